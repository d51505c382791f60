"""Per-kernel times of a TVM deploy folder, measured in the Relax VM.

TVM 0.27 has no per-op profiler any more (``tvm.runtime.profiling`` and the VM's
``profile()`` are gone); what remains is the VM instrument (a callback before and after every
call the VM makes) and ``time_evaluator``. So a folder is profiled in three runs of ``main``:

1. trace: the instrument records every kernel call (a PrimFunc of the library), which tensors
   it wrote (its destination arguments: those whose bytes changed, else the last one) and
   which earlier calls wrote the tensors it read (by data pointer: a reshape is a view of the
   same memory, and a pooled buffer belongs to its latest writer), plus a numeric
   ``Signature`` of each output, so that a caller holding the source graph can tell which of
   its nodes a kernel computed;
2. timing: the instrument times each call on its own arguments with the library's
   ``time_evaluator`` (C++ timer, ``repeat`` runs of one call, median);
3. the whole run: ``time_evaluator`` of ``invoke_stateful("main")`` without an instrument.

The kernels carry TVM's names (``conv2d3``, ``fused_conv2d_add_relu``): nothing in them says
which source module they came from, hence the signatures.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefx.backends.tvm import deploy_runtime
from edgefx.backends.tvm.backend import _quiet_native_warnings
from edgefx.backends.tvm.targets import runs_here_reason
from edgefx.errors import ArtifactError, BackendError, first_line

SAMPLE = 64  # elements of a tensor kept in its signature
BUILTIN_PREFIX = "vm.builtin."


@dataclass(frozen=True)
class Signature:
    """Enough of a tensor to recognise it computed elsewhere (PyTorch, another backend)."""

    shape: tuple[int, ...]
    sample: tuple[float, ...]  # SAMPLE evenly spaced elements of the flattened tensor
    abs_mean: float

    @classmethod
    def of(cls, array: Any) -> Signature:
        flat = np.asarray(array).reshape(-1).astype(np.float64)
        if flat.size == 0:
            return cls(tuple(np.shape(array)), (), 0.0)
        index = np.linspace(0, flat.size - 1, num=min(SAMPLE, flat.size)).astype(np.int64)
        return cls(
            tuple(int(d) for d in np.shape(array)),
            tuple(float(v) for v in flat[index]),
            float(np.abs(flat).mean()),
        )

    def matches(self, other: Signature, rtol: float = 1e-3) -> bool:
        """Same shape and the same values to ``rtol`` of the tensor's scale (float kernels
        round differently from PyTorch's)."""
        if self.shape != other.shape or len(self.sample) != len(other.sample):
            return False
        a, b = np.array(self.sample), np.array(other.sample)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            return bool(np.array_equal(a, b, equal_nan=True))
        scale = max(float(np.abs(a).max(initial=0.0)), self.abs_mean, 1e-12)
        close = np.allclose(a, b, rtol=0, atol=rtol * scale)
        return bool(close and abs(self.abs_mean - other.abs_mean) <= rtol * scale)


@dataclass
class KernelCall:
    """One call of a compiled kernel during a run of ``main``."""

    index: int  # position among the kernel calls of one run
    name: str  # the PrimFunc's name
    producers: tuple[int, ...]  # kernel calls that wrote the tensors this one read
    outputs: tuple[Signature, ...]
    ms: float = float("nan")  # median time of the call on its own
    times: list[float] = field(default_factory=list, repr=False)


@dataclass
class KernelProfile:
    calls: list[KernelCall]
    run_ms: float  # median time of a whole run of main (no instrument)
    other_calls: dict[str, int]  # calls that are neither kernels nor VM builtins, by name
    threads: int  # the threads TVM's pool had


def _digest(tensor: Any) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(tensor.numpy()).tobytes(), digest_size=16).digest()


def _kernel_library(module: Any, name: str) -> Any:
    """The module (the VM executable's imports, depth first) that holds kernel ``name``."""
    stack = list(module.imports)
    while stack:
        candidate = stack.pop(0)
        if candidate.implements_function(name):
            return candidate
        stack.extend(candidate.imports)
    return None


def tvm_threads() -> int:
    """The size of TVM's (process-wide) thread pool."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())


def set_tvm_threads(threads: int) -> int:
    """Ask for ``threads`` threads in TVM's pool; -> the size it got (TVM caps it at what it
    counts as the machine's cores, unless TVM_NUM_THREADS says otherwise)."""
    import tvm

    # affinity mode 1 = the "big" cores (every core on x86)
    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    return tvm_threads()


def profile_folder(
    folder: str | Path,
    inputs: Sequence[np.ndarray],
    *,
    runs: int = 20,
    warmup: int = 3,
    threads: int = 1,
) -> KernelProfile:
    """Trace and time every kernel call of the folder's ``main`` on ``inputs`` (see above)."""
    import tvm
    from tvm import relax

    folder = Path(folder)
    manifest = deploy_runtime.load_manifest(folder)
    if manifest.get("backend") != "tvm":
        raise ArtifactError(f"{folder} holds a {manifest.get('backend')!r} model, not a TVM one")
    target = manifest["target"]
    reason = runs_here_reason(target["arch"], target["device"])
    if reason:
        raise ArtifactError(
            f"{folder} (target {target['name']!r}) cannot be profiled here: {reason}",
            hint="profile a folder built for this machine (e.g. --target x86_64)",
        )
    if runs < 1 or warmup < 0 or threads < 1:
        raise ArtifactError("runs and threads must be >= 1 and warmup >= 0")
    device = deploy_runtime._device(target["device"])
    library = folder / manifest["artifact"]
    try:
        with _quiet_native_warnings():
            module = tvm.runtime.load_module(str(library))
    except Exception as exc:
        raise ArtifactError(f"cannot load the TVM library {library}: {first_line(exc)}") from exc
    args = [tvm.runtime.tensor(np.ascontiguousarray(x), device) for x in inputs]
    kernels: dict[str, Any] = {}  # name -> the library module holding it (None: not a kernel)

    def is_kernel(name: str) -> bool:
        if name.startswith(BUILTIN_PREFIX):
            return False
        if name not in kernels:
            kernels[name] = _kernel_library(module, name)
        return kernels[name] is not None

    calls: list[KernelCall] = []
    other: dict[str, int] = {}
    writer: dict[int, int] = {}  # data pointer -> the kernel call that wrote there last
    before: list[bytes] = []

    def trace(_func: Any, name: str, before_run: bool, _ret: Any, *call_args: Any) -> int:
        if not is_kernel(name):
            if before_run and not name.startswith(BUILTIN_PREFIX):
                other[name] = other.get(name, 0) + 1
            return 0
        tensors = [a for a in call_args if isinstance(a, tvm.runtime.Tensor)]
        if before_run:
            before[:] = [_digest(t) for t in tensors]
            return 0
        changed = [t for t, b in zip(tensors, before, strict=True) if _digest(t) != b]
        written = changed or tensors[-1:]  # destination-passing style: outputs come last
        written_ptrs = {t.data_ptr() for t in written}
        read = [t for t in tensors if t.data_ptr() not in written_ptrs]
        producers = sorted({writer[t.data_ptr()] for t in read if t.data_ptr() in writer})
        index = len(calls)
        for t in written:
            writer[t.data_ptr()] = index
        outputs = tuple(Signature.of(t.numpy()) for t in written)
        calls.append(KernelCall(index, name, tuple(producers), outputs))
        return 0

    timed = iter(calls)
    evaluators: dict[str, Any] = {}

    def time_call(_func: Any, name: str, before_run: bool, _ret: Any, *call_args: Any) -> int:
        if before_run or not is_kernel(name):
            return 0
        call = next(timed, None)
        if call is None or call.name != name:
            raise BackendError(
                f"the second run of {folder.name} called {name} where the first called "
                f"{call.name if call else 'nothing'}: the kernel sequence is not repeatable"
            )
        if name not in evaluators:
            evaluators[name] = kernels[name].time_evaluator(name, device, number=1, repeat=runs)
        function = kernels[name].get_function(name)
        for _ in range(warmup):
            function(*call_args)
        call.times = [t * 1e3 for t in evaluators[name](*call_args).results]
        call.ms = statistics.median(call.times)
        return 0

    pool = tvm_threads()
    threads = set_tvm_threads(threads)
    try:
        for instrument in (trace, time_call):
            with _quiet_native_warnings():
                vm = relax.VirtualMachine(module, device)
            vm.set_instrument(instrument)
            vm.set_input("main", *args)
            vm.invoke_stateful("main")
        with _quiet_native_warnings():
            vm = relax.VirtualMachine(module, device)
        vm.set_input("main", *args)
        for _ in range(warmup):
            vm.invoke_stateful("main")
        whole = vm.time_evaluator("invoke_stateful", device, number=1, repeat=runs)("main")
    except (BackendError, ArtifactError):
        raise
    except Exception as exc:
        raise BackendError(f"profiling {folder} in the Relax VM failed: {first_line(exc)}") from exc
    finally:
        set_tvm_threads(pool)
    return KernelProfile(
        calls=calls,
        run_ms=statistics.median(whole.results) * 1e3,
        other_calls=other,
        threads=threads,
    )
