"""edgefx: a torch.fx graph-rewriting compiler pass suite for vision models on edge devices."""

__version__ = "0.1.0"

import functools
from pathlib import Path
from typing import Any

import edgefx.ops  # noqa: F401  (registers edgefx's torch ops: saved Programs may use them)
from edgefx import compiler as _compiler
from edgefx.compiler import Compiled, CompileReport, load
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


@functools.wraps(_compiler.compile)
def compile(*args: Any, **kwargs: Any) -> Compiled:
    # compile(dump_dir=D) also draws every stage and writes D/index.html. The drawing lives in
    # edgefx.tools.dump, and nothing below tools/ may import tools/ (tools read Programs and
    # reports; compiler.py and the PassManager are what they read), so the PassManager takes
    # it as a hook and this entry point, above both, plugs it in.
    if kwargs.get("dump_dir") is not None:
        kwargs.setdefault("dump_hook", _draw_stages)
    return _compiler.compile(*args, **kwargs)


def _draw_stages(dump_dir: Path, captured: Program, results: list[Any]) -> None:
    from edgefx.tools.dump import draw_stages

    draw_stages(dump_dir, captured, results)

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
