"""Backends lower a Program to something that runs: ``torch`` (eager), ``onnx`` (ORT) and
``tvm`` (Apache TVM Relax, for x86/ARM CPUs and GPUs)."""

from __future__ import annotations

from typing import Any

from edgefx.backends.base import Artifact, Backend
from edgefx.errors import BackendError

# name -> "module:class", imported on first use so `import edgefx` stays light
_REGISTRY = {
    "torch": ("edgefx.backends.torch", "TorchBackend", "TorchArtifact"),
    "onnx": ("edgefx.backends.onnx", "OnnxBackend", "OnnxArtifact"),
    "tvm": ("edgefx.backends.tvm", "TvmBackend", "TvmArtifact"),
}

BACKENDS = tuple(_REGISTRY)


def _lookup(name: object, index: int) -> type:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise BackendError(
            f"unknown backend {name!r}", hint=f"choose one of: {', '.join(BACKENDS)}"
        )
    import importlib

    entry = _REGISTRY[name]
    return getattr(importlib.import_module(entry[0]), entry[index])


def get_backend(name: object, target: str | None = None, **options: Any) -> Backend:
    """Instantiate backend ``name``; BackendError for unknown names or bad options."""
    cls = _lookup(name, 1)
    try:
        return cls(target, **options)
    except TypeError as exc:
        raise BackendError(f"bad option for the {name} backend: {exc}") from None


def artifact_class(name: str) -> type[Artifact]:
    return _lookup(name, 2)


__all__ = ["BACKENDS", "Artifact", "Backend", "artifact_class", "get_backend"]
