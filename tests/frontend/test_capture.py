"""capture(): model -> Program with torch.export; dynamic batch, specs, refusals, no mutation."""

from __future__ import annotations

import inspect
import threading

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from edgefx import CaptureError, InputError
from edgefx.frontend import capture, normalize_inputs

MAX_ERROR_LINES = 10


def assert_short(error: BaseException) -> None:
    text = str(error)
    assert len(text.splitlines()) <= MAX_ERROR_LINES, text
    assert "Traceback" not in text and 'File "' not in text, text


def line_of(func, text: str) -> int:
    """The line number of the first source line of ``func`` containing ``text``."""
    lines, start = inspect.getsourcelines(func)
    return start + next(i for i, line in enumerate(lines) if text in line)


# ----------------------------------------------------------------------------- models
class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent branch
            return x * 2
        return x


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(x))


class HardCodedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 2 * 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(1, -1))  # batch hard-coded


class HardCodedReshape(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, 3, 2, 2) * 2  # batch hard-coded


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(5, 4)

    def forward(self, image: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return self.conv(image).mean((2, 3)) + self.fc(vector)


class NestedOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor):
        y = self.fc(x)
        return {"logits": y, "extra": (y.relu(), y * 3)}


class Uncopyable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.lock = threading.Lock()  # deepcopy cannot copy a lock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


# ----------------------------------------------------------------------------- dynamic batch
def test_batch_dim_is_dynamic_by_default(small_net, small_program, helpers, x1, x4):
    (spec,) = small_program.input_specs
    assert spec.shape == ("batch", 3, 8, 8)
    assert small_program.output_specs[0].shape == ("batch", 4)
    assert small_program.dynamic_batch
    # captured from a batch of 1, run at 4: the eager model's numbers
    torch.testing.assert_close(
        small_program(x4), helpers.eager(small_net, x4), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        small_program(x1), helpers.eager(small_net, x1), rtol=1e-5, atol=1e-6
    )


def test_example_inputs_are_kept_as_given(small_program, x1):
    """torch.export needs a batch of 2 to trace a dynamic batch; the Program keeps the user's 1."""
    (example,) = small_program.example_inputs
    assert example.shape == x1.shape
    assert torch.equal(example, x1)


def test_static_batch_gives_static_specs(helpers, x1, x4):
    model = helpers.make_small_net(3)
    program = capture(model, (x1,), dynamic_batch=False)
    assert program.input_specs[0].shape == (1, 3, 8, 8)
    assert program.output_specs[0].shape == (1, 4)
    assert not program.dynamic_batch
    torch.testing.assert_close(program(x1), helpers.eager(model, x1), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="dim 0"):
        program(x4)


def test_multiple_inputs_share_the_batch(helpers):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    inputs = (torch.randn(1, 3, 4, 4), torch.randn(1, 5))
    program = capture(model, inputs)
    assert [s.name for s in program.input_specs] == ["image", "vector"]
    assert [s.shape for s in program.input_specs] == [("batch", 3, 4, 4), ("batch", 5)]
    batch3 = (torch.randn(3, 3, 4, 4), torch.randn(3, 5))
    torch.testing.assert_close(
        program(*batch3), helpers.eager(model, *batch3), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(InputError, match="batch"):
        program(torch.randn(3, 3, 4, 4), torch.randn(2, 5))


def test_nested_outputs_keep_their_structure(helpers):
    torch.manual_seed(0)
    model = NestedOutputs().eval()
    x = torch.randn(2, 5)
    program = capture(model, (x,))
    out, ref = program(x), helpers.eager(model, x)
    assert pytree.tree_structure(out) == pytree.tree_structure(ref)
    assert list(out) == ["logits", "extra"] and isinstance(out["extra"], tuple)
    for got, want in zip(pytree.tree_leaves(out), pytree.tree_leaves(ref), strict=True):
        torch.testing.assert_close(got, want)
    assert [s.shape for s in program.output_specs] == [("batch", 4)] * 3


def test_a_bare_tensor_is_accepted_as_example_inputs(small_net, x1):
    program = capture(small_net, x1)
    assert len(program.input_specs) == 1 and program.input_specs[0].shape[0] == "batch"


def test_name_defaults_to_the_class_name(small_program, small_net, x1):
    assert small_program.name == "SmallNet"
    assert capture(small_net, (x1,), name="tiny", dynamic_batch=False).name == "tiny"


# ----------------------------------------------------------------------------- no mutation
def test_a_training_model_is_captured_in_eval_mode_on_a_copy(helpers, x1, x4):
    model = helpers.make_small_net(5, train=True)
    snapshot = helpers.ModelSnapshot(model)
    program = capture(model, (x1,))
    snapshot.assert_unchanged()
    assert model.training and model.bn1.training and model.drop.training
    # eval semantics: running statistics, dropout off, deterministic
    expected = helpers.eager(model, x4)
    torch.testing.assert_close(program(x4), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(program(x4), program(x4), rtol=0, atol=0)
    snapshot.assert_unchanged()


def test_the_program_does_not_share_weights_with_the_model(helpers, x1):
    model = helpers.make_small_net(6)
    program = capture(model, (x1,))
    before = program(x1)
    with torch.no_grad():
        model.conv1.weight.add_(1.0)
        model.bn1.running_mean.add_(1.0)
    torch.testing.assert_close(program(x1), before, rtol=0, atol=0)


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("example", "words"),
    [
        ([1, 2], ["int", "tensor"]),
        ({"x": torch.randn(1, 3, 8, 8)}, ["dict"]),
        (None, ["NoneType"]),
        ("image.png", ["str"]),
        ((), ["non-empty"]),
        ((torch.randn(1, 3, 8, 8), 3.0), ["example input 1", "float"]),
    ],
    ids=["list-of-ints", "dict", "none", "string", "empty", "tensor-and-float"],
)
def test_wrong_example_input_types_raise_input_error(small_net, helpers, example, words):
    snapshot = helpers.ModelSnapshot(small_net)
    with pytest.raises(InputError) as info:
        capture(small_net, example)
    for word in words:
        assert word in str(info.value)
    assert info.value.hint
    assert_short(info.value)
    snapshot.assert_unchanged()


def test_scalar_input_with_dynamic_batch_is_refused():
    model = nn.Identity()
    with pytest.raises(InputError) as info:
        capture(model, (torch.tensor(3.0),))
    assert "scalar" in info.value.message
    assert "dynamic_batch=False" in info.value.hint
    assert_short(info.value)


def test_scalar_input_with_static_batch_is_captured():
    program = capture(nn.Identity(), (torch.tensor(3.0),), dynamic_batch=False)
    assert program.input_specs[0].shape == ()


def test_mismatched_batch_sizes_are_refused(helpers):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    snapshot = helpers.ModelSnapshot(model)
    with pytest.raises(InputError) as info:
        capture(model, (torch.randn(1, 3, 4, 4), torch.randn(2, 5)))
    assert "batch" in info.value.message
    assert "(1, 3, 4, 4)" in info.value.message and "(2, 5)" in info.value.message
    assert "dynamic_batch=False" in info.value.hint
    assert_short(info.value)
    snapshot.assert_unchanged()


def test_mismatched_batch_sizes_are_fine_with_a_static_batch():
    torch.manual_seed(0)
    model = nn.Bilinear(3, 5, 2).eval()
    program = capture(model, (torch.randn(2, 3), torch.randn(2, 5)), dynamic_batch=False)
    assert [s.shape for s in program.input_specs] == [(2, 3), (2, 5)]


@pytest.mark.parametrize("model", ["a string", None, torch.randn(3)], ids=["str", "none", "tensor"])
def test_a_non_module_is_refused(model):
    with pytest.raises(InputError, match=r"torch\.nn\.Module"):
        capture(model, (torch.randn(1, 3),))


def test_normalize_inputs_detaches_and_tuples():
    x = torch.randn(2, 3, requires_grad=True)
    (out,) = normalize_inputs(x, dynamic_batch=True)
    assert not out.requires_grad and torch.equal(out, x)


# ----------------------------------------------------------------------------- capture failures
def test_data_dependent_control_flow_names_module_line_and_hint(helpers):
    torch.manual_seed(0)
    model = DataDependent().train()
    snapshot = helpers.ModelSnapshot(model)
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(1, 3, 4, 4),))
    error = info.value
    text = str(error)
    assert "DataDependent" in text
    assert error.module is not None and error.module.startswith("gate") and "Gate" in error.module
    assert f"{__file__}:{line_of(Gate.forward, 'if x.sum() > 0')}" in text
    assert "torch.where" in error.hint or "torch.cond" in error.hint
    assert error.__cause__ is None  # torch's long chain is not attached to the printed error
    assert_short(error)
    snapshot.assert_unchanged()
    assert model.training


def test_hard_coded_batch_is_refused_naming_the_line(helpers):
    model = HardCodedBatch().eval()
    snapshot = helpers.ModelSnapshot(model)
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(1, 3, 2, 2),))
    assert f"{__file__}:{line_of(HardCodedBatch.forward, 'x.view(1, -1)')}" in str(info.value)
    assert_short(info.value)
    snapshot.assert_unchanged()


@pytest.mark.parametrize("model_cls", [HardCodedBatch, HardCodedReshape])
def test_hard_coded_batch_hints_at_static_batch(model_cls):
    with pytest.raises(CaptureError) as info:
        capture(model_cls().eval(), (torch.randn(1, 3, 2, 2),))
    assert "dynamic_batch=False" in info.value.hint


@pytest.mark.parametrize("model_cls", [HardCodedBatch, HardCodedReshape])
def test_hard_coded_batch_captures_with_static_batch(model_cls, helpers):
    model = model_cls().eval()
    x = torch.randn(1, 3, 2, 2)
    program = capture(model, (x,), dynamic_batch=False)
    torch.testing.assert_close(program(x), helpers.eager(model, x))


def test_uncopyable_model_is_refused():
    model = Uncopyable()
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(1, 3),))
    assert "copy" in info.value.message
    assert "deep-copyable" in info.value.hint
    assert_short(info.value)


class Noisy(nn.Module):
    """Random in eval mode: the captured graph cannot reproduce the eager numbers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.randn_like(x)


def test_graph_that_disagrees_with_eager_is_refused():
    with pytest.raises(CaptureError) as info:
        capture(Noisy(), (torch.randn(2, 8),))
    assert "disagrees with the eager model" in info.value.message
    assert_short(info.value)


class NanWhenExported(nn.Module):
    """Finite in eager mode, NaN in the graph torch.export captures."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            return x * float("nan")
        return x * 2


def test_a_captured_graph_that_outputs_nan_is_refused(x1):
    with pytest.raises(CaptureError, match=r"captured graph of .* is not finite where the eager"):
        capture(NanWhenExported(), (x1,))
