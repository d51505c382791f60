"""ChannelPrune: exact when the removed channels carry nothing, meets MACs budgets by
bisection on real architectures, slims the layers physically and refuses bad requests."""

from __future__ import annotations

import pytest
import torch
from prune_models import ChannelShuffle, Couplings, randomize

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


def test_a_budget_for_a_model_without_batchnorm_is_refused_with_the_reason():
    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.out = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.conv(x)))

    program = capture(Plain().eval(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(PassError, match="cannot remove any channel of Plain") as info:
        ChannelPrune(macs=0.5)(program)
    assert "8 no BatchNorm ranks them" in info.value.message
    assert "BatchNorm" in info.value.hint


def test_nothing_to_rank_is_reported_not_silent():
    program = capture(randomize(ChannelShuffle()), (torch.randn(1, 3, 8, 8),))
    result = ChannelPrune(threshold=10.0)(program)
    assert not result.changed
    assert result.report["groups_removed"] == 0
    reasons = result.report["not_ranked"]
    assert any("reshape" in reason for reason in reasons)


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


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_torchvision_models_meet_half_the_macs(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize(getattr(torchvision.models, name)(weights=None))
    x = torch.randn(1, 3, 64, 64, generator=GEN)
    program = capture(model, (x,), dynamic_batch=False)
    result = ChannelPrune(macs=0.5)(program)
    assert 0.4 * result.before.macs <= result.after.macs <= 0.5 * result.before.macs
    assert result.report["estimated_macs"] == result.after.macs
    assert result.after.params < result.before.params
    out = result.program(x)
    assert out.shape == (1, 1000) and bool(torch.isfinite(out).all())


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
