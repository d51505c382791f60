"""FineTune: trains a Program's weights on labelled data in a pass pipeline (after ChannelPrune,
before FoldBatchNorm, and as QAT after PotQuantize), lowers to ONNX, and refuses bad input
with clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import edgefx
from edgefx import PassError
from edgefx.frontend import capture
from edgefx.passes import PASSES, ChannelPrune, FineTune, FoldBatchNorm, PotQuantize
from edgefx.tools.cli import parse_pass


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def dataset(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes told apart by which colour channel is brightest: learnable in seconds."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, 3, 8, 8, generator=gen) * 0.5
    x[torch.arange(n), y] += 1.0
    return x, y


@pytest.fixture(scope="module")
def program() -> edgefx.Program:
    torch.manual_seed(0)
    return capture(Tiny().eval(), (dataset(2, 9)[0],))


@pytest.fixture(scope="module")
def loader() -> DataLoader:
    x, y = dataset()
    return DataLoader(
        TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def accuracy(program: edgefx.Program, seed: int = 1) -> float:
    x, y = dataset(96, seed)
    return float((program(x).argmax(1) == y).double().mean())


def test_fine_tune_lowers_the_loss_and_leaves_the_input_alone(program, loader):
    before = {k: v.clone() for k, v in program.graph_module.state_dict().items()}
    result = FineTune(loader, epochs=4, lr=1e-2)(program)
    report = result.report
    assert report["loss_after"] < 0.7 * report["loss_before"]
    assert report["batches_per_epoch"] == 6 and len(report["epoch_train_loss"]) == 4
    assert report["trainable"]["batchnorms"] == 2
    assert accuracy(result.program) > accuracy(program) + 0.2  # held-out samples
    assert result.program.graph_module.code == program.graph_module.code
    assert result.program.history[-1].startswith("FineTune(epochs=4")
    after = program.graph_module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_prune_finetune_fold_quantize_qat_pipeline_compiles_to_onnx(program, loader):
    calib = [dataset(32, 3)[0]]
    compiled = edgefx.compile(
        program,
        passes=[
            ChannelPrune(macs=0.5),
            FineTune(loader, epochs=2, lr=1e-2),
            FoldBatchNorm(),
            PotQuantize(calib, weight_bits=4, act_bits=8, search="mse"),
            FineTune(loader, epochs=1, lr=1e-3),
        ],
        backend="onnx",
        progress=False,
    )  # compile checks the ONNX model against the Program
    names = [r.name for r in compiled.report.passes]
    assert names == ["ChannelPrune", "FineTune", "FoldBatchNorm", "PotQuantize", "FineTune"]
    qat = compiled.report.passes[-1].report["trainable"]
    assert qat["quantized_weights"] > 0 and qat["batchnorms"] == 0
    x = dataset(5, 4)[0]
    assert torch.allclose(torch.as_tensor(compiled(x)), compiled.program(x), atol=1e-4)


def test_average_last_holds_the_mean_of_the_weights_after_each_step_of_the_last_epochs(program):
    batches = [(x[i : i + 16], y[i : i + 16]) for x, y in [dataset()] for i in range(0, 96, 16)]

    def train(average_last: int) -> tuple[dict, list[dict], dict]:
        module = program.trainable()
        seen: list[dict] = []  # the weights at every forward pass: after the step before it

        def record() -> torch.Tensor:
            seen.append({k: v.detach().clone() for k, v in module.named_parameters()})
            return torch.zeros(())

        torch.manual_seed(0)
        tune = FineTune(batches, epochs=3, lr=1e-2, average_last=average_last)
        report = tune.fit(module, program, extra_loss=record)
        weights = {k: v.detach().clone() for k, v in module.named_parameters()}
        return weights, seen, {"report": report, "buffers": dict(module.named_buffers())}

    last, _, plain = train(0)
    mean, seen, averaged = train(2)
    assert plain["report"]["averaged_steps"] == 0
    assert averaged["report"]["averaged_steps"] == 12  # 2 epochs of 6 batches
    # the same trajectory (averaging only watches it): the weights after steps 7..18
    after_steps = [*seen[7:18], last]
    assert len(after_steps) == 12
    for name, value in mean.items():
        expected = torch.stack([w[name] for w in after_steps]).mean(0)
        assert torch.allclose(value, expected, atol=1e-6), name
    assert any(not torch.allclose(mean[k], last[k], atol=1e-4) for k in mean)
    # BatchNorm running statistics are the last step's
    for name, value in plain["buffers"].items():
        assert torch.equal(averaged["buffers"][name], value), name


def test_average_last_through_the_pass(program, loader):
    result = FineTune(loader, epochs=3, lr=1e-2, average_last=1)(program)
    assert result.report["averaged_steps"] == 6
    assert result.report["loss_after"] < 0.7 * result.report["loss_before"]
    assert result.program.history[-1].endswith("average_last=1)")


def test_wrong_shape_data_is_refused(program):
    bad = [(torch.randn(4, 3, 9, 9), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(PassError, match=r"batch 0 does not fit .*size 8 at dim 2"):
        FineTune(bad)(program)


def test_a_batch_without_target_is_refused(program):
    with pytest.raises(PassError, match="needs 1 input"):
        FineTune([torch.randn(4, 3, 8, 8)])(program)


def test_non_scalar_loss_is_refused(program, loader):
    def per_sample(out, y):
        return nn.functional.cross_entropy(out, y, reduction="none")

    with pytest.raises(PassError, match="scalar"):
        FineTune(loader, loss=per_sample)(program)


def test_empty_loader_is_refused(program):
    empty = DataLoader(TensorDataset(torch.randn(0, 3, 8, 8), torch.zeros(0)), batch_size=4)
    with pytest.raises(PassError, match="no batches"):
        FineTune(empty)(program)


def test_program_without_trainable_parameters_is_refused():
    parameterless = capture(nn.Sequential(nn.ReLU(), nn.Flatten()), (torch.randn(2, 3, 4, 4),))
    with pytest.raises(PassError, match="no trainable parameters"):
        FineTune([(torch.randn(2, 3, 4, 4), torch.randn(2, 48))], loss="mse")(parameterless)


def test_diverging_training_is_stopped(program, loader):
    with pytest.raises(PassError, match="lower the learning rate"):
        FineTune(loader, lr=1e30, optimizer="sgd")(program)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"data": None}, "needs training data"),
        ({"data": torch.randn(4, 3, 8, 8)}, "DataLoader or a list"),
        ({"data": iter([(torch.randn(1), 1)])}, "one-shot iterator"),
        ({"data": [], "epochs": 0}, "epochs"),
        ({"data": [], "lr": -1}, "lr"),
        ({"data": [], "loss": "hinge"}, "loss must be"),
        ({"data": [], "optimizer": "lbfgs"}, "optimizer must be"),
        ({"data": [], "schedule": "step"}, "schedule"),
        ({"data": [], "epochs": 2, "average_last": 3}, "average_last"),
        ({"data": [], "average_last": -1}, "average_last"),
        ({"data": [], "average_last": True}, "average_last"),
    ],
)
def test_bad_configuration_is_refused_eagerly(kwargs, message):
    data = kwargs.pop("data")
    with pytest.raises(PassError, match=message):
        FineTune(data, **kwargs)


def test_registered_for_the_cli_which_cannot_give_it_data():
    assert PASSES["finetune"] is FineTune
    with pytest.raises(PassError, match="needs training data"):
        parse_pass("finetune:epochs=2")
