"""The torch backend: runs the Program's graph module eagerly. The reference for the others."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from edgefx.backends.base import Artifact, Backend
from edgefx.errors import BackendError
from edgefx.program import Program

PROGRAM_FILE = "program.pt2"


class TorchArtifact(Artifact):
    backend = "torch"

    def __init__(self, program: Program) -> None:
        self.program = program

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return pytree.tree_leaves(self.program.graph_module(*inputs))

    def save(self, directory: Path) -> dict[str, Any]:
        self.program.save(directory / PROGRAM_FILE)
        return {"artifact": PROGRAM_FILE}

    @classmethod
    def load(cls, directory: Path, manifest: dict[str, Any]) -> TorchArtifact:
        return cls(Program.load(directory / manifest.get("artifact", PROGRAM_FILE)))


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, target: str | None = None, **options: Any) -> None:
        if target not in (None, "cpu"):
            raise BackendError(
                f"the torch backend runs on the CPU; target {target!r} is not supported",
                hint="leave target unset, or use backend='tvm' for device targets",
            )
        if options:
            raise BackendError(f"the torch backend takes no options, got {sorted(options)}")
        super().__init__(target)

    def build(self, program: Program) -> TorchArtifact:
        return TorchArtifact(program)
