"""Integer arithmetic on power-of-two quantized codes: ``edgefx::conv_int``,
``edgefx::linear_int``, ``edgefx::matmul_int``, ``edgefx::requant_shift`` and
``edgefx::max_pool_int``.

These are the kernels QDQToShift rewrites ``dequantize_pot -> conv/linear -> quantize_pot``
chains into. A tensor is a pair (integer codes, power-of-two exponent); the ops compute on the
codes only and the exponents live in the rewriting pass:

- ``conv_int`` / ``linear_int``: int8/uint8 codes times int8 weight codes, summed in int32,
  plus the int32 bias codes (on the accumulator's grid, exponent = input + weight exponent).
- ``matmul_int``: activation times activation (a ViT's q @ k^T and attn @ v): two tensors of
  int8/uint8 codes, ``torch.matmul``'s broadcasting, summed in int32 (exponent = the sum of
  the two operands' per-tensor exponents).
- ``requant_shift``: moves codes from one exponent to another by a shift, per tensor or per
  channel. ``shift > 0`` divides by ``2**shift`` rounding to nearest, ``shift < 0``
  multiplies by ``2**-shift`` (a left shift, exact), then the result is clamped to
  ``bits``-bit codes (and optionally to a narrower [low, high], which is how a ReLU/ReLU6
  before the requantization is folded in). Two rounding rules, on ties only:
  ``rounding="half_even"`` (the default) computes
  ``floor((x * 2**l + 2**(r-1) - 1 + b) / 2**r)`` with ``b`` = bit ``r`` of ``x * 2**l``
  (the lowest bit of the floor quotient): ties go to the even code;
  ``rounding="half_up"`` computes ``floor((x * 2**l + 2**(r-1)) / 2**r)``: ties go up, one
  right shift, one AND and one add fewer per requantization. Here ``l = max(-shift, 0)``,
  ``r = max(shift, 0)`` and there is no offset when ``r == 0``. Every reference kernel, the
  ONNX lowering and the TVM lowering compute exactly these integers, for both rules; a graph
  uses one rule throughout.
  Why half to even by default: ``quantize_pot``, the Q of PotQuantize's fake-quant graph,
  rounds half to even (``torch.round``, like ONNX QuantizeLinear), so with the same rule the
  integer graph computes the fake-quant graph's codes exactly (wherever the fake-quant
  graph's float32 sums are themselves exact) and keeps its accuracy. Half up moves every
  tie with an even lower code one step, and the difference propagates: on load_digits at
  W4A4 it cost 1.1 points of top-1 against fake-quant (``benchmarks/results/shift_digits.md``).
- ``max_pool_int``: max pooling on codes (max commutes with any monotone requantization).

The reference kernels are exact: integer shifts in int64, and the convolution / matrix
product in float64, which represents every product and partial sum exactly while the
accumulator stays below 2**53 (QDQToShift refuses layers whose worst case exceeds int32).

ONNX: ``ConvInteger`` / ``MatMulInteger`` (batched for ``matmul_int``) + ``Add`` (int32),
``BitShift`` on signed int32 (opset 28; at opset 11 BitShift is unsigned only), ``Clip``,
``Cast``. torch.onnx emits opset 21, so a graph holding ``requant_shift`` must be exported
with ``backend_options={"opset": 28}`` (the ONNX backend's version converter lifts the whole
graph to 28); at opset 21 onnxruntime refuses the int32 BitShift when loading.

TVM: Relax ``conv2d`` / ``matmul`` (operands widened to int32) with ``out_dtype="int32"``,
``left_shift``, ``right_shift`` (arithmetic on int32), ``clip``, ``max_pool2d``, ``astype``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
from onnxscript import opset21 as op

__all__ = [
    "DEFAULT_ROUNDING",
    "INT32",
    "ROUNDINGS",
    "codes_to_float",
    "conv_int",
    "float_to_codes",
    "linear_int",
    "matmul_int",
    "max_pool_int",
    "out_dtype",
    "requant_shift",
    "round_shift",
    "shift_range",
]

INT32 = (-(1 << 31), (1 << 31) - 1)


def shift_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer range of ``bits``-bit codes (``bits`` up to 32; 32 means int32)."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def out_dtype(bits: int, signed: bool) -> torch.dtype:
    """Codes up to 8 bits are held in int8/uint8, wider ones in int32."""
    if bits <= 8:
        return torch.int8 if signed else torch.uint8
    return torch.int32


def _clamp_range(bits: int, signed: bool, low: int | None, high: int | None) -> tuple[int, int]:
    lo, hi = shift_range(bits, signed)
    if low is not None:
        lo = max(lo, low)
    if high is not None:
        hi = min(hi, high)
    return lo, hi


def _along(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """A 0-d tensor as is; a 1-d one shaped to broadcast along ``axis`` of an ndim tensor."""
    if t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


ROUNDINGS = ("half_even", "half_up")
# the fake-quant graph's own rule (quantize_pot rounds half to even): see the module docstring
DEFAULT_ROUNDING = "half_even"


def round_shift(
    x: torch.Tensor, shift: torch.Tensor, rounding: str = DEFAULT_ROUNDING
) -> torch.Tensor:
    """The rounding rule, on int64 (see the module docstring); ``shift`` broadcasts against
    ``x``. ``"half_even"`` adds ``2**(r-1) - 1 + (bit r of x)`` before the right shift: ties
    go to the even code, as in ``quantize_pot``; ``"half_up"`` adds ``2**(r-1)``."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    x = x.to(torch.int64)
    shift = shift.to(torch.int64)
    left = torch.clamp(-shift, min=0)
    right = torch.clamp(shift, min=0)
    x = torch.bitwise_left_shift(x, left)
    half = torch.bitwise_left_shift(torch.ones_like(right), torch.clamp(right - 1, min=0))
    offset = torch.where(right > 0, half, 0)
    if rounding == "half_even":
        odd = torch.bitwise_and(torch.bitwise_right_shift(x, right), 1)
        offset = torch.where(right > 0, half - 1 + odd, 0)
    return torch.bitwise_right_shift(x + offset, right)


# ---------------------------------------------------------------------------- requant_shift
@torch.library.custom_op("edgefx::requant_shift", mutates_args=())
def requant_shift(
    x: torch.Tensor,
    shift: list[int],
    axis: int,
    bits: int,
    signed: bool,
    low: int | None = None,
    high: int | None = None,
    rounding: str = DEFAULT_ROUNDING,
) -> torch.Tensor:
    """Integer codes -> codes at an exponent ``shift`` higher, rounded half to even (or half
    up with ``rounding="half_up"``), clamped to ``bits``-bit codes and to [low, high] when
    given (see the module docstring).

    ``shift`` is a compile-time constant: one amount (per tensor) or one per channel along
    ``axis``; the lowerings emit only the shifts it needs (no left shift if none is < 0)."""
    amounts = torch.tensor(shift, dtype=torch.int64)
    y = round_shift(
        x, _along(amounts if len(shift) > 1 else amounts[0], axis, x.dim()), rounding
    )
    lo, hi = _clamp_range(bits, signed, low, high)
    return y.clamp(lo, hi).to(out_dtype(bits, signed))


@requant_shift.register_fake
def _(x, shift, axis, bits, signed, low=None, high=None, rounding=DEFAULT_ROUNDING):
    return torch.empty_like(x, dtype=out_dtype(bits, signed))


# ---------------------------------------------------------------------------- conv_int
def _exact(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


@torch.library.custom_op("edgefx::conv_int", mutates_args=())
def conv_int(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """2-d convolution of integer codes, int32 accumulation (+ int32 bias codes)."""
    acc = torch.nn.functional.conv2d(
        _exact(x), _exact(weight), None if bias is None else _exact(bias),
        list(stride), list(padding), list(dilation), groups,
    )
    return acc.to(torch.int32)


@conv_int.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    acc = torch.nn.functional.conv2d(
        x.float(), weight.float(), None, list(stride), list(padding), list(dilation), groups
    )
    return torch.empty_like(acc, dtype=torch.int32)


# ---------------------------------------------------------------------------- linear_int
@torch.library.custom_op("edgefx::linear_int", mutates_args=())
def linear_int(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Matrix product of integer codes with ``weight`` [out, in], int32 accumulation."""
    acc = torch.nn.functional.linear(
        _exact(x), _exact(weight), None if bias is None else _exact(bias)
    )
    return acc.to(torch.int32)


@linear_int.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.int32)


# ---------------------------------------------------------------------------- matmul_int
@torch.library.custom_op("edgefx::matmul_int", mutates_args=())
def matmul_int(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul`` of two tensors of integer codes (batched, broadcasting), int32
    accumulation."""
    return torch.matmul(_exact(a), _exact(b)).to(torch.int32)


@matmul_int.register_fake
def _(a, b):
    return torch.empty_like(torch.matmul(a.float(), b.float()), dtype=torch.int32)


# ---------------------------------------------------------------------------- max_pool_int
@torch.library.custom_op("edgefx::max_pool_int", mutates_args=())
def max_pool_int(
    x: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
) -> torch.Tensor:
    """2-d max pooling of integer codes (padding never wins, as in float max pooling)."""
    return torch.ops.aten.max_pool2d.default(
        x, list(kernel_size), list(stride), list(padding), list(dilation), ceil_mode
    )


@max_pool_int.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode):
    out = torch.ops.aten.max_pool2d.default(
        x.float(), list(kernel_size), list(stride), list(padding), list(dilation), ceil_mode
    )
    return torch.empty_like(out, dtype=x.dtype)


# ---------------------------------------------------------------------------- float boundaries
# Where an integer region starts or ends (the model's input and output, float islands), codes
# meet floats. These two ops compute exactly edgefx::quantize_pot / dequantize_pot (round half
# to even on the way in), but lower to Mul/Round/Clip/Cast instead of QuantizeLinear /
# DequantizeLinear: onnxruntime 1.32 has no QuantizeLinear-28 kernel, and the shift graph
# must be opset 28 for its signed BitShift. Multiplying by 2**-e is exact, like the division
# QuantizeLinear does.
@torch.library.custom_op("edgefx::float_to_codes", mutates_args=())
def float_to_codes(
    x: torch.Tensor, exponent: torch.Tensor, axis: int, bits: int, signed: bool
) -> torch.Tensor:
    """Float -> codes at ``2**exponent``, round half to even (as ``quantize_pot``)."""
    from edgefx.ops.pot import quantize_pot

    return quantize_pot(x, exponent, axis, bits, signed)


@float_to_codes.register_fake
def _(x, exponent, axis, bits, signed):
    return torch.empty_like(x, dtype=out_dtype(bits, signed))


@torch.library.custom_op("edgefx::codes_to_float", mutates_args=())
def codes_to_float(q: torch.Tensor, exponent: torch.Tensor, axis: int) -> torch.Tensor:
    """Codes -> float32 ``q * 2**exponent`` (as ``dequantize_pot``)."""
    from edgefx.ops.pot import dequantize_pot

    return dequantize_pot(q, exponent, axis)


@codes_to_float.register_fake
def _(q, exponent, axis):
    return torch.empty_like(q, dtype=torch.float32)


# ---------------------------------------------------------------------------- ONNX lowering
_I32 = onnx.TensorProto.INT32


def _onnx_dtype(bits: int, signed: bool) -> int:
    if bits <= 8:
        return onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8
    return _I32


def _i32(value: int):
    return op.Constant(value=onnx.helper.make_tensor("c", _I32, [], [int(value)]))


def _onnx_along(t, axis: int, rank: int | None):
    """Reshape a per-channel vector to broadcast along ``axis`` (rank known from the graph)."""
    if rank is None:
        raise ValueError("requant_shift needs the input rank to broadcast a per-channel shift")
    shape = [1] * rank
    shape[axis] = -1
    return op.Reshape(t, op.Constant(value_ints=shape))


def _rank(value) -> int | None:
    shape = getattr(value, "shape", None)
    return None if shape is None else len(shape)


def _onnx_requant_shift(
    x, shift, axis: int, bits: int, signed: bool, low=None, high=None,
    rounding=DEFAULT_ROUNDING,
):
    lo, hi = _clamp_range(bits, signed, low, high)
    amounts = np.asarray(list(shift), dtype=np.int64)
    shape = [1] * (_rank(x) or 0)
    if len(amounts) > 1:
        shape[axis] = -1

    def const(values: np.ndarray):
        values = values.astype(np.int32)
        values = values.reshape(shape) if len(amounts) > 1 else values.reshape(())
        return op.Constant(value=onnx.numpy_helper.from_array(values, "c"))

    y = op.Cast(x, to=_I32)
    left, right = np.maximum(-amounts, 0), np.maximum(amounts, 0)
    if (left > 0).any():
        y = op.BitShift(y, const(left), direction="LEFT")
    if (right > 0).any():
        offset = np.where(right > 0, np.left_shift(1, np.maximum(right - 1, 0)), 0)
        if rounding == "half_even":  # + 2**(r-1) - 1 + bit r of y
            odd = op.BitwiseAnd(
                op.BitShift(y, const(right), direction="RIGHT"), const((right > 0) * 1)
            )
            y = op.Add(y, odd)
            offset = np.where(right > 0, offset - 1, 0)
        y = op.BitShift(op.Add(y, const(offset)), const(right), direction="RIGHT")
    if (lo, hi) != INT32:
        y = op.Clip(y, _i32(lo), _i32(hi))
    out = _onnx_dtype(bits, signed)
    return y if out == _I32 else op.Cast(y, to=out)


def _onnx_conv_int(x, weight, bias, stride, padding, dilation, groups: int):
    acc = op.ConvInteger(
        x,
        weight,
        strides=list(stride),
        pads=list(padding) * 2,
        dilations=list(dilation),
        group=groups,
    )
    if bias is not None:
        acc = op.Add(acc, op.Reshape(bias, op.Constant(value_ints=[1, -1, 1, 1])))
    return acc


def _onnx_linear_int(x, weight, bias):
    acc = op.MatMulInteger(x, op.Transpose(weight, perm=[1, 0]))
    if bias is not None:
        acc = op.Add(acc, bias)
    return acc


def _onnx_matmul_int(a, b):
    return op.MatMulInteger(a, b)


def _onnx_max_pool_int(x, kernel_size, stride, padding, dilation, ceil_mode: bool):
    def pool(v):
        out = op.MaxPool(
            v,
            kernel_shape=list(kernel_size),
            strides=list(stride) or list(kernel_size),
            pads=list(padding) * 2,
            dilations=list(dilation),
            ceil_mode=int(ceil_mode),
        )
        return out[0] if isinstance(out, (tuple, list)) else out  # (values, indices)

    dtype = getattr(x, "dtype", None)
    if dtype is not None and str(dtype).upper().endswith("INT32"):
        # onnxruntime's MaxPool takes (u)int8 but not int32; float32 holds the int32 codes
        # exactly below 2**24, which QDQToShift checks before choosing this op
        return op.Cast(pool(op.Cast(x, to=onnx.TensorProto.FLOAT)), to=_I32)
    return pool(x)


def _onnx_pow2(exponent, x, axis: int, negate: bool):
    """``2**exponent`` (or ``2**-exponent``) as float, broadcasting along ``axis`` of ``x``."""
    e = op.Cast(exponent, to=onnx.TensorProto.FLOAT)
    if negate:
        e = op.Neg(e)
    scale = op.Pow(op.Constant(value_float=2.0), e)
    if _rank(exponent) == 1:
        scale = _onnx_along(scale, axis, _rank(x))
    return scale


def _onnx_float_to_codes(x, exponent, axis: int, bits: int, signed: bool):
    lo, hi = shift_range(bits, signed)
    scaled = op.Round(op.Mul(x, _onnx_pow2(exponent, x, axis, negate=True)))  # half to even
    clipped = op.Clip(
        scaled, op.Constant(value_float=float(lo)), op.Constant(value_float=float(hi))
    )
    return op.Cast(clipped, to=_onnx_dtype(bits, signed))


def _onnx_codes_to_float(q, exponent, axis: int):
    return op.Mul(op.Cast(q, to=onnx.TensorProto.FLOAT), _onnx_pow2(exponent, q, axis, False))


ONNX_TRANSLATIONS = {
    torch.ops.edgefx.requant_shift.default: _onnx_requant_shift,
    torch.ops.edgefx.conv_int.default: _onnx_conv_int,
    torch.ops.edgefx.linear_int.default: _onnx_linear_int,
    torch.ops.edgefx.matmul_int.default: _onnx_matmul_int,
    torch.ops.edgefx.max_pool_int.default: _onnx_max_pool_int,
    torch.ops.edgefx.float_to_codes.default: _onnx_float_to_codes,
    torch.ops.edgefx.codes_to_float.default: _onnx_codes_to_float,
}


# ---------------------------------------------------------------------------- TVM lowering
def _tvm_args(node: torch.fx.Node, importer: Any) -> list[Any]:
    return [importer.env[a] if isinstance(a, torch.fx.Node) else a for a in node.args]


_TVM_DTYPES = {torch.int8: "int8", torch.uint8: "uint8", torch.int32: "int32"}


def _tvm_requant_shift(node: torch.fx.Node, importer: Any) -> Any:
    from tvm import relax

    args = _tvm_args(node, importer)
    x, shift, axis, bits, signed = args[:5]
    low = node.kwargs.get("low", args[5] if len(args) > 5 else None)
    high = node.kwargs.get("high", args[6] if len(args) > 6 else None)
    rounding = node.kwargs.get("rounding", args[7] if len(args) > 7 else DEFAULT_ROUNDING)
    lo, hi = _clamp_range(bits, signed, low, high)
    bb = importer.block_builder
    amounts = np.asarray(list(shift), dtype=np.int64)
    shape = [1] * len(node.args[0].meta["val"].shape)
    if len(amounts) > 1:
        shape[axis] = -1

    def const(values: np.ndarray) -> Any:
        values = values.astype(np.int32)
        return relax.const(values.reshape(shape) if len(amounts) > 1 else values[0], "int32")

    y = bb.emit(relax.op.astype(x, "int32"))
    left, right = np.maximum(-amounts, 0), np.maximum(amounts, 0)
    if (left > 0).any():
        y = bb.emit(relax.op.left_shift(y, const(left)))
    if (right > 0).any():
        offset = np.where(right > 0, np.left_shift(1, np.maximum(right - 1, 0)), 0)
        if rounding == "half_even":  # + 2**(r-1) - 1 + bit r of y
            odd = relax.op.bitwise_and(
                relax.op.right_shift(y, const(right)), const((right > 0) * 1)
            )
            y = bb.emit(relax.op.add(y, odd))
            offset = np.where(right > 0, offset - 1, 0)
        y = bb.emit(relax.op.right_shift(relax.op.add(y, const(offset)), const(right)))
    if (lo, hi) != INT32:
        y = bb.emit(relax.op.clip(y, lo, hi))
    dtype = _TVM_DTYPES[out_dtype(bits, signed)]
    return y if dtype == "int32" else bb.emit(relax.op.astype(y, dtype))


def _tvm_conv_int(node: torch.fx.Node, importer: Any) -> Any:
    from tvm import relax

    x, weight, bias, stride, padding, dilation, groups = _tvm_args(node, importer)
    bb = importer.block_builder
    # widen to int32 first: Relax conv2d wants one input dtype (codes are uint8 or int8,
    # weights int8), and int32 products are what ConvInteger computes
    acc = bb.emit(
        relax.op.nn.conv2d(
            relax.op.astype(x, "int32"),
            relax.op.astype(weight, "int32"),
            strides=list(stride),
            padding=list(padding),
            dilation=list(dilation),
            groups=groups,
            out_dtype="int32",
        )
    )
    if bias is not None:
        acc = bb.emit(relax.op.add(acc, relax.op.reshape(bias, (1, -1, 1, 1))))
    return acc


def _tvm_linear_int(node: torch.fx.Node, importer: Any) -> Any:
    from tvm import relax

    x, weight, bias = _tvm_args(node, importer)
    bb = importer.block_builder
    acc = bb.emit(
        relax.op.matmul(
            relax.op.astype(x, "int32"),
            relax.op.permute_dims(relax.op.astype(weight, "int32"), [1, 0]),
            out_dtype="int32",
        )
    )
    if bias is not None:
        acc = bb.emit(relax.op.add(acc, bias))
    return acc


def _tvm_matmul_int(node: torch.fx.Node, importer: Any) -> Any:
    from tvm import relax

    a, b = _tvm_args(node, importer)
    return importer.block_builder.emit(
        relax.op.matmul(relax.op.astype(a, "int32"), relax.op.astype(b, "int32"),
                        out_dtype="int32")
    )


def _tvm_max_pool_int(node: torch.fx.Node, importer: Any) -> Any:
    from tvm import relax

    x, kernel_size, stride, padding, dilation, ceil_mode = _tvm_args(node, importer)
    return importer.block_builder.emit(
        relax.op.nn.max_pool2d(
            x,
            pool_size=list(kernel_size),
            strides=list(stride) or list(kernel_size),
            padding=list(padding),
            dilation=list(dilation),
            ceil_mode=ceil_mode,
        )
    )


def _tvm_pow2(bb: Any, exponent: Any, node: torch.fx.Node, axis: int, negate: bool) -> Any:
    from tvm import relax

    e = relax.op.astype(exponent, "float32")
    scale = bb.emit(
        relax.op.power(relax.const(2.0, "float32"), relax.op.negative(e) if negate else e)
    )
    if len(node.args[1].meta["val"].shape) == 1:
        shape = [1] * len(node.args[0].meta["val"].shape)
        shape[axis] = -1
        scale = relax.op.reshape(scale, shape)
    return scale


def _tvm_float_to_codes(node: torch.fx.Node, importer: Any) -> Any:
    from tvm import relax

    x, exponent, axis, bits, signed = _tvm_args(node, importer)
    bb = importer.block_builder
    v = bb.emit(relax.op.multiply(x, _tvm_pow2(bb, exponent, node, axis, negate=True)))
    # round half to even, spelled out (exactly what QuantizeLinear and torch.round do)
    low = bb.emit(relax.op.floor(v))
    frac = bb.emit(relax.op.subtract(v, low))
    half = relax.const(0.5, "float32")
    two = relax.const(2.0, "float32")
    odd = relax.op.subtract(low, relax.op.multiply(two, relax.op.floor(relax.op.divide(low, two))))
    up = relax.op.where(
        relax.op.greater(frac, half),
        relax.const(1.0, "float32"),
        relax.op.where(relax.op.equal(frac, half), odd, relax.const(0.0, "float32")),
    )
    lo, hi = shift_range(bits, signed)
    rounded = relax.op.clip(relax.op.add(low, up), lo, hi)
    return bb.emit(relax.op.astype(rounded, _TVM_DTYPES[out_dtype(bits, signed)]))


def _tvm_codes_to_float(node: torch.fx.Node, importer: Any) -> Any:
    from tvm import relax

    q, exponent, axis = _tvm_args(node, importer)
    bb = importer.block_builder
    scale = _tvm_pow2(bb, exponent, node, axis, negate=False)
    return bb.emit(
        relax.op.multiply(relax.op.astype(q, "float32"), scale)
    )


TVM_CONVERTERS: dict[str, Callable[[torch.fx.Node, Any], Any]] = {
    "float_to_codes.default": _tvm_float_to_codes,
    "codes_to_float.default": _tvm_codes_to_float,
    "requant_shift.default": _tvm_requant_shift,
    "conv_int.default": _tvm_conv_int,
    "linear_int.default": _tvm_linear_int,
    "matmul_int.default": _tvm_matmul_int,
    "max_pool_int.default": _tvm_max_pool_int,
}
