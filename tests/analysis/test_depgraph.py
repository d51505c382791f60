"""Channel dependency graph: which channels go together, which may not go at all."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from prune_models import Attention, ChannelShuffle, Couplings, randomize
from torch import nn

from edgefx.analysis.depgraph import ChannelDependencyGraph
from edgefx.frontend import capture


@pytest.fixture(scope="module")
def couplings():
    torch.manual_seed(0)
    model = randomize(Couplings())
    program = capture(model, (torch.randn(1, 3, 16, 16),))
    return program, ChannelDependencyGraph(program.graph_module)


def _class(dep: ChannelDependencyGraph, module: str):
    """The class whose channels the BatchNorm of ``module`` scales (its first use)."""
    norm = next(n for n in dep.norms if n.module == f"{module}.1")
    return dep.classes[norm.class_id]


def _group(dep: ChannelDependencyGraph, module: str, index: int):
    cls = _class(dep, module)
    return next(g for g in dep.groups if (cls.id, index) in g.channels)


def test_residual_add_puts_both_sides_in_one_class(couplings):
    _, dep = couplings
    assert _class(dep, "stem") is _class(dep, "res")
    assert _class(dep, "stem").size == 16


def test_concat_shifts_indices(couplings):
    _, dep = couplings
    a, b = _class(dep, "branch_a"), _class(dep, "branch_b")
    assert a is not b
    # channel 3 of branch_b is channel 8 + 3 of the concat, which the depthwise conv keeps;
    # the grouped conv after it then ties concat channels 3, 7, 11 and 15 together
    group = _group(dep, "branch_b", 3)

    def indices(cls):
        return sorted(i for c, i in group.channels if c == cls.id)

    assert indices(_class(dep, "dw")) == [3, 7, 11, 15]
    assert indices(a) == [3, 7]
    assert indices(b) == [3, 7]


def test_grouped_conv_ties_channel_i_of_every_group(couplings):
    _, dep = couplings
    # grouped conv: 16 inputs in 4 groups of 4; input channel 1 of every group goes together
    dw = _class(dep, "dw")
    group = _group(dep, "dw", 1)
    assert {(dw.id, i) for i in (1, 5, 9, 13)} <= set(group.channels)
    # and its 24 outputs in 4 groups of 6: output 2 of every group
    grouped = _class(dep, "grouped")
    outputs = {i for c, i in _group(dep, "grouped", 2).channels if c == grouped.id}
    assert {2, 8, 14, 20} <= outputs


def test_split_pieces_map_back_to_their_input(couplings):
    program, dep = couplings
    splits = (torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default)
    split = next(n for n in program.graph_module.graph.nodes if n.target in splits)
    source = dep.class_of(dep.axis_of(split.args[0]))
    # split(12), then both halves go through the same conv, whose weight's input dim is one
    # axis: input channel i of that conv is channel i of the left and 12 + i of the right
    pieces = [n for n in split.users]
    assert len(pieces) == 2
    left, right = (dep.class_of(dep.axis_of(p)) for p in pieces)
    assert left.size == right.size == 12
    for i in (0, 5, 11):
        group = next(g for g in dep.groups if (left.id, i) in g.channels)
        assert (right.id, i) in group.channels
        assert (source.id, i) in group.channels and (source.id, 12 + i) in group.channels


def test_flatten_into_linear_repeats_each_channel_over_positions(couplings):
    program, dep = couplings
    head = next(n for n in program.graph_module.graph.nodes if n.name == "linear")
    features = dep.axis_of(head.args[0])
    assert features.size == 64
    # after_split's output channel 5 is pool channel 5 (left half) and 8 + 5 (right half),
    # one shared conv: features 4 * 5 ... 4 * 5 + 3 and 4 * 13 ... 4 * 13 + 3 go with it
    group = _group(dep, "after_split", 5)
    flat = dep.class_of(features).id
    assert sorted(i for c, i in group.channels if c == flat) == [20, 21, 22, 23, 52, 53, 54, 55]


def test_model_input_and_output_channels_are_fixed(couplings):
    _, dep = couplings
    fixed = [g for g in dep.groups if g.fixed]
    assert any("model output" in g.fixed for g in fixed)
    assert any("model input" in g.fixed for g in fixed)
    assert sum("model output" in g.fixed for g in fixed) == 10  # the head's outputs
    assert all(g.fixed is None for g in (_group(dep, m, 0) for m in ("stem", "dw", "grouped")))


def test_importance_is_mean_abs_gamma_over_the_group(couplings):
    program, dep = couplings
    gm = program.graph_module
    stem_gamma = gm.get_submodule("stem.1").weight.detach()
    res_gamma = gm.get_submodule("res.1").weight.detach()
    group = _group(dep, "stem", 4)
    assert group.importance == pytest.approx(float((stem_gamma[4] + res_gamma[4]) / 2))
    se = [g for g in dep.groups if g.importance is None and g.fixed is None]
    assert len(se) == 6  # the squeeze-excite bottleneck: no BatchNorm ranks it


def test_graph_is_a_networkx_graph_of_axes(couplings):
    _, dep = couplings
    assert isinstance(dep.graph, nx.Graph)
    kinds = {data["kind"] for _, _, data in dep.graph.edges(data=True)}
    assert kinds == {"identity", "index"}
    summary = dep.summary()
    assert summary["groups"] == len(dep.groups)
    assert summary["prunable_groups"] == len(dep.prunable_groups())


def test_channel_shuffle_reshape_is_fixed_with_its_reason():
    program = capture(randomize(ChannelShuffle()), (torch.randn(1, 3, 8, 8),))
    dep = ChannelDependencyGraph(program.graph_module)
    conv = _class(dep, "conv")
    assert conv.fixed and "reshape" in conv.fixed[0]
    assert all(g.fixed for g in dep.groups if any(c == conv.id for c, _ in g.channels))
    # the output conv's input side is fixed too, its own 4 outputs are the model's
    assert not dep.prunable_groups()


def test_resnet18_groups(resnet18):
    _, _, program = resnet18
    dep = ChannelDependencyGraph(program.graph_module)
    # every channel of every block is removable except the image's 3 and the 1000 logits
    total = sum(len(g.channels) for g in dep.groups)
    assert len(dep.prunable_groups()) == len(dep.groups) - 3 - 1000
    assert total >= len(dep.groups)
    # the residual stream of each stage is one class: stem + 2 blocks of layer1 = 64 channels
    (stem,) = [n for n in dep.norms if n.module == "bn1"]
    modules = set(dep.classes[stem.class_id].modules)
    assert {"bn1", "layer1.0.bn2", "layer1.1.bn2"} <= modules


def test_a_weight_also_read_by_an_unknown_op_fixes_its_channels():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.bn = nn.BatchNorm2d(8)
            self.out = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.out(torch.relu(self.bn(self.conv(x)))).mean((2, 3))
            return y + torch.cumsum(self.bn.weight, 0)[:4]

    program = capture(Odd().eval(), (torch.randn(1, 3, 4, 4),))
    dep = ChannelDependencyGraph(program.graph_module)
    (norm,) = dep.norms
    cls = dep.classes[norm.class_id]
    assert any("cumsum" in reason for reason in cls.fixed)
    assert not dep.prunable_groups()


def test_attention_heads_go_whole_across_q_k_v_and_the_output_projection():
    program = capture(Attention(32, 4).eval(), (torch.randn(1, 3, 2, 3),), dynamic_batch=False)
    dep = ChannelDependencyGraph(program.graph_module)
    qkv = dep.class_of(dep.axis_of("linear"))  # the q/k/v projection's 96 outputs
    proj_in = dep.class_of(
        dep.axis_of(
            next(n for n in program.graph_module.graph.nodes if n.name == "linear_1").args[0]
        )
    )
    heads = [g for g in dep.prunable_groups() if any(c == qkv.id for c, _ in g.channels)]
    assert len(heads) == 4
    for h, group in enumerate(
        sorted(heads, key=lambda g: min(i for c, i in g.channels if c == qkv.id))
    ):
        # head h: rows h*8 .. h*8+7 of q, of k (32 + ...) and of v (64 + ...)
        rows = sorted(i for c, i in group.channels if c == qkv.id)
        assert rows == [p * 32 + h * 8 + d for p in range(3) for d in range(8)]
        assert sorted(i for c, i in group.channels if c == proj_in.id) == list(
            range(h * 8, h * 8 + 8)
        )
