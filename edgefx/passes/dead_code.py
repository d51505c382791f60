"""DeadCodeElimination: drop nodes nothing uses and the weights only they read."""

from __future__ import annotations

from typing import Any

from edgefx.passes.base import Pass
from edgefx.passes.rewrite import remove_dead_code
from edgefx.program import Program


class DeadCodeElimination(Pass):
    """Remove dead nodes and unused parameters/buffers. Exact by construction."""

    name = "DeadCodeElimination"
    exact = True

    def run(self, program: Program) -> tuple[Program, dict[str, Any]]:
        gm = program.copy_graph()
        removed_nodes, removed_attrs = remove_dead_code(gm)
        report = {"removed_nodes": removed_nodes, "removed_attributes": removed_attrs}
        return program.with_graph(gm, repr(self)), report
