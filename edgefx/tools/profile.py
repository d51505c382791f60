"""Where the time goes: run a compiled folder under a profiler and map every kernel's time
back to the FX node and source module it came from.

ONNX (onnxruntime's profiler): the ONNX backend names nodes ``<module>/<fx node>`` and writes
the map to ``onnx_nodes.json``; onnxruntime's profile names kernels after the nodes it ran,
including nodes it fused (which keep the name of the node they were built from, sometimes with
a suffix, and without the module prefix), so a kernel is charged to its ONNX node by name, or
else to the FX node whose name it keeps. Layout conversions onnxruntime inserts itself
(``ReorderInput`` / ``ReorderOutput``) have no origin and are reported as unmapped. A fused
kernel (onnxruntime runs Conv -> Relu as one Conv named after the Relu) is charged to the
node it starts from (the conv).

TVM (the Relax VM's instrument and ``time_evaluator``, see backends/tvm/profiling.py): TVM's
kernels are named after ops (``conv2d3``, ``fused_conv2d_add_relu``), not after source
modules, so a kernel call is mapped by value: its output is compared with the output of every
node of the folder's Program run on the same inputs. A kernel whose output is a node's output
is charged to that node, or, when it computed several nodes (a fused kernel, the nodes between
its inputs and its output), to the costliest of them (the conv, not its ReLU); a kernel whose
output is no node's output (TVM splits ``linear`` into transpose, matmul and add; a
decomposed op) is charged to the kernel that consumes it. What is left is reported unmapped.

Kernel times are medians over the measured runs (warm-up runs are dropped).
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from edgefx.errors import EdgefxError
from edgefx.tools.layers import TOP
from edgefx.tools.target import Target

_KERNEL_SUFFIX = "_kernel_time"
UNMAPPED = "(unmapped)"


class ProfileError(EdgefxError):
    """A model that cannot be profiled (no ONNX model or TVM library, bad inputs, a runtime
    failure)."""


@dataclass
class NodeTime:
    kernel: str  # the ONNX node onnxruntime ran, or the TVM kernel (PrimFunc) called
    op_type: str
    module: str
    fx_node: str
    ms: float  # median kernel time over the measured runs
    call: int | None = None  # TVM: the call's position in a run (a kernel runs many times)
    mapped_by: str = ""  # how the kernel was tied to fx_node ("" when it was not)


@dataclass
class ProfileReport:
    name: str
    runs: int
    threads: int
    nodes: list[NodeTime]
    run_ms: float  # median wall time of one whole run, as the runtime measured it
    unmapped_ms: float  # kernel time with no FX origin (e.g. nodes added by ORT)
    inputs: dict[str, list[int]] = field(default_factory=dict)
    runtime: str = "onnxruntime"
    notes: list[str] = field(default_factory=list)  # what the mapping could not do, and why

    @property
    def kernel_ms(self) -> float:
        return sum(n.ms for n in self.nodes)

    def by_module(self) -> dict[str, float]:
        times: dict[str, float] = {}
        for n in self.nodes:
            key = n.module or (TOP if n.fx_node else UNMAPPED)
            times[key] = times.get(key, 0.0) + n.ms
        return times

    def by_fx_node(self) -> dict[str, float]:
        times: dict[str, float] = {}
        for n in self.nodes:
            if n.fx_node:
                times[n.fx_node] = times.get(n.fx_node, 0.0) + n.ms
        return times

    def by_kernel(self) -> dict[str, float]:
        """Time per ONNX node (for onnxruntime; TVM kernels run many times: see ``nodes``)."""
        times: dict[str, float] = {}
        for n in self.nodes:
            times[n.kernel] = times.get(n.kernel, 0.0) + n.ms
        return times

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "runtime": self.runtime,
            "runs": self.runs,
            "threads": self.threads,
            "inputs": self.inputs,
            "run_ms": self.run_ms,
            "kernel_ms": self.kernel_ms,
            "unmapped_ms": self.unmapped_ms,
            "notes": self.notes,
            "modules": dict(sorted(self.by_module().items(), key=lambda kv: -kv[1])),
            "nodes": [vars(n) for n in sorted(self.nodes, key=lambda n: -n.ms)],
        }

    def table(self, *, nodes: bool = False, top: int | None = None) -> Table:
        title = (
            f"Profile of {self.name} ({self.runtime}): median of {self.runs} runs, "
            f"{self.threads} thread(s), run {self.run_ms:.3f} ms"
        )
        table = Table(title=title, caption="\n".join(self.notes) or None)
        tvm = self.runtime != "onnxruntime"
        if nodes:
            rows = [
                (
                    n.kernel + (f" #{n.call}" if n.call is not None else ""),
                    n.op_type,
                    n.fx_node,
                    n.module or (TOP if n.fx_node else UNMAPPED),
                    n.mapped_by,
                    n.ms,
                )
                for n in sorted(self.nodes, key=lambda n: -n.ms)
            ]
            columns = ("TVM kernel call" if tvm else "ONNX node", "op", "FX node", "module",
                       "mapped by")  # fmt: skip
        else:
            rows = [(m, ms) for m, ms in sorted(self.by_module().items(), key=lambda kv: -kv[1])]
            columns = ("module",)
        for column in columns:
            table.add_column(column)
        table.add_column("ms", justify="right")
        table.add_column("% of kernels", justify="right")
        total = self.kernel_ms or 1.0
        hidden = 0 if top is None else max(len(rows) - top, 0)
        for row in rows[: len(rows) - hidden]:
            *cells, ms = row
            table.add_row(*cells, f"{ms:.4f}", f"{100 * ms / total:.1f}%")
        if hidden:
            table.add_row(f"… {hidden} more", *[""] * len(columns))
        table.add_section()
        table.add_row(
            "kernels total", *[""] * (len(columns) - 1), f"{self.kernel_ms:.4f}", "100%",
            style="bold",
        )  # fmt: skip
        return table


def _inputs(target: Target, session: Any, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    specs = {s["name"]: s for s in target.manifest.get("inputs", [])}
    feeds = {}
    for i, arg in enumerate(session.get_inputs()):
        spec = specs.get(arg.name) or (list(specs.values())[i] if i < len(specs) else None)
        dims = spec["shape"] if spec else arg.shape
        shape = [d if isinstance(d, int) else batch for d in dims]
        if "int" in arg.type:
            feeds[arg.name] = rng.integers(0, 10, size=shape).astype(np.int64)
        else:
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


# suffixes onnxruntime's graph transformers append to the nodes they rebuild
_ORT_SUFFIX = re.compile(r"(_nchwc|_token_\d+|_fused|_new_reshape)+$")


def _origin(
    name: str, node_map: dict[str, dict[str, str]], by_fx: dict[str, dict[str, str]]
) -> dict[str, str]:
    """The node_map entry of a profiled kernel: by its ONNX name; for nodes onnxruntime
    rebuilt, by that name less what it appended (``layer1.0.conv1/conv2d_1`` from
    ``.../conv2d_1/MatMulAddFusion``), else by the FX node name it keeps (``conv2d_1_nchwc``
    drops the module prefix)."""
    base = _ORT_SUFFIX.sub("", name)
    candidate = base
    while True:
        if candidate in node_map:
            return node_map[candidate]
        if "/" not in candidate:
            break
        candidate = candidate.rsplit("/", 1)[0]
    for part in reversed(base.split("/")):
        if part in by_fx:
            return by_fx[part]
    return {}


def _fusion_sources(
    model: Any, node_map: dict[str, dict[str, str]]
) -> dict[tuple[str, str], dict[str, str]]:
    """(fx node of a node, op type of a node feeding it) -> the feeding node's entry.

    onnxruntime fuses e.g. Conv -> Relu into one Conv kernel named after the Relu; the
    kernel's op type then differs from the node it is named after, and its time belongs to
    the producer of that op type (the conv, where the MACs are)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    sources = {}
    for node in model.graph.node:
        entry = node_map.get(node.name, {})
        for name in node.input:
            feeding = producer.get(name)
            if feeding is not None and feeding.name in node_map and entry.get("fx_node"):
                sources[(entry["fx_node"], feeding.op_type)] = node_map[feeding.name]
    return sources


def _check_counts(runs: int, warmup: int, threads: int, batch: int) -> None:
    if runs < 1 or warmup < 0 or threads < 1 or batch < 1:
        raise ProfileError(
            f"runs, threads and batch must be >= 1 and warmup >= 0 (got runs={runs}, "
            f"warmup={warmup}, threads={threads}, batch={batch})"
        )


def profile_onnx(
    target: Target,
    *,
    runs: int = 20,
    warmup: int = 3,
    threads: int = 1,
    batch: int = 1,
    seed: int = 0,
) -> ProfileReport:
    """Profile ``target``'s ONNX model (a compiled folder or an .onnx file)."""
    import onnxruntime as ort

    if target.onnx_path is None:
        raise ProfileError(
            f"{target.name} has no ONNX model to profile",
            hint="profile a folder written by `edgefx compile -o DIR` (ONNX or TVM backend), "
            "or an .onnx file",
        )
    _check_counts(runs, warmup, threads, batch)
    target.onnx_model  # noqa: B018  (validates the file with a clear error first)
    with tempfile.TemporaryDirectory(prefix="edgefx-profile-") as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        if not target.manifest.get("fuse_qdq", False):
            # as the ONNX backend runs it: Q/DQ as written (see backends/onnx.py)
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        try:
            session = ort.InferenceSession(
                str(target.onnx_path), options, providers=["CPUExecutionProvider"]
            )
            feeds = _inputs(target, session, batch, seed)
            for _ in range(warmup + runs):
                session.run(None, feeds)
            trace_path = session.end_profiling()
        except Exception as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ProfileError(f"onnxruntime failed on {target.onnx_path}: {text}") from None
        events = json.loads(Path(trace_path).read_text())
    kernel: dict[str, list[float]] = {}
    op_types: dict[str, str] = {}
    run_times: list[float] = []
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            run_times.append(event["dur"] / 1000.0)
        if event.get("cat") != "Node" or not event.get("name", "").endswith(_KERNEL_SUFFIX):
            continue
        name = event["name"][: -len(_KERNEL_SUFFIX)]
        kernel.setdefault(name, []).append(event["dur"] / 1000.0)
        op_types[name] = event.get("args", {}).get("op_name", "")
    by_fx = {e["fx_node"]: e for e in target.node_map.values() if e.get("fx_node")}
    fused_into = _fusion_sources(target.onnx_model, target.node_map)
    nodes = []
    unmapped = 0.0
    for name, times in kernel.items():
        measured = times[warmup:] if len(times) > warmup else times
        origin = _origin(name, target.node_map, by_fx)
        fused = False
        if origin and op_types[name] and origin.get("op_type") not in (None, op_types[name]):
            # a fused kernel (Conv+Relu) named after its last node: charge its first one
            first = fused_into.get((origin.get("fx_node", ""), op_types[name]))
            fused = first is not None
            origin = first or origin
        module = origin.get("module", "") or (name.rsplit("/", 1)[0] if "/" in name else "")
        ms = statistics.median(measured)
        if not origin.get("fx_node"):
            unmapped += ms
        how = ("fused kernel" if fused else "node name") if origin.get("fx_node") else ""
        nodes.append(
            NodeTime(name, op_types[name], module, origin.get("fx_node", ""), ms, mapped_by=how)
        )
    measured_runs = run_times[warmup:] if len(run_times) > warmup else run_times
    return ProfileReport(
        name=target.name,
        runs=runs,
        threads=threads,
        nodes=nodes,
        run_ms=statistics.median(measured_runs) if measured_runs else float("nan"),
        unmapped_ms=unmapped,
        inputs={k: list(v.shape) for k, v in feeds.items()},
    )


def profile(target: Target, **options: Any) -> ProfileReport:
    """Profile a compiled folder (ONNX or TVM) or an .onnx file; ``options`` as in
    ``profile_onnx`` / ``profile_tvm``."""
    if target.manifest.get("backend") == "tvm":
        return profile_tvm(target, **options)
    return profile_onnx(target, **options)


def _fx_outputs(program: Any, inputs: list[np.ndarray]) -> dict[str, Any]:
    """Signature of the output of every call_function node of ``program`` on ``inputs``."""
    import torch

    from edgefx.backends.tvm.profiling import Signature

    signatures: dict[str, Signature] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if n.op == "call_function" and isinstance(out, torch.Tensor):
                signatures[n.name] = Signature.of(out.detach().cpu().double().numpy())
            return out

    with torch.no_grad():
        Recorder(program.graph_module).run(*(torch.from_numpy(x) for x in inputs))
    return signatures


def _tvm_origins(
    program: Any, calls: list[Any], costs: dict[str, int], inputs: list[np.ndarray]
) -> list[tuple[str, str]]:
    """(fx node, how it was found) per kernel call, ("", "") where none was; ``costs``: the
    MACs of every node that is not plumbing. See the module docstring."""
    signatures = _fx_outputs(program, inputs)
    graph = program.graph_module.graph
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    nodes = {n.name: n for n in graph.nodes}
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, signature in signatures.items():
        by_shape.setdefault(signature.shape, []).append(name)
    # the node each output of a call is: the first in graph order whose output equals it and
    # that comes after the nodes the call's producers computed (a tensor can equal several
    # nodes' outputs: a ReLU's output and the 1x1 average pool of it)
    chosen: dict[int, list[str]] = {}
    done: set[str] = set()
    for call in calls:
        after = max((order[n] for p in call.producers for n in chosen.get(p, ())), default=-1)
        for out in call.outputs:
            candidates = [
                name for name in by_shape.get(out.shape, ())
                if order[name] > after and name not in done and signatures[name].matches(out)
            ]  # fmt: skip
            if candidates:
                first = min(candidates, key=order.__getitem__)
                chosen.setdefault(call.index, []).append(first)
                done.add(first)
    origins: list[tuple[str, str]] = [("", "")] * len(calls)
    for index, outputs in chosen.items():
        # the nodes this kernel computed: back from its outputs until a node another kernel
        # computed (or an input, a weight)
        region, stack = set(outputs), list(outputs)
        while stack:
            for src in nodes[stack.pop()].all_input_nodes:
                if src.op == "call_function" and not (src.name in region or src.name in done):
                    region.add(src.name)
                    stack.append(src.name)
        # charged to its costliest node, else (no MACs: BatchNorm -> ReLU) to the first
        # node that is not plumbing, as onnxruntime's fused kernels are
        primary = max(region, key=lambda n: (costs.get(n, 0), n in costs, -order[n]))
        how = "output" if len(region) == 1 else f"output, {len(region)} nodes"
        origins[index] = (primary, how)
    consumers: dict[int, list[int]] = {}
    for call in calls:
        for producer in call.producers:
            consumers.setdefault(producer, []).append(call.index)
    for call in reversed(calls):
        if origins[call.index][0]:
            continue
        for consumer in consumers.get(call.index, ()):
            if origins[consumer][0]:
                origins[call.index] = (origins[consumer][0], f"consumer #{consumer}")
                break
    return origins


def profile_tvm(
    target: Target,
    *,
    runs: int = 20,
    warmup: int = 3,
    threads: int = 1,
    batch: int = 1,
    seed: int = 0,
) -> ProfileReport:
    """Profile a TVM deploy folder in the Relax VM (see the module docstring)."""
    from edgefx.backends.tvm.deploy_runtime import example_inputs
    from edgefx.backends.tvm.profiling import profile_folder

    if target.folder is None or target.manifest.get("backend") != "tvm":
        raise ProfileError(f"{target.name} is not a TVM deploy folder")
    _check_counts(runs, warmup, threads, batch)
    inputs = example_inputs(target.manifest, batch, seed)
    measured = profile_folder(target.folder, inputs, runs=runs, warmup=warmup, threads=threads)
    calls = measured.calls
    notes = [
        "TVM kernels carry op names, not module names: each call is mapped by comparing its "
        "output with the Program's node outputs on the same inputs"
    ]
    if target.program is not None:
        graph = target.graph()
        costs = {name: atom.macs for name, atom in graph.atoms.items() if not atom.plumbing}
        origins = _tvm_origins(target.program, calls, costs, inputs)
    else:
        graph = None
        origins = [("", "")] * len(calls)
        notes.append(f"{target.folder} has no program.pt2: no kernel can be mapped")
    nodes = []
    for call, (fx_node, how) in zip(calls, origins, strict=True):
        module = graph.atoms[fx_node].module if graph is not None and fx_node else ""
        op = re.sub(r"\d+$", "", call.name)
        nodes.append(NodeTime(call.name, op, module, fx_node, call.ms, call.index, how))
    unmapped = [n for n in nodes if not n.fx_node]
    if unmapped:
        names = sorted({n.kernel for n in unmapped})
        notes.append(
            f"{len(unmapped)} of {len(nodes)} kernel calls ({sum(n.ms for n in unmapped):.3f} "
            f"ms) computed no tensor of the Program and feed no kernel that did: "
            + ", ".join(names[:6])
            + (" …" if len(names) > 6 else "")
        )
    if measured.other_calls:
        notes.append(
            "not timed (not kernels of the library): "
            + ", ".join(f"{k} x{v}" for k, v in sorted(measured.other_calls.items()))
        )
    if measured.threads != threads:
        notes.append(
            f"TVM ran {measured.threads} thread(s), not {threads}: its pool stops at what it "
            "counts as this machine's cores (set TVM_NUM_THREADS to change that)"
        )
    names = [s["name"] for s in target.manifest.get("inputs", [])]
    return ProfileReport(
        name=target.name,
        runs=runs,
        threads=measured.threads,
        nodes=nodes,
        run_ms=measured.run_ms,
        unmapped_ms=sum(n.ms for n in unmapped),
        inputs={
            names[i] if i < len(names) else f"input{i}": list(x.shape) for i, x in enumerate(inputs)
        },
        runtime="TVM Relax VM",
        notes=notes,
    )


def onnx_node_times(report: ProfileReport, target: Target) -> dict[str, float]:
    """Kernel time per node of ``target``'s ONNX model (for Model Explorer, which draws the
    model file): a kernel named after a node goes to it; one onnxruntime rebuilt or fused
    (``conv2d_1_nchwc``) to the node of the FX node it was charged to; the rest (layout
    reorders onnxruntime added) to none."""
    names = [node.name for node in target.onnx_model.graph.node]
    present = set(names)
    by_fx: dict[str, str] = {}
    for name in names:  # the first ONNX node lowered from each FX node
        fx_node = target.node_map.get(name, {}).get("fx_node")
        if fx_node:
            by_fx.setdefault(fx_node, name)
    times: dict[str, float] = {}
    for n in report.nodes:
        node = n.kernel if n.kernel in present else by_fx.get(n.fx_node)
        if node is not None:
            times[node] = times.get(node, 0.0) + n.ms
    return times


def latency_data(target: Target, report: ProfileReport) -> dict[str, float]:
    """Per-atom latency for the picture of ``target.graph()``: FX node names when the graph
    is the Program's, ONNX node names when it is the ONNX model's.

    A saved and reloaded Program may name a node differently from the Program the ONNX
    model was lowered from (torch.export renames e.g. ``view`` to ``reshape``); such a
    node's time goes to the first op of the same module."""
    if target.program is None:
        return report.by_kernel()
    graph = target.graph()
    data: dict[str, float] = {}
    for fx_node, ms in report.by_fx_node().items():
        if fx_node not in graph.atoms:
            node = next((n for n in report.nodes if n.fx_node == fx_node), None)
            layer = graph.layers.get(node.module or TOP) if node is not None else None
            visible = [a for a in layer.atoms if not graph.atoms[a].plumbing] if layer else []
            if not visible:
                continue
            fx_node = visible[0]
        data[fx_node] = data.get(fx_node, 0.0) + ms
    return data
