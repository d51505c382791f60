"""The TVM backend: Program -> Relax (importer.py) -> ``tvm.compile`` for a target -> a
library that runs in a Relax VM here, under emulation, over RPC, or on the board itself.

A library built for another CPU architecture or for a GPU this machine lacks cannot run here:
the artifact says why (``cannot_run_here``) and compile() records that instead of its numeric
check; the deploy folder (``save``) holds the library, manifest.json and a standalone run.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from edgefx.backends.base import Artifact, Backend
from edgefx.backends.tvm import deploy_runtime
from edgefx.backends.tvm.importer import to_relax
from edgefx.backends.tvm.targets import (
    CROSS_COMPILER,
    CROSS_PACKAGE,
    ResolvedTarget,
    resolve_target,
    runs_here_reason,
)
from edgefx.errors import ArtifactError, BackendError, first_line
from edgefx.program import Program

LIBRARY_FILE = "model.so"
RUN_SCRIPT = "run.py"


@contextlib.contextmanager
def _quiet_native_warnings() -> Iterator[None]:
    """Silence stderr at the file-descriptor level: TVM 0.27's VM executable logs a
    "Warning: Scope Saving/Loaded" line per constant when a library is saved or loaded
    (hundreds for a CNN). Failures still arrive as Python exceptions."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def tvm_versions() -> dict[str, str]:
    versions = {}
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    return versions


def cross_compiler_for(target: dict[str, Any]) -> Any:
    """``fcompile`` for ``export_library``: None for this host's architecture, else the
    aarch64 cross compiler (BackendError naming the Debian package when it is missing)."""
    from edgefx.backends.tvm.targets import host_arch

    if target["arch"] == host_arch():
        return None
    if target["arch"] != "aarch64":
        raise BackendError(f"no cross compiler known for {target['arch']} libraries")
    if shutil.which(CROSS_COMPILER) is None:
        raise BackendError(
            f"linking a {target['name']} ({target['arch']}) library needs the cross compiler "
            f"{CROSS_COMPILER}, which is not on PATH",
            hint=f"install the Debian package {CROSS_PACKAGE}: "
            f"sudo apt-get install -y {CROSS_PACKAGE}",
        )
    from tvm.support import cc

    return cc.cross_compiler(CROSS_COMPILER)


class TvmArtifact(Artifact):
    """A TVM library: an in-memory executable after a build, or a loaded ``model.so``.

    It does not expose intermediate values (``run_observing`` returns None): Relax fuses
    and renames the graph's ops, so compile() checks a quantized Program on TVM by its
    outputs only (in quantization steps), not quantizer by quantizer."""

    backend = "tvm"

    def __init__(
        self,
        target: dict[str, Any],
        *,
        executable: Any = None,
        module: Any = None,
        library: Path | None = None,
        build_info: dict[str, Any] | None = None,
    ) -> None:
        self.target = target  # ResolvedTarget.to_dict()
        self.executable = executable  # tvm.relax.VMExecutable, after a build
        self.module = module  # a loaded runtime module, after load()
        self.library = library
        self.build_info = dict(build_info or {})
        self._vm: tuple[Any, Any] | None = None

    @property
    def cannot_run_here(self) -> str | None:
        """Why this library cannot run on this machine (None when it can)."""
        return runs_here_reason(self.target["arch"], self.target["device"])

    def _session(self) -> tuple[Any, Any]:
        if self._vm is None:
            reason = self.cannot_run_here
            if reason:
                raise ArtifactError(
                    f"this TVM library for target {self.target['name']!r} cannot run here: "
                    f"{reason}",
                    hint="save it (compiled.save(dir)) and run dir/run.py on the device, or "
                    "`edgefx run DIR --rpc host:port` / `--emulate` (aarch64 under qemu)",
                )
            from tvm import relax

            device = deploy_runtime._device(self.target["device"])
            self._vm = (relax.VirtualMachine(self.executable or self.module, device), device)
        return self._vm

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        vm, device = self._session()
        arrays = [x.detach().cpu().numpy() for x in inputs]
        return [torch.from_numpy(y) for y in deploy_runtime.run(vm, device, arrays)]

    def export_library(self, path: Path) -> Path:
        if self.executable is None:
            if self.library is None:
                raise ArtifactError("this TVM artifact has neither an executable nor a library")
            shutil.copyfile(self.library, path)
            return path
        fcompile = cross_compiler_for(self.target)
        try:
            with _quiet_native_warnings():
                if fcompile is None:
                    self.executable.export_library(str(path))
                else:
                    self.executable.export_library(str(path), fcompile=fcompile)
        except Exception as exc:
            raise BackendError(f"linking the TVM library {path} failed: {first_line(exc)}") from exc
        return path

    def save(self, directory: Path) -> dict[str, Any]:
        self.export_library(directory / LIBRARY_FILE)
        shutil.copyfile(Path(deploy_runtime.__file__), directory / RUN_SCRIPT)
        return {
            "artifact": LIBRARY_FILE,
            "run_script": RUN_SCRIPT,
            "target": self.target,
            "tvm_versions": tvm_versions(),
            "build": self.build_info,
        }

    @classmethod
    def load(cls, directory: Path, manifest: dict[str, Any]) -> TvmArtifact:
        target = manifest.get("target")
        if not isinstance(target, dict) or "arch" not in target:
            raise ArtifactError(f"{directory}/manifest.json has no TVM target entry")
        reason = runs_here_reason(target["arch"], target["device"])
        if reason:
            raise ArtifactError(
                f"{directory} was built for target {target['name']!r} ({target['tvm']}): "
                f"it cannot run on this machine because {reason}",
                hint=f"copy the folder to the device and run `python {RUN_SCRIPT}` there "
                "(needs only the TVM runtime and numpy), or `edgefx run DIR --rpc host:port`"
                + (", or `edgefx run DIR --emulate`" if target["arch"] == "aarch64" else ""),
            )
        library = directory / manifest.get("artifact", LIBRARY_FILE)
        try:
            import tvm

            with _quiet_native_warnings():
                module = tvm.runtime.load_module(str(library))
        except Exception as exc:
            raise ArtifactError(
                f"cannot load the TVM library {library}: {first_line(exc)}"
            ) from exc
        return cls(target, module=module, library=library, build_info=manifest.get("build"))

    def describe(self) -> dict[str, Any]:
        info = {
            "target": self.target["name"],
            "arch": self.target["arch"],
            "device": self.target["device"],
            **self.build_info,
        }
        tuning = info.pop("tuning", None)
        if tuning:
            failed = len(tuning["tasks_failed"])
            info["tuning"] = (
                f"{tuning['tune_trials']} trials, {tuning['tasks_tuned']} tasks tuned, "
                f"{tuning['tasks_reused']} from the database, {failed} failed (default schedule)"
                f", measured on {tuning.get('measured_on', 'this machine')}"
            )
        return info

    def device_sources(self) -> dict[str, str]:
        """Generated device code (CUDA C / OpenCL C) by module kind, for GPU targets."""
        root = self.executable.mod if self.executable is not None else self.module
        sources: dict[str, str] = {}
        stack = list(root.imports)
        while stack:
            module = stack.pop()
            stack.extend(module.imports)
            kind = module.kind
            if kind in ("cuda", "opencl"):
                sources[kind] = sources.get(kind, "") + module.inspect_source()
        return sources


def default_tuning_dir(target_name: str) -> Path:
    base = os.environ.get("EDGEFX_CACHE") or Path.home() / ".cache" / "edgefx"
    return Path(base) / "tuning" / target_name


class TvmBackend(Backend):
    """Options: ``target`` (preset name or TVM target dict; default the x86-64 host);
    ``tune_trials`` (MetaSchedule trials over the whole model, 0 = TVM's default schedules;
    needs a static batch); ``work_dir`` (the tuning database, reused across builds; default
    ``~/.cache/edgefx/tuning/<target>``); ``rpc`` (tune on the board itself:
    ``{"tracker": "host:port", "key": K}``, the TVM RPC tracker its server registered with;
    MetaSchedule then times every candidate there); ``progress`` (a progress bar while
    tuning)."""

    name = "tvm"

    def __init__(
        self,
        target: str | dict[str, Any] | None = None,
        *,
        tune_trials: int = 0,
        work_dir: str | Path | None = None,
        rpc: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        from edgefx.backends.tvm.tuning import RpcDevice

        if not isinstance(tune_trials, int) or isinstance(tune_trials, bool) or tune_trials < 0:
            raise BackendError(f"tune_trials must be an integer >= 0, got {tune_trials!r}")
        self.rpc = RpcDevice.from_option(rpc) if rpc is not None else None
        if self.rpc and not tune_trials:
            raise BackendError(
                "the rpc option measures MetaSchedule's candidates on a board: it needs "
                "tune_trials > 0",
                hint="to run a built model on a board: edgefx run DIR --rpc host:port",
            )
        self.resolved: ResolvedTarget = resolve_target(target)
        super().__init__(self.resolved.name)
        self.tune_trials = tune_trials
        self.work_dir = Path(work_dir) if work_dir else default_tuning_dir(self.resolved.name)
        self.progress = progress

    def build(self, program: Program) -> TvmArtifact:
        import tvm

        if program.dynamic_batch and self.resolved.static_shapes:
            raise BackendError(
                f"TVM's schedules for {self.resolved.name} need static shapes, and "
                f"{program.name} has a dynamic batch",
                hint="compile with dynamic_batch=False (CLI: --static-batch)",
            )
        if self.tune_trials and program.dynamic_batch:
            raise BackendError(
                f"MetaSchedule tunes static shapes, and {program.name} has a dynamic batch",
                hint="compile with dynamic_batch=False (CLI: --static-batch) to tune",
            )
        start = time.perf_counter()
        mod = to_relax(program)
        import_s = time.perf_counter() - start
        info: dict[str, Any] = {}
        target = self.resolved.tvm_target
        if self.tune_trials:
            from edgefx.backends.tvm.tuning import tune, tuning_target

            target = tuning_target(target)
            if self.rpc:  # candidates are linked here: the toolchain first, with its hint
                cross_compiler_for(self.resolved.to_dict())
            try:
                mod, tuning = tune(
                    mod, target, self.tune_trials, self.work_dir, progress=self.progress,
                    rpc=self.rpc, cross_compiler=self.resolved.cross_compiler,
                )  # fmt: skip
            except BackendError:
                raise
            except Exception as exc:
                raise BackendError(
                    f"MetaSchedule tuning of {program.name} failed: {first_line(exc)}"
                ) from exc
            info["tuning"] = tuning.to_dict()
        start = time.perf_counter()
        try:
            executable = tvm.compile(mod, target=target)
        except Exception as exc:
            raise BackendError(
                f"TVM could not build {program.name} for {self.resolved.name}: {first_line(exc)}",
                hint="run with --debug for TVM's trace",
            ) from exc
        info = {
            **info,
            "import_s": round(import_s, 3),
            "tvm_build_s": round(time.perf_counter() - start, 3),
            "dynamic_batch": program.dynamic_batch,
        }
        return TvmArtifact(self.resolved.to_dict(), executable=executable, build_info=info)
