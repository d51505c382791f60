"""What every backend provides: build a Program into an Artifact that runs, saves and loads."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from edgefx.program import Program


class Artifact(abc.ABC):
    """A lowered model. Runs on flat torch tensors and returns flat torch tensors."""

    backend: ClassVar[str]

    @abc.abstractmethod
    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run on the flat inputs (already validated against the input specs)."""

    @abc.abstractmethod
    def save(self, directory: Path) -> dict[str, Any]:
        """Write the deployable files into ``directory``; return what the manifest must record."""

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: Path, manifest: dict[str, Any]) -> Artifact:
        """Load what :meth:`save` wrote."""

    def describe(self) -> dict[str, Any]:
        """Backend-specific facts for the compile report (opset, node count, target, ...)."""
        return {}

    def run_observing(
        self, inputs: Sequence[torch.Tensor], names: Sequence[str]
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]] | None:
        """Run on ``inputs`` and also return the values this artifact computes for the
        Program nodes ``names`` (those it can locate; others are left out), or None where
        the backend cannot expose intermediate values. compile() uses it to check a
        quantized Program quantizer by quantizer (teacher forcing)."""
        return None


class Backend(abc.ABC):
    """Lowers a Program. Backends never import passes."""

    name: ClassVar[str]

    def __init__(self, target: str | None = None, **options: Any) -> None:
        self.target = target
        self.options = options

    @abc.abstractmethod
    def build(self, program: Program) -> Artifact:
        """Lower ``program``; raise BackendError naming the node/op that cannot be lowered."""
