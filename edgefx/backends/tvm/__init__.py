"""The Apache TVM (Relax) backend: targets as data, import, build, deploy folders, runners."""

from edgefx.backends.tvm.backend import TvmArtifact, TvmBackend
from edgefx.backends.tvm.targets import PRESETS, resolve_target

__all__ = ["PRESETS", "TvmArtifact", "TvmBackend", "resolve_target"]
