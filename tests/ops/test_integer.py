"""edgefx integer ops: the rounding rule of requant_shift, exact conv/linear accumulation, and
the ONNX (opset 28) and TVM lowerings giving the reference kernels' integers exactly."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import edgefx.ops as ops
from edgefx.ops.integer import round_shift, shift_range


def test_requant_shift_rounds_half_to_even_by_default_shifts_left_and_clamps():
    x = torch.tensor([-5, -3, -1, 1, 3, 5, 6, 300, -300], dtype=torch.int32)
    # shift 1: x / 2 rounded half to even (as quantize_pot): -2.5 -> -2, -1.5 -> -2, 2.5 -> 2
    y = ops.requant_shift(x, [1], 0, 8, True)
    assert y.dtype == torch.int8
    assert y.tolist() == [-2, -2, 0, 0, 2, 2, 3, 127, -128]
    # half up (ties go towards +inf): -2.5 -> -2, 1.5 -> 2
    up = ops.requant_shift(x, [1], 0, 8, True, None, None, "half_up")
    assert up.tolist() == [-2, -1, 0, 1, 2, 3, 3, 127, -128]
    assert ops.requant_shift(x, [-2], 0, 32, True).tolist() == [v * 4 for v in x.tolist()]
    # unsigned 4-bit output, with a ReLU6-style [0, 5] clamp folded in
    u = ops.requant_shift(x, [0], 0, 4, False, 0, 5)
    assert u.dtype == torch.uint8 and u.tolist() == [0, 0, 0, 1, 3, 5, 5, 5, 0]
    with pytest.raises(ValueError, match="rounding"):
        ops.requant_shift(x, [1], 0, 8, True, None, None, "nearest")


def test_half_up_round_shift_is_floor_of_x_over_2s_plus_half():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-(1 << 20), 1 << 20, (2000,), generator=gen)
    shift = torch.randint(-3, 12, (2000,), generator=gen)
    got = round_shift(x, shift, "half_up").tolist()
    for xi, si, yi in zip(x.tolist(), shift.tolist(), got, strict=True):
        exact = Fraction(xi) / Fraction(2) ** si
        assert yi == (exact + Fraction(1, 2)).__floor__()


def test_half_even_rounding_sends_ties_to_the_even_code():
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(-(1 << 16), 1 << 16, (3000,), generator=gen)
    shift = torch.randint(-2, 6, (3000,), generator=gen)
    got = round_shift(x, shift, "half_even").tolist()
    for xi, si, yi in zip(x.tolist(), shift.tolist(), got, strict=True):
        assert yi == round(Fraction(xi) / Fraction(2) ** si)  # Fraction rounds half to even
    assert round_shift(x, shift).tolist() == got  # the default rule
    # and exactly quantize_pot's rounding (torch.round) of the same value
    assert got == torch.round(x.double() * torch.pow(2.0, -shift.double())).long().tolist()
    ties = torch.tensor([-5, -3, -1, 1, 3, 5], dtype=torch.int32)
    assert ops.requant_shift(ties, [1], 0, 8, True, None, None, "half_even").tolist() == [
        -2, -2, 0, 0, 2, 2
    ]


def test_per_channel_shifts_along_an_axis():
    x = torch.arange(-12, 12, dtype=torch.int32).reshape(2, 3, 4)
    y = ops.requant_shift(x, [0, 1, -1], 1, 32, True)
    ref = torch.stack([x[:, 0], round_shift(x[:, 1], torch.tensor(1)), x[:, 2] * 2], dim=1)
    assert torch.equal(y, ref.to(torch.int32))


def test_conv_and_linear_accumulate_exactly_in_integers():
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 4, 7, 7), dtype=torch.uint8, generator=gen)
    w = torch.randint(-128, 128, (6, 2, 3, 3), dtype=torch.int8, generator=gen)
    b = torch.randint(-(1 << 20), 1 << 20, (6,), dtype=torch.int32, generator=gen)
    acc = ops.conv_int(x, w, b, [2, 2], [1, 1], [1, 1], 2)
    # int64 reference: unfold the input per group, multiply in int64
    cols = torch.nn.functional.unfold(x.double(), 3, padding=1, stride=2).long()  # [2, 36, L]
    cols = cols.reshape(2, 2, 18, -1)
    wl = w.long().reshape(2, 3, 18)
    ref = torch.einsum("gok,ngkl->ngol", wl, cols).reshape(2, 6, 4, 4) + b.long().reshape(6, 1, 1)
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), ref)
    xs = torch.randint(-128, 128, (3, 5, 300), dtype=torch.int8, generator=gen)
    ws = torch.randint(-128, 128, (7, 300), dtype=torch.int8, generator=gen)
    out = ops.linear_int(xs, ws, None)
    assert torch.equal(out.long(), xs.long() @ ws.long().T)


def test_matmul_int_multiplies_two_activations_exactly_with_broadcasting():
    """uint8 x int8 (attention weights @ values), batched and broadcast; a 2**16-long dot
    product of extreme codes (about -7.2e8) stays exact where a float32 sum would not."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randint(0, 256, (2, 3, 7, 65), dtype=torch.uint8, generator=gen)
    b = torch.randint(-128, 128, (3, 65, 4), dtype=torch.int8, generator=gen)
    out = ops.matmul_int(a, b)
    assert out.dtype == torch.int32 and out.shape == (2, 3, 7, 4)
    assert torch.equal(out.long(), a.long() @ b.long())
    wide_a = torch.full((1, 1 << 16), 255, dtype=torch.uint8)
    wide_b = torch.full((1 << 16, 1), -128, dtype=torch.int8)
    wide_b[::3] = 127
    want = (wide_a.long() @ wide_b.long()).item()
    assert ops.matmul_int(wide_a, wide_b).item() == want
    assert abs(want) > 1 << 24  # beyond float32's exact integers


class _AllOps(torch.nn.Module):
    """Every integer op and both float borders, per tensor and per channel."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.register_buffer("w", torch.randint(-8, 8, (6, 3, 3, 3), dtype=torch.int8,
                                                generator=gen))
        self.register_buffer("b", torch.randint(-500, 500, (6,), dtype=torch.int32,
                                                generator=gen))
        self.register_buffer("fw", torch.randint(-128, 128, (5, 6), dtype=torch.int8,
                                                 generator=gen))
        self.register_buffer("fb", torch.randint(-999, 999, (5,), dtype=torch.int32,
                                                 generator=gen))
        self.register_buffer("x_exp", torch.tensor(-4, dtype=torch.int32))
        self.register_buffer("out_exp", torch.tensor([-9, -8, -7, -9, -8, -6], dtype=torch.int32))

    def forward(self, x):
        codes = ops.float_to_codes(x, self.x_exp, 1, 7, True)
        acc = ops.conv_int(codes, self.w, self.b, [1, 1], [1, 1], [1, 1], 1)
        pooled = ops.max_pool_int(acc, [3, 3], [2, 2], [1, 1], [1, 1], False)
        mixed = ops.requant_shift(pooled, [3, 2, 1, 0, -1, 4], 1, 32, True)
        small = ops.requant_shift(mixed, [2], 1, 8, False, 0, 100, "half_up")
        even = ops.requant_shift(mixed, [2, 1, 3, 0, 1, 2], 1, 6, True)  # default: half even
        small_pool = ops.max_pool_int(small, [2, 2], [2, 2], [0, 0], [1, 1], True)
        summed = small_pool.to(torch.int32).sum(dim=(2, 3))
        u8 = ops.requant_shift(summed, [1], 1, 8, False)
        out = ops.linear_int(u8, self.fw, self.fb)
        s8 = ops.float_to_codes(x, self.x_exp, 1, 8, True)
        scores = ops.matmul_int(s8, s8.transpose(-2, -1))  # int8 x int8, batched (q @ k^T)
        mixed_types = ops.matmul_int(small, ops.requant_shift(mixed, [4], 1, 8, True))  # u8 x s8
        return ops.codes_to_float(acc, self.out_exp, 1), small_pool, out, even, scores, mixed_types


def _inputs() -> torch.Tensor:
    return torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(3)) * 4


def test_onnx_lowering_at_opset_28_matches_the_reference_exactly():
    model = _AllOps().eval()
    x = _inputs()
    ep = torch.export.export(model, (x,), strict=False)
    exported = torch.onnx.export(
        ep, dynamo=True, opset_version=21, custom_translation_table=ops.onnx_translations()
    )
    proto = onnx.version_converter.convert_version(exported.model_proto, 28)
    kinds = {n.op_type for n in proto.graph.node}
    assert {"ConvInteger", "MatMulInteger", "BitShift", "MaxPool", "Clip"} <= kinds
    assert "QuantizeLinear" not in kinds and "DequantizeLinear" not in kinds
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.numpy().dtype
        np.testing.assert_array_equal(g, w.numpy())


def test_tvm_lowering_matches_the_reference_exactly():
    tvm = pytest.importorskip("tvm")
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    model = _AllOps().eval()
    x = _inputs()
    ep = torch.export.export(model, (x,), strict=False)
    mod = from_exported_program(
        ep, keep_params_as_input=False, custom_convert_map=ops.tvm_converters()
    )
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))
    with torch.no_grad():
        want = model(x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.numpy(), w.numpy())


def test_shift_range():
    assert shift_range(8, True) == (-128, 127)
    assert shift_range(4, False) == (0, 15)
    assert shift_range(32, True) == (-(1 << 31), (1 << 31) - 1)
