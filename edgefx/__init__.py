"""edgefx: a torch.fx graph-rewriting compiler pass suite for vision models on edge devices."""

__version__ = "0.1.0"

import edgefx.ops  # noqa: F401  (registers edgefx's torch ops: saved Programs may use them)
from edgefx.compiler import Compiled, CompileReport, compile, load
from edgefx.errors import (
    ArtifactError,
    BackendError,
    CaptureError,
    EdgefxError,
    InputError,
    ModelNotFoundError,
    PassError,
)
from edgefx.program import Program, TensorSpec

__all__ = [
    "ArtifactError",
    "BackendError",
    "CaptureError",
    "CompileReport",
    "Compiled",
    "EdgefxError",
    "InputError",
    "ModelNotFoundError",
    "PassError",
    "Program",
    "TensorSpec",
    "__version__",
    "compile",
    "load",
]
