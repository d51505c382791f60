"""Power-of-two quantize / dequantize: ``edgefx::quantize_pot`` and ``edgefx::dequantize_pot``.

A tensor is quantized with the scale ``2**exponent``: one exponent for the whole tensor
(a 0-d ``exponent``) or one per channel along ``axis`` (a 1-d ``exponent``), zero point 0,
into ``bits``-bit integers: signed ones held in int8, or unsigned ones held in uint8 (for
tensors that cannot be negative, e.g. after a ReLU, where a sign bit would be wasted):

    q = clamp(round_half_even(x * 2**-exponent), low, high)     (see ``qrange``)
    x' = q * 2**exponent

``dequantize_pot`` also takes int32 codes (biases on the accumulator's grid).

Multiplying by a power of two is exact in floating point, so the reference kernels below,
ONNX ``QuantizeLinear``/``DequantizeLinear`` (which round half to even) and integer
arithmetic with bit-shifts all give the same numbers. Exponents are an int32 tensor so that a
per-channel quantizer stays one graph constant, and so that a later rewrite into shifts reads
the shift amounts straight from it.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnxscript import opset21 as op

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "code_dtype",
    "dequantize_pot",
    "pack_int4_weights",
    "qrange",
    "quantize_pot",
]

MIN_BITS, MAX_BITS = 2, 8


def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    """The integer range of a ``bits``-bit quantizer."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def code_dtype(signed: bool) -> torch.dtype:
    return torch.int8 if signed else torch.uint8


def _scale(exponent: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """``2**exponent`` shaped to broadcast against ``x`` along ``axis``."""
    scale = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent.to(torch.int32))
    if exponent.dim() == 1:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    return scale


@torch.library.custom_op("edgefx::quantize_pot", mutates_args=())
def quantize_pot(
    x: torch.Tensor, exponent: torch.Tensor, axis: int, bits: int, signed: bool
) -> torch.Tensor:
    """Float tensor -> integer codes with scale ``2**exponent`` (see the module docstring)."""
    low, high = qrange(bits, signed)
    codes = torch.round(x.float() / _scale(exponent, x, axis))
    return codes.clamp(low, high).to(code_dtype(signed))


@quantize_pot.register_fake
def _(x: torch.Tensor, exponent: torch.Tensor, axis: int, bits: int, signed: bool) -> torch.Tensor:
    return torch.empty_like(x, dtype=code_dtype(signed))


@torch.library.custom_op("edgefx::dequantize_pot", mutates_args=())
def dequantize_pot(q: torch.Tensor, exponent: torch.Tensor, axis: int) -> torch.Tensor:
    """Integer codes -> float32 values ``q * 2**exponent``."""
    return q.float() * _scale(exponent, q, axis)


@dequantize_pot.register_fake
def _(q: torch.Tensor, exponent: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.empty_like(q, dtype=torch.float32)


# ---------------------------------------------------------------------------- ONNX lowering
# QuantizeLinear/DequantizeLinear with scale 2**exponent and a zero point of the codes' type
# (which picks int8 or uint8 output); narrower codes are clipped after QuantizeLinear.
def _onnx_scale(exponent):
    return op.Pow(op.Constant(value_float=2.0), op.Cast(exponent, to=onnx.TensorProto.FLOAT))


def _onnx_quantize_pot(x, exponent, axis: int, bits: int, signed: bool):
    code = onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8
    zero = op.Cast(op.Sub(exponent, exponent), to=code)  # zeros shaped like the scale
    q = op.QuantizeLinear(x, _onnx_scale(exponent), zero, axis=axis)
    if bits < 8:
        low, high = qrange(bits, signed)
        q = op.Clip(
            q,
            op.Constant(value=onnx.helper.make_tensor("low", code, [], [low])),
            op.Constant(value=onnx.helper.make_tensor("high", code, [], [high])),
        )
    return q


def _onnx_dequantize_pot(q, exponent, axis: int):
    zero = op.CastLike(op.Sub(exponent, exponent), q)
    return op.DequantizeLinear(q, _onnx_scale(exponent), zero, axis=axis)


ONNX_TRANSLATIONS = {
    torch.ops.edgefx.quantize_pot.default: _onnx_quantize_pot,
    torch.ops.edgefx.dequantize_pot.default: _onnx_dequantize_pot,
}


_INT4_LOW, _INT4_HIGH = qrange(4)


def pack_int4_weights(model: onnx.ModelProto) -> int:
    """Store as ONNX INT4 (two codes a byte, opset 21) every INT8 initializer that only
    DequantizeLinear nodes read and whose codes all fit in [-8, 7]: weights quantized to 4
    bits or fewer (2- and 3-bit codes are stored in int4 too). Lossless by that condition;
    the readers' zero points become INT4 zeros of the same shape. In place; returns how many
    initializers were packed."""
    initializers = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    packed = 0
    for name, tensor in list(initializers.items()):
        users = readers.get(name, [])
        if (
            tensor.data_type != onnx.TensorProto.INT8
            or name in outputs
            or not users
            or not all(
                n.op_type == "DequantizeLinear" and n.input[0] == name and name not in n.input[1:]
                for n in users
            )
        ):
            continue
        codes = onnx.numpy_helper.to_array(tensor)
        if codes.size == 0 or codes.min() < _INT4_LOW or codes.max() > _INT4_HIGH:
            continue
        zeros = []
        for node in users:
            zero = initializers.get(node.input[2]) if len(node.input) > 2 else None
            if zero is None:
                break
            zeros.append(zero)
        else:
            tensor.CopyFrom(_int4_tensor(name, codes))
            for node, zero in zip(users, zeros, strict=True):
                zero_name = f"{name}_zero_int4"
                if zero_name not in initializers:
                    shape = list(zero.dims)
                    new = _int4_tensor(zero_name, np.zeros(shape, dtype=np.int8))
                    model.graph.initializer.append(new)
                    initializers[zero_name] = new
                node.input[2] = zero_name
            packed += 1
    return packed


def _int4_tensor(name: str, codes: np.ndarray) -> onnx.TensorProto:
    """An INT4 initializer in raw bytes, two codes a byte, the first in the low nibble (as
    the ONNX spec lays them out)."""
    flat = codes.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, dtype=np.int8)])
    nibbles = flat.view(np.uint8) & 0x0F
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
    return onnx.helper.make_tensor(
        name, onnx.TensorProto.INT4, list(codes.shape), packed.tobytes(), raw=True
    )


# ---------------------------------------------------------------------------- TVM lowering
# Relax ops for TVM's ExportedProgram importer (``custom_convert_map``), called as
# ``fn(node, importer)``. The same arithmetic as the reference kernels: divide by 2**e (exact),
# round half to even (tir.nearbyint: Relax's ``round`` lowers to C ``round`` on GPUs, which
# rounds ties away from zero), clamp, cast. TVM is imported here, not at module level, so
# that ``import edgefx`` does not need it.
def _tvm_scale(importer, exponent_node, axis: int, ndim: int):
    from tvm import relax

    bb = importer.block_builder
    exponent = importer.env[exponent_node]
    scale = bb.emit(
        relax.op.power(relax.const(2.0, "float32"), relax.op.astype(exponent, "float32"))
    )
    if exponent_node.meta["val"].dim() == 1:
        shape = [1] * ndim
        shape[axis % ndim] = -1
        scale = bb.emit(relax.op.reshape(scale, shape))
    return scale


def _tvm_quantize_pot(node: torch.fx.Node, importer):
    from tvm import relax, te
    from tvm import tirx as tir

    x_node, exponent_node, axis, bits, signed = node.args
    bb = importer.block_builder
    ndim = x_node.meta["val"].dim()
    x = importer.env[x_node]
    if x_node.meta["val"].dtype != torch.float32:
        x = bb.emit(relax.op.astype(x, "float32"))
    scaled = bb.emit(relax.op.divide(x, _tvm_scale(importer, exponent_node, axis, ndim)))
    rounded = bb.emit_te(
        lambda t: te.compute(t.shape, lambda *i: tir.nearbyint(t(*i)), name="round_half_even"),
        scaled,
    )
    low, high = qrange(bits, signed)
    clamped = bb.emit(relax.op.clip(rounded, low, high))
    return bb.emit(relax.op.astype(clamped, "int8" if signed else "uint8"))


def _tvm_dequantize_pot(node: torch.fx.Node, importer):
    from tvm import relax

    q_node, exponent_node, axis = node.args
    bb = importer.block_builder
    ndim = q_node.meta["val"].dim()
    values = bb.emit(relax.op.astype(importer.env[q_node], "float32"))
    return bb.emit(relax.op.multiply(values, _tvm_scale(importer, exponent_node, axis, ndim)))


TVM_CONVERTERS = {
    torch.ops.edgefx.quantize_pot.default.__name__: _tvm_quantize_pot,
    torch.ops.edgefx.dequantize_pot.default.__name__: _tvm_dequantize_pot,
}
