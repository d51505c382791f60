"""DeadCodeElimination: drops unused nodes and the weights only they read; exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgefx.frontend import capture
from edgefx.passes import DeadCodeElimination, PassManager
from edgefx.passes.rewrite import add_parameter

aten = torch.ops.aten


class SideBranch(nn.Module):
    """Computes a side branch it never returns."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Conv2d(3, 4, 3, padding=1)
        self.side = nn.Conv2d(3, 6, 3)
        self.side_fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _unused = self.side_fc(self.side(x).mean((2, 3)))
        return torch.relu(self.main(x))


@pytest.fixture(scope="module")
def side_branch():
    torch.manual_seed(0)
    model = SideBranch().eval()
    x = torch.randn(1, 3, 6, 6)
    return model, x, capture(model, (x,))


@pytest.fixture(scope="module")
def with_dead_nodes(side_branch):
    """The side-branch Program plus a dead chain of ops reading a weight of its own."""
    _, _, program = side_branch
    gm = program.copy_graph()
    (x,) = gm.graph.find_nodes(op="placeholder")
    relu = next(iter(gm.graph.find_nodes(op="call_function", target=aten.relu.default)))
    weight = add_parameter(gm, "dead_weight", torch.randn(5, 3, 1, 1), before=relu)
    with gm.graph.inserting_before(relu):
        conv = gm.graph.call_function(aten.conv2d.default, (x, weight))
        gm.graph.call_function(aten.sigmoid.default, (conv,))
    gm.recompile()
    return program.with_graph(gm, "InjectDeadCode()")


def call_targets(program) -> list:
    return [n.target for n in program.graph_module.graph.nodes if n.op == "call_function"]


def test_removes_dead_nodes_and_their_weight(with_dead_nodes):
    assert aten.sigmoid.default in call_targets(with_dead_nodes)
    result = DeadCodeElimination()(with_dead_nodes)
    assert result.changed and result.exact
    assert aten.sigmoid.default not in call_targets(result.program)
    assert call_targets(result.program).count(aten.conv2d.default) == 1
    assert "dead_weight" in result.report["removed_attributes"]
    state = result.program.graph_module.state_dict()
    assert "dead_weight" not in state
    assert result.before.params - result.after.params == 5 * 3
    assert result.before.nodes - result.after.nodes == 2
    assert result.before.macs - result.after.macs == 6 * 6 * 5 * 3
    assert result.error.max_abs == 0.0
    assert result.report["removed_nodes"] >= 3  # the two ops and the weight's get_attr


def test_removes_the_unused_branch_weights(side_branch, helpers):
    model, _, program = side_branch
    assert {"side.weight", "side_fc.weight"} <= set(program.graph_module.state_dict())
    final, (result,) = PassManager([DeadCodeElimination()]).run(program)
    removed = set(result.report["removed_attributes"])
    assert removed == {"side.weight", "side.bias", "side_fc.weight", "side_fc.bias"}
    assert set(final.graph_module.state_dict()) == {"main.weight", "main.bias"}
    assert result.changed
    x3 = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(final(x3), helpers.eager(model, x3), rtol=0, atol=0)
    # the input Program still has its weights
    assert "side.weight" in program.graph_module.state_dict()


def test_second_run_is_a_no_op(with_dead_nodes):
    first = DeadCodeElimination()(with_dead_nodes)
    second = DeadCodeElimination()(first.program)
    assert not second.changed
    assert second.report == {"removed_nodes": 0, "removed_attributes": []}


def test_keeps_everything_that_is_used(small_folded):
    program, _ = small_folded
    result = DeadCodeElimination()(program)
    assert not result.changed
    assert result.before == result.after
    assert set(result.program.graph_module.state_dict()) == set(program.graph_module.state_dict())
