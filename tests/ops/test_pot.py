"""edgefx::quantize_pot / dequantize_pot: reference semantics, and the ONNX lowering running
in onnxruntime bit-exactly like the reference kernels."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgefx.ops import dequantize_pot, onnx_translations, quantize_pot
from edgefx.ops.pot import qrange


def test_codes_round_half_to_even_and_saturate():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 100.0, -100.0, 0.26]) * 0.25  # 2**-2 steps
    q = quantize_pot(x, torch.tensor(-2, dtype=torch.int32), 0, 8, True)
    assert q.dtype == torch.int8
    assert q.tolist() == [0, 2, 2, 0, -2, 100, -100, 0]
    q4 = quantize_pot(x, torch.tensor(-2, dtype=torch.int32), 0, 4, True)
    assert q4.tolist() == [0, 2, 2, 0, -2, 7, -8, 0]
    u = quantize_pot(x, torch.tensor(-2, dtype=torch.int32), 0, 4, False)
    assert u.dtype == torch.uint8 and u.tolist() == [0, 2, 2, 0, 0, 15, 0, 0]


@pytest.mark.parametrize("bits,signed", [(8, True), (4, True), (2, True), (8, False), (3, False)])
def test_dequantized_values_are_within_half_a_step(bits, signed):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 6, 5, generator=gen)
    exp = torch.tensor([-3, -2, -4, -1, 0, -5], dtype=torch.int32)
    q = quantize_pot(x, exp, 1, bits, signed)
    low, high = qrange(bits, signed)
    assert int(q.min()) >= low and int(q.max()) <= high
    y = dequantize_pot(q, exp, 1)
    step = torch.ldexp(torch.ones(6), exp).reshape(1, 6, 1)
    inside = (x >= low * step) & (x <= high * step)
    assert inside.any()
    assert ((y - x).abs() <= step / 2)[inside].all()
    assert ((y == low * step) | (y == high * step))[~inside].all()


class _QDQ(torch.nn.Module):
    """Every flavour of the two ops: per-tensor and per-channel, narrow, unsigned, int32."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer(
            "w", torch.randint(-128, 128, (6, 3, 3, 3), dtype=torch.int8, generator=gen)
        )
        self.register_buffer("w_exp", torch.tensor([-7, -6, -8, -7, -5, -9], dtype=torch.int32))
        self.register_buffer(
            "b", torch.randint(-5000, 5000, (6,), dtype=torch.int32, generator=gen)
        )
        self.register_buffer("x_exp", torch.tensor(-4, dtype=torch.int32))
        self.register_buffer("y_exp", torch.tensor(-3, dtype=torch.int32))

    def forward(self, x):
        xq = dequantize_pot(quantize_pot(x, self.x_exp, 1, 5, True), self.x_exp, 1)
        w = dequantize_pot(self.w, self.w_exp, 0)
        b = dequantize_pot(self.b, self.w_exp + self.x_exp, 0)
        y = torch.relu(torch.nn.functional.conv2d(xq, w, b))
        codes = quantize_pot(y, self.y_exp, 1, 8, False)
        per_channel = quantize_pot(y, self.w_exp, 1, 3, True)
        return codes, per_channel, dequantize_pot(codes, self.y_exp, 1)


def test_onnx_lowering_matches_the_reference_exactly():
    model = _QDQ().eval()
    x = torch.randn(2, 3, 10, 10) * 3
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
    onnx_program = torch.onnx.export(
        ep, dynamo=True, opset_version=21, custom_translation_table=onnx_translations()
    )
    ops = {n.op_type for n in onnx_program.model_proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Clip"} <= ops
    session = ort.InferenceSession(
        onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x4 = torch.randn(4, 3, 10, 10) * 3
    got = session.run(None, {session.get_inputs()[0].name: x4.numpy()})
    want = model(x4)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.numpy().dtype
        np.testing.assert_array_equal(g, w.numpy())
    assert want[0].float().std() > 0 and (want[1] != 0).any()  # not trivially zero
