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

Attention heads: a reshape that splits the channel dim into (heads, head dim) (or
(3, heads, head dim) for a joint q/k/v projection) gives an axis over several dims
(``Axis.sub``, flattened row-major back into the channel index), which permutes, selects,
unbinds and ``scaled_dot_product_attention`` carry through; attention ties every channel of a
head in q, k, v and its output, and such a class is only ever cut in whole slices along one of
its dims (the heads), so a reshape back to channels stays valid. Any other op reading such an
axis fixes it.

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
import sympy
import torch
from networkx.utils import UnionFind
from torch import fx

from edgefx.analysis.graph import ACTIVATIONS, CONVS, COPIES, POOLS, module_path

aten = torch.ops.aten


@dataclass(frozen=True)
class Axis:
    """The channel axis ``dim`` (of size ``size``) of a graph value: the output of node
    ``node``, or, for ``get_attr`` nodes, the constant it reads."""

    node: str
    dim: int
    size: int
    constant: bool = False
    # a channel axis split over several dims (attention heads): (dim, size) pairs in the
    # order that flattens them back, row-major, into the channel index; () for one dim
    sub: tuple[tuple[int, int], ...] = ()

    def __str__(self) -> str:
        return f"{self.node}[{self.dim}]"

    @property
    def parts(self) -> tuple[tuple[int, int], ...]:
        """(dim, size) of every dim the channels occupy, in flattening order."""
        return self.sub or ((self.dim, self.size),)


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
    """A BatchNorm (in ``norms``) or a LayerNorm over the channel dim (in ``layer_norms``)
    whose scaling factors rank a class's channels."""

    node: str  # the normalisation node
    module: str
    class_id: int
    gamma: torch.Tensor  # |gamma| per channel of the class


@dataclass(frozen=True)
class WeightMember:
    """A conv or linear layer producing a class's channels: ``weight`` sliced along ``dim``
    gives one channel's weights."""

    node: str
    module: str
    class_id: int
    weight: torch.Tensor
    dim: int


_UNARY = {
    *ACTIVATIONS,
    *COPIES,
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
    aten.addcmul.default,  # self + value * tensor1 * tensor2: three operands
}
_BATCH_NORMS = {
    aten._native_batch_norm_legit_no_training.default,
    aten._native_batch_norm_legit.default,
    aten.batch_norm.default,
}
_CONVS = CONVS | {aten.convolution.default}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}
# ops on a tensor's shape only: they read no channel values (new_zeros & co. take only the
# dtype and device of their input; their sizes are given)
_SHAPE_ONLY = {
    aten.sym_size.int,
    aten.sym_numel.default,
    aten.sym_stride.int,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_empty.default,
    aten.new_full.default,
}
_SDPA = {aten.scaled_dot_product_attention.default}
_MATMULS = {aten.matmul.default, aten.bmm.default}
_SIZE_ONE_RESHAPES = {
    aten.reshape.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
}
# ops that carry an axis split over several dims (attention heads) through; any other op
# reading one fixes its channels
_SPLIT_AXIS_OPS = {
    *_UNARY,
    aten.permute.default,
    aten.transpose.int,
    aten.reshape.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.select.int,
    aten.unbind.int,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.contiguous.default,
    operator.getitem,
    *_SDPA,
}


def _is_constant(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


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


def _expr(dim: Any) -> sympy.Expr:
    """A size as a sympy expression (symbolic sizes by their expression)."""
    if _is_static(dim):
        return sympy.Integer(dim)
    node = getattr(dim, "node", None)
    return node.expr if node is not None and hasattr(node, "expr") else sympy.sympify(str(dim))


def _equal_products(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """The products of two runs of sizes are equal (symbolic ones compared as expressions)."""
    if all(map(_is_static, a)) and all(map(_is_static, b)):
        return math.prod(a) == math.prod(b)
    pa = sympy.Mul(*map(_expr, a))
    pb = sympy.Mul(*map(_expr, b))
    return sympy.simplify(pa - pb) == 0


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
        self._layer_norms: list[tuple[fx.Node, Axis, torch.Tensor]] = []
        self._weights: list[tuple[fx.Node, Axis, torch.Tensor, int]] = []
        self._producers: dict[Axis, str] = {}
        # values computed from constants and shapes alone, not from the model's inputs
        # (Swin's shifted-window mask): they carry no channels of their own
        self._input_free: set[str] = set()
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

    def _split_axis(self, node: fx.Node, dims: Sequence[int]) -> Axis | None:
        """An axis of ``node`` over ``dims`` (flattening order); one dim gives a plain axis."""
        shape = _shape(node)
        if shape is None or not dims or not all(_is_static(shape[d]) for d in dims):
            return None
        if len(dims) == 1:
            return self._new_axis(node, dims[0])
        sub = tuple((d, int(shape[d])) for d in dims)
        axis = Axis(node.name, dims[0], math.prod(size for _, size in sub), False, sub)
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

    def _fix_constant(self, constant: fx.Node, reason: str) -> None:
        """Fix every dim of the ``get_attr`` node ``constant``: an op reads it whole, so it
        keeps its shape wherever else it is read."""
        value = self._constant(constant)
        for dim in range(value.dim() if isinstance(value, torch.Tensor) else 0):
            self._fix(self._constant_axis(constant, dim), reason)

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
                self._fix_constant(arg, reason)
            else:
                self._fix(self._input_axis(arg), reason)
        if node.name in self._input_free:
            self._set(node, None)  # a mask or table made from shapes: no channels to track
            return
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
            if node.target in _SHAPE_ONLY or all(
                a.name in self._input_free for a in node.all_input_nodes
            ):
                self._input_free.add(node.name)
            self._visit_call(node)
        elif node.op == "get_attr":
            self._input_free.add(node.name)
            self._axis[node.name] = None  # constants get axes where an op reads them

    def _visit_call(self, node: fx.Node) -> None:
        target = node.target
        first = node.args[0] if node.args else None
        source = self._input_axis(first)
        split_inputs = [
            a for a in node.all_input_nodes if (ax := self._input_axis(a)) is not None and ax.sub
        ]
        if target in _MATMULS and not _is_constant(_arg(node, 1, "other")):
            self._visit_attention_product(node)
        elif split_inputs and target not in _SPLIT_AXIS_OPS and target not in _BINARY:
            self._unknown(node, f"{getattr(target, '__name__', target)} of attention heads")
        elif target in _SHAPE_ONLY:
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
        elif target in (aten.select.int, aten.unbind.int):
            self._visit_select(node, source)
        elif target is aten.unsqueeze.default:
            self._visit_unsqueeze(node, source)
        elif target is aten.squeeze.dim:
            self._visit_squeeze(node, source)
        elif target is aten.contiguous.default:
            self._same_axis(node, source)
        elif target in _SDPA:
            self._visit_attention(node)
        elif target is aten.index.Tensor:
            self._visit_index(node)
        elif target is aten.roll.default:
            rank = len(_shape(node) or ())
            dims = _arg(node, 2, "dims", [])
            rolled = [_norm_dim(d, rank) for d in dims] if dims else list(range(rank))
            if source is not None and any(d in rolled for d, _ in source.parts):
                self._unknown(node, "rolled along channels")
            else:
                self._same_axis(node, source)
        elif target is aten.slice.Tensor:
            dim = _norm_dim(_arg(node, 1, "dim", 0), len(_shape(first) or ()))
            if source is not None and dim == source.dim:
                self._unknown(node, "sliced along channels")
            else:
                self._same_axis(node, source)
        else:
            self._unknown(node)

    def _same_axis(
        self,
        node: fx.Node,
        source: Axis | None,
        dim: int | None = None,
        dims: Sequence[int] | None = None,
    ) -> None:
        """``node``'s output has ``source``'s channels, at ``dim`` (default: the same dim), or
        split over ``dims`` (flattening order)."""
        if source is not None and (dims is not None or (source.sub and dim is None)):
            out = self._split_axis(node, dims if dims is not None else [d for d, _ in source.sub])
        else:
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
        elif producer.target is aten.unbind.int:
            self._select_piece(node, producer, _arg(producer, 1, "dim", 0), index)
        elif index == 0 and producer.name in self._axis:
            self._same_axis(node, self._axis[producer.name])
        else:
            self._set(node, None)  # BatchNorm's saved statistics, pooling indices

    def _visit_binary(self, node: fx.Node) -> None:
        out_shape = _shape(node)
        count = 3 if node.target is aten.addcmul.default else 2
        operands = [a for a in node.args[:count] if isinstance(a, fx.Node)]
        split = [ax for a in operands if (ax := self._axis.get(a.name)) is not None and ax.sub]
        if split:
            # attention heads times a number (a scale): same axis; anything else fixes them
            if len(operands) == 1 and _shape(operands[0]) == out_shape:
                self._same_axis(node, split[0])
            else:
                self._unknown(node, f"{node.target} of attention heads with a tensor")
            return
        tracked = [
            (self._axis[a.name], len(_shape(a) or ()), a.name in self._input_free)
            for a in operands
            if a.op != "get_attr" and self._axis.get(a.name) is not None
        ]
        if any(not free for _, _, free in tracked):
            # a tensor computed without the model's inputs (a mask) follows the other's
            # channel dim: it either broadcasts along it or is coupled / fixed below
            tracked = [t for t in tracked if not t[2]]
        # the channel dim counted from the right, which is how broadcasting lines dims up
        from_right = {axis.dim - rank for axis, rank, _ in tracked}
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
                if not self._reshaped_constant(operand, dim, out, node):
                    self._fix(out, f"{node.target} with an untracked operand")
            elif self._axis[operand.name].dim != dim:  # an input-free operand's other axis
                reason = f"{node.target} of tensors with different channel dims"
                self._fix(out, reason)
                self._fix(self._axis[operand.name], reason)
            else:
                self._identity(self._axis[operand.name], out, node)

    def _reshaped_constant(self, operand: fx.Node, dim: int, out: Axis | None, op: fx.Node) -> bool:
        """``operand`` is a constant seen through reshapes that only add or drop dims of size
        1 (timm's layer scale ``gamma.reshape(1, -1, 1, 1)``): couple the constant's dim
        behind ``operand``'s ``dim`` with ``out`` and give every step an axis, so slimming
        cuts the constant and rewrites the steps' sizes. False: not such a chain."""
        steps: list[tuple[fx.Node, int]] = []
        node = operand
        while node.op != "get_attr":
            source = node.args[0] if node.args else None
            if node.target not in _SIZE_ONE_RESHAPES or not isinstance(source, fx.Node):
                return False
            in_shape = self._constant(source).shape if _is_constant(source) else _shape(source)
            out_shape = _shape(node)
            if in_shape is None or out_shape is None:
                return False
            ins = [i for i, size in enumerate(in_shape) if size != 1]
            outs = [o for o, size in enumerate(out_shape) if size != 1]
            if [in_shape[i] for i in ins] != [out_shape[o] for o in outs] or dim not in outs:
                return False
            steps.append((node, dim))
            dim = ins[outs.index(dim)]
            node = source
        previous = self._constant_axis(node, dim)
        for step, step_dim in reversed(steps):
            axis = self._new_axis(step, step_dim)
            self._identity(previous, axis, op)
            self._set(step, axis)
            previous = axis
        self._identity(previous, out, op)
        return True

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
        if w_out is not None and not transposed:
            self._weights.append((node, w_out, self._constant(weight).detach(), out_dim))
        self._couple_constant(_arg(node, 2, "bias"), 0, out, node)
        data = node.args[0]
        if (
            source is None
            and isinstance(data, fx.Node)
            and data.name in self._input_free
            and not transposed
            and groups == 1
        ):
            # a conv of a table made from shapes (a position encoding): its outputs go with
            # its weight's rows and its bias; the table's channels (the weight's input dim)
            # stay whole
            self._identity(w_out, out, node)
            return
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
        if source is None or shape is None:
            self._unknown(node, "product of an untracked tensor")
            return
        if source.dim != len(shape) - 1:
            if len(_shape(node) or ()) != len(shape):
                self._unknown(node, "product over a non-channel dim that changes the rank")
                return
            # a product over another dim (MLP-Mixer's token mixing, over the patches): the
            # channels pass through, the weight's dims are not channels and stay whole
            for param in (weight, _arg(node, 2, "bias")):
                if isinstance(param, fx.Node) and param.op == "get_attr":
                    self._fix_constant(param, "mixes positions, not channels")
            self._same_axis(node, source)
            return
        self._identity(source, self._constant_axis(weight, w_in), node)
        out = self._new_axis(node, -1)
        weight_out = self._constant_axis(weight, w_out)
        self._identity(weight_out, out, node)
        if weight_out is not None:
            self._weights.append((node, weight_out, self._constant(weight).detach(), w_out))
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
        gamma = _arg(node, 2, "weight")
        if out is not None and isinstance(gamma, fx.Node) and gamma.op == "get_attr":
            self._layer_norms.append((node, out, self._constant(gamma).detach().abs().float()))
        self._set(node, out)

    def _visit_permute(self, node: fx.Node, source: Axis | None) -> None:
        if source is None:
            self._set(node, None)
            return
        rank = len(_shape(node) or ())
        if node.target is aten.transpose.int:
            a, b = (_norm_dim(d, rank) for d in node.args[1:3])
            order = list(range(rank))
            order[a], order[b] = b, a
        else:
            order = [_norm_dim(d, rank) for d in node.args[1]]
        dims = [order.index(d) for d, _ in source.parts]
        out = self._split_axis(node, dims)
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
        if not source.sub and self._reshape_one_dim(node, source, in_shape, out_shape):
            return
        parts = _reshape_parts(source, in_shape, out_shape)
        if parts is None:
            self._unknown(node, "reshape that splits or merges channels")
            return
        self._same_axis(node, source, dims=parts)

    def _reshape_one_dim(
        self, node: fx.Node, source: Axis, in_shape: tuple[Any, ...], out_shape: tuple[Any, ...]
    ) -> bool:
        """A reshape that keeps the channel dim whole (the dims before it and after it may be
        split or merged among themselves: windows into the batch, tokens into a grid), or
        merges it with static dims next to it into one dim (a flatten into a linear layer;
        Swin's 2x2 patch merging). False: not this kind of reshape."""
        d = source.dim
        rank = len(in_shape)
        for e, size in enumerate(out_shape):
            if not _is_static(size) or size % source.size:
                continue
            for j in range(d, -1, -1):  # in dims j .. k become out dim e
                if not _is_static(in_shape[j]) or not _equal_products(in_shape[:j], out_shape[:e]):
                    continue
                for k in range(d, rank):
                    if not all(map(_is_static, in_shape[j : k + 1])):
                        break
                    if math.prod(in_shape[j : k + 1]) != size:
                        continue
                    if not _equal_products(in_shape[k + 1 :], out_shape[e + 1 :]):
                        continue
                    before, after = math.prod(in_shape[j:d]), math.prod(in_shape[d + 1 : k + 1])
                    if before * after == 1:
                        self._same_axis(node, source, dim=e)
                        return True
                    # channel c at (b, c, a) of the merged dims becomes feature
                    # (b * channels + c) * after + a
                    out = self._new_axis(node, e)
                    self._set(node, out)
                    for b in range(before):
                        for c in range(source.size):
                            for a in range(after):
                                self._index(source, c, out, (b * source.size + c) * after + a, node)
                    return True
        return False

    def _visit_select(self, node: fx.Node, source: Axis | None) -> None:
        if node.target is aten.unbind.int:
            self._axis[node.name] = source  # each getitem takes its piece
            return
        self._select_piece(node, node, _arg(node, 1, "dim"), _arg(node, 2, "index"))

    def _select_piece(self, node: fx.Node, producer: fx.Node, dim: int, index: int) -> None:
        """``node`` = ``producer``'s input at ``index`` along ``dim`` (select, unbind)."""
        source = self._input_axis(producer.args[0])
        in_shape = _shape(producer.args[0])
        if source is None or in_shape is None:
            self._set(node, None)
            return
        dim = _norm_dim(dim, len(in_shape))
        parts = list(source.parts)
        dims = [d for d, _ in parts]
        shifted = [d - (d > dim) for d in dims if d != dim]
        if dim not in dims:
            self._same_axis(node, source, dims=shifted)
            return
        if not source.sub:
            self._unknown(node, "selects one channel")
            return
        # one slice of heads: q, k or v out of a joint projection
        j = dims.index(dim)
        sizes = [size for _, size in parts]
        index = index + sizes[j] if index < 0 else index
        out = self._split_axis(node, shifted)
        self._set(node, out)
        if out is None:
            self._fix(source, "selected into an untracked tensor")
            return
        rest = sizes[:j] + sizes[j + 1 :]
        for p in range(out.size):
            coords = list(_unravel(p, rest))
            coords.insert(j, index)
            self._index(out, p, source, _ravel(coords, sizes), node)

    def _visit_unsqueeze(self, node: fx.Node, source: Axis | None) -> None:
        if source is None:
            self._set(node, None)
            return
        dim = _norm_dim(node.args[1], len(_shape(node) or ()))
        self._same_axis(node, source, dims=[d + (d >= dim) for d, _ in source.parts])

    def _visit_squeeze(self, node: fx.Node, source: Axis | None) -> None:
        shape = _shape(node.args[0])
        if source is None or shape is None:
            self._set(node, None)
            return
        dim = _norm_dim(node.args[1], len(shape))
        if shape[dim] != 1:
            self._same_axis(node, source)
            return
        dims = [d for d, _ in source.parts]
        if dim in dims:
            self._unknown(node, "squeezes a channel dim of size 1")
            return
        self._same_axis(node, source, dims=[d - (d > dim) for d in dims])

    def _visit_attention(self, node: fx.Node) -> None:
        """scaled_dot_product_attention(q, k, v): (batch, heads, tokens, head dim) each. Whole
        heads go together: head h of q, k, v and the output, every channel of it (removing
        part of a head would change the softmax scale 1 / sqrt(head dim)). A mask that
        broadcasts over the heads (Hugging Face passes an all-true one) couples nothing; one
        per head (a relative position bias) goes with its head."""
        q, k, v = (self._input_axis(a) for a in node.args[:3])
        mask = _arg(node, 3, "attn_mask")
        shapes = [_shape(a) for a in node.args[:3]]
        heads_ok = all(
            a is not None
            and shape is not None
            and len(shape) == 4
            and [d for d, _ in a.parts] == [1, 3]
            for a, shape in zip((q, k, v), shapes, strict=True)
        )
        mask_axis, mask_shape = self._input_axis(mask), _shape(mask)
        per_head = mask_shape is not None and len(mask_shape) >= 3 and mask_shape[-3] != 1
        mask_ok = mask is None or (
            mask_shape is not None
            and (
                not per_head
                or (
                    mask_axis is not None
                    and not mask_axis.sub
                    and mask_axis.dim == len(mask_shape) - 3
                )
            )
        )
        if not heads_ok or not mask_ok:
            self._unknown(node, "attention with a mask or over untracked heads")
            return
        assert q is not None and k is not None and v is not None
        out = self._split_axis(node, [1, 3])
        self._set(node, out)
        self._identity(q, k, node)
        self._identity(v, out, node)
        heads, dq, dv = q.parts[0][1], q.parts[1][1], v.parts[1][1]
        if v.parts[0][1] != heads or (per_head and mask_axis.size != heads):
            self._unknown(node, "attention with different head counts")
            return
        if per_head:
            for h in range(heads):
                self._index(mask_axis, h, q, h * dq, node)
        else:
            self._fix(mask_axis, "attention mask")
        for h in range(heads):
            for d in range(dq):
                self._index(q, h * dq + d, v, h * dv, node)
            for d in range(1, dv):
                self._index(v, h * dv + d, v, h * dv, node)

    def _visit_attention_product(self, node: fx.Node) -> None:
        """Attention written out (Swin, timm/torchvision with fused attention off): the scores
        ``q @ k^T`` on (..., heads, tokens, head dim) x (..., heads, head dim, tokens) have one
        channel per head (dim -3); ``scores @ v`` has ``v``'s heads x head dim. As with
        scaled_dot_product_attention, whole heads go together: head h of q, k, the scores
        (and whatever is added to them, e.g. a relative position bias), v and the output.
        Any other product of two computed tensors fixes the channels it reads."""
        a, b = node.args[:2]
        ax, bx = self._input_axis(a), self._input_axis(b)
        shapes = [_shape(a), _shape(b), _shape(node)]
        rank = len(shapes[2] or ())
        if ax is None or bx is None or rank < 3 or any(len(s or ()) != rank for s in shapes):
            self._unknown(node, "product of two computed tensors")
            return
        heads = rank - 3
        a_dims, b_dims = [d for d, _ in ax.parts], [d for d, _ in bx.parts]
        if ax.sub and a_dims == [heads, rank - 1] and b_dims == [heads, rank - 2]:
            # scores = q @ k^T
            (_, n_heads), (_, head_dim) = ax.parts
            if bx.parts[0][1] != n_heads:
                self._unknown(node, "attention scores with different head counts")
                return
            out = self._new_axis(node, heads)
            self._set(node, out)
            self._identity(ax, bx, node)
            if out is None:
                return
            for h in range(n_heads):
                for d in range(head_dim):
                    self._index(ax, h * head_dim + d, out, h, node)
        elif not ax.sub and ax.dim == heads and bx.sub and b_dims == [heads, rank - 1]:
            # out = softmax(scores) @ v
            (_, n_heads), (_, head_dim) = bx.parts
            if ax.size != n_heads:
                self._unknown(node, "attention weights with different head counts")
                return
            out = self._split_axis(node, [heads, rank - 1])
            self._set(node, out)
            self._identity(bx, out, node)
            for h in range(n_heads):
                for d in range(head_dim):
                    self._index(bx, h * head_dim + d, ax, h, node)
        else:
            self._unknown(node, "product of two computed tensors")

    def _visit_index(self, node: fx.Node) -> None:
        """A constant table indexed along dim 0 (a relative position bias: (positions,
        heads) -> (tokens, tokens, heads)): the table's last dim is the output's last dim.
        Any other indexing fixes the channels it reads."""
        table, indices = node.args[0], list(node.args[1])
        shape = _shape(node)
        if not (
            _is_constant(table)
            and len(indices) == 1
            and isinstance(indices[0], fx.Node)
            and self._constant(table).dim() >= 2
            and shape is not None
        ):
            self._unknown(node)
            return
        self._fix(self._input_axis(indices[0]), "used as an index")
        out = self._new_axis(node, len(shape) - 1)
        self._set(node, out)
        self._identity(self._constant_axis(table, self._constant(table).dim() - 1), out, node)

    def _visit_cat(self, node: fx.Node) -> None:
        tensors = list(node.args[0])
        rank = len(_shape(node) or ())
        dim = _norm_dim(_arg(node, 1, "dim", 0), rank)
        axes = [self._input_axis(t) for t in tensors]
        dims = {a.dim for a in axes if a is not None}
        if None in axes and len(dims) == 1 and dims != {dim} and not any(a and a.sub for a in axes):
            # a learned token (a constant, maybe expanded to the batch) joined along the
            # sequence: its channel dim is the other inputs'
            channel = next(iter(dims))
            axes = [
                a if a is not None else self._constant_axis(_constant_source(t), channel)
                for a, t in zip(axes, tensors, strict=True)
            ]
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
        self.layer_norms = [
            NormMember(node.name, module_path(node), self._class_id[axis], gamma)
            for node, axis, gamma in self._layer_norms
        ]
        self.weights = [
            WeightMember(node.name, module_path(node), self._class_id[axis], weight, dim)
            for node, axis, weight, dim in self._weights
        ]

    def _build_groups(self) -> None:
        channels = UnionFind()
        touched: set[int] = set()
        for a, i, b, j in self._index_edges:
            ca, cb = self._class_id[a], self._class_id[b]
            channels.union((ca, i), (cb, j))
            touched.update((ca, cb))
        for cls in self.classes:
            for sizes in sorted({tuple(n for _, n in a.sub) for a in cls.axes if a.sub}):
                _tie_fibers(channels, cls.id, sizes)
                touched.add(cls.id)
        sets: list[set[tuple[int, int]]] = [
            {m for m in members if len(m) == 2}  # without the fiber markers
            for members in channels.to_sets()
        ]
        sets = [members for members in sets if members]
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


def _tie_fibers(channels: UnionFind, cls_id: int, sizes: tuple[int, ...]) -> None:
    """Make the removable units of a class split over dims of ``sizes`` (heads x head dim)
    whole slices along one of those dims, so what is kept stays a (heads' x head dim) block.
    The dim chosen is the one whose slices merge the fewest existing groups (the heads,
    where attention already ties each head's channels)."""
    total = math.prod(sizes)
    best: tuple[int, int] | None = None  # (groups left, dim)
    for f, size in enumerate(sizes):
        if size == 1:
            continue
        local = UnionFind()
        for p in range(total):
            local.union(channels[(cls_id, p)], ("fiber", _unravel(p, sizes)[f]))
        count = len({local[channels[(cls_id, p)]] for p in range(total)})
        if best is None or count > best[0]:
            best = (count, f)
    if best is None:
        return
    f = best[1]
    for p in range(total):
        channels.union((cls_id, p), ("fiber", cls_id, sizes, _unravel(p, sizes)[f]))


def _unravel(index: int, sizes: Sequence[int]) -> tuple[int, ...]:
    coords = []
    for size in reversed(sizes):
        coords.append(index % size)
        index //= size
    return tuple(reversed(coords))


def _ravel(coords: Sequence[int], sizes: Sequence[int]) -> int:
    index = 0
    for c, size in zip(coords, sizes, strict=True):
        index = index * size + c
    return index


def _reshape_groups(
    in_shape: Sequence[Any], out_shape: Sequence[Any]
) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input dims with runs of output dims holding the same elements (dims of
    size 1 left out); symbolic sizes (the batch) are compared as expressions, so windows
    folded into the batch pair up too. None where no such pairing exists."""
    ins = [i for i, s in enumerate(in_shape) if not (_is_static(s) and s == 1)]
    outs = [o for o, s in enumerate(out_shape) if not (_is_static(s) and s == 1)]
    groups: list[tuple[list[int], list[int]]] = []
    i = o = 0
    while i < len(ins) and o < len(outs):
        gi, go = [ins[i]], [outs[o]]
        i, o = i + 1, o + 1
        while not _equal_products([in_shape[d] for d in gi], [out_shape[d] for d in go]):
            grow = _larger_side([in_shape[d] for d in gi], [out_shape[d] for d in go])
            if grow is None:
                return None
            if grow == "out":
                if o >= len(outs):
                    return None
                go.append(outs[o])
                o += 1
            else:
                if i >= len(ins):
                    return None
                gi.append(ins[i])
                i += 1
        groups.append((gi, go))
    return groups if i == len(ins) and o == len(outs) else None


def _larger_side(a: Sequence[Any], b: Sequence[Any]) -> str | None:
    """Which run of sizes must grow to reach the other's product: "out" when ``a``'s product
    is larger (or a symbolic multiple of ``b``'s), "in" when smaller; None when neither
    divides the other symbolically."""
    if all(map(_is_static, a)) and all(map(_is_static, b)):
        return "out" if math.prod(a) > math.prod(b) else "in"
    ratio = sympy.together(sympy.Mul(*map(_expr, a)) / sympy.Mul(*map(_expr, b)))
    numerator, denominator = sympy.fraction(ratio)
    if denominator == 1:
        return "out"
    if numerator == 1:
        return "in"
    return None


def _reshape_parts(
    source: Axis, in_shape: Sequence[Any], out_shape: Sequence[Any]
) -> list[int] | None:
    """The output dims holding ``source``'s channels after a reshape, in flattening order,
    where the reshape only splits or merges channel dims among themselves (heads x head
    dim <-> channels) and moves other dims around them; None otherwise."""
    groups = _reshape_groups(in_shape, out_shape)
    parts = [d for d, _ in source.parts]
    if groups is None or any(size == 1 for _, size in source.parts):
        return None
    result = list(parts)
    for ins, outs in groups:
        channel = [d for d in ins if d in parts]
        if not channel:
            continue
        if channel != ins:
            return None  # channels merged with other dims
        at = [parts.index(d) for d in channel]
        if at != list(range(at[0], at[0] + len(at))):
            return None  # not consecutive in flattening order
        first = result.index(channel[0])
        result[first : first + len(channel)] = [-1 - o for o in outs]  # marked as output dims
    if any(r >= 0 for r in result):
        return None
    return [-1 - r for r in result]


def _constant_source(node: Any) -> Any:
    """The constant behind ``node`` if it is one, perhaps expanded (a learned token)."""
    while isinstance(node, fx.Node) and node.target is aten.expand.default:
        node = node.args[0]
    return node


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
