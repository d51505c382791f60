"""Run an edgefx TVM deploy folder. Copied into every folder as ``run.py``: it needs only the
TVM runtime and numpy (no torch, no edgefx), so it runs on the board itself.

    python run.py                         # random inputs (batch 1), prints output shapes
    python run.py --inputs x.npy --out y.npz
    python run.py --repeat 20             # median latency over 20 runs
    python run.py --rpc 192.168.1.7:9090  # run on a board's TVM RPC server from this machine
    python run.py --rpc 127.0.0.1:9190 --rpc-key rpi4   # ... through a TVM RPC tracker
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"


def load_manifest(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / MANIFEST).read_text())


def _device(kind: str, session: Any = None) -> Any:
    import tvm

    if session is None:
        return {"cpu": tvm.cpu, "cuda": tvm.cuda, "opencl": tvm.opencl}[kind](0)
    return {"cpu": session.cpu, "cuda": session.cuda, "opencl": session.cl}[kind](0)


def connect(address: str, key: str | None = None, timeout: float = 60) -> Any:
    """A TVM RPC session: ``host:port`` of an RPC server, or of a tracker when ``key`` is set."""
    from tvm import rpc

    host, _, port = address.rpartition(":")
    if key:
        return rpc.connect_tracker(host, int(port)).request(key, session_timeout=timeout)
    return rpc.connect(host, int(port), session_timeout=timeout)


def open_vm(folder: str | Path, session: Any = None) -> tuple[Any, Any]:
    """The folder's library in a Relax VM, here or on an RPC ``session``; -> (vm, device)."""
    import tvm
    from tvm import relax

    folder = Path(folder)
    manifest = load_manifest(folder)
    library = folder / manifest["artifact"]
    device = _device(manifest["target"]["device"], session)
    if session is None:
        module = tvm.runtime.load_module(str(library))
    else:
        session.upload(str(library))
        module = session.load_module(library.name)
    return relax.VirtualMachine(module, device), device


def run(vm: Any, device: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import tvm

    args = [tvm.runtime.tensor(np.ascontiguousarray(x), device) for x in inputs]
    # the stateful calls fetch tuple outputs field by field, which also works over RPC
    # (a remote tuple cannot be iterated from here)
    vm.set_input("main", *args)
    vm.invoke_stateful("main")
    return [np.asarray(y.numpy()) for y in _leaves(vm.get_outputs("main"))]


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def example_inputs(manifest: dict[str, Any], batch: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Random inputs matching the manifest's specs (the dynamic batch dimension = ``batch``)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in manifest["inputs"]:
        shape = [batch if isinstance(d, str) else d for d in spec["shape"]]
        dtype = spec["dtype"].removeprefix("torch.")
        if dtype.startswith("float"):
            arrays.append(rng.standard_normal(shape).astype(dtype))
        else:
            arrays.append(rng.integers(0, 10, size=shape).astype(dtype))
    return arrays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run an edgefx TVM deploy folder")
    parser.add_argument(
        "--dir",
        default=str(Path(__file__).resolve().parent),
        help="the deploy folder (default: this file's)",
    )
    parser.add_argument("--inputs", nargs="*", default=None, help=".npy files, one per input")
    parser.add_argument("--batch", type=int, default=1, help="batch of the random inputs")
    parser.add_argument("--out", default=None, help="write the outputs to this .npz file")
    parser.add_argument("--repeat", type=int, default=1, help="runs to time (median printed)")
    parser.add_argument("--rpc", default=None, help="host:port of a TVM RPC server or tracker")
    parser.add_argument("--rpc-key", default=None, help="device key, when --rpc is a tracker")
    args = parser.parse_args(argv)

    manifest = load_manifest(args.dir)
    if args.inputs:
        inputs = [np.load(path) for path in args.inputs]
    else:
        inputs = example_inputs(manifest, args.batch)
    session = connect(args.rpc, args.rpc_key) if args.rpc else None
    vm, device = open_vm(args.dir, session)
    outputs = run(vm, device, inputs)
    times = []
    for _ in range(max(args.repeat - 1, 0)):
        start = time.perf_counter()
        run(vm, device, inputs)
        times.append(time.perf_counter() - start)
    for spec, y in zip(manifest["outputs"], outputs, strict=False):
        print(f"{spec['name']}: {y.dtype}{list(y.shape)}  mean {float(y.mean()):.6g}")
    if times:
        print(f"median latency over {len(times)} runs: {statistics.median(times) * 1e3:.2f} ms")
    if args.out:
        np.savez(args.out, *outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
