"""QDQToShift: PotQuantize's QDQ graph as integer arithmetic with shifts. With the default
half-to-even rounding the rewrite computes the QDQ graph's values exactly (half up differs on
ties), onnxruntime and TVM run it bit-exactly like the reference kernels (both rules), the
layers the report calls integer have no float Mul/Div in ONNX, program.cost() counts the
integer layers' MACs, and bad input is refused clearly."""

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
    quantized,
    tvm_outputs,
)
from torch import nn

import edgefx
import edgefx.ops
from edgefx import PassError
from edgefx.frontend import capture
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
    integer = {layer["module"]: layer["integer"] for layer in report["layers"]}
    assert integer == {"stem.0": True, "a.0": True, "b": True, "c.0": False, "fc": True}
    compiled = _assert_onnx_bit_exact(shift, 12)
    assert _assert_no_float_between_integer_layers(compiled, report) == 4


def test_tiny_onnx_is_bit_exact_and_integer_between_layers(tiny):
    _, shift, report = tiny
    compiled = _assert_onnx_bit_exact(shift, 8)
    _assert_no_float_between_integer_layers(compiled, report)


def _assert_no_float_between_integer_layers(compiled: edgefx.Compiled, report) -> int:
    """Walk from every ConvInteger/MatMulInteger of a layer the report calls integer to the
    next ones: only integer ops, every Cast to an integer type, no Mul/Div."""
    model = compiled.artifact.model
    graph_outputs = {o.name for o in model.graph.output}
    consumers = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    integer_modules = {layer["module"] for layer in report["layers"] if layer["integer"]}
    node_map = compiled.artifact.node_map
    walked = 0
    for start in model.graph.node:
        if start.op_type not in ("ConvInteger", "MatMulInteger"):
            continue
        if node_map[start.name].get("module") not in integer_modules:
            continue
        walked += 1
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
                # otherwise only the model's output may be dequantized: Cast -> Mul -> output
                assert all(m.op_type == "Mul" and set(m.output) <= graph_outputs for m in users), (
                    f"{start.name}: float cast {node.name} not at the output"
                )
                continue
            assert node.op_type in INT_OPS, f"{start.name}: {node.op_type} {node.name}"
            stack.extend(n for o in node.output for n in consumers[o])
    assert walked == len(integer_modules)
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
