"""Where the time goes: run an ONNX model under onnxruntime's profiler and map every node's
kernel time back to the FX node and source module it came from.

The ONNX backend names nodes ``<module>/<fx node>`` and writes the map to
``onnx_nodes.json``; onnxruntime's profile names kernels after the nodes it ran, including
nodes it fused (which keep the name of the node they were built from, sometimes with a
suffix, and without the module prefix), so a kernel is charged to its ONNX node by name, or
else to the FX node whose name it keeps. Layout conversions onnxruntime inserts itself
(``ReorderInput`` / ``ReorderOutput``) have no origin and are reported as unmapped. A fused
kernel (onnxruntime runs Conv -> Relu as one Conv named after the Relu) is charged to the
node it starts from (the conv).
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


class ProfileError(EdgefxError):
    """A model that cannot be profiled (no ONNX model, bad inputs, onnxruntime failure)."""


@dataclass
class NodeTime:
    onnx_node: str
    op_type: str
    module: str
    fx_node: str
    ms: float  # median kernel time over the measured runs


@dataclass
class ProfileReport:
    name: str
    runs: int
    threads: int
    nodes: list[NodeTime]
    run_ms: float  # median wall time of one whole run, as onnxruntime measured it
    unmapped_ms: float  # kernel time of nodes with no FX origin (e.g. added by ORT)
    inputs: dict[str, list[int]] = field(default_factory=dict)

    @property
    def kernel_ms(self) -> float:
        return sum(n.ms for n in self.nodes)

    def by_module(self) -> dict[str, float]:
        times: dict[str, float] = {}
        for n in self.nodes:
            times[n.module or "(unmapped)"] = times.get(n.module or "(unmapped)", 0.0) + n.ms
        return times

    def by_fx_node(self) -> dict[str, float]:
        times: dict[str, float] = {}
        for n in self.nodes:
            if n.fx_node:
                times[n.fx_node] = times.get(n.fx_node, 0.0) + n.ms
        return times

    def by_onnx_node(self) -> dict[str, float]:
        return {n.onnx_node: n.ms for n in self.nodes}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "runs": self.runs,
            "threads": self.threads,
            "inputs": self.inputs,
            "run_ms": self.run_ms,
            "kernel_ms": self.kernel_ms,
            "unmapped_ms": self.unmapped_ms,
            "modules": dict(sorted(self.by_module().items(), key=lambda kv: -kv[1])),
            "nodes": [vars(n) for n in sorted(self.nodes, key=lambda n: -n.ms)],
        }

    def table(self, *, nodes: bool = False, top: int | None = None) -> Table:
        title = (
            f"Profile of {self.name}: median of {self.runs} runs, {self.threads} thread(s), "
            f"run {self.run_ms:.3f} ms"
        )
        table = Table(title=title)
        if nodes:
            rows = [
                (n.onnx_node, n.op_type, n.fx_node, n.ms)
                for n in sorted(self.nodes, key=lambda n: -n.ms)
            ]
            columns = ("ONNX node", "op", "FX node")
        else:
            rows = [
                (m, "", "", ms) for m, ms in sorted(self.by_module().items(), key=lambda kv: -kv[1])
            ]
            columns = ("module", "", "")
        for column in columns:
            if column:
                table.add_column(column)
        table.add_column("ms", justify="right")
        table.add_column("% of kernels", justify="right")
        total = self.kernel_ms or 1.0
        hidden = 0 if top is None else max(len(rows) - top, 0)
        for row in rows[: len(rows) - hidden]:
            cells = [c for c, col in zip(row[:3], columns, strict=True) if col]
            table.add_row(*cells, f"{row[3]:.4f}", f"{100 * row[3] / total:.1f}%")
        if hidden:
            table.add_row(f"… {hidden} more", *[""] * (len([c for c in columns if c]) + 1))
        table.add_section()
        width = len([c for c in columns if c])
        table.add_row(
            "kernels total", *[""] * (width - 1), f"{self.kernel_ms:.4f}", "100%", style="bold"
        )
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
            hint="profile a folder written by `edgefx compile --backend onnx -o DIR`, or an "
            ".onnx file",
        )
    if runs < 1 or warmup < 0 or threads < 1 or batch < 1:
        raise ProfileError("runs, threads and batch must be >= 1 and warmup >= 0")
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
        if origin and op_types[name] and origin.get("op_type") not in (None, op_types[name]):
            # a fused kernel (Conv+Relu) named after its last node: charge its first one
            origin = fused_into.get((origin.get("fx_node", ""), op_types[name]), origin)
        module = origin.get("module", "") or (name.rsplit("/", 1)[0] if "/" in name else "")
        ms = statistics.median(measured)
        if not origin.get("fx_node"):
            unmapped += ms
        nodes.append(NodeTime(name, op_types[name], module, origin.get("fx_node", ""), ms))
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


def latency_data(target: Target, report: ProfileReport) -> dict[str, float]:
    """Per-atom latency for the picture of ``target.graph()``: FX node names when the graph
    is the Program's, ONNX node names when it is the ONNX model's.

    A saved and reloaded Program may name a node differently from the Program the ONNX
    model was lowered from (torch.export renames e.g. ``view`` to ``reshape``); such a
    node's time goes to the first op of the same module."""
    if target.program is None:
        return report.by_onnx_node()
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
