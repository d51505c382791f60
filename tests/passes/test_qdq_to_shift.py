"""QDQToShift: PotQuantize's QDQ graph as integer arithmetic with shifts. With the default
half-to-even rounding the rewrite computes the QDQ graph's values exactly (half up differs on
ties), onnxruntime and TVM run it bit-exactly like the reference kernels (both rules), the
integer layers have no float Mul/Div in ONNX up to the next integer layers or, for a layer
the report says ends in a float island, up to that island's dequantize, program.cost()
counts the integer layers' MACs, and bad input is refused clearly. A small timm ViT: every
linear, the patch embedding and both attention matmuls are integer layers."""

from __future__ import annotations

import collections

import onnx
import pytest
import torch
import torchvision
from prune_models import Couplings, randomize
from shift_models import (
    Tiny,
    assert_equal_integers,
    fresh,
    integer_outputs,
    integer_regions,
    onnx_outputs,
    quantized,
    tvm_outputs,
)
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import edgefx
import edgefx.ops
from edgefx import PassError
from edgefx.frontend import capture
from edgefx.ops import integer as integer_ops
from edgefx.passes import PASSES, FoldBatchNorm, PotQuantize, QDQToShift

CONV_INT = torch.ops.edgefx.conv_int.default
INT_OPS = {"ConvInteger", "MatMulInteger", "BitShift", "Add", "Clip", "Cast", "MaxPool",
           "ReduceSum", "Reshape", "Max", "Min", "Concat", "Flatten", "Transpose", "Squeeze",
           "Unsqueeze", "Identity", "Shape", "Gather", "Slice", "BitwiseAnd"}
INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32,
             onnx.TensorProto.INT64}


@pytest.fixture(scope="module")
def tiny():
    return quantized(randomize(Tiny(), 1), 8, (8, 8))


def _assert_onnx_bit_exact(shift: edgefx.Program, size: int) -> edgefx.Compiled:
    ints = integer_outputs(shift)
    compiled = edgefx.compile(ints, backend="onnx", backend_options={"opset": 28},
                              progress=False)
    x = fresh(size)
    want, got = ints.run_flat([x]), compiled.artifact.run([x])
    for w, g in zip(want, got, strict=True):
        assert w.dtype == torch.int32 and g.dtype == torch.int32
        assert torch.equal(w, g)  # every element
    return compiled


def test_registered_and_validated():
    assert PASSES["shift"] is QDQToShift
    with pytest.raises(PassError, match="exclude"):
        QDQToShift(exclude="fc")
    with pytest.raises(PassError, match="rounding"):
        QDQToShift(rounding="nearest")


def test_tiny_is_all_integer_with_pooling_as_a_shift(tiny):
    _, shift, report = tiny
    assert report["islands"] == []
    assert report["integer_layers"] == len(report["layers"]) == 5
    targets = collections.Counter(
        str(n.target) for n in shift.graph_module.graph.nodes if n.op == "call_function"
    )
    assert targets["edgefx.conv_int.default"] == 4 and targets["edgefx.linear_int.default"] == 1
    assert targets["edgefx.max_pool_int.default"] == 1
    assert targets["aten.sum.dim_IntList"] == 1  # 4x4 average = sum, exponent - 4
    assert "edgefx.quantize_pot.default" not in targets
    for layer in report["layers"]:
        assert 0 < layer["acc_bound"] <= layer["bitwidth_bound"] < 2**31


@pytest.mark.parametrize("case", ["tiny", "couplings"])
def test_rewrite_equals_the_qdq_graph_but_for_half_up_tie_rounding(case, tiny):
    """With the default half-to-even requantization the integer graph IS the QDQ graph (every
    element); with rounding="half_up" it differs, on ties."""
    if case == "tiny":
        qdq, shift, report = tiny
        x = fresh(8, 64)
    else:
        qdq, shift, report = quantized(randomize(Couplings(), 3), 16, (4, 4))
        assert report["islands"]  # the SE gate's sigmoid * x stays float
        x = fresh(16, 16)
    assert report["rounding"] == "half to even, as the QDQ graph"
    requants = shift.graph_module.graph.find_nodes(
        op="call_function", target=torch.ops.edgefx.requant_shift.default
    )
    # (torch.export drops an argument equal to the op schema's default)
    assert requants and all(_rounding(n) == "half_even" for n in requants)
    want = qdq.run_flat([x])
    for w, e in zip(want, shift.run_flat([x]), strict=True):
        assert torch.equal(w, e)
    half_up = QDQToShift(rounding="half_up")(qdq)
    assert half_up.report["rounding"].startswith("half up")
    got = half_up.program.run_flat([x])
    assert any(not torch.equal(w, u) for w, u in zip(want, got, strict=True))


def _rounding(node: torch.fx.Node) -> str:
    """A requant_shift node's rounding argument, or the op schema's default where absent."""
    if "rounding" in node.kwargs:
        return node.kwargs["rounding"]
    if len(node.args) > 7:
        return node.args[7]
    return next(a.default_value for a in node.target._schema.arguments if a.name == "rounding")


def test_half_up_graph_is_bit_exact_on_onnxruntime_and_tvm(tiny):
    half_up = QDQToShift(rounding="half_up")(tiny[0]).program
    _assert_onnx_bit_exact(half_up, 8)
    _assert_tvm_bit_exact(half_up, 8)


def test_cost_counts_the_integer_layers_like_the_float_ones(tiny):
    """conv_int / linear_int cost the MACs of the conv / linear they replace, and their weight
    codes count as parameters, as the QDQ graph's do."""
    qdq, shift, _ = tiny
    before, after = qdq.cost(), shift.cost()
    layer_macs = sorted(n.macs for n in before.nodes if n.op in ("conv2d", "linear"))
    int_macs = sorted(n.macs for n in after.nodes
                      if n.op in ("edgefx.conv_int", "edgefx.linear_int"))  # fmt: skip
    assert len(int_macs) == 5 and all(m > 0 for m in int_macs)
    assert int_macs == layer_macs
    assert after.total_macs == before.total_macs
    assert after.total_params == before.total_params > 0
    result = QDQToShift()(qdq)
    assert result.after.macs == result.before.macs


def test_island_where_the_average_is_not_over_a_power_of_two():
    _, shift, report = quantized(randomize(Tiny(), 1), 12, (8, 8))  # 6x6 = 36 positions
    reasons = [i["reason"] for i in report["islands"]]
    assert reasons == ["average over 36 positions, not a power of two"]
    assert report["islands"][0]["op"] == "adaptive_avg_pool2d"
    # every layer's MACs are integer; c.0's codes (ReLU6 folded) are dequantized for the
    # average, exactly (its accumulator stays far below 2**24)
    outputs = {layer["module"]: layer["output"] for layer in report["layers"]}
    assert outputs == {"stem.0": "codes", "a.0": "codes", "b": "codes", "c.0": "float",
                       "fc": "codes"}  # fmt: skip
    assert all(layer["integer"] for layer in report["layers"])
    (c0,) = [layer for layer in report["layers"] if layer["output"] == "float"]
    assert c0["float_consumers"] == [report["islands"][0]["node"]]
    assert c0["dequantized_exactly"] is True and report["layers_into_float"] == 1
    compiled = _assert_onnx_bit_exact(shift, 12)
    assert _assert_no_float_between_integer_layers(compiled, report) == 5


def test_tiny_onnx_is_bit_exact_and_integer_between_layers(tiny):
    _, shift, report = tiny
    compiled = _assert_onnx_bit_exact(shift, 8)
    _assert_no_float_between_integer_layers(compiled, report)


def _assert_no_float_between_integer_layers(compiled: edgefx.Compiled, report) -> int:
    """Walk from the ConvInteger/MatMulInteger of every layer of the report (all integer) to
    the next ones: only integer ops, every Cast to an integer type, no Mul/Div, except the
    dequantize (Cast to float, Mul by 2**e) where the codes leave: at the model's output, or,
    for a layer the report says ends in a float island (output "float"), in front of that
    island, and nowhere else (a "codes" layer reaches no island). The report's layers and the
    ONNX layer nodes are paired in graph order within each module."""
    model = compiled.artifact.model
    graph_outputs = {o.name for o in model.graph.output}
    consumers = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    node_map = compiled.artifact.node_map
    pending = collections.defaultdict(list)  # module -> its report layers, in graph order
    for layer in report["layers"]:
        assert layer["integer"]
        pending[layer["module"]].append(layer)
    walked = 0
    for start in model.graph.node:
        if start.op_type not in ("ConvInteger", "MatMulInteger"):
            continue
        layer = pending[node_map[start.name].get("module")].pop(0)
        assert (layer["op"] == "conv2d") == (start.op_type == "ConvInteger"), start.name
        walked += 1
        into_island = False
        stack, seen = [n for o in start.output for n in consumers[o]], set()
        while stack:
            node = stack.pop()
            if node.name in seen or node.op_type in ("ConvInteger", "MatMulInteger"):
                continue
            seen.add(node.name)
            if node.op_type == "Cast" and _cast_to(node) not in INT_TYPES:
                users = consumers[node.output[0]]
                if all(_float_max_pool(u, consumers) for u in users):
                    # int32 max pooling: onnxruntime's MaxPool has no int32 kernel, so the
                    # codes are pooled as float32 (exact below 2**24, which the pass checks)
                    stack.extend(c for u in users for c in consumers[u.output[0]])
                    continue
                # otherwise a dequantize: Cast -> Mul, into the model's output or an island
                assert all(m.op_type == "Mul" for m in users), f"{start.name}: {node.name}"
                if not all(set(m.output) <= graph_outputs for m in users):
                    assert layer["output"] == "float", (
                        f"{start.name}: float cast {node.name} not at the output"
                    )
                    into_island = True
                continue
            assert node.op_type in INT_OPS, f"{start.name}: {node.op_type} {node.name}"
            stack.extend(n for o in node.output for n in consumers[o])
        assert into_island == (layer["output"] == "float"), start.name
    assert walked == len(report["layers"]) and not any(pending.values())
    return walked


def _cast_to(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _float_max_pool(node: onnx.NodeProto, consumers) -> bool:
    """MaxPool whose every consumer casts back to int32 (no arithmetic in float)."""
    return node.op_type == "MaxPool" and all(
        c.op_type == "Cast" and _cast_to(c) == onnx.TensorProto.INT32
        for c in consumers[node.output[0]]
    )


MODELS = [
    pytest.param("resnet18", (8, 8), id="resnet18-W8A8"),
    pytest.param("mobilenet_v2", (4, 4), id="mobilenet_v2-W4A4", marks=pytest.mark.slow),
    pytest.param("resnet18", (4, 4), id="resnet18-W4A4", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", (8, 8), id="mobilenet_v2-W8A8", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,bits", MODELS)
def test_torchvision_models_run_bit_exactly_on_onnxruntime(name, bits):
    model = randomize(getattr(torchvision.models, name)(), 0)
    _, shift, report = quantized(model, 64, bits)  # 2x2 before the global pool: a shift
    assert report["islands"] == []
    assert report["integer_layers"] == len(report["layers"])
    compiled = _assert_onnx_bit_exact(shift, 64)
    assert _assert_no_float_between_integer_layers(compiled, report) == len(report["layers"])


# ---------------------------------------------------------------------------- a small ViT
def _vit() -> nn.Module:
    """timm's VisionTransformer at 16x16, 2 blocks, head dim 16: the attention scale 1/4 is a
    power of two, so q @ k^T is rescaled by the exponent (the real-data ViT's 1/sqrt(32) is a
    float multiply; tests/passes/test_qdq_to_shift_real_data.py)."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             num_classes=5).eval()  # fmt: skip


@pytest.fixture(scope="module", params=[(8, 8), (4, 4)], ids=["W8A8", "W4A4"])
def vit(request):
    return quantized(_vit(), 16, request.param)


# residual stream (float: the class token and position embedding are float parameters),
# GELU, softmax; LayerNorm reads only float values
VIT_ISLANDS = {"cat", "add.Tensor", "gelu", "_softmax"}


def test_vit_every_linear_and_attention_matmul_is_an_integer_layer(vit):
    _, shift, report = vit
    blocks = 2
    layers = report["layers"]
    # patch embedding, per block qkv / q @ k^T / attn @ v / proj / fc1 / fc2, the head
    assert [layer["op"] for layer in layers] == (
        ["conv2d"] + ["linear", "matmul", "matmul", "linear", "linear", "linear"] * blocks
        + ["linear"]
    )  # fmt: skip
    assert report["integer_layers"] == len(layers) == 1 + 6 * blocks + 1
    assert all(layer["integer"] for layer in layers)
    assert {i["op"] for i in report["islands"]} == VIT_ISLANDS
    # into float islands: the patch embedding (class-token concat), q @ k^T (softmax), proj
    # and fc2 (residual adds), fc1 (GELU); qkv and attn @ v requantize to codes, the head is
    # the output
    into_float = [layer["module"] for layer in layers if layer["output"] == "float"]
    assert into_float == ["patch_embed.proj"] + [
        f"blocks.{b}.{m}" for b in range(blocks) for m in ("attn", "attn.proj", "mlp.fc1",
                                                             "mlp.fc2")
    ]  # fmt: skip
    assert report["layers_into_float"] == len(into_float)
    for layer in layers:
        assert 0 < layer["acc_bound"] <= layer["bitwidth_bound"] < 2**24
        assert layer["dequantized_exactly"] is (True if layer["output"] == "float" else None)
    kinds = collections.Counter(
        str(n.target) for n in shift.graph_module.graph.nodes if n.op == "call_function"
    )
    assert kinds["edgefx.matmul_int.default"] == 2 * blocks
    assert kinds["aten.matmul.default"] == 0 and kinds["aten.linear.default"] == 0
    assert kinds["aten.mul.Tensor"] == 0  # the 1/4 attention scale went into the exponent


def test_vit_rewrite_equals_the_qdq_graph(vit):
    """Every accumulator stays below 2**24, so the QDQ graph's float32 sums are exact and the
    integer graph (half to even) computes its outputs exactly: every element, 64 images."""
    qdq, shift, _ = vit
    x = fresh(16, 64)
    (want,), (got,) = qdq.run_flat([x]), shift.run_flat([x])
    assert torch.equal(want, got)


def test_vit_integer_regions_are_bit_exact_on_onnxruntime_and_tvm(vit):
    """The ViT's float islands (GELU, softmax, LayerNorm) are each backend's own float
    kernels, so bit-exactness is checked on the integer regions alone: every value from the
    codes entering them to the codes or accumulators leaving them, every element."""
    _, shift, report = vit
    cut, inputs = integer_regions(shift, fresh(16, 2))
    kinds = {str(n.target) for n in cut.graph_module.graph.nodes if n.op == "call_function"}
    assert {"edgefx.conv_int.default", "edgefx.linear_int.default",
            "edgefx.matmul_int.default"} <= kinds  # fmt: skip
    assert not any(k.startswith(("aten.gelu", "aten.layer_norm", "aten._softmax")) for k in kinds)
    want = cut.run_flat(inputs)
    assert len(want) == report["layers_into_float"] + 1  # and the logits
    assert_equal_integers(want, onnx_outputs(cut, inputs), "onnxruntime")
    assert_equal_integers(want, tvm_outputs(cut, inputs), "TVM x86")


def test_vit_onnx_is_integer_up_to_each_float_island(vit):
    _, shift, report = vit
    compiled = edgefx.compile(shift, backend="onnx", backend_options={"opset": 28},
                              progress=False)  # fmt: skip
    assert _assert_no_float_between_integer_layers(compiled, report) == len(report["layers"])


def test_vit_cost_counts_the_attention_matmuls(vit):
    qdq, shift, _ = vit
    before, after = qdq.cost(), shift.cost()
    float_mm = sorted(n.macs for n in before.nodes if n.op == "matmul")
    int_mm = sorted(n.macs for n in after.nodes if n.op == "edgefx.matmul_int")
    assert len(int_mm) == 4 and all(m > 0 for m in int_mm) and int_mm == float_mm
    assert after.total_macs == before.total_macs


@pytest.fixture(scope="module")
def vit_w8a8():
    return quantized(_vit(), 16, (8, 8))


@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_compile_checks_the_integer_graph_in_quantization_steps(vit_w8a8, backend):
    """compile() measures a QDQToShift Program in quantization steps like the QDQ graph it
    came from (its quantizers became float_to_codes / requant_shift): on TVM and onnxruntime
    alike, a float island's last-bit difference may flip a code, and passes as such."""
    _, shift, _ = vit_w8a8
    options = {"opset": 28} if backend == "onnx" else {}
    compiled = edgefx.compile(shift, backend=backend, backend_options=options, progress=False)
    check = compiled.report.quantized_check
    assert check is not None and check["beyond_one_step"] <= 0.01 and check["snr_db"] >= 30


def _wrong_requant_shift(node, importer):
    """TVM's requant_shift lowered one bit short: every requantized code doubled."""
    from tvm import relax

    out = integer_ops._tvm_requant_shift(node, importer)
    bits, signed = node.args[3:5]
    one = relax.const(1, str(integer_ops.out_dtype(bits, signed)).removeprefix("torch."))
    return importer.block_builder.emit(relax.op.left_shift(out, one))


def test_the_step_check_still_fails_a_wrong_integer_lowering(vit_w8a8, monkeypatch):
    pytest.importorskip("tvm")
    _, shift, _ = vit_w8a8
    converters = dict(integer_ops.TVM_CONVERTERS)
    converters["requant_shift.default"] = _wrong_requant_shift
    monkeypatch.setattr(integer_ops, "TVM_CONVERTERS", converters)
    with pytest.raises(edgefx.BackendError, match="disagrees with the quantized Program"):
        edgefx.compile(shift, backend="tvm", progress=False)


def test_teacher_forcing_fails_a_rounding_flip_at_an_integer_requantization(
    vit_w8a8, monkeypatch
):
    """ONNX exposes every float_to_codes / requant_shift, so compile() checks the integer
    graph quantizer by quantizer; requant_shift lowered with the other tie rule (half up)
    moves codes one step at exact ties only, which a float quantizer might be forgiven, but a
    requant_shift reads integer codes and may flip nothing."""
    _, shift, _ = vit_w8a8

    def half_up(x, amounts, axis, bits, signed, low=None, high=None, rounding="half_even"):
        return integer_ops._onnx_requant_shift(x, amounts, axis, bits, signed, low, high,
                                               "half_up")  # fmt: skip

    translations = dict(integer_ops.ONNX_TRANSLATIONS)
    translations[torch.ops.edgefx.requant_shift.default] = half_up
    monkeypatch.setattr(integer_ops, "ONNX_TRANSLATIONS", translations)
    with pytest.raises(edgefx.BackendError, match="quantizer by quantizer") as info:
        edgefx.compile(shift, backend="onnx", backend_options={"opset": 28}, progress=False)
    assert "quantizer requant_shift" in str(info.value)


def _assert_tvm_bit_exact(shift: edgefx.Program, size: int) -> None:
    ints = integer_outputs(shift)
    x = fresh(size)
    assert_equal_integers(ints.run_flat([x]), tvm_outputs(ints, [x]), "TVM x86")


def test_tiny_tvm_is_bit_exact(tiny):
    _assert_tvm_bit_exact(tiny[1], 8)


@pytest.mark.slow
@pytest.mark.parametrize("name,bits", [m.values for m in MODELS], ids=[m.id for m in MODELS])
def test_torchvision_models_run_bit_exactly_on_tvm(name, bits):
    model = randomize(getattr(torchvision.models, name)(), 0)
    _, shift, _ = quantized(model, 32, bits)
    _assert_tvm_bit_exact(shift, 32)


# ---------------------------------------------------------------------------- bad input
def test_a_float_graph_is_refused():
    program = capture(randomize(Tiny(), 1), (torch.randn(2, 3, 8, 8),))
    with pytest.raises(PassError, match="no dequantize_pot -> conv/linear chain") as info:
        QDQToShift()(program)
    assert "PotQuantize" in info.value.hint


class _NotPowerOfTwo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        ops = torch.ops.quantized_decomposed
        q = ops.quantize_per_tensor(x, 0.1, 0, -128, 127, torch.int8)
        return self.conv(ops.dequantize_per_tensor(q, 0.1, 0, -128, 127, torch.int8))


def test_non_power_of_two_quantizers_are_refused():
    import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops

    program = capture(_NotPowerOfTwo(), (torch.randn(2, 3, 8, 8),))
    with pytest.raises(PassError, match="powers of two"):
        QDQToShift()(program)


class _WideLinear(nn.Module):
    """A QDQ linear layer whose worst-case accumulator exceeds int32: fan-in 70000, 8-bit
    unsigned inputs, every weight code 127 (127 * 255 * 70000 > 2**31)."""

    def __init__(self, fan_in: int = 70000) -> None:
        super().__init__()
        self.register_buffer("w", torch.full((2, fan_in), 127, dtype=torch.int8))
        self.register_buffer("w_exp", torch.tensor([-7, -7], dtype=torch.int32))
        self.register_buffer("x_exp", torch.tensor(-4, dtype=torch.int32))

    def forward(self, x):
        codes = edgefx.ops.quantize_pot(torch.relu(x), self.x_exp, 1, 8, False)
        xq = edgefx.ops.dequantize_pot(codes, self.x_exp, 1)
        return nn.functional.linear(xq, edgefx.ops.dequantize_pot(self.w, self.w_exp, 0))


def test_an_overflow_prone_layer_is_an_error_naming_it():
    program = capture(_WideLinear(), (torch.randn(2, 70000),))
    with pytest.raises(PassError, match="could overflow int32") as info:
        QDQToShift()(program)
    assert "linear" in (info.value.node or "") and "fewer" in info.value.hint
    fine = capture(_WideLinear(1000), (torch.randn(2, 1000),))
    report = QDQToShift()(fine).report
    assert report["layers"][0]["acc_bound"] == 127 * 255 * 1000


def test_excluded_layers_stay_float_and_are_listed(tiny):
    qdq, _, _ = tiny
    result = QDQToShift(exclude=["fc"])(qdq)
    islands = result.report["islands"]
    assert [i["reason"] for i in islands] == ["excluded (QDQToShift(exclude=...))"]
    assert len(result.report["layers"]) == 4


def test_compile_to_tvm_and_onnx_gives_the_programs_integer_outputs():
    """The whole flow through compile(): both backends' own checks pass and, at another batch
    size than the example's, their outputs equal the integer Program element for element."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 16, 16)

    def passes():
        return [FoldBatchNorm(), PotQuantize([torch.randn(8, 3, 16, 16)], search="mse"),
                QDQToShift()]  # fmt: skip

    tvm = edgefx.compile(model, (x,), passes=passes(), backend="tvm", progress=False)
    ort = edgefx.compile(
        model, (x,), passes=passes(), backend="onnx", backend_options={"opset": 28},
        progress=False,
    )  # fmt: skip
    assert tvm.report.backend_check.max_abs == 0.0
    assert ort.report.backend_check.max_abs == 0.0
    x4 = torch.randn(4, 3, 16, 16)
    reference = tvm.program(x4)
    assert torch.equal(tvm(x4), reference)
    assert torch.equal(ort(x4), reference)
