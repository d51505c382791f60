"""Channel dependency graph: which channels of a captured graph must be removed together.

Every tensor of the graph that carries channels has one tracked *channel axis* (dim 1 of an
NCHW activation, the last dim after a ``linear`` or a permute to NHWC), and every constant
that a channel-wise op reads has one along its channel dim (conv weight dim 0 for output
channels, dim 1 for input channels, BatchNorm statistics, biases, layer-scale factors).

Ops couple axes:

- *identity*: channel ``i`` of one axis is channel ``i`` of the other (elementwise ops, a
  residual ``add``, BatchNorm with its parameters, a conv's output with its weight's dim 0,
  pooling, permutes). Identity-coupled axes form a :class:`ChannelClass`: one channel count,
  sliced alike.
- *index*: channel ``i`` of one class is channel ``f(i)`` of another (``cat`` and ``split``
  shift indices; a depthwise conv ties input channel ``g`` to its ``m`` output channels; a
  grouped conv ties channel ``i`` of every group; a flatten feeding a linear layer repeats
  each channel over the spatial positions).

A :class:`ChannelGroup` is a set of (class, index) channels closed under all couplings:
removing one means removing all, and removing a whole group keeps the network valid. Classes
touching the model's inputs or outputs, or an op the analysis does not understand, are
*fixed* (with the reason), and so is every group with a channel in them.

The graph of axes is a ``networkx.Graph`` (``.graph``); channels are grouped with networkx's
union-find. Read-only: nothing here changes the graph module.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from networkx.utils import UnionFind
from torch import fx

from edgefx.analysis.graph import POOLS, module_path

aten = torch.ops.aten


@dataclass(frozen=True)
class Axis:
    """The channel axis ``dim`` (of size ``size``) of a graph value: the output of node
    ``node``, or, for ``get_attr`` nodes, the constant it reads."""

    node: str
    dim: int
    size: int
    constant: bool = False

    def __str__(self) -> str:
        return f"{self.node}[{self.dim}]"


@dataclass
class ChannelClass:
    """Identity-coupled axes: they have the same channels and are sliced alike."""

    id: int
    size: int
    axes: list[Axis]
    fixed: list[str] = field(default_factory=list)  # why these channels cannot be removed
    modules: list[str] = field(default_factory=list)  # source modules of the ops producing it


@dataclass
class ChannelGroup:
    """Channels that must be removed together, as ``(class id, channel index)`` pairs."""

    id: int
    channels: tuple[tuple[int, int], ...]
    importance: float | None  # mean |BatchNorm gamma| over its channels (None: no BatchNorm)
    fixed: str | None  # why the group cannot be removed (None: it can)


@dataclass(frozen=True)
class NormMember:
    """A BatchNorm whose scaling factors rank a class's channels."""

    node: str  # the batch-norm node
    module: str
    class_id: int
    gamma: torch.Tensor  # |gamma| per channel of the class


_UNARY = {
    aten.relu.default,
    aten.relu_.default,
    aten.relu6.default,
    aten.hardtanh.default,
    aten.hardtanh_.default,
    aten.silu.default,
    aten.silu_.default,
    aten.gelu.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.hardswish.default,
    aten.hardswish_.default,
    aten.hardsigmoid.default,
    aten.elu.default,
    aten.leaky_relu.default,
    aten.mish.default,
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
    aten.dropout.default,
    aten.neg.default,
    aten.abs.default,
    aten.exp.default,
    aten.sqrt.default,
    aten.rsqrt.default,
    aten.erf.default,
    aten._to_copy.default,
    *POOLS,
    aten.upsample_nearest2d.vec,
    aten.upsample_bilinear2d.vec,
    aten.pad.default,
    aten.constant_pad_nd.default,
}
# ops returning (values, indices): getitem 0 keeps the input's channel axis
_TUPLE_UNARY = {
    aten.max_pool2d_with_indices.default,
    aten.adaptive_max_pool2d.default,
}
_BINARY = {
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.maximum.default,
    aten.minimum.default,
    aten.where.self,
    aten.add_.Tensor,
    aten.mul_.Tensor,
}
_BATCH_NORMS = {
    aten._native_batch_norm_legit_no_training.default,
    aten._native_batch_norm_legit.default,
    aten.batch_norm.default,
}
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}
# ops on a tensor's shape only: they read no channel values
_SHAPE_ONLY = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node: Any) -> tuple[Any, ...] | None:
    val = _val(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _is_static(dim: Any) -> bool:
    return isinstance(dim, int)


def _same_dim(a: Any, b: Any) -> bool:
    """Equal sizes; symbolic ones (the batch) compared by their expression."""
    return a == b if _is_static(a) and _is_static(b) else str(a) == str(b)


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class ChannelDependencyGraph:
    """The channel axes of ``gm`` and how its ops couple them; see the module docstring.

    ``gm`` must carry ``meta['val']`` on its nodes (every Program's graph does).
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = nx.Graph()  # nodes: Axis; edges: kind ("identity" | "index"), op
        self._axis: dict[str, Axis | None] = {}  # node name -> its tracked channel axis
        self._fixed: dict[Axis, list[str]] = defaultdict(list)
        self._index_edges: list[tuple[Axis, int, Axis, int]] = []  # (a, i) ~ (b, j)
        self._norms: list[tuple[fx.Node, Axis, torch.Tensor]] = []
        self._producers: dict[Axis, str] = {}
        for node in gm.graph.nodes:
            self._visit(node)
        self._build_classes()
        self._build_groups()

    # ------------------------------------------------------------------ public queries
    def axis_of(self, node: fx.Node | str) -> Axis | None:
        """The tracked channel axis of ``node``'s output (None: it has none)."""
        return self._axis.get(node if isinstance(node, str) else node.name)

    def class_of(self, axis: Axis) -> ChannelClass:
        return self.classes[self._class_id[axis]]

    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.fixed is None]

    def summary(self) -> dict[str, Any]:
        """Counts for reports: classes, groups, prunable groups, fixed classes by reason."""
        reasons: dict[str, int] = defaultdict(int)
        for cls in self.classes:
            if cls.fixed:
                reasons[cls.fixed[0]] += 1
        return {
            "axes": self.graph.number_of_nodes(),
            "classes": len(self.classes),
            "groups": len(self.groups),
            "prunable_groups": len(self.prunable_groups()),
            "fixed_classes": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        }

    # ------------------------------------------------------------------ building
    def _new_axis(self, node: fx.Node, dim: int | None, *, constant: bool = False) -> Axis | None:
        shape = _shape(node) if not constant else tuple(self._constant(node).shape)
        if shape is None or dim is None or not shape:
            return None
        dim = _norm_dim(dim, len(shape))
        if not 0 <= dim < len(shape) or not _is_static(shape[dim]):
            return None
        name = str(node.target) if constant else node.name
        axis = Axis(name, dim, int(shape[dim]), constant)
        self.graph.add_node(axis)
        return axis

    def _constant(self, node: fx.Node) -> torch.Tensor:
        value: Any = self.gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value

    def _constant_axis(self, node: Any, dim: int) -> Axis | None:
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            return None
        return self._new_axis(node, dim, constant=True)

    def _fix(self, axis: Axis | None, reason: str) -> None:
        if axis is not None:
            self.graph.add_node(axis)
            self._fixed[axis].append(reason)

    def _identity(self, a: Axis | None, b: Axis | None, op: fx.Node) -> None:
        if a is None or b is None:
            self._fix(a or b, f"{op.target} mixes it with an untracked tensor")
            return
        if a.size != b.size:
            reason = f"{op.target} pairs {a.size} with {b.size} channels"
            self._fix(a, reason)
            self._fix(b, reason)
            return
        self.graph.add_edge(a, b, kind="identity", op=op.name)

    def _couple_constant(self, param: Any, dim: int, axis: Axis | None, op: fx.Node) -> None:
        """Couple ``param`` (an optional argument: a constant, None, or a computed tensor) along
        ``dim`` with ``axis``."""
        if param is None:
            return
        if isinstance(param, fx.Node) and param.op == "get_attr":
            self._identity(self._constant_axis(param, dim), axis, op)
        else:
            self._fix(axis, f"{op.target} with a computed weight")

    def _index(self, a: Axis, i: int, b: Axis, j: int, op: fx.Node) -> None:
        self.graph.add_edge(a, b, kind="index", op=op.name)
        self._index_edges.append((a, i, b, j))

    def _set(self, node: fx.Node, axis: Axis | None) -> None:
        self._axis[node.name] = axis
        if axis is not None and not axis.constant:
            self._producers[axis] = module_path(node)

    def _input_axis(self, node: Any) -> Axis | None:
        return self._axis.get(node.name) if isinstance(node, fx.Node) else None

    def _unknown(self, node: fx.Node, why: str | None = None) -> None:
        reason = why or f"read by {getattr(node.target, '__name__', node.target)}"
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                # a constant this op reads must keep its shape, wherever else it is read
                constant = self._constant(arg)
                for dim in range(constant.dim() if isinstance(constant, torch.Tensor) else 0):
                    self._fix(self._constant_axis(arg, dim), reason)
            else:
                self._fix(self._input_axis(arg), reason)
        shape = _shape(node)
        out = self._new_axis(node, 1 if shape and len(shape) > 1 else None)
        self._fix(out, f"made by {getattr(node.target, '__name__', node.target)}")
        self._set(node, out)

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            shape = _shape(node)
            axis = self._new_axis(node, 1 if shape and len(shape) > 1 else None)
            self._fix(axis, "model input")
            self._set(node, axis)
        elif node.op == "output":
            for arg in node.all_input_nodes:
                self._fix(self._input_axis(arg), "model output")
        elif node.op == "call_function":
            self._visit_call(node)
        elif node.op == "get_attr":
            self._axis[node.name] = None  # constants get axes where an op reads them

    def _visit_call(self, node: fx.Node) -> None:
        target = node.target
        first = node.args[0] if node.args else None
        source = self._input_axis(first)
        if target in _SHAPE_ONLY:
            self._axis[node.name] = None
        elif target in _UNARY:
            self._same_axis(node, source)
        elif target in _TUPLE_UNARY:
            self._axis[node.name] = source  # getitem 0 takes it
        elif target is operator.getitem:
            self._visit_getitem(node)
        elif target in _BINARY:
            self._visit_binary(node)
        elif target in _BATCH_NORMS:
            self._visit_batch_norm(node, source)
        elif target in _CONVS:
            self._visit_conv(node, source)
        elif target is aten.linear.default:
            self._visit_product(node, source, w_in=1, w_out=0)
        elif target in (aten.mm.default, aten.matmul.default):
            self._visit_product(node, source, w_in=0, w_out=1)
        elif target is aten.layer_norm.default:
            self._visit_layer_norm(node, source)
        elif target in (aten.permute.default, aten.transpose.int):
            self._visit_permute(node, source)
        elif target in _REDUCTIONS:
            self._visit_reduction(node, source)
        elif target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
            self._visit_reshape(node, source)
        elif target is aten.cat.default:
            self._visit_cat(node)
        elif target in (aten.split.Tensor, aten.split_with_sizes.default):
            self._visit_split(node, source)
        elif target in (aten._softmax.default, aten.softmax.int, aten._log_softmax.default):
            dim = _norm_dim(_arg(node, 1, "dim"), len(_shape(node) or ()))
            if source is not None and dim == source.dim:
                self._unknown(node, "softmax over channels")
            else:
                self._same_axis(node, source)
        elif target is aten.expand.default:
            self._same_axis(node, source)
        elif target is aten.slice.Tensor:
            dim = _norm_dim(_arg(node, 1, "dim", 0), len(_shape(first) or ()))
            if source is not None and dim == source.dim:
                self._unknown(node, "sliced along channels")
            else:
                self._same_axis(node, source)
        else:
            self._unknown(node)

    def _same_axis(self, node: fx.Node, source: Axis | None, dim: int | None = None) -> None:
        """``node``'s output has ``source``'s channels, at ``dim`` (default: the same dim)."""
        out = self._new_axis(node, source.dim if dim is None else dim) if source else None
        if source is not None:
            self._identity(source, out, node)
        self._set(node, out)

    def _visit_getitem(self, node: fx.Node) -> None:
        producer, index = node.args
        if not isinstance(producer, fx.Node):
            self._set(node, None)
            return
        if producer.target in (aten.split.Tensor, aten.split_with_sizes.default):
            self._split_piece(node, producer, index)
        elif index == 0 and producer.name in self._axis:
            self._same_axis(node, self._axis[producer.name])
        else:
            self._set(node, None)  # BatchNorm's saved statistics, pooling indices

    def _visit_binary(self, node: fx.Node) -> None:
        out_shape = _shape(node)
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        tracked = [
            (self._axis[a.name], len(_shape(a) or ()))
            for a in operands
            if a.op != "get_attr" and self._axis.get(a.name) is not None
        ]
        # the channel dim counted from the right, which is how broadcasting lines dims up
        from_right = {axis.dim - rank for axis, rank in tracked}
        if out_shape is None or len(from_right) > 1:
            self._unknown(node, f"{node.target} of tensors with different channel dims")
            return
        if not from_right:
            self._set(node, None)  # arithmetic on shapes or untracked values
            return
        offset = from_right.pop()
        out = self._new_axis(node, len(out_shape) + offset)
        self._set(node, out)
        for operand in operands:
            constant = operand.op == "get_attr"
            shape = tuple(self._constant(operand).shape) if constant else _shape(operand)
            if shape is None:
                continue
            dim = len(shape) + offset
            if dim < 0 or shape[dim] == 1:
                continue  # broadcast along channels: one value for all of them
            if constant:
                self._identity(self._constant_axis(operand, dim), out, node)
            elif self._axis.get(operand.name) is None:
                self._fix(out, f"{node.target} with an untracked operand")
            else:
                self._identity(self._axis[operand.name], out, node)

    def _visit_batch_norm(self, node: fx.Node, source: Axis | None) -> None:
        if source is None:
            self._unknown(node, "BatchNorm of an untracked tensor")
            return
        if _shape(node) is not None:  # aten.batch_norm: a tensor
            out = self._new_axis(node, source.dim)
        else:  # the _native_ variants: a tuple whose item 0 is the output
            out = Axis(node.name, source.dim, source.size)
            self.graph.add_node(out)
        self._identity(source, out, node)
        for param in node.args[1:5]:
            self._couple_constant(param, 0, out, node)
        gamma = node.args[1]
        if isinstance(gamma, fx.Node) and gamma.op == "get_attr":
            self._norms.append((node, out, self._constant(gamma).detach().abs().float()))
        self._set(node, out)

    def _visit_conv(self, node: fx.Node, source: Axis | None) -> None:
        weight = node.args[1]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            self._unknown(node, "convolution with a computed weight")
            return
        transposed = node.target is aten.convolution.default and bool(node.args[6])
        if node.target is aten.convolution.default:
            groups = int(node.args[8])
        else:
            groups = int(_arg(node, 6, "groups", 1))
        in_dim, out_dim = (0, 1) if transposed else (1, 0)
        w_out = self._constant_axis(weight, out_dim)
        out = self._new_axis(node, 1)
        self._set(node, out)
        self._couple_constant(_arg(node, 2, "bias"), 0, out, node)
        if source is None or out is None or w_out is None:
            self._fix(out, "convolution of an untracked input")
            self._fix(source, "convolution of an untracked input")
            return
        if transposed and groups != 1:
            self._fix(source, "grouped transposed convolution")
            self._fix(out, "grouped transposed convolution")
            return
        if groups == 1:
            self._identity(source, self._constant_axis(weight, in_dim), node)
            self._identity(w_out, out, node)
            return
        # grouped: weight is (out, in / groups, ...); its dims are sliced per group
        self._identity(w_out, out, node)
        per_in, per_out = source.size // groups, out.size // groups
        if per_in == 1:
            # depthwise (channel multiplier per_out): input channel g feeds outputs of group g
            for g in range(groups):
                for j in range(per_out):
                    self._index(source, g, out, g * per_out + j, node)
        else:
            # a depthwise weight's input dim (size 1) is left alone: it has no channels to cut
            w_in = self._constant_axis(weight, in_dim)
            # channel i of every group goes together, so the groups stay equal
            for j in range(per_out):
                for g in range(1, groups):
                    self._index(out, j, out, g * per_out + j, node)
            # the weight's input dim has per_in entries: channel i of every group is entry i
            for g in range(groups):
                for i in range(per_in):
                    self._index(source, g * per_in + i, w_in, i, node)

    def _visit_product(self, node: fx.Node, source: Axis | None, w_in: int, w_out: int) -> None:
        """``linear`` (weight ``(out, in)``: w_in=1, w_out=0) or a product with a constant
        ``(in, out)`` matrix (w_in=0, w_out=1), over the input's last (channel) dim."""
        weight = node.args[1]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            self._unknown(node, "product of two computed tensors")
            return
        shape = _shape(node.args[0])
        if source is None or shape is None or source.dim != len(shape) - 1:
            self._unknown(node, "product over a non-channel dim")
            return
        self._identity(source, self._constant_axis(weight, w_in), node)
        out = self._new_axis(node, -1)
        self._identity(self._constant_axis(weight, w_out), out, node)
        self._couple_constant(_arg(node, 2, "bias"), 0, out, node)
        self._set(node, out)

    def _visit_layer_norm(self, node: fx.Node, source: Axis | None) -> None:
        shape = _shape(node.args[0])
        normalized = list(node.args[1])
        if source is None or shape is None or len(normalized) != 1 or source.dim != len(shape) - 1:
            self._unknown(node, "layer norm over more than the channel dim")
            return
        out = self._new_axis(node, source.dim)
        self._identity(source, out, node)
        for param in (_arg(node, 2, "weight"), _arg(node, 3, "bias")):
            self._couple_constant(param, 0, out, node)
        self._set(node, out)

    def _visit_permute(self, node: fx.Node, source: Axis | None) -> None:
        if source is None:
            self._set(node, None)
            return
        rank = len(_shape(node) or ())
        if node.target is aten.transpose.int:
            a, b = (_norm_dim(d, rank) for d in node.args[1:3])
            dim = b if source.dim == a else a if source.dim == b else source.dim
        else:
            dims = [_norm_dim(d, rank) for d in node.args[1]]
            dim = dims.index(source.dim)
        out = self._new_axis(node, dim)
        self._identity(source, out, node)
        self._set(node, out)

    def _visit_reduction(self, node: fx.Node, source: Axis | None) -> None:
        if source is None:
            self._set(node, None)
            return
        rank = len(_shape(node.args[0]) or ())
        dims = _arg(node, 1, "dim")
        dims = list(range(rank)) if dims is None else [_norm_dim(d, rank) for d in dims]
        keepdim = bool(_arg(node, 2, "keepdim", False))
        if source.dim in dims:
            self._unknown(node, "reduced over channels")
            return
        dim = source.dim if keepdim else source.dim - sum(d < source.dim for d in dims)
        out = self._new_axis(node, dim)
        self._identity(source, out, node)
        self._set(node, out)

    def _visit_reshape(self, node: fx.Node, source: Axis | None) -> None:
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if source is None or in_shape is None or out_shape is None:
            self._set(node, None)
            return
        d = source.dim
        # the batch (dim 0, maybe symbolic) must pass through untouched
        if d == 0 or not _same_dim(in_shape[0], out_shape[0]):
            self._unknown(node, "reshape that moves the batch or its channels")
            return
        if not all(map(_is_static, in_shape[1:] + out_shape[1:])):
            self._unknown(node, "reshape of symbolic dims")
            return
        before, after = math.prod(in_shape[1:d]), math.prod(in_shape[d + 1 :])
        # the out dim starting where the channel dim starts
        prefix, e = 1, 1
        while e < len(out_shape) and prefix < before:
            prefix *= out_shape[e]
            e += 1
        if prefix == before and e < len(out_shape):
            size = out_shape[e]
            if size == source.size and math.prod(out_shape[e + 1 :]) == after:
                self._same_axis(node, source, dim=e)
                return
            if size == source.size * after and e == len(out_shape) - 1:
                # flatten: channel c becomes features c * after ... (c + 1) * after - 1
                out = self._new_axis(node, e)
                self._set(node, out)
                for c in range(source.size):
                    for k in range(after):
                        self._index(source, c, out, c * after + k, node)
                return
        self._unknown(node, "reshape that splits or merges channels")

    def _visit_cat(self, node: fx.Node) -> None:
        tensors = list(node.args[0])
        rank = len(_shape(node) or ())
        dim = _norm_dim(_arg(node, 1, "dim", 0), rank)
        axes = [self._input_axis(t) for t in tensors]
        dims = {a.dim for a in axes if a is not None}
        if None in axes or len(dims) != 1:
            self._unknown(node, "cat of untracked tensors")
            return
        channel = dims.pop()
        out = self._new_axis(node, channel)
        self._set(node, out)
        if dim != channel:
            for axis in axes:
                self._identity(axis, out, node)
            return
        offset = 0
        for axis in axes:
            for i in range(axis.size):
                self._index(axis, i, out, offset + i, node)
            offset += axis.size

    def _visit_split(self, node: fx.Node, source: Axis | None) -> None:
        # a list of pieces: each getitem takes its channels from the split's input
        self._axis[node.name] = source

    def _split_piece(self, node: fx.Node, split: fx.Node, index: int) -> None:
        source = self._axis.get(split.name)
        rank = len(_shape(split.args[0]) or ())
        dim = _norm_dim(_arg(split, 2, "dim", 0), rank)
        if source is None:
            self._set(node, None)
            return
        if dim != source.dim:
            self._same_axis(node, source)
            return
        sizes = [int(v.shape[dim]) for v in _val(split)]
        out = self._new_axis(node, dim)
        self._set(node, out)
        offset = sum(sizes[:index])
        for i in range(sizes[index]):
            self._index(source, offset + i, out, i, node)

    # ------------------------------------------------------------------ classes and groups
    def _build_classes(self) -> None:
        identity = UnionFind()
        for axis in self.graph.nodes:
            identity[axis]  # registers the axis
        for a, b, data in self.graph.edges(data=True):
            if data["kind"] == "identity":
                identity.union(a, b)
        self.classes: list[ChannelClass] = []
        self._class_id: dict[Axis, int] = {}
        for members in sorted(identity.to_sets(), key=lambda s: min(_order(a) for a in s)):
            axes = sorted(members, key=_order)
            cls = ChannelClass(len(self.classes), axes[0].size, axes)
            for axis in axes:
                self._class_id[axis] = cls.id
                cls.fixed.extend(self._fixed.get(axis, ()))
                if axis in self._producers and self._producers[axis] not in cls.modules:
                    cls.modules.append(self._producers[axis])
            self.classes.append(cls)
        self.norms = [
            NormMember(node.name, module_path(node), self._class_id[axis], gamma)
            for node, axis, gamma in self._norms
        ]

    def _build_groups(self) -> None:
        channels = UnionFind()
        touched: set[int] = set()
        for a, i, b, j in self._index_edges:
            ca, cb = self._class_id[a], self._class_id[b]
            channels.union((ca, i), (cb, j))
            touched.update((ca, cb))
        sets: list[set[tuple[int, int]]] = list(channels.to_sets())
        for cls in self.classes:
            if cls.id not in touched:
                sets.extend({(cls.id, i)} for i in range(cls.size))
        importance: dict[tuple[int, int], list[float]] = defaultdict(list)
        for norm in self.norms:
            for i, value in enumerate(norm.gamma.tolist()):
                importance[(norm.class_id, i)].append(value)
        self.groups: list[ChannelGroup] = []
        for members in sorted(sets, key=min):
            channels_ = tuple(sorted(members))
            scores = [s for ch in channels_ for s in importance.get(ch, ())]
            fixed = next(
                (
                    f"{self.classes[c].fixed[0]} ({_describe(self.classes[c])})"
                    for c, _ in channels_
                    if self.classes[c].fixed
                ),
                None,
            )
            self.groups.append(
                ChannelGroup(
                    len(self.groups),
                    channels_,
                    sum(scores) / len(scores) if scores else None,
                    fixed,
                )
            )


def _order(axis: Axis) -> tuple[str, int]:
    return (axis.node, axis.dim)


def _describe(cls: ChannelClass) -> str:
    return cls.modules[0] if cls.modules else str(cls.axes[0])


def class_sizes_after(
    graph: ChannelDependencyGraph, removed: Sequence[ChannelGroup]
) -> dict[int, int]:
    """Channels left in every class once ``removed`` are gone."""
    left = {cls.id: cls.size for cls in graph.classes}
    for group in removed:
        for cls_id, _ in group.channels:
            left[cls_id] -= 1
    return left
