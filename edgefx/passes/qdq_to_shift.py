"""QDQToShift: PotQuantize's quantize/dequantize graph becomes integer arithmetic with shifts.

PotQuantize leaves ``dequantize_pot(x codes) -> conv/linear(dequantize_pot(weight codes),
dequantize_pot(int32 bias)) -> [ReLU/ReLU6] -> ... -> quantize_pot``, every scale a power of
two. Every float value here is ``codes * 2**exponent``; this pass tracks, for each float node
of the graph, whether its value can be held exactly as integer codes with a known exponent
(per tensor, or per channel) and rewrites the graph to compute the codes instead:

- conv2d / linear on dequantized 8-bit-or-narrower codes with int32 bias codes on the
  accumulator grid -> ``edgefx::conv_int`` / ``linear_int`` (int32 accumulator, exponent
  input + weight exponent per output channel);
- matmul of two dequantized per-tensor 8-bit-or-narrower activations (a ViT's q @ k^T and
  attn @ v, both quantized by PotQuantize) -> ``edgefx::matmul_int`` (int32 accumulator,
  exponent the sum of the two);
- times / divided by a positive power of two (a ViT's attention scale where the head
  dimension is a power of four) -> the same codes, the exponent moved;
- ReLU / ReLU6 / hardtanh / clamp with constant bounds -> a pending clamp, folded into the
  clamp of the next requantization (or applied to the codes where something needs it first);
- ``quantize_pot`` of such a value -> ``edgefx::requant_shift``: a per-channel rounding
  arithmetic right shift by (output exponent - accumulator exponent), a left shift where that
  difference is negative, then the clamp to the output range (ReLU/ReLU6 folded in);
- residual add / concat of two such values -> aligned on the smaller exponent by left shifts
  (exact), then added / concatenated in int32 (a concat along the channel axis keeps each
  part's exponents instead);
- max pooling -> ``edgefx::max_pool_int`` on the codes; global average pooling / mean over a
  power-of-two count -> an int32 sum, exponent minus log2(count);
- reshapes, flattens, permutes, unbind (a ViT's q/k/v split) -> the same op on the codes.

Everything else (GELU, softmax, LayerNorm, a pooling over 49 positions, ...) is a float
island: the codes are dequantized in front of it (``dequantize_pot``) and its result is
quantized again by the ``quantize_pot`` PotQuantize already placed after it. The report lists
every island and why, every integer layer with its accumulator bound against int32 and every
requantization with its shift range.

Every conv/linear/matmul on codes is an integer layer, wherever its result goes. A layer whose
result a float island reads (a ViT's linears: the residual add of a float stream, GELU) is
"an integer layer ending in a float island" (``output: "float"`` in the report, with the
island's ops): its int32 accumulator (bias included) is dequantized, ``acc * 2**(ex + ew)``.
That is exact in float32 while |acc| < 2**24 (``dequantized_exactly``, from the overflow
analysis's bounds of the codes dequantized); where every partial sum stays below 2**24 as well
(``bitwidth_bound`` bounds them) the QDQ graph's float32 layer sums exactly too, so the island
reads the very value the QDQ graph computes.

Overflow analysis: each integer value carries per-channel bounds of its codes. A layer's
accumulator bound is, per output channel, sum_k |w[c, k]| * max|x| + |b[c]| (the worst case
over every input the input's bit width allows, with the layer's fan-in and weight codes); the
report also gives the cruder fan_in * max|w| * max|x| + max|b|. Left shifts (alignment,
negative requantization shifts) and sums (pooling) scale the bounds. A bound beyond int32 is a
PassError naming the layer.

Rounding: by default the integer graph rounds half to even, as the QDQ graph's
``quantize_pot`` does, so it computes the fake-quant graph's codes (wherever the QDQ graph's
float32 sums are exact); ``rounding="half_up"`` saves three integer ops per requantization
but differs by one step on exact ties, and the difference propagates (``edgefx.ops.integer``
says why half to even is the default).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx

from edgefx.errors import PassError
from edgefx.ops.integer import DEFAULT_ROUNDING, INT32, ROUNDINGS, out_dtype, shift_range
from edgefx.ops.pot import qrange
from edgefx.passes.base import Pass
from edgefx.passes.rewrite import (
    add_buffer,
    attr_tensor,
    check_module_paths,
    module_path,
    remove_dead_code,
    under,
)
from edgefx.program import Program

aten = torch.ops.aten
_QUANTIZE = torch.ops.edgefx.quantize_pot.default
_DEQUANTIZE = torch.ops.edgefx.dequantize_pot.default
_CONV_INT = torch.ops.edgefx.conv_int.default
_LINEAR_INT = torch.ops.edgefx.linear_int.default
_MATMUL_INT = torch.ops.edgefx.matmul_int.default
_INT_LAYERS = (_CONV_INT, _LINEAR_INT, _MATMUL_INT)
_REQUANT = torch.ops.edgefx.requant_shift.default
_MAX_POOL_INT = torch.ops.edgefx.max_pool_int.default
_TO_CODES = torch.ops.edgefx.float_to_codes.default
_TO_FLOAT = torch.ops.edgefx.codes_to_float.default

_FLOAT24 = 1 << 24  # int32 codes go through float32 exactly below this (onnx max pooling)
_SHAPE_OPS = {
    aten.reshape.default,
    aten.view.default,
    aten.flatten.using_ints,
    aten.permute.default,
    aten.transpose.int,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
    aten.clone.default,
    aten.contiguous.default,
}
_IDENTITY = {aten.dropout.default, aten.alias.default, aten.detach.default}
_CLAMPS = {aten.relu.default, aten.hardtanh.default, aten.clamp.default, aten.relu6.default}
_GLOBAL_POOLS = {aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default}
_FOREIGN_QUANT = "quantized_decomposed"


@dataclass
class _Int:
    """A float node's value held as integer codes: value = codes * 2**exp."""

    codes: fx.Node
    exp: torch.Tensor  # int64, 0-d (per tensor) or 1-d (per channel along ``axis``)
    axis: int
    lo: torch.Tensor  # float64 bounds of the codes, shaped like ``exp``
    hi: torch.Tensor
    dtype: torch.dtype
    clamp: tuple[float | None, float | None] = (None, None)  # real bounds not yet applied
    layer: str | None = None  # the integer layer this value comes from (for the report)


@dataclass
class _Layer:
    node: str
    module: str
    op: str
    fan_in: int
    acc_bound: int
    bitwidth_bound: int
    requants: list[dict[str, Any]] = field(default_factory=list)
    # where its codes are dequantized for a float op: the largest |code| dequantized there
    dequantized_bound: float = 0.0


class QDQToShift(Pass):
    """Rewrite PotQuantize's QDQ chains into integer kernels with shift requantization.

    Args:
        exclude: module paths (prefixes) whose conv/linear layers stay float islands.
        rounding: "half_even" (default: ties go to the even code, as in the QDQ graph, so the
            integer graph computes the QDQ graph's codes wherever its float sums were exact)
            or "half_up" (add 2**(s-1), shift: three integer ops fewer per requantization,
            but one step off the QDQ graph on ties, and that difference propagates).

    The pass is not declared exact: the QDQ graph sums in float32, which is inexact once an
    accumulator passes 2**24, where the integer graph sums exactly in int32.
    Export with ``backend_options={"opset": 28}``: the requantization uses ONNX BitShift on
    signed int32, which exists from opset 28 on.
    """

    name = "QDQToShift"

    def __init__(
        self, *, exclude: list[str] | tuple[str, ...] = (), rounding: str = DEFAULT_ROUNDING
    ) -> None:
        check_module_paths("exclude", exclude, example='["fc"]')
        if rounding not in ROUNDINGS:
            raise PassError(
                f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}",
                hint='"half_even" (default) matches the QDQ graph on ties; "half_up" is cheaper',
            )
        self.exclude = tuple(exclude)
        self.rounding = rounding

    def __repr__(self) -> str:
        return f"QDQToShift(exclude={list(self.exclude)}, rounding={self.rounding!r})"

    def run(self, program: Program) -> tuple[Program, dict[str, Any]]:
        nodes = program.graph_module.graph.nodes
        if any(n.op == "call_function" and "val" not in n.meta for n in nodes):
            # shapes are read below; a pass result not yet re-exported (PotQuantize's own
            # attention decomposition) lacks some
            program = program.refreshed()
        gm = program.copy_graph()
        rewriter = _Rewriter(gm, self.exclude, self.rounding)
        rewriter.run()
        if not rewriter.layers:
            foreign = rewriter.foreign_quantizers
            if foreign:
                raise PassError(
                    f"{program.name} has no edgefx power-of-two quantize/dequantize chains; "
                    f"its {len(foreign)} quantizer(s) ({', '.join(foreign[:3])}) are "
                    "torch.ao/quantized_decomposed ops whose scales need not be powers of two",
                    hint="quantize with edgefx.passes.PotQuantize (power-of-two scales) first",
                )
            raise PassError(
                f"{program.name} has no dequantize_pot -> conv/linear chain to rewrite"
                + (f" ({rewriter.refusals[0]})" if rewriter.refusals else ""),
                hint="run PotQuantize before QDQToShift, e.g. passes=[PotQuantize(calib), "
                "QDQToShift()]",
            )
        remove_dead_code(gm)
        _own_boundaries(gm)
        report = rewriter.report()
        return program.with_graph(gm, repr(self)), report


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, exclude: tuple[str, ...], rounding: str) -> None:
        self.gm = gm
        self.rounding = rounding
        self.graph = gm.graph
        self.exclude = exclude
        self.ints: dict[fx.Node, _Int] = {}
        self.floats: dict[fx.Node, fx.Node] = {}  # float node -> its dequantized codes
        self.layers: list[_Layer] = []
        self.layer_of: dict[str, _Layer] = {}
        self.islands: list[dict[str, str]] = []
        self.refusals: list[str] = []
        self.foreign_quantizers: list[str] = []
        self.requants: list[dict[str, Any]] = []
        self.aligned: list[dict[str, Any]] = []
        self.unbound: dict[fx.Node, tuple[fx.Node, _Int, int]] = {}  # unbind -> its codes'

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op == "output":
                self._to_float_inputs(node, reason=None)
            elif node.op == "call_function":
                self._visit(node)
        self.gm.recompile()

    def _visit(self, node: fx.Node) -> None:
        target = node.target
        if getattr(target, "namespace", None) == _FOREIGN_QUANT or _FOREIGN_QUANT in str(target):
            self.foreign_quantizers.append(node.name)
        handler = {
            _DEQUANTIZE: self._dequantize,
            _QUANTIZE: self._quantize,
            aten.conv2d.default: self._layer,
            aten.linear.default: self._layer,
            aten.add.Tensor: self._add,
            aten.cat.default: self._cat,
            aten.max_pool2d.default: self._max_pool,
            aten.mean.dim: self._global_pool,
            aten.matmul.default: self._matmul,
            aten.mul.Tensor: self._scale,
            aten.div.Tensor: self._scale,
            aten.unbind.int: self._unbind,
            operator.getitem: self._getitem,
        }.get(target)
        if target in _CLAMPS:
            handler = self._clamp
        elif target in _SHAPE_OPS:
            handler = self._shape
        elif target in _IDENTITY:
            handler = self._identity
        elif target in _GLOBAL_POOLS or target is aten.avg_pool2d.default:
            handler = self._global_pool
        reason = None
        if handler is not None:
            try:
                reason = handler(node)
            except _Refuse as exc:
                reason = str(exc)
            if reason is None:
                return
        self._to_float_inputs(node, reason)

    # ------------------------------------------------------------------ helpers
    def _int_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.ints]

    def _to_float_inputs(self, node: fx.Node, reason: str | None) -> None:
        """``node`` reads floats: dequantize every integer value it reads (a float island)."""
        inputs = self._int_inputs(node)
        if not inputs:
            return
        for value in inputs:
            node.replace_input_with(value, self._float(value))
        if node.op == "output":
            return
        if node.target in (_QUANTIZE,) and reason is None:
            return
        self.islands.append(
            {
                "node": node.name,
                "module": module_path(node),
                "op": _op_name(node),
                "reason": reason or f"no integer form for {_op_name(node)}",
            }
        )

    def _float(self, value: fx.Node) -> fx.Node:
        """The float value of an integer-held node: its codes dequantized (+ pending clamp)."""
        if value in self.floats:
            return self.floats[value]
        v = self.ints[value]
        if v.layer in self.layer_of:  # an integer layer's codes read by a float island
            layer = self.layer_of[v.layer]
            bound = max(float(v.hi.max()), -float(v.lo.min()))
            layer.dequantized_bound = max(layer.dequantized_bound, bound)
        exp = self._const(f"{value.name}_exp", v.exp.to(torch.int32), value)
        with self.graph.inserting_after(value):
            out = self.graph.call_function(_DEQUANTIZE, (v.codes, exp, v.axis))
        _copy_meta(value, out)
        low, high = v.clamp
        if low is not None or high is not None:
            with self.graph.inserting_after(out):
                out = self.graph.call_function(aten.clamp.default, (out, low, high))
            _copy_meta(value, out)
        self.floats[value] = out
        return out

    def _const(self, hint: str, value: torch.Tensor, near: fx.Node) -> fx.Node:
        del near  # constants all go to the top of the graph
        return add_buffer(self.gm, hint, value, before=_first_call(self.graph))

    def _emit(self, like: fx.Node, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        with self.graph.inserting_before(like):
            new = self.graph.call_function(target, args, kwargs or {})
        _copy_meta(like, new)
        return new

    def _codes_clamped(self, node: fx.Node) -> _Int | None:
        """The value with its pending clamp applied to the codes (None if the bounds are not on
        the codes' grid, so the clamp can only be applied in float)."""
        v = self.ints[node]
        low, high = v.clamp
        if low is None and high is None:
            return v
        scale = torch.ldexp(torch.ones_like(v.exp, dtype=torch.float64), -v.exp)
        bounds = []
        for bound in (low, high):
            if bound is None:
                bounds.append(None)
                continue
            codes = bound * scale
            if not torch.equal(codes, codes.round()):
                return None
            bounds.append(codes)
        lo_codes, hi_codes = bounds
        # both bounds given (TVM's importer cannot take an open int bound), one number
        # where every channel has the same bound (a ReLU's 0)
        dtype_lo, dtype_hi = _dtype_range(v.dtype)
        low_arg = torch.full_like(v.lo, dtype_lo) if lo_codes is None else lo_codes
        high_arg = torch.full_like(v.hi, dtype_hi) if hi_codes is None else hi_codes
        if v.exp.dim() == 0 or (
            bool((low_arg == low_arg.reshape(-1)[0]).all())
            and bool((high_arg == high_arg.reshape(-1)[0]).all())
        ):
            args = (v.codes, int(low_arg.reshape(-1)[0]), int(high_arg.reshape(-1)[0]))
            clamped = self._emit(node, aten.clamp.default, args)
        else:
            shape = [1] * _rank(node)
            shape[v.axis] = -1
            # maximum/minimum rather than clamp.Tensor: TVM's importer ends clamp.Tensor
            # with an infinite clip, which int tensors cannot take
            clamped = v.codes
            for codes, op in ((lo_codes, aten.maximum.default), (hi_codes, aten.minimum.default)):
                if codes is not None:
                    bound = self._const(f"{node.name}_clamp",
                                        codes.to(torch.int32).reshape(shape), node)
                    clamped = self._emit(node, op, (clamped, bound))
        lo = v.lo if lo_codes is None else torch.maximum(v.lo, lo_codes)
        hi = v.hi if hi_codes is None else torch.minimum(v.hi, hi_codes)
        return replace(v, codes=clamped, lo=lo, hi=hi, clamp=(None, None))

    def _shifted(self, node: fx.Node, v: _Int, shift: torch.Tensor, axis: int) -> fx.Node:
        """Codes of ``v`` times 2**-shift (shift <= 0 here: left shifts), as int32."""
        if not bool((shift != 0).any()) and v.dtype == torch.int32:
            return v.codes
        return self._emit(node, _REQUANT, (v.codes, _amounts(shift), axis, 32, True))

    def _check_bound(self, node: fx.Node, lo: torch.Tensor, hi: torch.Tensor, what: str) -> None:
        worst = max(float(hi.max()), -float(lo.min()))
        if worst > INT32[1]:
            raise PassError(
                f"{what} could overflow int32: worst case |value| {worst:.4g} > 2**31-1",
                node=node.name,
                module=module_path(node) or None,
                hint="quantize with fewer weight/activation bits, split the layer, or leave it "
                "in float (PotQuantize(exclude=[...]) or QDQToShift(exclude=[...]))",
            )

    # ------------------------------------------------------------------ handlers
    # each returns None when the node was handled, or the reason it stays float
    def _dequantize(self, node: fx.Node) -> str | None:
        codes, exp_node, axis = node.args[:3]
        exp = attr_tensor(self.gm, exp_node)
        if exp is None or not isinstance(codes, fx.Node):
            return "dequantize with a non-constant exponent"
        const = attr_tensor(self.gm, codes)
        if const is not None:  # weight or bias codes
            c = const.to(torch.float64)
            if exp.dim() == 1:
                c = c.reshape(c.shape[0], -1)
                lo, hi = c.min(dim=1).values, c.max(dim=1).values
            else:
                lo, hi = c.min(), c.max()
            self.ints[node] = _Int(codes, exp.to(torch.int64), axis, lo, hi, const.dtype)
            return None
        if codes.op == "call_function" and codes.target is _REQUANT:  # rewritten quantize
            bits, signed = codes.args[3], codes.args[4]
            low, high = _requant_range(codes)
        elif codes.op == "call_function" and codes.target is _QUANTIZE:
            bits, signed = codes.args[3], codes.args[4]
            low, high = qrange(bits, signed)
        else:
            return "dequantize of codes that are not a quantize_pot output"
        lo = torch.full_like(exp, low, dtype=torch.float64)
        hi = torch.full_like(exp, high, dtype=torch.float64)
        self.ints[node] = _Int(codes, exp.to(torch.int64), axis, lo, hi, out_dtype(bits, signed))
        return None

    def _quantize(self, node: fx.Node) -> str | None:
        source, exp_node, axis, bits, signed = node.args[:5]
        if source not in self.ints:
            return None  # float -> codes: the start of an integer region, kept as is
        exp = attr_tensor(self.gm, exp_node)
        v = self.ints[source]
        if exp is None:
            return "quantize with a non-constant exponent"
        if exp.dim() == 1 and v.exp.dim() == 1 and axis % _rank(node) != v.axis:
            return "per-channel quantize along another axis than its input's exponents"
        shift = exp.to(torch.int64) - v.exp
        shift_axis = v.axis if v.exp.dim() == 1 else axis % max(_rank(node), 1)
        # the pending ReLU/ReLU6 clamp is monotone: clamp(requant(v)) of requant(bounds)
        low = high = None
        lo_real, hi_real = v.clamp
        if (lo_real is not None or hi_real is not None) and exp.dim() != 0:
            return "a ReLU/clamp before a per-channel quantize"
        if lo_real is not None:
            low = _requant_bound(lo_real, exp, self.rounding)
        if hi_real is not None:
            high = _requant_bound(hi_real, exp, self.rounding)
        left, right = torch.clamp(-shift, min=0), torch.clamp(shift, min=0)
        scale = torch.ldexp(torch.ones_like(left, dtype=torch.float64), left)
        # the rounding offset (at most 2**(r-1)) is added in int32 before the right shift
        offset = torch.where(right > 0, torch.ldexp(torch.ones_like(scale), right - 1), 0.0)
        self._check_bound(node, v.lo * scale, v.hi * scale + offset,
                          f"requantization {node.name}")
        args = (v.codes, _amounts(shift), shift_axis, bits, signed, low, high, self.rounding)
        requant = self._emit(node, _REQUANT, args)
        node.replace_all_uses_with(requant)
        info = {
            "node": requant.name,
            "module": module_path(node),
            "from_layer": v.layer,
            "shift": [int(shift.min()), int(shift.max())],
            "bits": bits,
            "signed": signed,
            "clamp": list(_requant_range(requant)),
        }
        self.requants.append(info)
        if v.layer in self.layer_of:
            self.layer_of[v.layer].requants.append(info)
        return None

    def _layer(self, node: fx.Node) -> str | None:
        module = module_path(node) or node.name
        if any(under(module, p) for p in self.exclude):
            self.refusals.append(f"{module} excluded")
            return "excluded (QDQToShift(exclude=...))"
        is_conv = node.target is aten.conv2d.default
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        reason = self._layer_refusal(x, w, b)
        if reason:
            self.refusals.append(f"{module}: {reason}")
            return reason
        xv, wv = self.ints[x], self.ints[w]
        bv = self.ints[b] if b is not None else None
        weight = attr_tensor(self.gm, wv.codes).to(torch.float64)
        rows = weight.reshape(weight.shape[0], -1)
        fan_in = rows.shape[1]
        xlo, xhi = float(xv.lo), float(xv.hi)
        pos, neg = rows.clamp(min=0).sum(dim=1), rows.clamp(max=0).sum(dim=1)
        bias = torch.zeros(rows.shape[0], dtype=torch.float64)
        if bv is not None:
            bias = attr_tensor(self.gm, bv.codes).to(torch.float64).reshape(-1)
        hi = pos * xhi + neg * xlo + bias
        lo = pos * xlo + neg * xhi + bias
        xmax = max(abs(xlo), abs(xhi))
        bitwidth = fan_in * float(rows.abs().max()) * xmax + float(bias.abs().max())
        self._check_bound(node, lo, hi, f"the accumulator of {module}")
        if is_conv:
            stride, padding, dilation, groups = _conv_args(node)
            args = (xv.codes, wv.codes, bv.codes if bv else None, stride, padding, dilation, groups)
            new = self._emit(node, _CONV_INT, args)
            axis = 1
        else:
            new = self._emit(node, _LINEAR_INT, (xv.codes, wv.codes, bv.codes if bv else None))
            axis = _rank(node) - 1
        exp = xv.exp + wv.exp
        layer = _Layer(new.name, module, "conv2d" if is_conv else "linear", fan_in,
                       int(max(hi.max(), -lo.min())), int(bitwidth))
        self.layers.append(layer)
        self.layer_of[new.name] = layer
        self.ints[node] = _Int(new, exp, axis, lo, hi, torch.int32, layer=new.name)
        return None

    def _layer_refusal(self, x: Any, w: Any, b: Any) -> str | None:
        if x not in self.ints or w not in self.ints:
            return "input or weight is not dequantized power-of-two codes"
        xv, wv = self.ints[x], self.ints[w]
        if xv.exp.dim() != 0 or xv.dtype not in (torch.int8, torch.uint8) or xv.clamp != (
            None,
            None,
        ):
            return "input is not per-tensor 8-bit-or-narrower codes"
        if attr_tensor(self.gm, wv.codes) is None or wv.dtype != torch.int8:
            return "weight is not constant int8 codes"
        if wv.exp.dim() == 1 and wv.axis != 0:
            return "weight exponents are not per output channel"
        if b is not None:
            if b not in self.ints or attr_tensor(self.gm, self.ints[b].codes) is None:
                return "bias is not constant integer codes"
            bv = self.ints[b]
            if bv.dtype != torch.int32:
                return "bias codes are not int32"
            expected = (xv.exp + wv.exp).expand(bv.exp.shape) if bv.exp.dim() else None
            if expected is None or not torch.equal(bv.exp, expected):
                return "bias exponent is not input + weight exponent (not on the accumulator grid)"
        return None

    def _matmul(self, node: fx.Node) -> str | None:
        """Activation times activation (a ViT's q @ k^T, attn @ v): both operands per-tensor
        8-bit-or-narrower codes -> ``matmul_int``, exponent the sum of theirs."""
        a, b = node.args[:2]
        if not (a in self.ints and b in self.ints):
            return "matmul of an integer and a float value" if self._int_inputs(node) else None
        module = module_path(node) or node.name
        if any(under(module, p) for p in self.exclude):
            self.refusals.append(f"{module} excluded")
            return "excluded (QDQToShift(exclude=...))"
        operands = [self._codes_clamped(a), self._codes_clamped(b)]
        if any(v is None for v in operands):
            return "matmul: a clamp not on the codes' grid"
        va, vb = operands
        if va.exp.dim() or vb.exp.dim():
            return "matmul of per-channel exponents (only per-tensor codes multiply exactly)"
        if any(v.dtype not in (torch.int8, torch.uint8) for v in operands):
            return "matmul operand is not 8-bit-or-narrower codes"
        fan_in = int(a.meta["val"].shape[-1])
        corners = torch.stack([va.lo * vb.lo, va.lo * vb.hi, va.hi * vb.lo, va.hi * vb.hi])
        lo, hi = corners.min() * fan_in, corners.max() * fan_in
        self._check_bound(node, lo, hi, f"the accumulator of the matmul {node.name} ({module})")
        new = self._emit(node, _MATMUL_INT, (va.codes, vb.codes))
        bound = int(max(hi, -lo))
        layer = _Layer(new.name, module, "matmul", fan_in, bound, bound)
        self.layers.append(layer)
        self.layer_of[new.name] = layer
        self.ints[node] = _Int(new, va.exp + vb.exp, 0, lo, hi, torch.int32, layer=new.name)
        return None

    def _scale(self, node: fx.Node) -> str | None:
        """Times / divided by a positive power of two: the same codes, exponent moved (exact,
        as in float)."""
        source, factor = node.args[:2]
        if node.target is aten.mul.Tensor and not isinstance(source, fx.Node):
            source, factor = factor, source
        if source not in self.ints:
            return "power-of-two scaling of a float by integer codes" if (
                self._int_inputs(node)) else None  # fmt: skip
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
            return f"{_op_name(node)} by a tensor or a non-positive number"
        mantissa, power = math.frexp(float(factor))
        if mantissa != 0.5:
            return f"{_op_name(node)} by {factor:g}, not a power of two"
        power -= 1
        if node.target is aten.div.Tensor:
            power = -power
        v = self.ints[source]
        low, high = v.clamp
        clamp = tuple(None if c is None else math.ldexp(c, power) for c in (low, high))
        self.ints[node] = replace(v, exp=v.exp + power, clamp=clamp)
        return None

    def _unbind(self, node: fx.Node) -> str | None:
        source = node.args[0]
        if source not in self.ints:
            return None
        v = self.ints[source]
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % _rank(source)
        if v.exp.dim() == 1 and v.axis == dim:
            return "unbind along the axis of per-channel exponents"
        new = self._emit(node, aten.unbind.int, (v.codes, dim))
        self.unbound[node] = (new, v, dim)
        return None

    def _getitem(self, node: fx.Node) -> str | None:
        source, index = node.args[:2]
        if source not in self.unbound:
            return None
        new_tuple, v, dim = self.unbound[source]
        new = self._emit(node, operator.getitem, (new_tuple, index))
        axis = v.axis - 1 if v.exp.dim() == 1 and v.axis > dim else v.axis
        self.ints[node] = replace(v, codes=new, axis=axis if v.exp.dim() == 1 else 0)
        return None

    def _clamp(self, node: fx.Node) -> str | None:
        source = node.args[0]
        if source not in self.ints:
            return None
        if node.target is aten.relu.default:
            low, high = 0.0, None
        elif node.target is aten.relu6.default:
            low, high = 0.0, 6.0
        elif node.target is aten.hardtanh.default:
            low = float(node.args[1]) if len(node.args) > 1 else -1.0
            high = float(node.args[2]) if len(node.args) > 2 else 1.0
        else:
            low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
            high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
            if not all(b is None or isinstance(b, (int, float)) for b in (low, high)):
                return "clamp bounds are tensors"
        v = self.ints[source]
        old_lo, old_hi = v.clamp
        new_lo = low if old_lo is None else (old_lo if low is None else max(old_lo, low))
        new_hi = high if old_hi is None else (old_hi if high is None else min(old_hi, high))
        scale = torch.ldexp(torch.ones_like(v.exp, dtype=torch.float64), -v.exp)
        lo = v.lo if new_lo is None else torch.maximum(v.lo, torch.floor(new_lo * scale))
        hi = v.hi if new_hi is None else torch.minimum(v.hi, torch.ceil(new_hi * scale))
        self.ints[node] = replace(v, clamp=(new_lo, new_hi), lo=lo, hi=hi)
        return None

    def _identity(self, node: fx.Node) -> str | None:
        if node.args[0] in self.ints:
            self.ints[node] = self.ints[node.args[0]]
        return None

    def _shape(self, node: fx.Node) -> str | None:
        source = node.args[0]
        if source not in self.ints:
            return None
        v = self.ints[source]
        axis = v.axis
        if v.exp.dim() == 1:
            axis = _mapped_axis(node, v.axis)
            if axis is None:  # the channel axis does not survive: one exponent for all
                v = self._aligned_to_scalar(node, source, v)
                axis = 0
        new = self._emit(node, node.target, (v.codes, *node.args[1:]), dict(node.kwargs))
        self.ints[node] = replace(v, codes=new, axis=axis)
        return None

    def _aligned_to_scalar(self, node: fx.Node, source: fx.Node, v: _Int) -> _Int:
        clamped = self._codes_clamped(source)
        if clamped is None:
            raise _Refuse("a clamp not on the codes' grid")
        target = clamped.exp.min()
        shift = target - clamped.exp
        scale = torch.ldexp(torch.ones_like(shift, dtype=torch.float64), -shift)
        lo, hi = clamped.lo * scale, clamped.hi * scale
        self._check_bound(node, lo, hi, f"aligning {source.name} to one exponent")
        codes = self._shifted(node, clamped, shift, clamped.axis)
        self.aligned.append({"node": node.name, "left_shift": [0, int(-shift.min())]})
        return replace(clamped, codes=codes, exp=target, lo=lo.min(), hi=hi.max(),
                       dtype=torch.int32)

    def _add(self, node: fx.Node) -> str | None:
        a, b = node.args[:2]
        if "alpha" in node.kwargs and node.kwargs["alpha"] != 1:
            return "add with alpha"
        if not (a in self.ints and b in self.ints):
            return "add of an integer and a float value" if self._int_inputs(node) else None
        try:
            parts = self._aligned(node, [a, b])
        except _Refuse as exc:
            return f"add: {exc}"
        (ca, va), (cb, vb) = parts
        new = self._emit(node, aten.add.Tensor, (ca, cb))
        lo, hi = va.lo + vb.lo, va.hi + vb.hi
        self._check_bound(node, lo, hi, f"the residual add {node.name}")
        self.ints[node] = replace(va, codes=new, lo=lo, hi=hi, dtype=torch.int32, layer=None)
        return None

    def _aligned(self, node: fx.Node, sources: list[fx.Node]) -> list[tuple[fx.Node, _Int]]:
        """Each source's codes left-shifted onto the smallest exponent (per channel)."""
        values = []
        for s in sources:
            clamped = self._codes_clamped(s)
            if clamped is None:
                raise _Refuse("a clamp not on the codes' grid")
            values.append(clamped)
        per_channel = [v for v in values if v.exp.dim() == 1]
        if per_channel and len({v.axis for v in per_channel}) > 1:
            raise _Refuse("per-channel exponents along different axes")
        axis = per_channel[0].axis if per_channel else 0
        target = values[0].exp
        for v in values[1:]:
            target = torch.minimum(target, v.exp)
        out = []
        for s, v in zip(sources, values, strict=True):
            shift = target - v.exp  # <= 0: left shifts
            scale = torch.ldexp(torch.ones_like(shift, dtype=torch.float64), -shift)
            lo, hi = v.lo * scale, v.hi * scale
            self._check_bound(node, lo, hi, f"aligning {s.name} for {node.name}")
            codes = self._shifted(node, v, shift, axis)
            if bool((shift != 0).any()):
                self.aligned.append(
                    {"node": node.name, "input": s.name, "left_shift": [int(-shift.max()),
                                                                       int(-shift.min())]}
                )
            out.append((codes, replace(v, codes=codes, exp=target, axis=axis, lo=lo, hi=hi,
                                       dtype=torch.int32)))
        return out

    def _cat(self, node: fx.Node) -> str | None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not all(t in self.ints for t in tensors):
            return "concat of integer and float values" if self._int_inputs(node) else None
        rank = _rank(node)
        dim = dim % rank
        values = [self.ints[t] for t in tensors]
        same = all(
            v.exp.dim() == 0 and torch.equal(v.exp, values[0].exp) and v.dtype == values[0].dtype
            and v.clamp == values[0].clamp
            for v in values
        )
        if same:
            new = self._emit(node, aten.cat.default, ([v.codes for v in values], dim))
            lo = torch.minimum(*(v.lo for v in values[:2])) if len(values) > 1 else values[0].lo
            hi = torch.maximum(*(v.hi for v in values[:2])) if len(values) > 1 else values[0].hi
            for v in values[2:]:
                lo, hi = torch.minimum(lo, v.lo), torch.maximum(hi, v.hi)
            self.ints[node] = replace(values[0], codes=new, lo=lo, hi=hi, layer=None)
            return None
        try:
            if dim == 1 and all(v.exp.dim() == 0 or v.axis == 1 for v in values):
                parts = []
                for t in tensors:
                    v = self._codes_clamped(t)
                    if v is None:
                        raise _Refuse("a clamp not on the codes' grid")
                    n = int(t.meta["val"].shape[1])
                    zero = torch.zeros(n, dtype=torch.int64)
                    parts.append((self._shifted(node, v, zero, 1), _per_channel(v, n)))
                new = self._emit(node, aten.cat.default, ([c for c, _ in parts], 1))
                self.ints[node] = _Int(
                    new,
                    torch.cat([v.exp for _, v in parts]),
                    1,
                    torch.cat([v.lo for _, v in parts]),
                    torch.cat([v.hi for _, v in parts]),
                    torch.int32,
                )
                return None
            parts = self._aligned(node, list(tensors))
        except _Refuse as exc:
            return f"concat: {exc}"
        if any(v.exp.dim() == 1 and v.axis == dim for _, v in parts):
            return "concat along the axis of per-channel exponents"
        new = self._emit(node, aten.cat.default, ([c for c, _ in parts], dim))
        first = parts[0][1]
        lo, hi = first.lo, first.hi
        for _, v in parts[1:]:
            lo, hi = torch.minimum(lo, v.lo), torch.maximum(hi, v.hi)
        self.ints[node] = replace(first, codes=new, lo=lo, hi=hi, layer=None)
        return None

    def _max_pool(self, node: fx.Node) -> str | None:
        source = node.args[0]
        if source not in self.ints:
            return None
        v = self.ints[source]
        if v.exp.dim() == 1 and v.axis != 1:
            return "max pooling over the channel axis of per-channel exponents"
        if v.dtype == torch.int32 and max(float(v.hi.max()), -float(v.lo.min())) >= _FLOAT24:
            return "int32 codes beyond 2**24 (onnxruntime pools them in float32)"
        kernel, stride, padding, dilation, ceil = _pool_args(node)
        new = self._emit(node, _MAX_POOL_INT, (v.codes, kernel, stride, padding, dilation, ceil))
        self.ints[node] = replace(v, codes=new, layer=None)  # clamps commute with max
        return None

    def _global_pool(self, node: fx.Node) -> str | None:
        source = node.args[0]
        if source not in self.ints:
            return None
        shape = [int(d) if not isinstance(d, torch.SymInt) else None
                 for d in source.meta["val"].shape]
        dims, keepdim = _pooled_dims(node, shape)
        if dims is None:
            return f"{_op_name(node)} is not a global average (a windowed pooling)"
        count = math.prod(shape[d] for d in dims) if all(shape[d] for d in dims) else None
        if count is None or count & (count - 1):
            return f"average over {count} positions, not a power of two"
        v = self._codes_clamped(source)
        if v is None:
            return "a clamp not on the codes' grid"
        if v.exp.dim() == 1 and v.axis in dims:
            return "average over the axis of per-channel exponents"
        lo, hi = v.lo * count, v.hi * count
        self._check_bound(node, lo, hi, f"the sum of {node.name}")
        zero = torch.zeros_like(v.exp)
        codes = self._shifted(node, v, zero, v.axis)
        new = self._emit(node, aten.sum.dim_IntList, (codes, dims, keepdim),
                         {"dtype": torch.int32})
        axis = v.axis
        if not keepdim and v.exp.dim() == 1:
            axis -= sum(1 for d in dims if d < v.axis)
        shift = count.bit_length() - 1
        self.ints[node] = replace(v, codes=new, exp=v.exp - shift, axis=axis, lo=lo, hi=hi,
                                  dtype=torch.int32, layer=None)
        return None

    # ------------------------------------------------------------------ report
    def report(self) -> dict[str, Any]:
        into_float = self._layers_into_float()
        return {
            "rounding": (
                "half up: floor((x + 2**(s-1)) / 2**s); the QDQ graph rounds half to even"
                if self.rounding == "half_up"
                else "half to even, as the QDQ graph"
            ),
            "layers": [
                {
                    "node": layer.node,
                    "module": layer.module,
                    "op": layer.op,
                    "fan_in": layer.fan_in,
                    "acc_bound": layer.acc_bound,
                    "bitwidth_bound": layer.bitwidth_bound,
                    "int32_headroom_bits": round(math.log2(INT32[1] / max(layer.acc_bound, 1)), 2),
                    "requant_shift": _shift_span(layer.requants),
                    # every multiply-accumulate of a layer listed here is integer
                    "integer": True,
                    # "codes": on to the next integer layers (or the model output) in integers;
                    # "float": its codes are dequantized for the float islands named in
                    # float_consumers ("an integer layer ending in a float island")
                    "output": "float" if into_float.get(layer.node) else "codes",
                    "float_consumers": into_float.get(layer.node, []),
                    # the codes dequantized there stay below 2**24, so their float32 value
                    # (codes * 2**exponent) is exact: the float island reads exactly the value
                    # the QDQ graph's float32 layer computes, where its sums are exact too
                    "dequantized_exactly": (
                        layer.dequantized_bound < _FLOAT24 if into_float.get(layer.node) else None
                    ),
                }
                for layer in self.layers
            ],
            # ONNX BitShift on signed int32 exists from opset 28 on: export with
            # backend_options={"opset": 28} (at 21, onnxruntime refuses the model)
            "onnx_opset_required": 28,
            "requants": self.requants,
            "aligned": self.aligned,
            "islands": self.islands,
            "integer_layers": len(self.layers),
            "layers_into_float": sum(1 for consumers in into_float.values() if consumers),
        }

    def _layers_into_float(self) -> dict[str, list[str]]:
        """Per integer layer, the float ops its codes reach through a dequantize on the way to
        the next integer layers (none: integer from its accumulator to the next integer layers
        or to the model's own dequantized output)."""

        def only_outputs(n: fx.Node) -> bool:
            return all(
                u.op == "output" or (u.target is aten.clamp.default and only_outputs(u))
                for u in n.users
            )

        layer_nodes = {n for n in self.graph.nodes if n.target in _INT_LAYERS}
        result = {}
        for start in layer_nodes:
            consumers: list[str] = []
            stack, seen = list(start.users), set()
            while stack:
                n = stack.pop()
                if n in seen or n in layer_nodes or n.op == "output":
                    continue
                seen.add(n)
                if n.target in (_DEQUANTIZE, _TO_FLOAT):  # a float island or an output
                    if not only_outputs(n):
                        consumers.extend(_island_users(n))
                    continue
                stack.extend(n.users)
            result[start.name] = sorted(set(consumers))
        return result


def _island_users(dequantized: fx.Node) -> list[str]:
    """The float ops reading a dequantized value (through a pending clamp)."""
    names = []
    for user in dequantized.users:
        if user.target is aten.clamp.default and user.args[0] is dequantized:
            names.extend(_island_users(user))
        elif user.op != "output":
            names.append(user.name)
    return names


def _own_boundaries(gm: fx.GraphModule) -> None:
    """The quantize/dequantize nodes left at the borders of the integer regions become
    float_to_codes / codes_to_float (same kernels; they lower without QuantizeLinear-28,
    which onnxruntime lacks, see edgefx.ops.integer)."""
    swap = {_QUANTIZE: _TO_CODES, _DEQUANTIZE: _TO_FLOAT}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in swap:
            node.target = swap[node.target]
    gm.recompile()


class _Refuse(Exception):
    """Internal: this node stays float, for the given reason."""


# ---------------------------------------------------------------------------- small helpers
def _copy_meta(src: fx.Node, dst: fx.Node) -> None:
    for key in ("nn_module_stack", "stack_trace"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def _first_call(graph: fx.Graph) -> fx.Node:
    for node in graph.nodes:
        if node.op not in ("placeholder", "get_attr"):
            return node
    raise PassError("empty graph")


def _rank(node: fx.Node) -> int:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim()
    raise PassError(f"node {node.name} has no shape metadata", node=node.name,
                    hint="re-capture the Program (shape metadata comes from torch.export)")


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.replace(".default", "")


def _amounts(shift: torch.Tensor) -> list[int]:
    """requant_shift's constant shift list: one amount, or one per channel."""
    return [int(s) for s in shift.reshape(-1)]


def _dtype_range(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.iinfo(dtype)
    return info.min, info.max


def _per_channel(v: _Int, n: int) -> _Int:
    if v.exp.dim() == 1:
        return v
    return replace(v, exp=v.exp.expand(n).clone(), lo=v.lo.expand(n).clone(),
                   hi=v.hi.expand(n).clone(), axis=1)


def _requant_range(node: fx.Node) -> tuple[int, int]:
    bits, signed = node.args[3], node.args[4]
    lo, hi = shift_range(bits, signed)
    low = node.args[5] if len(node.args) > 5 else None
    high = node.args[6] if len(node.args) > 6 else None
    return (lo if low is None else max(lo, low)), (hi if high is None else min(hi, high))


def _requant_bound(real: float, exp: torch.Tensor, rounding: str) -> int:
    """A real clamp bound as a code at exponent ``exp``, by the graph's rounding rule:
    requantization is monotone, so requant(clamp(v, a, b)) equals
    clamp(requant(v), requant(a), requant(b))."""
    scaled = real * 2.0 ** -int(exp)
    return round(scaled) if rounding == "half_even" else math.floor(scaled + 0.5)


def _shift_span(requants: list[dict[str, Any]]) -> list[int] | None:
    if not requants:
        return None
    return [min(r["shift"][0] for r in requants), max(r["shift"][1] for r in requants)]


def _pair(value: Any, n: int = 2) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    return value * n if len(value) == 1 else value


def _conv_args(node: fx.Node) -> tuple[list[int], list[int], list[int], int]:
    args = list(node.args) + [None] * (7 - len(node.args))
    stride = _pair(args[3] if args[3] is not None else node.kwargs.get("stride", 1))
    padding = args[4] if args[4] is not None else node.kwargs.get("padding", 0)
    dilation = _pair(args[5] if args[5] is not None else node.kwargs.get("dilation", 1))
    groups = args[6] if args[6] is not None else node.kwargs.get("groups", 1)
    if isinstance(padding, str):
        raise _Refuse("string padding")
    return stride, _pair(padding), dilation, int(groups)


def _pool_args(node: fx.Node) -> tuple[list[int], list[int], list[int], list[int], bool]:
    args = list(node.args) + [None] * (6 - len(node.args))
    kernel = _pair(args[1])
    stride = _pair(args[2]) if args[2] else kernel
    padding = _pair(args[3] if args[3] is not None else 0)
    dilation = _pair(args[4] if args[4] is not None else 1)
    ceil = bool(args[5]) if args[5] is not None else False
    return kernel, stride, padding, dilation, ceil


def _pooled_dims(node: fx.Node, shape: list[int | None]) -> tuple[list[int] | None, bool]:
    """The dims a global average reduces (None if it is windowed), and keepdim."""
    rank = len(shape)
    if node.target is aten.mean.dim:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim"))
        if dims is None:
            return None, False
        return sorted(d % rank for d in _pair(dims, 1)), keepdim
    if node.target is aten.avg_pool2d.default:
        kernel = _pair(node.args[1])
        padding = _pair(node.args[3]) if len(node.args) > 3 else [0, 0]
        if rank == 4 and kernel == shape[2:] and padding == [0, 0]:
            return [2, 3], True
        return None, False
    output_size = _pair(node.args[1])
    if output_size == [1, 1]:
        return [rank - 2, rank - 1], True
    return None, False


def _mapped_axis(node: fx.Node, axis: int) -> int | None:
    """Where the channel axis ``axis`` of the input goes in a shape op's output (None when
    the channel axis does not survive as its own axis)."""
    src = node.args[0]
    before = [str(d) for d in src.meta["val"].shape]
    after = [str(d) for d in node.meta["val"].shape]
    if node.target is aten.permute.default:
        return list(node.args[1]).index(axis) if axis in node.args[1] else None
    if node.target is aten.transpose.int:
        d0, d1 = (d % len(before) for d in node.args[1:3])
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if before[: axis + 1] == after[: axis + 1]:
        return axis
    return None
