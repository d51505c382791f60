"""Shared models, inputs and session-scoped captured programs for the edgefx tests.

Capturing and lowering cost seconds each on 2 cores, so every Program or Compiled that several
tests read is built once here. Tests treat them as values: passes copy the graph before
rewriting, and no test may modify a shared fixture in place.

BatchNorm statistics and affine parameters are randomised in every model: with the default
initialisation (mean 0, var 1, gamma 1, beta 0) a BatchNorm is almost the identity and a wrong
fold would go unnoticed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import edgefx
from edgefx.frontend import capture
from edgefx.passes import DeadCodeElimination, FoldBatchNorm, PassManager


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                if module.running_mean is not None:
                    module.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                    module.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
                if module.affine:
                    module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    module.bias.copy_(torch.randn(c, generator=gen) * 0.3)
    return model


class SmallNet(nn.Module):
    """conv(bias) -> BN -> ReLU -> conv(no bias) -> BN -> ReLU -> dropout -> mean -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(x.mean((2, 3))))


# Hand-computed figures of SmallNet for a (1, 3, 8, 8) input.
SMALL_MACS = 8 * 8 * 8 * (3 * 9) + 8 * 8 * 8 * (8 * 9) + 4 * 8
SMALL_CONV_PARAMS = (8 * 3 * 9 + 8) + 8 * 8 * 9
SMALL_BN_PARAMS = 2 * 8 + 2 * 8
SMALL_FC_PARAMS = 8 * 4 + 4
SMALL_PARAMS = SMALL_CONV_PARAMS + SMALL_BN_PARAMS + SMALL_FC_PARAMS


class ModelSnapshot:
    """Every state tensor and training flag of a model, to prove edgefx left it alone."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.training = {name: m.training for name, m in model.named_modules()}
        self.requires_grad = {k: p.requires_grad for k, p in model.named_parameters()}

    def assert_unchanged(self) -> None:
        state = self.model.state_dict()
        assert state.keys() == self.state.keys()
        for key, before in self.state.items():
            after = state[key]
            assert after.dtype == before.dtype and after.shape == before.shape, key
            assert torch.equal(after, before), f"{key} was modified"
        assert {n: m.training for n, m in self.model.named_modules()} == self.training
        assert {k: p.requires_grad for k, p in self.model.named_parameters()} == self.requires_grad


def make_small_net(seed: int = 0, *, train: bool = False) -> SmallNet:
    torch.manual_seed(seed)
    model = randomize_batchnorm(SmallNet(), seed)
    return model.train(train)


def eager(model: nn.Module, *inputs: torch.Tensor):
    """The model's eval-mode outputs, computed on a copy so the model itself is untouched."""
    with torch.no_grad():
        return copy.deepcopy(model).eval()(*inputs)


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference|."""
    actual, reference = actual.detach().double(), reference.detach().double()
    return float((actual - reference).abs().max() / reference.abs().max())


# ----------------------------------------------------------------------------- plain helpers
@pytest.fixture(scope="session")
def helpers():
    """Helpers as a namespace fixture (tests do not import conftest)."""

    class Helpers:
        SmallNet = SmallNet
        ModelSnapshot = ModelSnapshot
        SMALL_MACS = SMALL_MACS
        SMALL_PARAMS = SMALL_PARAMS
        SMALL_BN_PARAMS = SMALL_BN_PARAMS
        randomize_batchnorm = staticmethod(randomize_batchnorm)
        make_small_net = staticmethod(make_small_net)
        eager = staticmethod(eager)
        rel_err = staticmethod(rel_err)

    return Helpers


@pytest.fixture(scope="session")
def x1() -> torch.Tensor:
    return torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def x4() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4))


# ----------------------------------------------------------------------------- small programs
@pytest.fixture(scope="session")
def small_net() -> SmallNet:
    """The eval-mode SmallNet every shared Program was captured from (do not modify)."""
    return make_small_net(0)


@pytest.fixture(scope="session")
def small_program(small_net, x1) -> edgefx.Program:
    return capture(small_net, (x1,))


@pytest.fixture(scope="session")
def small_folded(small_program):
    """(Program, [PassResult, PassResult]) after FoldBatchNorm then DeadCodeElimination."""
    return PassManager([FoldBatchNorm(), DeadCodeElimination()]).run(small_program)


@pytest.fixture(scope="session")
def small_onnx(small_net, x1) -> edgefx.Compiled:
    """SmallNet compiled with FoldBatchNorm + DCE to the ONNX backend (dynamic batch)."""
    return edgefx.compile(
        small_net, (x1,), passes=[FoldBatchNorm(), DeadCodeElimination()], backend="onnx"
    )


# ----------------------------------------------------------------------------- real models
@pytest.fixture(scope="session")
def resnet18():
    """(model, example input, captured Program) for torchvision resnet18 (random weights)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.resnet18(weights=None), 18).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(18))
    return model, x, capture(model, (x,))


@pytest.fixture(scope="session")
def resnet18_folded(resnet18):
    _, _, program = resnet18
    folded, (result,) = PassManager([FoldBatchNorm()]).run(program)
    return folded, result


@pytest.fixture(scope="session")
def resnet18_onnx(resnet18_folded) -> edgefx.Compiled:
    folded, _ = resnet18_folded
    return edgefx.compile(folded, backend="onnx")


@pytest.fixture(scope="session")
def mobilenet_v2():
    """(model, example input, captured Program) for torchvision mobilenet_v2 (random weights).

    Captured with a static batch: dynamic-batch capture of mobilenet_v2 takes ~3x longer and
    the fold tests do not need it (resnet18 covers the dynamic case)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.mobilenet_v2(weights=None), 2).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return model, x, capture(model, (x,), dynamic_batch=False)


@pytest.fixture(scope="session")
def mobilenet_v2_folded(mobilenet_v2):
    _, _, program = mobilenet_v2
    folded, (result,) = PassManager([FoldBatchNorm()]).run(program)
    return folded, result
