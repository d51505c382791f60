"""Run a saved TVM deploy folder: here (Relax VM), under qemu as an aarch64 board, or on a
board's TVM RPC server (directly or through a TVM RPC tracker). All three take and return
numpy arrays; the emulated one runs the folder's own run.py, as the board would."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgefx.backends.tvm import deploy_runtime
from edgefx.backends.tvm.backend import _quiet_native_warnings
from edgefx.backends.tvm.targets import runs_here_reason
from edgefx.errors import ArtifactError, BackendError, first_line


def _manifest(directory: Path) -> dict:
    path = directory / deploy_runtime.MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"no {deploy_runtime.MANIFEST} in {directory}",
            hint="pass a folder written by `edgefx compile --backend tvm -o DIR`",
        )
    manifest = deploy_runtime.load_manifest(directory)
    if manifest.get("backend") != "tvm":
        raise ArtifactError(f"{directory} holds a {manifest.get('backend')!r} model, not a TVM one")
    return manifest


def inputs_for(directory: str | Path, batch: int = 1) -> list[np.ndarray]:
    """Random inputs matching the folder's manifest."""
    return deploy_runtime.example_inputs(_manifest(Path(directory)), batch)


def run_local(directory: str | Path, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    directory = Path(directory)
    target = _manifest(directory)["target"]
    reason = runs_here_reason(target["arch"], target["device"])
    if reason:
        raise ArtifactError(
            f"{directory} (target {target['name']!r}) cannot run here: {reason}",
            hint="use --rpc host:port (a TVM RPC server on the device)"
            + (" or --emulate" if target["arch"] == "aarch64" else ""),
        )
    with _quiet_native_warnings():
        vm, device = deploy_runtime.open_vm(directory)
    return deploy_runtime.run(vm, device, list(inputs))


def run_emulated(
    directory: str | Path, inputs: Sequence[np.ndarray], timeout: float = 900
) -> list[np.ndarray]:
    """Run the folder's run.py on an emulated aarch64 Linux (qemu-user; see emulation.py)."""
    from edgefx.backends.tvm import emulation

    directory = Path(directory).resolve()
    target = _manifest(directory)["target"]
    if target["arch"] != "aarch64" or target["device"] != "cpu":
        raise ArtifactError(
            f"emulation runs aarch64 CPU libraries; {directory} is for {target['name']!r} "
            f"({target['arch']}, {target['device']})"
        )
    with tempfile.TemporaryDirectory(prefix="edgefx-emu-") as tmp:
        paths = []
        for i, x in enumerate(inputs):
            paths.append(str(Path(tmp) / f"input{i}.npy"))
            np.save(paths[-1], np.ascontiguousarray(x))
        out = Path(tmp) / "outputs.npz"
        script = directory / _manifest(directory).get("run_script", "run.py")
        done = emulation.run_python(
            script, ["--dir", str(directory), "--inputs", *paths, "--out", str(out)],
            timeout=timeout,
        )  # fmt: skip
        if done.returncode != 0 or not out.is_file():
            tail = "\n".join(done.stderr.strip().splitlines()[-8:])
            raise BackendError(f"run.py failed under aarch64 emulation:\n{tail}")
        with np.load(out) as saved:
            return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def run_rpc(
    directory: str | Path,
    inputs: Sequence[np.ndarray],
    address: str,
    key: str | None = None,
) -> list[np.ndarray]:
    """Upload the library to a TVM RPC server (``host:port``, or a tracker with ``key``), run
    it there on the target's device, fetch the outputs."""
    directory = Path(directory)
    _manifest(directory)
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BackendError(f"--rpc takes host:port, got {address!r}", hint="e.g. 192.168.1.7:9090")
    try:
        session = deploy_runtime.connect(address, key)
    except Exception as exc:
        what = f"tracker {address} (key {key!r})" if key else f"RPC server {address}"
        raise BackendError(
            f"cannot reach the TVM {what}: {first_line(exc)}",
            hint="on the device: python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090",
        ) from None
    vm, device = deploy_runtime.open_vm(directory, session)
    return deploy_runtime.run(vm, device, list(inputs))
