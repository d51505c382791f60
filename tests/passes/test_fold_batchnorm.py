"""FoldBatchNorm: exact on real and hand-written models; reports what it folded and skipped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgefx.frontend import capture
from edgefx.passes import FoldBatchNorm, PassManager
from edgefx.passes.rewrite import attr_tensor, module_path

aten = torch.ops.aten
TIGHT = 1e-5  # relative to the output scale; observed ~1e-6 on resnet18 / mobilenet_v2


def bn_nodes(program) -> list[torch.fx.Node]:
    return [
        n
        for n in program.graph_module.graph.nodes
        if n.op == "call_function" and "batch_norm" in str(n.target)
    ]


def bn_params(model: nn.Module, names: list[str]) -> int:
    return sum(p.numel() for name in names for p in model.get_submodule(name).parameters())


def assert_same_outputs(folded, original, *inputs, tol=TIGHT):
    for got, want in zip(folded.run_flat(inputs), original.run_flat(inputs), strict=True):
        err = float((got.double() - want.double()).abs().max() / want.double().abs().max())
        assert err <= tol, f"relative error {err:.3g}"


# ----------------------------------------------------------------------------- real models
def test_resnet18_fold_is_exact(resnet18, resnet18_folded, helpers):
    model, x, program = resnet18
    folded, result = resnet18_folded
    assert result.exact and result.changed
    assert result.error.relative <= TIGHT
    x3 = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(3))
    assert_same_outputs(folded, program, x)
    assert_same_outputs(folded, program, x3)
    assert helpers.rel_err(folded(x3), helpers.eager(model, x3)) <= TIGHT


def test_resnet18_has_no_batchnorm_left(resnet18, resnet18_folded):
    _, _, program = resnet18
    folded, result = resnet18_folded
    assert len(bn_nodes(program)) == 20
    assert bn_nodes(folded) == []
    assert result.report["folded"] == 20 and result.report["skipped"] == []
    pairs = result.report["pairs"]
    assert {"bn": "bn1", "conv": "conv1"} in pairs
    assert {"bn": "layer1.0.bn2", "conv": "layer1.0.conv2"} in pairs
    assert {"bn": "layer2.0.downsample.1", "conv": "layer2.0.downsample.0"} in pairs
    assert len({p["bn"] for p in pairs}) == 20


def test_resnet18_params_drop_by_the_batchnorm_params(resnet18, resnet18_folded):
    model, _, _ = resnet18
    _, result = resnet18_folded
    folded_bns = [p["bn"] for p in result.report["pairs"]]
    # every resnet conv is bias-free: folding gives each a bias of C_out
    new_biases = sum(model.get_submodule(p["conv"]).out_channels for p in result.report["pairs"])
    assert result.before.params == sum(p.numel() for p in model.parameters())
    assert result.before.params - result.after.params == bn_params(model, folded_bns) - new_biases
    assert result.after.macs == result.before.macs
    assert result.after.nodes == result.before.nodes - 2 * 20  # each BN and its getitem


def test_mobilenet_v2_fold_is_exact(mobilenet_v2, mobilenet_v2_folded, helpers):
    model, x, program = mobilenet_v2
    folded, result = mobilenet_v2_folded
    assert result.exact and result.error.relative <= TIGHT
    assert_same_outputs(folded, program, x)
    x_other = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    assert_same_outputs(folded, program, x_other)
    assert helpers.rel_err(folded(x_other), helpers.eager(model, x_other)) <= TIGHT


def test_mobilenet_v2_has_no_batchnorm_left(mobilenet_v2, mobilenet_v2_folded):
    model, _, program = mobilenet_v2
    folded, result = mobilenet_v2_folded
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(bn_nodes(program)) == n_bn == 52
    assert bn_nodes(folded) == []
    assert result.report["folded"] == 52 and result.report["skipped"] == []
    assert {"bn": "features.0.1", "conv": "features.0.0"} in result.report["pairs"]
    folded_bns = [p["bn"] for p in result.report["pairs"]]
    new_biases = sum(model.get_submodule(p["conv"]).out_channels for p in result.report["pairs"])
    assert result.before.params - result.after.params == bn_params(model, folded_bns) - new_biases


# ----------------------------------------------------------------------------- small models
class ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


CASES = {
    "conv-with-bias": (lambda: ConvBN(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)), (3, 6, 6)),
    "conv-without-bias": (
        lambda: ConvBN(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6)),
        (3, 6, 6),
    ),
    "bn-without-affine": (
        lambda: ConvBN(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6, affine=False)),
        (3, 5, 5),
    ),
    "conv1d-bn1d": (lambda: ConvBN(nn.Conv1d(3, 5, 3, padding=1), nn.BatchNorm1d(5)), (3, 16)),
    "conv3d-bn3d": (
        lambda: ConvBN(nn.Conv3d(2, 4, 3, bias=False), nn.BatchNorm3d(4)),
        (2, 4, 4, 4),
    ),
    "grouped-strided-dilated": (
        lambda: ConvBN(
            nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
            nn.BatchNorm2d(8),
        ),
        (4, 9, 9),
    ),
    "depthwise": (
        lambda: ConvBN(nn.Conv2d(6, 6, 3, groups=6), nn.BatchNorm2d(6, eps=1e-3)),
        (6, 5, 5),
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def folded_case(request, helpers):
    factory, shape = CASES[request.param]
    torch.manual_seed(0)
    model = helpers.randomize_batchnorm(factory(), 11).eval()
    x = torch.randn(1, *shape)
    program = capture(model, (x,))
    code = program.graph_module.code
    folded, (result,) = PassManager([FoldBatchNorm()]).run(program)
    return model, x, program, code, folded, result


def test_fold_is_exact(folded_case, helpers):
    model, x, program, _, folded, result = folded_case
    x3 = torch.randn(3, *x.shape[1:])
    assert_same_outputs(folded, program, x)
    assert_same_outputs(folded, program, x3)
    assert helpers.rel_err(folded(x3), helpers.eager(model, x3)) <= TIGHT
    assert result.error.relative <= TIGHT


def test_fold_removes_the_batchnorm(folded_case):
    _, _, program, _, folded, result = folded_case
    assert len(bn_nodes(program)) == 1
    assert bn_nodes(folded) == []
    assert result.report["folded"] == 1
    assert result.report["pairs"] == [{"bn": "bn", "conv": "conv"}]
    assert result.report["skipped"] == []


def test_fold_writes_the_folded_weights(folded_case):
    """The new conv weight and bias are W * s and (b - mean) * s + beta, s = gamma/sqrt(var+eps)."""
    model, _, _, _, folded, _ = folded_case
    conv, bn = model.conv, model.bn
    gamma = bn.weight if bn.affine else torch.ones(bn.num_features)
    beta = bn.bias if bn.affine else torch.zeros(bn.num_features)
    scale = gamma.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels).double()
    want_w = conv.weight.double() * scale.reshape(-1, *[1] * (conv.weight.dim() - 1))
    want_b = (bias - bn.running_mean.double()) * scale + beta.double()
    gm = folded.graph_module
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert module_path(node) == "conv"
    torch.testing.assert_close(attr_tensor(gm, node.args[1]).double(), want_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(attr_tensor(gm, node.args[2]).double(), want_b, rtol=1e-6, atol=1e-7)


def test_fold_params_drop_by_the_batchnorm_params(folded_case):
    model, _, _, _, _, result = folded_case
    added_bias = model.conv.out_channels if model.conv.bias is None else 0
    dropped = sum(p.numel() for p in model.bn.parameters()) - added_bias
    assert result.before.params == sum(p.numel() for p in model.parameters())
    assert result.before.params - result.after.params == dropped


def test_fold_leaves_the_input_program_alone(folded_case):
    _, _, program, code, _, _ = folded_case
    assert program.graph_module.code == code
    assert len(bn_nodes(program)) == 1
    assert program.history == ()


# ----------------------------------------------------------------------------- skipped
class BNAfterAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x) + self.b(x))


class ConvTwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class LinearBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x.mean((2, 3))))


class TransposedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 2, stride=2)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.up(x))


class MixedSkipAndFold(nn.Module):
    """One foldable pair, one BN after an add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.post = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.post(y + 1.0)


@pytest.mark.parametrize(
    ("model_cls", "reason_words"),
    [
        (BNAfterAdd, ["add", "not a convolution"]),
        (ConvTwoUsers, ["other users"]),
        (LinearBN, ["linear", "not a convolution"]),
        (TransposedBN, ["conv_transpose"]),
    ],
    ids=["after-add", "conv-two-users", "after-linear", "after-transposed-conv"],
)
def test_unfoldable_batchnorm_is_reported_and_kept(model_cls, reason_words, helpers):
    torch.manual_seed(0)
    model = helpers.randomize_batchnorm(model_cls(), 3).eval()
    x = torch.randn(1, 3, 4, 4)
    program = capture(model, (x,))
    result = FoldBatchNorm()(program)
    assert result.report["folded"] == 0 and result.report["pairs"] == []
    (skipped,) = result.report["skipped"]
    assert skipped["bn"] == "bn"
    for word in reason_words:
        assert word in skipped["reason"]
    assert len(bn_nodes(result.program)) == 1
    assert_same_outputs(result.program, program, torch.randn(2, 3, 4, 4), tol=0.0)


def test_fold_and_skip_in_one_model(helpers):
    torch.manual_seed(0)
    model = helpers.randomize_batchnorm(MixedSkipAndFold(), 4).eval()
    x = torch.randn(1, 3, 4, 4)
    program = capture(model, (x,))
    folded, (result,) = PassManager([FoldBatchNorm()]).run(program)
    assert result.report["pairs"] == [{"bn": "bn", "conv": "conv"}]
    assert [s["bn"] for s in result.report["skipped"]] == ["post"]
    assert [module_path(n) for n in bn_nodes(folded)] == ["post"]
    assert_same_outputs(folded, program, torch.randn(2, 3, 4, 4))


def test_batchnorm_without_running_stats_is_reported():
    model = ConvBN(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    program = capture(model, (torch.randn(2, 3, 4, 4),))
    result = FoldBatchNorm()(program)
    assert result.report["folded"] == 0
    assert [s["bn"] for s in result.report["skipped"]] == ["bn"]


def test_no_batchnorm_is_no_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    program = capture(model, (torch.randn(1, 3, 5, 5),))
    result = FoldBatchNorm()(program)
    assert not result.changed
    assert result.report == {"folded": 0, "pairs": [], "skipped": []}
    assert result.before == result.after
