"""Named TVM targets, as data: each preset is a TVM target dict (JSON form, as TVM 0.27 takes
them), the CPU architecture its library runs on, the device it computes on, and one line
saying what it is. A user's own TVM target dict is accepted wherever a name is."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

from edgefx.errors import BackendError

AARCH64_TRIPLE = "aarch64-linux-gnu"
CROSS_COMPILER = "aarch64-linux-gnu-g++"  # Debian: g++-aarch64-linux-gnu
CROSS_PACKAGE = "g++-aarch64-linux-gnu"
_AARCH64_HOST = {"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mattr": ["+neon"]}


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    target: dict[str, Any]  # TVM target dict; "host" inside it for GPU targets
    arch: str  # the CPU architecture the library's host code runs on: x86_64 / aarch64
    device: str = "cpu"  # where the model computes: cpu / cuda / opencl
    # TVM's schedules for it need every shape known (Adreno's DLight rules: symbolic batch)
    static_shapes: bool = False


PRESETS: dict[str, TargetPreset] = {
    p.name: p
    for p in (
        TargetPreset(
            "x86_64",
            "this x86-64 host (LLVM, -mcpu of this machine's CPU)",
            {"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
            "x86_64",
        ),
        TargetPreset(
            "aarch64",
            "generic 64-bit ARM Linux with NEON (any Cortex-A53 or newer)",
            {"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mattr": ["+neon"]},
            "aarch64",
        ),
        TargetPreset(
            "rpi4",
            "Raspberry Pi 4 (Cortex-A72, 4 cores, NEON), 64-bit OS",
            {
                "kind": "llvm",
                "mtriple": AARCH64_TRIPLE,
                "mcpu": "cortex-a72",
                "mattr": ["+neon"],
                "num-cores": 4,
            },
            "aarch64",
        ),
        TargetPreset(
            "rpi5",
            "Raspberry Pi 5 (Cortex-A76, 4 cores, NEON + dotprod), 64-bit OS",
            {
                "kind": "llvm",
                "mtriple": AARCH64_TRIPLE,
                "mcpu": "cortex-a76",
                "mattr": ["+neon", "+dotprod"],
                "num-cores": 4,
            },
            "aarch64",
        ),
        TargetPreset(
            "jetson-orin-nano",
            "NVIDIA Jetson Orin Nano (CUDA sm_87, Cortex-A78AE host)",
            {
                "kind": "cuda",
                "arch": "sm_87",
                "max_threads_per_block": 1024,
                "max_shared_memory_per_block": 49152,
                "thread_warp_size": 32,
                "host": {**_AARCH64_HOST, "mcpu": "cortex-a78"},
            },
            "aarch64",
            "cuda",
        ),
        TargetPreset(
            "mali",
            "ARM Mali GPU through OpenCL (aarch64 Linux host)",
            {"kind": "opencl", "device": "mali", "host": _AARCH64_HOST},
            "aarch64",
            "opencl",
        ),
        TargetPreset(
            "adreno",
            "Qualcomm Adreno GPU through OpenCL (aarch64 host; static batch)",
            {"kind": "opencl", "device": "adreno", "host": _AARCH64_HOST},
            "aarch64",
            "opencl",
            static_shapes=True,
        ),
        TargetPreset(
            "cuda",
            "this host's NVIDIA GPU (CUDA, x86-64 host code)",
            {"kind": "cuda", "host": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}},
            "x86_64",
            "cuda",
        ),
    )
}
DEFAULT_TARGET = "x86_64"


@dataclass(frozen=True)
class ResolvedTarget:
    """A preset or user dict turned into a ``tvm.target.Target`` plus what edgefx needs."""

    name: str  # preset name, or "custom"
    config: dict[str, Any]  # the dict given to TVM
    arch: str
    device: str
    tvm_target: Any  # tvm.target.Target
    static_shapes: bool = False

    @property
    def cross_compiler(self) -> str | None:
        """The C++ compiler that links the library when it is not for this host's CPU."""
        return CROSS_COMPILER if self.arch == "aarch64" and host_arch() != "aarch64" else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config,
            "arch": self.arch,
            "device": self.device,
            "tvm": str(self.tvm_target),
        }


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _triple_arch(config: dict[str, Any]) -> str:
    host = config.get("host") if config.get("kind") != "llvm" else config
    if isinstance(host, dict):
        triple = str(host.get("mtriple", ""))
        if triple.startswith(("aarch64", "arm64")):
            return "aarch64"
        if triple.startswith("x86_64") or not triple:
            return "x86_64" if triple or host_arch() == "x86_64" else host_arch()
        return triple.split("-")[0]
    return host_arch()


def _device(config: dict[str, Any]) -> str:
    kind = config.get("kind")
    if kind == "llvm":
        return "cpu"
    if kind in ("cuda", "opencl"):
        return kind
    raise BackendError(
        f"target kind {kind!r} is not one edgefx can run (llvm, cuda or opencl)",
        hint="use a preset (`edgefx targets`) or a dict with kind llvm/cuda/opencl",
    )


def resolve_target(target: str | dict[str, Any] | None) -> ResolvedTarget:
    """A preset name or a TVM target dict -> ResolvedTarget; BackendError when TVM refuses."""
    import tvm
    import tvm.target

    if target is None:
        target = DEFAULT_TARGET
    if isinstance(target, str):
        if target not in PRESETS:
            raise BackendError(
                f"unknown TVM target {target!r}",
                hint=f"choose a preset ({', '.join(PRESETS)}; `edgefx targets` describes them) "
                "or pass a TVM target dict such as {'kind': 'llvm', 'mtriple': "
                "'aarch64-linux-gnu'}",
            )
        preset = PRESETS[target]
        config = dict(preset.target)
        if target == "x86_64":
            # the host's own CPU (what -mcpu=native picks): AVX2/AVX-512 where present
            config["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
        name, arch, device = preset.name, preset.arch, preset.device
        static_shapes = preset.static_shapes
    elif isinstance(target, dict):
        config, name, static_shapes = dict(target), "custom", False
        device = _device(config)
        arch = _triple_arch(config)
    else:
        raise BackendError(
            f"a TVM target is a preset name or a target dict, got {type(target).__name__}",
            hint=f"e.g. target='rpi4'; presets: {', '.join(PRESETS)}",
        )
    try:
        tvm_target = tvm.target.Target(config)
    except Exception as exc:  # TVM raises ValueError / TVMError with its own text
        raise BackendError(
            f"TVM rejects the target {config}: {str(exc).strip().splitlines()[0]}",
            hint="TVM 0.27 takes JSON-style dicts: {'kind': 'llvm', 'mtriple': ..., "
            "'mcpu': ..., 'mattr': [...]}; see `edgefx targets` for working ones",
        ) from None
    if device == "cpu" and tvm_target.kind.name != "llvm":
        device = _device({"kind": tvm_target.kind.name})
    return ResolvedTarget(name, config, arch, device, tvm_target, static_shapes)


def runs_here_reason(arch: str, device: str) -> str | None:
    """Why a library for (arch, device) cannot run on this machine, or None if it can."""
    here = host_arch()
    if arch != here:
        return f"it is built for {arch} and this host is {here}"
    if device == "cpu":
        return None
    import tvm
    import tvm.target

    dev = tvm.cuda(0) if device == "cuda" else tvm.opencl(0)
    if not dev.exist:
        return f"it computes on {device} and this host has no {device} device"
    return None
