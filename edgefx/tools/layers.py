"""Layers: a graph's nodes rolled up by the source module they came from.

A captured Program has one FX node per aten op, an ONNX model one node per ONNX op; people
think in modules (``layer1.0.conv1``, ``blocks.3.attn``). :func:`program_graph` and
:func:`onnx_graph` turn either into the same :class:`LayerGraph`: every node becomes an
:class:`Atom` (op, module, output shape, MACs, params, weight dtype), and atoms roll up

- into one :class:`Layer` per module (a table row: ops folded in, plumbing such as
  ``sym_size`` / ``getitem`` / ``Shape`` hidden), and
- into :class:`Segment`\\ s: maximal runs of one module's atoms in graph order, the boxes of
  a picture. A module called twice (ResNet's shared ``relu``) is one row but two boxes, so
  the picture has no false cycles.

Everything here only reads: the Program, its GraphModule and the ONNX model are untouched.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from edgefx.analysis.cost import CostReport
from edgefx.analysis.graph import module_path

TOP = "(top)"
"""The name of the layer holding a model's own top-level ops (e.g. ResNet's flatten)."""

_PLUMBING_TARGETS = {operator.getitem, torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel}
_PLUMBING_ONNX = {"Shape", "Constant", "ConstantOfShape", "Size"}
# aten names that read badly in a table or a box
_OP_ALIASES = {
    "_native_batch_norm_legit_no_training": "batch_norm",
    "_native_batch_norm_legit_functional": "batch_norm",
    "scaled_dot_product_attention": "sdpa",
    "edgefx.quantize_pot": "quantize_pot",
    "edgefx.dequantize_pot": "dequantize_pot",
}


@dataclass(frozen=True)
class Atom:
    """One graph node (FX or ONNX) with its cost and where it came from."""

    name: str
    op: str
    module: str
    kind: str  # the source module's class name ("Conv2d"), "" when unknown
    output_shape: tuple[int, ...] | None
    macs: int
    params: int
    inputs: tuple[str, ...]  # names of the atoms (or graph inputs) it reads
    plumbing: bool = False  # shape arithmetic and tuple indexing: hidden in tables
    weight_dtype: str | None = None  # dtype of the largest >= 2-D constant it reads
    weight_bits: int | None = None  # bits its integer weight codes span (None for float)


@dataclass
class Layer:
    """One source module: its atoms' costs summed, its ops folded into one row."""

    module: str
    kind: str
    ops: list[str] = field(default_factory=list)  # distinct visible ops, first-seen order
    atoms: list[str] = field(default_factory=list)
    macs: int = 0
    params: int = 0
    output_shape: tuple[int, ...] | None = None
    calls: int = 0  # how many segments (separate runs in graph order) it has
    weight_dtype: str | None = None
    weight_bits: int | None = None
    _weight_size: int = -1

    @property
    def channels(self) -> int | None:
        """Output channels: dim 1 of an N,C,H,W(,D) output, else the last dim (tokens, C)."""
        shape = self.output_shape
        if not shape or len(shape) < 2:
            return None
        return shape[1] if len(shape) >= 4 else shape[-1]

    @property
    def tokens(self) -> int | None:
        """Sequence length of a (B, N, C) output."""
        shape = self.output_shape
        return shape[1] if shape and len(shape) == 3 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "kind": self.kind,
            "ops": list(self.ops),
            "macs": self.macs,
            "params": self.params,
            "output_shape": None if self.output_shape is None else list(self.output_shape),
            "channels": self.channels,
            "tokens": self.tokens,
            "calls": self.calls,
            "weight_dtype": self.weight_dtype,
            "weight_bits": self.weight_bits,
            "nodes": list(self.atoms),
        }


@dataclass
class Segment:
    """A maximal run of one module's atoms in graph order: one box of a picture."""

    id: str
    module: str
    index: int  # 0 for a module's first run, 1 for its second, ...
    atoms: list[str] = field(default_factory=list)
    macs: int = 0
    params: int = 0
    ops: list[str] = field(default_factory=list)
    output_shape: tuple[int, ...] | None = None


def _absorb(into: Layer | Segment, atom: Atom) -> None:
    """Add ``atom`` to a layer's or a segment's sums; plumbing adds its cost but no op/shape."""
    into.atoms.append(atom.name)
    into.macs += atom.macs
    into.params += atom.params
    if not atom.plumbing:
        if atom.op not in into.ops:
            into.ops.append(atom.op)
        if atom.output_shape is not None:
            into.output_shape = atom.output_shape


@dataclass
class LayerGraph:
    """A graph as layers (table rows) and segments (picture boxes), with totals."""

    name: str
    source: str  # "program" or "onnx"
    atoms: dict[str, Atom]
    layers: dict[str, Layer]
    segments: list[Segment]
    edges: list[tuple[str, str]]  # segment id -> segment id, plus "input:NAME"/"output:NAME"
    total_macs: int
    total_params: int
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def layer_of(self, atom: str) -> Layer | None:
        """The layer holding ``atom`` (None for plumbing that belongs to no layer)."""
        return self.layers.get(self.atoms[atom].module or TOP)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "total_macs": self.total_macs,
            "total_params": self.total_params,
            "layers": [layer.to_dict() for layer in self.layers.values()],
        }


@dataclass(frozen=True)
class BlockTokens:
    """Tokens into and out of one attention block, as the layers' output shapes show them."""

    block: str
    attention: str
    tokens_in: int | None  # the attention's output: every token the block received
    tokens_out: int | None  # the block's own output (its residual adds)
    gate: str = ""  # "top-k" / "threshold" when the block scores its tokens itself


ATTENTION_OPS = frozenset({"sdpa", "softmax"})


def block_tokens(graph: LayerGraph) -> list[BlockTokens]:
    """One entry per module that computes attention (an sdpa or softmax op), in graph order;
    its block is its parent module. A block that also computes a softmax of its own (outside
    its attention module) scores its tokens: a TokenGate gate, threshold when it compares the
    scores with a threshold (``ge``), else top-k when it runs ``topk``. Unlike
    edgefx.analysis.vit, this needs no particular block structure, so it also reads a gated
    graph."""
    scoring = [
        name for name, layer in graph.layers.items() if not ATTENTION_OPS.isdisjoint(layer.ops)
    ]
    rows = []
    for name in scoring:
        if any(other.startswith(name + ".") for other in scoring):
            continue  # a block scoring its tokens: its attention module has its own row
        block = name.rpartition(".")[0] or TOP
        outer = graph.layers.get(block)
        gate = ""
        if outer is not None and block in scoring:
            gate = "threshold" if "ge" in outer.ops else "top-k" if "topk" in outer.ops else "gate"
        tokens_out = outer.tokens if outer is not None else None
        rows.append(BlockTokens(block, name, graph.layers[name].tokens, tokens_out, gate))
    return rows


def build(
    name: str,
    source: str,
    atoms: Iterable[Atom],
    *,
    total_params: int,
    inputs: Iterable[str],
    outputs: dict[str, str],
) -> LayerGraph:
    """Roll ``atoms`` (in graph order) up into layers and segments. ``outputs`` maps each
    graph output name to the atom producing it."""
    atoms = list(atoms)
    by_name = {a.name: a for a in atoms}
    layers: dict[str, Layer] = {}
    segments: list[Segment] = []
    segment_of: dict[str, str] = {}
    input_names = list(inputs)
    for atom in atoms:
        key = atom.module or TOP
        layer = layers.get(key)
        if layer is None:
            layer = layers[key] = Layer(key, atom.kind)
        if not layer.kind and not atom.plumbing:
            layer.kind = atom.kind
        _absorb(layer, atom)
        if atom.weight_dtype is not None:
            size = atom.params
            if size > layer._weight_size:
                layer._weight_size = size
                layer.weight_dtype, layer.weight_bits = atom.weight_dtype, atom.weight_bits
        # Plumbing joins its producer's segment: it never starts a box of its own.
        if atom.plumbing:
            producer = next((segment_of[i] for i in atom.inputs if i in segment_of), None)
            if producer is not None:
                segment_of[atom.name] = producer
            continue  # plumbing on graph inputs (the batch size) is in no box
        last = segments[-1] if segments else None
        if last is None or last.module != key:
            index = sum(1 for s in segments if s.module == key)
            last = Segment(f"{key}#{index}" if index else key, key, index)
            segments.append(last)
            layer.calls += 1
        segment_of[atom.name] = last.id
        _absorb(last, atom)
    # a layer of nothing but plumbing (shape arithmetic at the top level) is not a row
    for key in [k for k, v in layers.items() if not v.ops]:
        if all(by_name[a].plumbing for a in layers[key].atoms):
            del layers[key]
    first_box = {}
    for i, seg in enumerate(segments):
        first_box.setdefault(seg.module, i)
    layers = dict(sorted(layers.items(), key=lambda kv: first_box.get(kv[0], len(segments))))
    # a segment's atoms may have joined a producer's segment (plumbing): count them there
    by_id = {s.id: s for s in segments}
    for atom_name, seg_id in segment_of.items():
        seg = by_id[seg_id]
        if atom_name not in seg.atoms:
            seg.atoms.append(atom_name)
            seg.macs += by_name[atom_name].macs
            seg.params += by_name[atom_name].params
    edges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def add(a: str, b: str) -> None:
        if a != b and (a, b) not in seen:
            seen.add((a, b))
            edges.append((a, b))

    for atom in atoms:
        if atom.name not in segment_of:
            continue
        for src in atom.inputs:
            if src in segment_of:
                add(segment_of[src], segment_of[atom.name])
            elif src in input_names:
                add(f"input:{src}", segment_of[atom.name])
    for out_name, producer in outputs.items():
        if producer in segment_of:
            add(segment_of[producer], f"output:{out_name}")
        elif producer in input_names:
            add(f"input:{producer}", f"output:{out_name}")
    return LayerGraph(
        name=name,
        source=source,
        atoms=by_name,
        layers=layers,
        segments=segments,
        edges=edges,
        total_macs=sum(a.macs for a in atoms),
        total_params=total_params,
        inputs=input_names,
        outputs=list(outputs),
    )


# ----------------------------------------------------------------------------- Programs
def _module_kind(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    key, (_, cls) = next(reversed(stack.items()))
    if key.startswith("_empty_nn_module_stack"):  # sym_size and friends
        return ""
    text = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    return text.rsplit(".", 1)[-1]


def code_bits(codes: torch.Tensor) -> int:
    """The fewest bits of a signed (or, for uint8, unsigned) integer type holding every
    code: what a quantized tensor really uses, whatever its container dtype."""
    if codes.numel() == 0:
        return 0
    low, high = int(codes.min()), int(codes.max())
    if codes.dtype == torch.uint8:
        return max(high.bit_length(), 1)
    bits = 1
    while not (-(1 << (bits - 1)) <= low and high <= (1 << (bits - 1)) - 1):
        bits += 1
    return bits


def _is_plumbing(node: torch.fx.Node) -> bool:
    if node.target in _PLUMBING_TARGETS:
        return True
    # arithmetic on SymInts (batch * 197, ...) is shape bookkeeping, not model compute
    val = node.meta.get("val")
    return isinstance(val, torch.SymInt | int) and not isinstance(val, bool)


def program_graph(program: Any, cost: CostReport | None = None) -> LayerGraph:
    """The layers of a Program (MACs and params from ``program.cost()``)."""
    gm = program.graph_module
    cost = cost if cost is not None else program.cost()
    costs = {c.node: c for c in cost.nodes}
    tensors = dict(gm.named_parameters(remove_duplicate=False))
    tensors.update(gm.named_buffers(remove_duplicate=False))
    atoms: list[Atom] = []
    placeholders = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        c = costs[node.name]
        weight_dtype = weight_bits = None
        biggest = -1
        for src in node.all_input_nodes:
            t = tensors.get(str(src.target)) if src.op == "get_attr" else None
            if t is not None and t.dim() >= 2 and t.numel() > biggest:
                biggest = t.numel()
                weight_dtype = str(t.dtype).removeprefix("torch.")
                weight_bits = None if t.is_floating_point() else code_bits(t)
        atoms.append(
            Atom(
                name=node.name,
                op=_OP_ALIASES.get(c.op, c.op),
                module=c.module,
                kind=_module_kind(node),
                output_shape=c.output_shape,
                macs=c.macs,
                params=c.params,
                inputs=tuple(
                    n.name for n in node.all_input_nodes if n.op in ("call_function", "placeholder")
                ),
                plumbing=_is_plumbing(node),
                weight_dtype=weight_dtype,
                weight_bits=weight_bits,
            )
        )
    (output_node,) = gm.graph.find_nodes(op="output")
    leaves = torch.utils._pytree.tree_leaves(output_node.args[0])
    outputs = {
        f"output_{i}": leaf.name for i, leaf in enumerate(leaves) if isinstance(leaf, torch.fx.Node)
    }
    return build(
        program.name,
        "program",
        atoms,
        total_params=cost.total_params,
        inputs=placeholders,
        outputs=outputs,
    )


def module_of(node: torch.fx.Node) -> str:
    """The source module of an FX node, as a layer name."""
    return module_path(node) or TOP


# ----------------------------------------------------------------------------- ONNX
def _onnx_module(name: str, node_map: dict[str, dict[str, str]]) -> str:
    entry = node_map.get(name)
    if entry and "module" in entry:
        return entry["module"]
    # the ONNX backend names nodes "<module path>/<fx node>"
    return name.rsplit("/", 1)[0] if "/" in name else ""


def _dims(value_info: Any) -> tuple[int, ...] | None:
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = []
    for d in tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return tuple(dims)


def _concrete_batch(model: Any, batch: int) -> Any:
    """A copy of ``model`` with every symbolic input dim set to ``batch``, shapes inferred."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_param") or not d.HasField("dim_value"):
                d.dim_value = batch
    del fixed.graph.value_info[:]
    for value in fixed.graph.output:
        value.type.tensor_type.ClearField("shape")
    return onnx.shape_inference.infer_shapes(fixed, data_prop=True)


def _onnx_macs(node: Any, shapes: dict[str, tuple[int, ...]], inits: dict[str, Any]) -> int:
    """MACs by the same rules as ``edgefx.analysis.cost``: conv, gemm and matmul."""

    def shape(i: int) -> tuple[int, ...] | None:
        if i >= len(node.input) or not node.input[i]:
            return None
        name = node.input[i]
        return tuple(inits[name].dims) if name in inits else shapes.get(name)

    out = shapes.get(node.output[0]) if node.output else None
    if out is None:
        return 0
    if node.op_type == "Conv":
        weight = shape(1)
        return math.prod(out) * math.prod(weight[1:]) if weight else 0
    if node.op_type == "ConvTranspose":
        x, weight = shape(0), shape(1)
        return math.prod(x) * math.prod(weight[1:]) if x and weight else 0
    if node.op_type == "Gemm":
        a = shape(0)
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        return math.prod(out) * (a[0] if trans_a else a[-1]) if a else 0
    if node.op_type == "MatMul":
        a = shape(0)
        return math.prod(out) * a[-1] if a else 0
    return 0


def _counts_as_param(op_type: str, position: int, tensor: Any) -> bool:
    """Which constant inputs are parameters, as the cost analysis counts them on the
    Program: weights, biases and quantized codes; not quantization scales / zero points
    (exponent buffers there), a BatchNorm's running statistics (buffers there), shapes,
    axes or scalars."""
    from onnx import TensorProto

    if op_type in ("QuantizeLinear", "DequantizeLinear"):
        return op_type == "DequantizeLinear" and position == 0
    if op_type == "BatchNormalization":
        return position in (1, 2)
    return tensor.data_type != TensorProto.INT64 and math.prod(tensor.dims) > 1


def onnx_graph(
    model: Any,
    node_map: dict[str, dict[str, str]] | None = None,
    *,
    name: str = "model",
    batch: int = 1,
) -> LayerGraph:
    """The layers of an ONNX model; modules come from ``onnx_nodes.json`` (``node_map``) or
    from the node names the ONNX backend writes (``<module>/<fx node>``)."""
    from onnx import numpy_helper

    node_map = node_map or {}
    inferred = _concrete_batch(model, batch)
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        dims = _dims(value)
        if dims is not None:
            shapes[value.name] = dims
    inits = {t.name: t for t in model.graph.initializer}
    producer: dict[str, str] = {}
    atoms = []
    used_params: dict[str, int] = {}
    graph_inputs = [i.name for i in model.graph.input if i.name not in inits]
    # an ONNX model from elsewhere names no modules: then every node is its own row
    names = [node.name or f"{node.op_type}_{i}" for i, node in enumerate(model.graph.node)]
    has_modules = any(_onnx_module(n, node_map) for n in names)
    for index, node in enumerate(model.graph.node):
        node_name = node.name or f"{node.op_type}_{index}"
        params = 0
        weight_dtype = weight_bits = None
        biggest = -1
        for position, i in enumerate(node.input):
            if i in inits and _counts_as_param(node.op_type, position, inits[i]):
                numel = math.prod(inits[i].dims)
                params += numel
                used_params[i] = numel
                if len(inits[i].dims) >= 2 and numel > biggest:
                    biggest = numel
                    array = numpy_helper.to_array(inits[i])
                    weight_dtype = str(array.dtype)
                    if array.dtype.kind in "iu":
                        weight_bits = code_bits(torch.from_numpy(array.copy()))
                    else:
                        weight_bits = None
        atoms.append(
            Atom(
                name=node_name,
                op=node.op_type,
                module=_onnx_module(node_name, node_map) if has_modules else node_name,
                kind="",
                output_shape=shapes.get(node.output[0]) if node.output else None,
                macs=_onnx_macs(node, shapes, inits),
                params=params,
                inputs=tuple(
                    producer.get(i, i) for i in node.input if i in producer or i in graph_inputs
                ),
                plumbing=node.op_type in _PLUMBING_ONNX,
                weight_dtype=weight_dtype,
                weight_bits=weight_bits,
            )
        )
        for out in node.output:
            producer[out] = node_name
    outputs = {o.name: producer.get(o.name, o.name) for o in model.graph.output}
    return build(
        name,
        "onnx",
        atoms,
        total_params=sum(used_params.values()),
        inputs=graph_inputs,
        outputs=outputs,
    )
