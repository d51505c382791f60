"""ChannelPrune: exact when the removed channels carry nothing, meets MACs budgets by
bisection on real architectures, slims the layers physically and refuses bad requests."""

from __future__ import annotations

import pytest
import torch
from prune_models import (
    ChannelShuffle,
    ChannelsLastBlock,
    Couplings,
    deit_small,
    randomize,
    silence_heads_and_mlp,
    vit_b_16,
)
from torch import nn

import edgefx
from edgefx import PassError
from edgefx.analysis.depgraph import ChannelDependencyGraph
from edgefx.frontend import capture
from edgefx.passes import ChannelPrune, FoldBatchNorm, PassManager

GEN = torch.Generator().manual_seed(7)


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    actual, reference = actual.double(), reference.double()
    return float((actual - reference).abs().max() / reference.abs().max())


def silence_groups(model: torch.nn.Module, share: float, seed: int = 0) -> int:
    """Zero gamma and beta of every BatchNorm channel in a random ``share`` of the removable
    groups (so those channels carry exact zeros); returns how many groups were silenced."""
    program = capture(model, (torch.randn(1, 3, 16, 16),))
    dep = ChannelDependencyGraph(program.graph_module)
    groups = [g for g in dep.prunable_groups() if g.importance is not None]
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed))
    chosen = [groups[i] for i in order[: int(share * len(groups))].tolist()]
    with torch.no_grad():
        for group in chosen:
            for cls_id, index in group.channels:
                for norm in dep.norms:
                    if norm.class_id == cls_id:
                        bn = model.get_submodule(norm.module)
                        bn.weight[index] = 0.0
                        bn.bias[index] = 0.0
    return len(chosen)


@pytest.fixture(scope="module")
def silenced():
    """Couplings with 40% of its removable channel groups silenced, and its Program."""
    torch.manual_seed(0)
    model = randomize(Couplings())
    count = silence_groups(model, 0.4)
    return model, count, capture(model, (torch.randn(1, 3, 16, 16, generator=GEN),))


def test_removing_silent_channels_is_exact(silenced):
    model, count, program = silenced
    result = ChannelPrune(threshold=1e-6, min_keep=0)(program)
    assert result.changed
    assert result.report["groups_removed"] == count
    assert result.after.macs < result.before.macs
    assert result.after.params < result.before.params
    x = torch.randn(5, 3, 16, 16, generator=GEN)
    with torch.no_grad():
        expected = model(x)
    assert rel_err(result.program(x), expected) <= 1e-5


def test_slimmed_layers_are_physically_smaller(silenced):
    _, _, program = silenced
    result = ChannelPrune(threshold=1e-6, min_keep=0)(program)
    before = dict(program.graph_module.named_parameters())
    after = dict(result.program.graph_module.named_parameters())
    # depthwise: weight (C, 1, 3, 3) keeps its unit dim and loses channels; groups follow
    assert after["dw.0.weight"].shape[1:] == (1, 3, 3)
    assert after["dw.0.weight"].shape[0] < before["dw.0.weight"].shape[0]
    dw_conv = next(
        n
        for n in result.program.graph_module.graph.nodes
        if n.op == "call_function" and "conv" in str(n.target) and n.args[1].target == "dw.0.weight"
    )
    assert dw_conv.args[-1] == after["dw.0.weight"].shape[0]
    # grouped: still 4 groups, of equal width
    assert after["grouped.0.weight"].shape[0] % 4 == 0
    # BatchNorm statistics follow their channels
    assert after["stem.1.weight"].shape == after["stem.0.weight"].shape[:1]
    # the head's inputs are 4 positions per remaining channel; its 10 outputs stay
    assert after["head.weight"].shape[0] == 10
    assert after["head.weight"].shape[1] == 4 * 2 * after["after_split.0.weight"].shape[0]


def test_macs_budget_is_met_by_bisection():
    torch.manual_seed(0)
    program = capture(randomize(Couplings()), (torch.randn(1, 3, 16, 16),))
    for keep in (0.8, 0.5, 0.3):
        result = ChannelPrune(macs=keep)(program)
        assert result.after.macs <= keep * result.before.macs
        # the analytic estimate bisection used is the measured figure
        assert result.report["estimated_macs"] == result.after.macs
        # bisection finds the fewest groups: one group fewer would miss the budget
        assert result.report["groups_removed"] > 0
    loose = ChannelPrune(macs=0.8)(program)
    tight = ChannelPrune(macs=0.3)(program)
    assert tight.report["groups_removed"] > loose.report["groups_removed"]
    assert tight.report["threshold"] > loose.report["threshold"]


def test_least_important_channels_go_first():
    torch.manual_seed(0)
    model = randomize(Couplings())
    with torch.no_grad():
        model.grouped[1].weight[[1, 7, 13, 19]] = 1e-3  # output 1 of every group: least important
    program = capture(model, (torch.randn(1, 3, 16, 16),))
    result = ChannelPrune(threshold=0.01)(program)
    assert result.report["groups_removed"] == 1
    kept = result.program.graph_module.get_submodule("grouped.1").weight
    assert kept.shape == (20,)
    assert torch.equal(
        kept,
        torch.cat([model.grouped[1].weight[i * 6 : i * 6 + 6] for i in range(4)])[
            [i for i in range(24) if i % 6 != 1]
        ],
    )


def test_min_keep_and_exclude_are_respected():
    torch.manual_seed(0)
    program = capture(randomize(Couplings()), (torch.randn(1, 3, 16, 16),))
    result = ChannelPrune(threshold=10.0, min_keep=0.5)(program)  # everything ranks below 10
    params = dict(result.program.graph_module.named_parameters())
    assert params["stem.1.weight"].shape[0] == 8  # half of 16
    assert params["branch_a.1.weight"].shape[0] == 4  # half of 8
    kept = ChannelPrune(threshold=10.0, min_keep=0.5, exclude=["stem", "res"])(program)
    params = dict(kept.program.graph_module.named_parameters())
    assert params["stem.1.weight"].shape[0] == 16
    assert params["res.1.weight"].shape[0] == 16
    assert kept.report["not_ranked"]["excluded"] == 16


def test_unreachable_budget_is_refused_with_the_reachable_figure():
    torch.manual_seed(0)
    program = capture(randomize(Couplings()), (torch.randn(1, 3, 16, 16),))
    with pytest.raises(PassError, match=r"cannot reach 0\.001 of the MACs") as info:
        ChannelPrune(macs=0.001)(program)
    assert "min_keep" in info.value.hint
    # and it names what stays whole: here the model's input and output channels
    assert "; kept whole: " in info.value.message
    assert "fixed: model output" in info.value.message


class Plain(torch.nn.Module):
    """No BatchNorm: only weight magnitude can rank its 8 hidden channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.out = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.conv(x)))


@pytest.mark.parametrize("kwargs", [{"macs": 0.5}, {"threshold": 0.5}])
def test_batchnorm_ranking_of_a_model_without_batchnorm_is_refused_with_the_reason(kwargs):
    # a threshold used to return the model unchanged without a word
    program = capture(Plain().eval(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(PassError, match="cannot remove any channel of Plain") as info:
        ChannelPrune(importance="bn", **kwargs)(program)
    assert "8 no BatchNorm ranks them" in info.value.message
    assert "importance='auto'" in info.value.hint


def test_a_model_without_batchnorm_is_ranked_by_weight_magnitude():
    torch.manual_seed(0)
    model = Plain().eval()
    with torch.no_grad():
        model.conv.weight[[2, 5]] *= 0.01  # the two weakest filters
    program = capture(model, (torch.randn(1, 3, 8, 8),))
    result = ChannelPrune(threshold=0.2)(program)
    assert result.report["ranked_by"] == {"l2": 8}
    assert result.report["groups_removed"] == 2
    kept = result.program.graph_module.get_parameter("conv.weight")
    assert torch.equal(kept, model.conv.weight[[0, 1, 3, 4, 6, 7]])


class ConvPositionEncoding(torch.nn.Module):
    """A conv over a table made from the input's shape only (timm's PositionalEncodingFourier in
    XCiT and EdgeNeXt), added to the features: its outputs are tied to the features' channels,
    its input comes from no model input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.pos = torch.nn.Conv2d(4, 8, 1)
        self.out = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ys = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(1, 2, h, w)
        xs = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(1, 2, h, w)
        table = torch.cat([ys.sin(), xs.cos()], dim=1)
        return self.out(torch.relu(self.bn(self.conv(x)) + self.pos(table)))


def test_a_conv_of_a_shape_made_table_loses_outputs_with_its_weight_and_bias():
    # the table's conv goes with the features it is added to: weight rows and bias together
    # (pruning once cut its weight alone and the slimmed graph failed: XCiT, EdgeNeXt)
    torch.manual_seed(0)
    model = randomize(ConvPositionEncoding())
    silent = [2, 5]
    with torch.no_grad():
        for param in (model.bn.weight, model.bn.bias, model.pos.weight, model.pos.bias):
            param[silent] = 0.0
    x = torch.randn(1, 3, 6, 6)
    result = ChannelPrune(threshold=1e-6)(capture(model, (x,)))
    assert result.report["groups_removed"] == 2
    pruned = result.program.graph_module
    assert pruned.get_parameter("pos.weight").shape == (6, 4, 1, 1)
    assert pruned.get_parameter("pos.bias").shape == (6,)
    assert torch.allclose(pruned(x), model(x), atol=1e-6)


class ResMlpBlock(torch.nn.Module):
    """timm's ResMLP in small: Affine layers made of ``addcmul`` and a linear mixing the
    patches (over a non-channel dim), between channel MLPs."""

    def __init__(self, dim: int = 8, patches: int = 4) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, dim, 2, stride=2)  # patch embedding
        self.alpha = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.beta = torch.nn.Parameter(torch.randn(dim))
        self.tokens = torch.nn.Linear(patches, patches)
        self.fc = torch.nn.Linear(dim, 12)
        self.head = torch.nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).flatten(2).transpose(1, 2)  # (batch, patches, dim)
        a = torch.addcmul(self.beta, self.alpha, h)
        h = h + self.tokens(a.transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(self.fc(h))).mean(1)


def test_resmlp_affine_and_patch_mixing_keep_the_channels_prunable():
    torch.manual_seed(0)
    model = ResMlpBlock().eval()
    silent = [1, 6]  # embedding channels that carry exact zeros everywhere
    with torch.no_grad():
        model.stem.weight[silent] = 0.0
        model.stem.bias[silent] = 0.0
        model.beta[silent] = 0.0
        model.tokens.bias.zero_()  # it adds the same per-patch value to every channel
    x = torch.randn(3, 3, 4, 4)
    dep = ChannelDependencyGraph(capture(model, (x[:1],)).graph_module)
    assert dep.prunable_groups(), "the embedding and MLP channels are prunable"
    result = ChannelPrune(threshold=1e-6, importance="l2")(capture(model, (x[:1],)))
    pruned = result.program.graph_module
    assert pruned.get_parameter("alpha").shape == (6,)
    assert pruned.get_parameter("tokens.weight").shape == (4, 4)  # patches stay whole
    assert torch.allclose(pruned(x), model(x), atol=1e-6)


class ConvMixerBlock(torch.nn.Module):
    """timm's ConvMixer in small: ``padding="same"`` convs (captured as ``conv2d.padding``), a
    residual around the depthwise one."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, dim, 2, stride=2), torch.nn.BatchNorm2d(dim)
        )
        self.depthwise = torch.nn.Sequential(
            torch.nn.Conv2d(dim, dim, 3, groups=dim, padding="same"), torch.nn.BatchNorm2d(dim)
        )
        self.pointwise = torch.nn.Sequential(
            torch.nn.Conv2d(dim, dim, 1), torch.nn.BatchNorm2d(dim)
        )
        self.head = torch.nn.Conv2d(dim, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.depthwise(h)) + h
        return self.head(torch.relu(self.pointwise(h)))


def test_padding_same_convs_are_pruned_like_any_conv():
    torch.manual_seed(0)
    model = randomize(ConvMixerBlock())
    silent = [0, 3]  # residual-stream channels that carry exact zeros everywhere
    with torch.no_grad():
        for bn in (model.stem[1], model.depthwise[1]):
            bn.weight[silent] = 0.0
            bn.bias[silent] = 0.0
    x = torch.randn(2, 3, 8, 8)
    program = capture(model, (x[:1],))
    assert torch.ops.aten.conv2d.padding in {n.target for n in program.graph_module.graph.nodes}
    result = ChannelPrune(threshold=1e-6)(program)
    pruned = result.program.graph_module
    assert pruned.get_parameter("depthwise.0.weight").shape == (6, 1, 3, 3)
    assert torch.allclose(pruned(x), model(x), atol=1e-5)


def test_a_model_whose_channels_are_all_fixed_is_refused_with_the_reasons():
    program = capture(randomize(ChannelShuffle()), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(PassError, match="cannot remove any channel") as info:
        ChannelPrune(threshold=10.0)(program)
    assert "reshape" in info.value.message


def test_layer_norm_and_expand_sizes_are_rewritten():
    torch.manual_seed(0)
    model = randomize(ChannelsLastBlock(16))
    with torch.no_grad():
        model.stem[1].weight[[1, 5, 6]] = 1e-3  # the three least important channels
    x = torch.randn(1, 3, 4, 4, generator=GEN)
    program = capture(model, (x,), dynamic_batch=False)
    result = ChannelPrune(threshold=0.01, importance="bn")(program)
    assert result.report["groups_removed"] == 3
    nodes = {n.target: n for n in result.program.graph_module.graph.nodes}
    assert nodes[torch.ops.aten.layer_norm.default].args[1] == [13]
    assert nodes[torch.ops.aten.expand.default].args[1] == [1, 13, 4, 4]
    # removing channels from a LayerNorm changes its statistics: the reference is the same
    # block built 13 channels wide with the kept weights cut by hand
    reference = model.sliced([i for i in range(16) if i not in (1, 5, 6)])
    with torch.no_grad():
        assert rel_err(result.program(x), reference(x)) <= 1e-5


def test_importance_by_layer_norm_gamma_and_by_a_function():
    torch.manual_seed(0)
    model = randomize(ChannelsLastBlock(16))
    with torch.no_grad():
        model.norm.weight.copy_(torch.linspace(1, 2, 16))
        model.norm.weight[[4, 9]] = 0.01
    program = capture(model, (torch.randn(1, 3, 4, 4, generator=GEN),), dynamic_batch=False)
    by_norm = ChannelPrune(threshold=0.5, importance="norm")(program)
    assert by_norm.report["groups_removed"] == 2 and by_norm.report["ranked_by"] == {"norm": 16}
    assert by_norm.program.graph_module.get_parameter("norm.weight").min() >= 1

    seen = []

    def last_channels_first(group) -> float:
        seen.append(group)
        return 16.0 - max(i for _, i in group.channels)

    by_function = ChannelPrune(threshold=2.5, importance=last_channels_first)(program)
    assert by_function.report["ranked_by"] == {"callable": 16} and len(seen) == 16
    kept = by_function.program.graph_module.get_parameter("norm.weight")
    assert torch.equal(kept, model.norm.weight[:14])  # channels 14 and 15 scored lowest


def test_round_to_keeps_multiples_and_one_turns_it_off():
    torch.manual_seed(0)
    model = randomize(ChannelsLastBlock(64))
    program = capture(model, (torch.randn(1, 3, 4, 4, generator=GEN),), dynamic_batch=False)
    widths = {}
    for round_to in (8, 1):
        result = ChannelPrune(macs=0.55, round_to=round_to, importance="bn")(program)
        assert result.after.macs <= 0.55 * result.before.macs
        assert result.report["estimated_macs"] == result.after.macs
        assert result.report["round_to"] == round_to
        widths[round_to] = result.program.graph_module.get_parameter("norm.weight").shape[0]
    assert widths[8] % 8 == 0
    assert widths[1] % 8 != 0  # without rounding the bisection stops at an odd count
    assert ChannelPrune(macs=0.5).report_round_to == 8
    assert ChannelPrune(threshold=0.5).report_round_to == 1


class ConstantChannels(torch.nn.Module):
    """conv -> BN -> ReLU -> conv (``k`` x ``k``, zero padding) -> mean -> linear."""

    def __init__(self, k: int, bias: bool) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(16)
        self.conv = torch.nn.Conv2d(16, 8, k, padding=k // 2, bias=bias)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(torch.relu(self.bn(self.stem(x))))
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize(("k", "bias"), [(1, True), (1, False), (3, True)])
def test_bias_compensation_folds_what_constant_channels_fed_forward(k, bias):
    torch.manual_seed(0)
    model = randomize(ConstantChannels(k, bias))
    with torch.no_grad():
        model.bn.weight[[2, 7, 11]] = 0.0  # constant channels: relu(beta) = beta > 0
        model.bn.bias[[2, 7, 11]] = torch.tensor([0.5, 1.0, 0.8])
    x = torch.randn(2, 3, 8, 8, generator=GEN)
    program = capture(model, (x,))
    with torch.no_grad():
        expected = model(x)
    errors, reports = {}, {}
    for compensate in (True, False):
        result = ChannelPrune(threshold=1e-6, importance="bn", compensate=compensate)(program)
        assert result.report["groups_removed"] == 3
        errors[compensate] = rel_err(result.program(x), expected)
        reports[compensate] = result.report
    assert reports[True]["compensated_layers"] == 1  # the conv after the ReLU
    assert "compensated_layers" not in reports[False]
    assert errors[False] > 1e-2  # plain removal loses what the channels fed forward
    if k == 1:
        assert errors[True] <= 1e-5  # no padding: the fold is exact
    else:
        assert errors[True] < errors[False] / 3  # zero padding: the border sees less of it


def test_an_importance_function_returning_the_wrong_shape_is_refused_naming_the_group():
    program = capture(Plain().eval(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(PassError, match=r"shape \(8,\) for channel group .*conv") as info:
        ChannelPrune(macs=0.5, importance=lambda group: torch.ones(8))(program)
    assert "one number" in info.value.message
    with pytest.raises(PassError, match="returned str"):
        ChannelPrune(macs=0.5, importance=lambda group: "high")(program)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"macs": 0.5, "threshold": 0.1},
        {"macs": 0},
        {"macs": 1.5},
        {"macs": "half"},
        {"threshold": -1},
        {"macs": 0.5, "min_keep": 2},
        {"macs": 0.5, "exclude": "fc"},
        {"macs": 0.5, "importance": "taylor"},
        {"macs": 0.5, "importance": None},
        {"macs": 0.5, "round_to": 0},
        {"macs": 0.5, "round_to": 2.5},
    ],
)
def test_bad_configuration_is_refused_eagerly(kwargs):
    with pytest.raises(PassError):
        ChannelPrune(**kwargs)


def test_input_program_is_not_modified(silenced):
    _, _, program = silenced
    state = {k: v.clone() for k, v in program.graph_module.state_dict().items()}
    code = program.graph_module.code
    ChannelPrune(macs=0.5)(program)
    assert program.graph_module.code == code
    after = program.graph_module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


# ----------------------------------------------------------------------------- real models
# residual, depthwise, flatten into linear, channel shuffle (refused) and split/concat; the
# rest add concat-heavy, squeeze-excite and grouped architectures (~30 s each on 2 cores)
ARCHITECTURES = [
    "resnet18",
    "mobilenet_v2",
    "shufflenet_v2_x0_5",
    "vgg11_bn",
    *(
        pytest.param(name, marks=pytest.mark.slow)
        for name in ("densenet121", "efficientnet_b0", "regnet_x_400mf", "resnext50_32x4d")
    ),
]
_CAPTURED: dict[str, tuple[torch.Tensor, object]] = {}


def torchvision_program(name: str):
    """(input, Program) of torchvision ``name`` (random weights, BatchNorms randomised) at
    1x3x64x64, captured once per test session: several tests read the same model."""
    if name not in _CAPTURED:
        torchvision = pytest.importorskip("torchvision")
        torch.manual_seed(0)
        model = randomize(getattr(torchvision.models, name)(weights=None))
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(64))
        _CAPTURED[name] = (x, capture(model, (x,), dynamic_batch=False))
    return _CAPTURED[name]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_torchvision_models_meet_half_the_macs(name):
    x, program = torchvision_program(name)
    result = ChannelPrune(macs=0.5)(program)
    assert 0.4 * result.before.macs <= result.after.macs <= 0.5 * result.before.macs
    assert result.report["estimated_macs"] == result.after.macs
    assert result.after.params < result.before.params
    out = result.program(x)
    assert out.shape == (1, 1000) and bool(torch.isfinite(out).all())


def silenced_copy(program, share: float, seed: int = 0):
    """A copy of ``program`` whose BatchNorms output exact zeros (gamma = beta = 0) on every
    channel of a random ``share`` of the BatchNorm-ranked removable groups, and how many
    groups that is. ``program`` itself is not touched."""
    gm = program.copy_graph()
    dep = ChannelDependencyGraph(gm)
    groups = [g for g in dep.prunable_groups() if g.importance is not None]
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed))
    chosen = [groups[i] for i in order[: int(share * len(groups))].tolist()]
    nodes = {n.name: n for n in gm.graph.nodes}
    with torch.no_grad():
        for group in chosen:
            for cls_id, index in group.channels:
                for norm in dep.norms:
                    if norm.class_id == cls_id:
                        for param in nodes[norm.node].args[1:3]:  # gamma, beta
                            owner, _, leaf = param.target.rpartition(".")
                            getattr(gm.get_submodule(owner), leaf)[index] = 0.0
    return program.with_graph(gm, "silenced"), len(chosen)


# the couplings a wrong channel mapping would break: a flatten into the classifier (vgg),
# split / cat / channel shuffle (shufflenet), dense concatenation (densenet), squeeze-excite
# and depthwise (efficientnet), grouped convs with squeeze-excite (regnet_y)
SILENCED = ["vgg11_bn", "shufflenet_v2_x0_5", "densenet121", "efficientnet_b0", "regnet_y_400mf"]


@pytest.mark.parametrize("name", SILENCED)
def test_silenced_channels_of_torchvision_models_are_removed_exactly(name):
    x, program = torchvision_program(name)
    silenced, count = silenced_copy(program, 0.3)
    assert count > 0
    # the pass alone (no PassManager checks around it: this test compares the outputs itself)
    pruned, report = ChannelPrune(threshold=1e-9, min_keep=0).run(silenced)
    assert report["groups_removed"] == count
    assert report["estimated_macs"] < sum(c.macs for c in program.cost().nodes)
    other = torch.randn(x.shape, generator=GEN)
    for inputs in (x, other):
        assert rel_err(pruned(inputs), silenced(inputs)) <= 1e-5


def test_pruned_then_folded_resnet18_runs_in_onnx_runtime_with_dynamic_batch(resnet18):
    model, x, _ = resnet18
    compiled = edgefx.compile(
        model, (x,), passes=[ChannelPrune(macs=0.6), FoldBatchNorm()], progress=False
    )
    prune, fold = compiled.report.passes
    assert prune.after.macs <= 0.6 * prune.before.macs
    assert fold.report["folded"] == 20
    x3 = torch.randn(3, *x.shape[1:], generator=GEN)
    expected = compiled.program(x3)
    assert rel_err(compiled(x3), expected) <= 1e-4
    assert model.fc.weight.shape == (1000, 512)  # the user's model is untouched


def test_pass_manager_refreshes_the_pruned_program(silenced):
    _, _, program = silenced
    pruned, (result,) = PassManager([ChannelPrune(macs=0.6)]).run(program)
    for node in pruned.graph_module.graph.nodes:
        if node.op == "call_function":
            assert "val" in node.meta
    assert pruned.history[-1].startswith("ChannelPrune(")
    assert result.report["layers"]


# ----------------------------------------------------------------------------- transformers
# (builder, heads, head dim, MLP hidden width, name of block 0's q/k/v weight)
VITS = {
    "deit_small": (deit_small, 6, 64, 1536, "blocks.0.attn.qkv.weight"),
    "vit_b_16": (
        vit_b_16,
        12,
        64,
        3072,
        "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
    ),
}


@pytest.mark.parametrize("name", sorted(VITS))
def test_zeroed_heads_and_mlp_channels_of_vits_are_removed_exactly(name):
    build, heads, head_dim, hidden, qkv = VITS[name]
    model = build()
    silence_heads_and_mlp(model, {0: [1, 4], 1: [0]}, hidden=[3, 100, 700])
    x = torch.randn(1, 3, 32, 32, generator=GEN)
    program = capture(model, (x,), dynamic_batch=False)
    result = ChannelPrune(threshold=1e-6, min_keep=0)(program)
    # 3 heads and 2 x 3 hidden channels, ranked by weight magnitude (no BatchNorm here)
    assert result.report["groups_removed"] == 3 + 6
    assert set(result.report["ranked_by"]) == {"l2"}
    params = dict(result.program.graph_module.named_parameters())
    width = heads * head_dim
    assert params[qkv].shape == (3 * (heads - 2) * head_dim, width)  # whole heads, q, k and v
    mlp_in = [p for p in params.values() if p.dim() == 2 and p.shape[1] == width]
    assert sum(p.shape[0] == hidden - 3 for p in mlp_in) == 2  # each block's first MLP layer
    # the reshape into (3, heads, head dim) now says heads - 2 (block 0) and heads - 1
    shapes = [
        list(n.args[1])
        for n in result.program.graph_module.graph.nodes
        if n.target is torch.ops.aten.reshape.default
    ]
    assert any(
        s[-3:] == [3, heads - 2, head_dim] or s[-2:] == [3, (heads - 2) * head_dim] for s in shapes
    )
    other = torch.randn(1, 3, 32, 32, generator=GEN)
    with torch.no_grad():
        for inputs in (x, other):
            assert rel_err(result.program(inputs), model(inputs)) <= 1e-5


def test_vit_meets_a_macs_budget_with_heads_mlp_and_embedding_pruned():
    model = deit_small()
    program = capture(model, (torch.randn(1, 3, 32, 32, generator=GEN),), dynamic_batch=False)
    result = ChannelPrune(macs=0.5)(program)
    assert result.after.macs <= 0.5 * result.before.macs
    assert result.report["estimated_macs"] == result.after.macs
    params = dict(result.program.graph_module.named_parameters())
    embed = params["pos_embed"].shape[-1]
    assert embed < 384 and embed % 8 == 0  # the residual stream, rounded to 8
    assert params["cls_token"].shape[-1] == embed == params["norm.weight"].shape[0]
    assert params["blocks.0.mlp.fc1.weight"].shape[0] % 8 == 0
    out = result.program(torch.randn(1, 3, 32, 32, generator=GEN))
    assert out.shape == (1, 1000) and bool(torch.isfinite(out).all())


def test_a_small_convnext_meets_a_macs_budget():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    blocks = [CNBlockConfig(32, 64, 2), CNBlockConfig(64, None, 2)]
    model = ConvNeXt(blocks, num_classes=10).eval()
    assert torchvision  # the architecture comes from torchvision, built small
    x = torch.randn(1, 3, 32, 32, generator=GEN)
    program = capture(model, (x,), dynamic_batch=False)
    result = ChannelPrune(macs=0.5)(program)
    assert result.after.macs <= 0.5 * result.before.macs
    assert result.report["estimated_macs"] == result.after.macs
    assert set(result.report["ranked_by"]) == {"l2"}  # no BatchNorm in a ConvNeXt
    params = dict(result.program.graph_module.named_parameters())
    # the stage's stream: stem conv, every block's depthwise conv, LayerNorm and layer scale
    width = params["features.0.0.weight"].shape[0]
    assert width < 32 and width % 8 == 0
    assert params["features.1.0.block.0.weight"].shape[0] == width
    assert params["features.1.0.layer_scale"].shape[0] == width
    out = result.program(x)
    assert out.shape == (1, 10) and bool(torch.isfinite(out).all())


# ------------------------------------------------------------------ allocation
class _TwoStages(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))
        self.b = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64))
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.head(x.mean((2, 3)))


def _kept(result, module: str, size: int) -> int:
    rows = [r for r in result.report["layers"] if any(m.startswith(module) for m in r["modules"])]
    return rows[0]["kept"] if rows else size


def test_uniform_allocation_cuts_every_class_alike():
    """Stage a's BatchNorm gammas are all below stage b's: one global ranking takes the
    budget from a alone, 'uniform' takes the same fraction from each (ranked within it), and
    both meet the budget."""
    torch.manual_seed(0)
    model = _TwoStages().eval()
    with torch.no_grad():
        model.a[1].weight.copy_(torch.rand(32) * 0.1)
        model.b[1].weight.copy_(torch.rand(64) * 0.1 + 0.5)
    program = capture(model, (torch.randn(1, 3, 16, 16),))
    budget = 0.6 * program.cost().total_macs
    glob = ChannelPrune(macs=0.6, round_to=1, min_keep=0.05)(program)
    uniform = ChannelPrune(macs=0.6, round_to=1, allocation="uniform")(program)
    for result in (glob, uniform):
        assert result.after.macs <= budget
    assert _kept(glob, "b", 64) == 64 and _kept(glob, "a", 32) < 32
    assert uniform.report["allocation"] == "uniform"
    a, b = _kept(uniform, "a", 32) / 32, _kept(uniform, "b", 64) / 64
    assert a < 1 and b < 1 and abs(a - b) <= 1 / 32, (a, b)
    # within a class the least important go first: stage b keeps its largest gammas
    gammas = model.b[1].weight.detach()
    k = _kept(uniform, "b", 64)
    state = uniform.program.graph_module.state_dict().values()
    (kept,) = [v for v in state if v.dim() == 1 and len(v) == k and torch.isin(v, gammas).all()]
    assert torch.equal(kept.sort().values, gammas.sort().values[-k:])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"macs": 0.5, "allocation": "even"}, "unknown allocation 'even'"),
        ({"threshold": 0.1, "allocation": "uniform"}, "allocation='uniform' orders groups"),
    ],
)
def test_bad_allocation_is_refused(kwargs, message):
    with pytest.raises(PassError, match=message):
        ChannelPrune(**kwargs)
