"""The ONNX backend: torch.onnx (dynamo) export -> onnx-graphsurgeon clean-up -> onnxruntime.

Node names in the exported model say where each node came from: ``<module path>/<fx node>``
(e.g. ``layer1.0.conv1/conv2d``); the full map is kept in ``node_map`` and saved next to the
model. The dynamic batch dimension is named ``batch`` in the model's inputs and outputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import torch

from edgefx.backends.base import Artifact, Backend
from edgefx.errors import ArtifactError, BackendError, first_line
from edgefx.ops import onnx_translations
from edgefx.ops.pot import pack_int4_weights
from edgefx.program import BATCH, Program, quiet_torch_logs

MODEL_FILE = "model.onnx"
NODE_MAP_FILE = "onnx_nodes.json"
EXPORT_OPSET = 21  # what torch.onnx emits natively; higher opsets go through onnx's converter
DEFAULT_OPSET = 21
# protobuf cannot serialise a model over 2 GiB; keep weights as external data well before that
_EXTERNAL_DATA_BYTES = 1 << 30


def _model_bytes(model: onnx.ModelProto) -> int:
    return sum(t.ByteSize() for t in model.graph.initializer)


def _scope_and_fx_name(node: onnx.NodeProto) -> tuple[str, str]:
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    module = ""
    if scopes:
        with contextlib.suppress(ValueError, SyntaxError):
            # one entry per nesting level, each the full path: ['', 'layer1', 'layer1.0', ...]
            parts = [s for s in json.loads(scopes.replace("'", '"'))[:-1] if s]
            module = parts[-1] if parts else ""
    fx_text = meta.get("pkg.torch.onnx.fx_node", "")
    match = re.match(r"%(\S+)", fx_text)
    return module, match.group(1) if match else ""


_ORIGIN_KEY = "edgefx_node"


def _tagged_export(program: Program) -> torch.export.ExportedProgram:
    """Export with every node tagged by its Program name: torch.onnx re-traces and renames
    nodes, but ``meta["custom"]`` travels with them, so ONNX nodes can name their origin."""
    tagged = _contiguous_before_reshapes(program.copy_graph())
    # only ops: torch.export asserts that a lifted constant's clone keeps the constant's tag
    for node in tagged.graph.nodes:
        if node.op == "call_function":
            node.meta.setdefault("custom", {})[_ORIGIN_KEY] = node.name
    return program.with_graph(tagged).export()


def _contiguous_before_reshapes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make every reshape read a contiguous tensor (in place; returns ``gm``).

    torch.onnx decomposes ``reshape`` into ``view`` using the strides of its own trace, in
    which e.g. attention (SDPA) outputs are laid out differently from eager: BEiT's and
    MaxViT's ``transpose -> reshape`` then fail with "Cannot view a tensor ...". A contiguous
    input can always be viewed; in ONNX the copy is an Identity that the optimizer drops."""
    reshape = torch.ops.aten.reshape.default
    for node in list(gm.graph.find_nodes(op="call_function", target=reshape)):
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "call_function":
            continue
        with gm.graph.inserting_before(node):
            copy = gm.graph.call_function(
                torch.ops.aten.clone.default, (source,), {"memory_format": torch.contiguous_format}
            )
        copy.meta.update(
            {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
        )
        node.replace_input_with(source, copy)
    gm.recompile()
    return gm


def _name_nodes(model: onnx.ModelProto, origin: dict[str, str]) -> dict[str, dict[str, str]]:
    """Rename every node ``<module>/<Program node>`` (unique); return the name -> origin map.

    ``origin`` maps torch.onnx's FX node names to the Program's node names."""
    node_map: dict[str, dict[str, str]] = {}
    for node in model.graph.node:
        module, onnx_fx_name = _scope_and_fx_name(node)
        fx_name = origin.get(onnx_fx_name, "")
        base = f"{module}/{fx_name}" if module and fx_name else fx_name or node.name or node.op_type
        name, i = base, 0
        while name in node_map:
            i += 1
            name = f"{base}_{i}"
        node.name = name
        node_map[name] = {"op_type": node.op_type, "fx_node": fx_name, "module": module}
    return node_map


def _name_batch_dim(model: onnx.ModelProto, program: Program) -> None:
    """torch.onnx names dynamic dims after sympy symbols (``s77``); call the batch ``batch``."""
    if not program.dynamic_batch or not model.graph.input:
        return
    symbol = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol:
        return
    pattern = re.compile(rf"\b{re.escape(symbol)}\b")
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(BATCH, dim.dim_param)


def _keeps_integer_weights(node: gs.Node) -> bool:
    """Folding DequantizeLinear(constant codes) would store the weights as float again."""
    return node.op == "DequantizeLinear"


def _clean(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    graph.fold_constants(should_exclude_node=_keeps_integer_weights).cleanup().toposort()
    cleaned = gs.export_onnx(graph)
    del cleaned.opset_import[:]  # keep every domain's version exactly as exported
    cleaned.opset_import.extend(model.opset_import)
    cleaned.ir_version = model.ir_version
    return cleaned


def _cpu_session(source: bytes | str, fuse_qdq: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session for serialised model bytes or a model file path.

    Unless ``fuse_qdq``, onnxruntime runs QuantizeLinear/DequantizeLinear as written instead
    of fusing DQ -> Conv -> Q into its QLinearConv/QGemm kernels: those round ties their own
    way and, on x86 without VNNI, saturate uint8 x int8 products in 16 bits, so their outputs
    differ from the graph's by an integer step here and there."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not fuse_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _session(model: onnx.ModelProto, workdir: Path | None, fuse_qdq: bool) -> ort.InferenceSession:
    if _model_bytes(model) < _EXTERNAL_DATA_BYTES:
        return _cpu_session(model.SerializeToString(), fuse_qdq)
    if workdir is None:
        raise BackendError("model is over 1 GiB and needs a folder for its external weights")
    path = workdir / MODEL_FILE
    onnx.save_model(model, path, save_as_external_data=True, location=f"{MODEL_FILE}.data")
    return _cpu_session(str(path), fuse_qdq)


def _values_of(
    model: onnx.ModelProto, node_map: dict[str, dict[str, str]], names: Sequence[str]
) -> dict[str, str]:
    """Program node name -> the ONNX value holding its result: the one output of the ONNX
    nodes lowered from it (``node_map``) that a node lowered from elsewhere reads, or that
    is a graph output. Nodes with no such single value are left out."""
    wanted = set(names)
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        fx_node = node_map.get(node.name, {}).get("fx_node", "")
        if fx_node in wanted:
            groups.setdefault(fx_node, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        origin = node_map.get(node.name, {}).get("fx_node", "")
        for value in node.input:
            readers.setdefault(value, set()).add(origin)
    found = {}
    for name, nodes in groups.items():
        outside = [
            value
            for node in nodes
            for value in node.output
            if value in graph_outputs or readers.get(value, set()) - {name}
        ]
        if len(outside) == 1:
            found[name] = outside[0]
    return found


class OnnxArtifact(Artifact):
    backend = "onnx"

    def __init__(
        self,
        model: onnx.ModelProto,
        node_map: dict[str, dict[str, str]],
        session: ort.InferenceSession | None = None,
        workdir: Path | None = None,
        fuse_qdq: bool = False,
    ) -> None:
        self.model = model
        self.node_map = node_map
        self.fuse_qdq = fuse_qdq
        self._tmp = None
        if session is None:
            if workdir is None and _model_bytes(model) >= _EXTERNAL_DATA_BYTES:
                self._tmp = tempfile.TemporaryDirectory(prefix="edgefx-onnx-")
                workdir = Path(self._tmp.name)
            session = _session(model, workdir, fuse_qdq)
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        # run_observing's sessions, by the tuple of ONNX values they add as outputs
        self._observing: dict[tuple[str, ...], ort.InferenceSession] = {}

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        feeds = {
            name: np.ascontiguousarray(x.detach().cpu().numpy())
            for name, x in zip(self.input_names, inputs, strict=True)
        }
        return [torch.from_numpy(np.asarray(y)) for y in self.session.run(None, feeds)]

    def run_observing(
        self, inputs: Sequence[torch.Tensor], names: Sequence[str]
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]] | None:
        """Run a copy of the model that also outputs the ONNX values computed for the
        Program nodes ``names`` (located through ``node_map``; a node whose lowering has no
        single output value is left out). Outputs come first, as :meth:`run` returns them.
        None for a model over 1 GiB (its weights live in external data; not copied here)."""
        if _model_bytes(self.model) >= _EXTERNAL_DATA_BYTES:
            return None
        values = _values_of(self.model, self.node_map, names)
        extra = tuple(dict.fromkeys(values.values()))
        if extra not in self._observing:
            self._observing[extra] = self._session_with_outputs(extra)
        feeds = {
            name: np.ascontiguousarray(x.detach().cpu().numpy())
            for name, x in zip(self.input_names, inputs, strict=True)
        }
        outputs = [o.name for o in self.model.graph.output]
        wanted = outputs + [v for v in extra if v not in outputs]
        results = dict(zip(wanted, self._observing[extra].run(wanted, feeds), strict=True))
        return [torch.from_numpy(np.asarray(results[o])) for o in outputs], {
            name: torch.from_numpy(np.asarray(results[value])) for name, value in values.items()
        }

    def _session_with_outputs(self, extra: tuple[str, ...]) -> ort.InferenceSession:
        """A session on the model with ``extra`` values added as graph outputs (added for
        the serialisation only, so that the model is not copied)."""
        graph = self.model.graph
        types = {v.name: v for v in graph.value_info}
        existing = {o.name for o in graph.output}
        count = len(graph.output)
        try:
            for name in extra:
                if name not in existing:
                    graph.output.append(types.get(name, onnx.ValueInfoProto(name=name)))
            return _cpu_session(self.model.SerializeToString(), self.fuse_qdq)
        finally:
            del graph.output[count:]

    def save(self, directory: Path) -> dict[str, Any]:
        external = _model_bytes(self.model) >= _EXTERNAL_DATA_BYTES
        onnx.save_model(
            self.model,
            directory / MODEL_FILE,
            save_as_external_data=external,
            location=f"{MODEL_FILE}.data",
        )
        (directory / NODE_MAP_FILE).write_text(json.dumps(self.node_map, indent=1))
        return {"artifact": MODEL_FILE, "node_map": NODE_MAP_FILE, **self.describe()}

    @classmethod
    def load(cls, directory: Path, manifest: dict[str, Any]) -> OnnxArtifact:
        path = directory / manifest.get("artifact", MODEL_FILE)
        try:
            model = onnx.load(path)
            fuse_qdq = bool(manifest.get("fuse_qdq", False))
            session = _cpu_session(str(path), fuse_qdq)
        except Exception as exc:
            raise ArtifactError(f"cannot load ONNX model {path}: {first_line(exc)}") from exc
        node_map_path = directory / manifest.get("node_map", NODE_MAP_FILE)
        node_map = json.loads(node_map_path.read_text()) if node_map_path.exists() else {}
        return cls(model, node_map, session=session, fuse_qdq=fuse_qdq)

    def describe(self) -> dict[str, Any]:
        opset = next(
            (o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), None
        )
        return {"opset": opset, "onnx_nodes": len(self.model.graph.node), "fuse_qdq": self.fuse_qdq}


class OnnxBackend(Backend):
    """Options: ``opset`` (default 21; up to onnx's latest via the version converter);
    ``fuse_qdq`` lets onnxruntime run quantized layers with its own int8 kernels (not
    bit-exact: see ``_cpu_session``; and not faster on the 2-core x86 machine of
    ``benchmarks/results/quantize.md``, where they were slower than Q/DQ as written)."""

    name = "onnx"

    def __init__(
        self, target: str | None = None, *, opset: int = DEFAULT_OPSET, fuse_qdq: bool = False
    ) -> None:
        if target not in (None, "cpu"):
            raise BackendError(
                f"the onnx backend runs on onnxruntime's CPU provider; "
                f"target {target!r} is not supported",
                hint="leave target unset, or use backend='tvm' for device targets",
            )
        latest = onnx.defs.onnx_opset_version()
        if not isinstance(opset, int) or not 18 <= opset <= latest:
            raise BackendError(f"opset must be an integer from 18 to {latest}, got {opset!r}")
        if not isinstance(fuse_qdq, bool):
            raise BackendError(f"fuse_qdq must be True or False, got {fuse_qdq!r}")
        super().__init__(target, opset=opset, fuse_qdq=fuse_qdq)
        self.opset = opset
        self.fuse_qdq = fuse_qdq

    def build(self, program: Program) -> OnnxArtifact:
        try:
            ep = _tagged_export(program)
        except Exception as exc:
            raise BackendError(
                f"torch.export could not re-trace {program.name} for ONNX: {first_line(exc)}",
                hint="a pass may have left a graph torch.export cannot trace; run the passes "
                "with dump_dir to see the graph after each one",
            ) from exc
        try:
            with quiet_torch_logs(), contextlib.redirect_stdout(io.StringIO()):
                exported = torch.onnx.export(
                    ep,
                    dynamo=True,
                    opset_version=EXPORT_OPSET,
                    verbose=False,
                    optimize=True,
                    custom_translation_table=onnx_translations(),
                )
        except Exception as exc:
            raise BackendError(
                f"torch.onnx could not export {program.name}: {_export_failure(exc)}",
                node=_failed_node(exc),
                op=_unsupported_op(exc),
                hint="an op with no ONNX lowering needs one in edgefx/ops",
            ) from exc
        model = exported.model_proto
        origin = {
            n.name: n.meta["custom"][_ORIGIN_KEY]
            for n in exported.exported_program.graph.nodes
            if _ORIGIN_KEY in n.meta.get("custom", {})
        }
        node_map = _name_nodes(model, origin)
        _name_batch_dim(model, program)
        try:
            model = _clean(model)
            pack_int4_weights(model)  # weights of <= 4 bits: two codes a byte (lossless)
            if self.opset != EXPORT_OPSET:
                model = onnx.version_converter.convert_version(model, self.opset)
        except Exception as exc:
            raise BackendError(
                f"cleaning the ONNX graph of {program.name} failed: {first_line(exc)}",
                hint=f"try another opset (now {self.opset})",
            ) from exc
        node_map = {n.name: node_map.get(n.name, {"op_type": n.op_type}) for n in model.graph.node}
        try:
            return OnnxArtifact(model, node_map, fuse_qdq=self.fuse_qdq)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(
                f"onnxruntime cannot load the exported {program.name}: {first_line(exc)}",
                hint=f"opset {self.opset}",
            ) from exc


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _export_failure(exc: BaseException) -> str:
    """The root cause from torch.onnx's "Exception summary" (its first line is boilerplate)."""
    text = _ANSI.sub("", str(exc))
    _, found, summary = text.partition("## Exception summary")
    if found:
        for line in summary.splitlines():
            match = re.match(r"<class '(?:[\w.]+\.)?(\w+)'>: (.*)", line.strip())
            if match:
                return f"{match.group(1)}: {match.group(2)}"
    return _ANSI.sub("", first_line(exc))


def _failed_node(exc: BaseException) -> str | None:
    match = re.search(r"Error when translating node %(\S+)", str(exc))
    return match.group(1) if match else None


def _unsupported_op(exc: BaseException) -> str | None:
    text = str(exc)
    match = re.search(r"Error when translating node .*?target=torch\.ops\.([\w.]+)", text)
    match = match or re.search(r"(aten::\w+|aten\.\w+(?:\.\w+)?|\w+::\w+)", text)
    return match.group(1) if match else None
