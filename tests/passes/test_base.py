"""Pass, PassResult, NumericError and PassManager: figures, checks, failures, dumps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from edgefx import EdgefxError, PassError
from edgefx.passes import (
    DeadCodeElimination,
    Figures,
    FoldBatchNorm,
    NumericError,
    Pass,
    PassManager,
    PassResult,
    check_passes,
)
from edgefx.program import Program

aten = torch.ops.aten


# ----------------------------------------------------------------------------- test passes
def _param(gm: torch.fx.GraphModule, target: str) -> torch.nn.Parameter:
    return gm.get_parameter(target)


class Identity(Pass):
    """Rewrites nothing."""

    name = "Identity"

    def run(self, program):
        return program.with_graph(program.copy_graph(), repr(self)), {"note": "nothing"}


class ShiftBias(Pass):
    """Adds ``delta`` to the final linear bias: every output moves by exactly ``delta``."""

    name = "ShiftBias"

    def __init__(self, delta: float) -> None:
        self.delta = delta

    def run(self, program):
        gm = program.copy_graph()
        with torch.no_grad():
            _param(gm, "fc.bias").add_(self.delta)
        return program.with_graph(gm, repr(self)), {"shifted": "fc.bias"}


class WrongButExact(Pass):
    """Claims exactness but scales a weight."""

    name = "WrongButExact"
    exact = True

    def run(self, program):
        gm = program.copy_graph()
        with torch.no_grad():
            _param(gm, "conv1.weight").mul_(1.5)
        return program.with_graph(gm, repr(self)), {}


class Explodes(Pass):
    """Rewrites its copy, then raises a plain exception."""

    name = "Explodes"

    def run(self, program):
        gm = program.copy_graph()
        with torch.no_grad():
            _param(gm, "conv1.weight").zero_()
        raise ValueError("kaboom")


class RefusesGraph(Pass):
    name = "RefusesGraph"

    def run(self, program):
        raise PassError("cannot handle this graph", node="conv2d", hint="try another model")


class UseBeforeDefinition(Pass):
    """Makes the first relu read a node defined after it."""

    name = "UseBeforeDefinition"

    def run(self, program):
        gm = program.copy_graph()
        relu = next(iter(gm.graph.find_nodes(op="call_function", target=aten.relu.default)))
        linear = next(iter(gm.graph.find_nodes(op="call_function", target=aten.linear.default)))
        relu.args = (linear,)
        return program.with_graph(gm, repr(self)), {}


class DeletesAttribute(Pass):
    """Deletes a weight the graph still reads."""

    name = "DeletesAttribute"

    def run(self, program):
        gm = program.copy_graph()
        delattr(gm.get_submodule("fc"), "bias")
        return program.with_graph(gm, repr(self)), {}


class WrongWeightShape(Pass):
    """Swaps a conv weight for one of another shape: the graph no longer runs."""

    name = "WrongWeightShape"

    def run(self, program):
        gm = program.copy_graph()
        gm.get_submodule("conv2").weight = nn.Parameter(
            torch.randn(8, 5, 3, 3), requires_grad=False
        )
        return program.with_graph(gm, repr(self)), {}


class ChangesOutputShape(Pass):
    """Replaces the classifier by one with more outputs."""

    name = "ChangesOutputShape"

    def run(self, program):
        gm = program.copy_graph()
        fc = gm.get_submodule("fc")
        fc.weight = nn.Parameter(torch.randn(6, 8), requires_grad=False)
        fc.bias = nn.Parameter(torch.randn(6), requires_grad=False)
        return program.with_graph(gm, repr(self)), {}


class FixesTheBatch(Pass):
    """Inserts view(x, [1, -1]) before the classifier: runs at batch 1, cannot re-export with a
    dynamic batch."""

    name = "FixesTheBatch"

    def run(self, program):
        gm = program.copy_graph()
        linear = next(iter(gm.graph.find_nodes(op="call_function", target=aten.linear.default)))
        with gm.graph.inserting_before(linear):
            view = gm.graph.call_function(aten.view.default, (linear.args[0], [1, -1]))
        linear.replace_input_with(linear.args[0], view)
        gm.recompile()
        return program.with_graph(gm, repr(self)), {}


def assert_same_program(program: Program, code: str, outputs: list[torch.Tensor]) -> None:
    assert program.graph_module.code == code
    for got, want in zip(program.run_flat(), outputs, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.fixture
def pristine(small_program):
    """The shared small Program with its code and outputs, to check it is left unchanged."""
    return (
        small_program,
        small_program.graph_module.code,
        [t.clone() for t in small_program.run_flat()],
    )


# ----------------------------------------------------------------------------- figures
def test_fold_figures_before_and_after(small_folded, helpers):
    _, (fold, dce) = small_folded
    assert isinstance(fold, PassResult) and fold.name == "FoldBatchNorm"
    assert fold.before == Figures(macs=helpers.SMALL_MACS, params=helpers.SMALL_PARAMS, nodes=10)
    # conv1 keeps its bias; conv2 had none and gains one of 8; BN affine params (2 x 16) go
    assert fold.after == Figures(
        macs=helpers.SMALL_MACS, params=helpers.SMALL_PARAMS - helpers.SMALL_BN_PARAMS + 8, nodes=6
    )
    assert fold.changed and fold.exact
    assert fold.error.relative <= 1e-6 and fold.error.snr_db > 100
    assert fold.wall_s > 0
    assert fold.report["folded"] == 2
    assert dce.before == fold.after == dce.after


def test_figures_of_program(small_program, helpers):
    figures = Figures.of(small_program)
    assert figures == Figures(helpers.SMALL_MACS, helpers.SMALL_PARAMS, 10)


def test_pass_result_to_dict_is_json(small_folded):
    _, (fold, dce) = small_folded
    data = json.loads(json.dumps(fold.to_dict()))
    assert data["pass"] == "FoldBatchNorm" and data["changed"] is True and data["exact"] is True
    assert set(data["before"]) == set(data["after"]) == {"macs", "params", "nodes"}
    assert set(data["error"]) == {"max_abs", "relative", "snr_db", "nonfinite"}
    assert data["report"]["folded"] == 2
    assert data["wall_s"] >= 0
    assert dce.to_dict()["error"]["snr_db"] == "inf"  # identical outputs; JSON has no inf


def test_lossy_pass_measures_its_error(small_program):
    delta = 0.25
    result = ShiftBias(delta)(small_program)
    assert result.changed and not result.exact
    (reference,) = small_program.run_flat()
    ref = reference.double()
    assert result.error.max_abs == pytest.approx(delta, rel=1e-5)
    assert result.error.relative == pytest.approx(delta / float(ref.abs().max()), rel=1e-5)
    expected_snr = 10 * math.log10(float((ref**2).sum()) / (ref.numel() * delta**2))
    assert result.error.snr_db == pytest.approx(expected_snr, abs=1e-3)
    assert result.before == result.after  # same MACs, params, nodes
    assert result.report == {"shifted": "fc.bias"}
    assert result.program.history == ("ShiftBias(delta=0.25)",)


def test_lossy_pass_is_accepted_by_the_manager(small_program):
    program, (result,) = PassManager([ShiftBias(0.5)]).run(small_program)
    assert result.error.max_abs == pytest.approx(0.5, rel=1e-5)
    torch.testing.assert_close(program.run_flat()[0], small_program.run_flat()[0] + 0.5)


def test_no_op_pass_is_not_changed(small_program):
    result = Identity()(small_program)
    assert not result.changed
    assert result.error == NumericError(0.0, 0.0, math.inf)
    assert result.before == result.after
    assert result.report == {"note": "nothing"}


def test_no_op_pass_through_the_manager(small_folded):
    folded, _ = small_folded
    program, (result,) = PassManager([DeadCodeElimination()]).run(folded)
    assert not result.changed
    assert result.report == {"removed_nodes": 0, "removed_attributes": []}
    assert program.graph_module.code == folded.graph_module.code


def test_pass_repr_shows_its_arguments():
    assert repr(ShiftBias(0.5)) == "ShiftBias(delta=0.5)"
    assert repr(FoldBatchNorm()) == "FoldBatchNorm()"


# ----------------------------------------------------------------------------- numeric error
def test_numeric_error_between():
    ref = [torch.tensor([3.0, -4.0]), torch.tensor([[0.0]])]
    out = [torch.tensor([3.0, -3.0]), torch.tensor([[0.0]])]
    error = NumericError.between(ref, out)
    assert error.max_abs == 1.0
    assert error.relative == pytest.approx(0.25)
    assert error.snr_db == pytest.approx(10 * math.log10(25.0 / 1.0))
    identical = NumericError.between(ref, [t.clone() for t in ref])
    assert identical == NumericError(0.0, 0.0, math.inf)


def test_numeric_error_refuses_changed_outputs():
    with pytest.raises(EdgefxError, match="output count"):
        NumericError.between([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)])
    with pytest.raises(EdgefxError, match="output shape"):
        NumericError.between([torch.zeros(2)], [torch.zeros(3)])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_numeric_error_refuses_non_finite_values(bad):
    ref = [torch.tensor([3.0, -4.0])]
    with pytest.raises(EdgefxError, match="the result is not finite where the reference is"):
        NumericError.between(ref, [torch.tensor([3.0, bad])])
    with pytest.raises(EdgefxError, match="the reference is not finite where the result is"):
        NumericError.between([torch.tensor([3.0, bad])], ref)


def test_numeric_error_leaves_out_values_non_finite_on_both_sides_alike():
    ref = [torch.tensor([3.0, float("nan"), float("inf"), -4.0])]
    out = [torch.tensor([3.0, float("nan"), float("inf"), -3.0])]
    error = NumericError.between(ref, out)
    assert (error.max_abs, error.relative, error.nonfinite) == (1.0, 0.25, 2)
    with pytest.raises(EdgefxError, match="not finite"):  # +inf against -inf is no match
        NumericError.between(ref, [torch.tensor([3.0, float("nan"), -float("inf"), -4.0])])
    with pytest.raises(EdgefxError, match="nothing finite to compare"):
        NumericError.between([torch.full((2,), float("nan"))], [torch.full((2,), float("nan"))])


class PoisonsTheOutput(Pass):
    """A lossy pass that multiplies the output by NaN or Inf."""

    name = "PoisonsTheOutput"

    def __init__(self, value: float) -> None:
        self.value = value

    def run(self, program):
        gm = program.copy_graph()
        with torch.no_grad():
            _param(gm, "fc.bias").fill_(self.value)
        return program.with_graph(gm, repr(self)), {}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_pass_that_makes_outputs_non_finite_is_refused_by_name(small_program, value):
    with pytest.raises(PassError, match="the Program PoisonsTheOutput produced is not finite"):
        PassManager([PoisonsTheOutput(value)]).run(small_program)


# ----------------------------------------------------------------------------- failures
def test_exact_pass_that_changes_outputs_is_refused(pristine):
    program, code, outputs = pristine
    with pytest.raises(PassError) as info:
        PassManager([WrongButExact()]).run(program)
    text = str(info.value)
    assert "WrongButExact" in text and "exact" in text and "tolerance" in text
    assert len(text.splitlines()) <= 6
    assert_same_program(program, code, outputs)


def test_exact_pass_within_tolerance_is_accepted(small_program):
    class TinyChange(WrongButExact):
        name = "TinyChange"
        tolerance = 1e-3

        def run(self, program):
            gm = program.copy_graph()
            with torch.no_grad():
                _param(gm, "fc.bias").add_(1e-6)
            return program.with_graph(gm, repr(self)), {}

    _, (result,) = PassManager([TinyChange()]).run(small_program)
    assert 0 < result.error.relative <= 1e-3


def test_plain_exception_in_run_becomes_pass_error(pristine):
    program, code, outputs = pristine
    with pytest.raises(PassError) as info:
        PassManager([Explodes()]).run(program)
    error = info.value
    assert (
        "Explodes" in error.message and "ValueError" in error.message and "kaboom" in error.message
    )
    assert "unchanged" in error.hint
    assert isinstance(error.__cause__, ValueError)
    assert_same_program(program, code, outputs)


def test_edgefx_error_in_run_passes_through(pristine):
    program, code, outputs = pristine
    with pytest.raises(PassError, match="cannot handle this graph") as info:
        RefusesGraph()(program)
    assert info.value.node == "conv2d"
    assert_same_program(program, code, outputs)


@pytest.mark.parametrize(
    ("bad_pass", "words"),
    [
        (UseBeforeDefinition(), ["UseBeforeDefinition", "invalid graph"]),
        (DeletesAttribute(), ["DeletesAttribute", "invalid graph"]),
        (ChangesOutputShape(), ["output shape", "(1, 4) -> (1, 6)"]),
        (FixesTheBatch(), ["FixesTheBatch", "re-trace"]),
    ],
    ids=["use-before-def", "missing-attribute", "output-shape", "not-exportable"],
)
def test_pass_that_breaks_the_graph_is_caught(pristine, bad_pass, words):
    program, code, outputs = pristine
    with pytest.raises(PassError) as info:
        PassManager([bad_pass]).run(program)
    for word in words:
        assert word in str(info.value)
    assert_same_program(program, code, outputs)


def test_pass_whose_graph_no_longer_runs_raises_pass_error(pristine):
    program, code, outputs = pristine
    with pytest.raises(EdgefxError) as info:
        PassManager([WrongWeightShape()]).run(program)
    assert_same_program(program, code, outputs)
    assert isinstance(info.value, PassError)
    assert "WrongWeightShape" in str(info.value)
    assert "Traceback" not in str(info.value) and "traceback" not in str(info.value)


def test_pass_refuses_something_that_is_not_a_program(small_net):
    with pytest.raises(PassError, match="expects a Program") as info:
        FoldBatchNorm()(small_net)
    assert "capture" in info.value.hint


# ----------------------------------------------------------------------------- check_passes
def test_check_passes_accepts_passes():
    fold, dce = FoldBatchNorm(), DeadCodeElimination()
    assert check_passes([fold, dce]) == [fold, dce]
    assert check_passes((fold,)) == [fold]
    assert check_passes(fold) == [fold]
    assert check_passes(None) == []
    assert check_passes([]) == []


@pytest.mark.parametrize(
    ("passes", "words"),
    [
        ("fold-bn", ["list of Pass", "str"]),
        ([FoldBatchNorm], ["passes[0]", "class FoldBatchNorm", "instance"]),
        ([FoldBatchNorm(), "dce"], ["passes[1]", "str", "not an edgefx Pass"]),
        ([lambda program: program], ["passes[0]", "function"]),
        ({"fold": FoldBatchNorm()}, ["list of Pass", "dict"]),
    ],
    ids=["string", "class", "string-in-list", "function", "dict"],
)
def test_check_passes_refuses_non_passes(passes, words):
    with pytest.raises(PassError) as info:
        check_passes(passes)
    for word in words:
        assert word in str(info.value)
    assert info.value.hint


def test_pass_manager_validates_eagerly():
    with pytest.raises(PassError, match="instance") as info:
        PassManager([DeadCodeElimination])
    assert "DeadCodeElimination()" in info.value.hint


def test_pass_must_implement_run():
    class NoRun(Pass):
        name = "NoRun"

    with pytest.raises(TypeError):
        NoRun()


# ----------------------------------------------------------------------------- manager
def test_manager_chains_passes_and_history(small_folded, small_program, x4):
    program, results = small_folded
    assert [r.name for r in results] == ["FoldBatchNorm", "DeadCodeElimination"]
    assert program.history == ("FoldBatchNorm()", "DeadCodeElimination()")
    assert results[1].program is program
    assert small_program.history == ()
    torch.testing.assert_close(program(x4), small_program(x4), rtol=1e-5, atol=1e-6)


def test_manager_refreshes_changed_programs(small_folded):
    """After a changing pass every node has a symbolic shape again (re-exported)."""
    program, _ = small_folded
    for node in program.graph_module.graph.nodes:
        if node.op in ("placeholder", "call_function"):
            assert isinstance(node.meta.get("val"), torch.Tensor), node.name
    assert program.input_specs[0].shape[0] == "batch"


def test_manager_with_no_passes_returns_the_program(small_program):
    program, results = PassManager([]).run(small_program)
    assert program is small_program and results == []


def test_dump_dir_writes_readable_graph_after_each_pass(small_program, tmp_path):
    dump = tmp_path / "dump"
    _, results = PassManager([FoldBatchNorm(), ShiftBias(0.1)], dump_dir=dump).run(small_program)
    assert sorted(p.name for p in dump.iterdir()) == [
        "00-captured.py",
        "01-FoldBatchNorm.json",
        "01-FoldBatchNorm.py",
        "02-ShiftBias.json",
        "02-ShiftBias.py",
    ]
    captured = (dump / "00-captured.py").read_text()
    folded = (dump / "01-FoldBatchNorm.py").read_text()
    assert "def forward" in captured and "def forward" in folded
    assert "_native_batch_norm_legit_no_training" in captured
    assert "_native_batch_norm_legit_no_training" not in folded
    assert "aten.conv2d" in folded
    assert json.loads((dump / "01-FoldBatchNorm.json").read_text()) == json.loads(
        json.dumps(results[0].to_dict())
    )
    assert json.loads((dump / "02-ShiftBias.json").read_text())["report"] == {"shifted": "fc.bias"}


def test_dump_dir_sanitises_pass_names(small_program, tmp_path):
    class Odd(Identity):
        name = "odd name/with:chars"

    PassManager([Odd()], dump_dir=tmp_path).run(small_program)
    assert (tmp_path / "01-odd_name_with_chars.py").is_file()
