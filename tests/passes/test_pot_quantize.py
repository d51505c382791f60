"""PotQuantize: power-of-two QDQ that is exactly integer arithmetic, exponents chosen by the
three searches as documented, lowered to ONNX bit-exactly, and bad requests refused."""

from __future__ import annotations

import collections
import math
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from prune_models import Couplings, randomize
from torch import nn

import edgefx
from edgefx import PassError
from edgefx.analysis.numerics import NumericError
from edgefx.frontend import capture
from edgefx.ops.pot import qrange
from edgefx.passes import FoldBatchNorm, PassManager, PotQuantize

aten = torch.ops.aten
QUANTIZE = torch.ops.edgefx.quantize_pot.default
DEQUANTIZE = torch.ops.edgefx.dequantize_pot.default
LAYERS = {aten.conv2d.default, aten.linear.default}


def batches(n: int, size: int = 4, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 16, 16, generator=gen) for _ in range(n)]


@pytest.fixture(scope="module")
def folded() -> edgefx.Program:
    """Couplings (residual, concat, depthwise, grouped, SE gate, split, linear), BN folded."""
    torch.manual_seed(0)
    model = randomize(Couplings(), 3)
    program = capture(model, (batches(1, 2, seed=9)[0],))
    return PassManager([FoldBatchNorm()]).run(program)[0]


@pytest.fixture(scope="module")
def quantized(folded):
    """{search: PassResult} at 4-bit weights and activations (differences show at 4 bits)."""
    calib = batches(2)
    return {
        search: PotQuantize(calib, weight_bits=4, act_bits=4, search=search)(folded)
        for search in ("minmax", "mse", "joint")
    }


def values(program: edgefx.Program, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every node's value when ``program`` runs on ``inputs``."""
    seen: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            seen[n.name] = out = super().run_node(n)
            return out

    with torch.no_grad():
        Recorder(program.graph_module).run(*inputs)
    return seen


def layer_nodes(program: edgefx.Program) -> list[torch.fx.Node]:
    return [n for n in program.graph_module.graph.nodes if n.target in LAYERS]


def test_every_layer_reads_power_of_two_codes(quantized):
    program = quantized["mse"].program
    layers = layer_nodes(program)
    assert len(layers) == 11 and not quantized["mse"].report["skipped"]  # after_split twice
    gm = program.graph_module
    for node in layers:
        x_dq, w_dq, b_dq = node.args[:3]
        assert x_dq.target is DEQUANTIZE and x_dq.args[0].target is QUANTIZE
        assert w_dq.target is DEQUANTIZE and b_dq.target is DEQUANTIZE
        codes, w_exp = (gm.get_buffer(a.target) for a in w_dq.args[:2])
        assert codes.dtype == torch.int8 and w_exp.shape == (codes.shape[0],)
        low, high = qrange(4)
        assert low <= int(codes.min()) and int(codes.max()) <= high
        b_codes, b_exp = (gm.get_buffer(a.target) for a in b_dq.args[:2])
        x_exp = gm.get_buffer(x_dq.args[1].target)
        assert b_codes.dtype == torch.int32 and torch.equal(b_exp, w_exp + x_exp)
    assert not any(n.target is aten.conv2d.default and n.args[1].op == "get_attr" for n in layers)
    # the integer codes are the parameters now: as many as the float weights and biases
    assert quantized["mse"].after.params == quantized["mse"].before.params > 0


def assert_integer_accumulation(program: edgefx.Program, *inputs: torch.Tensor) -> list[float]:
    """Assert that every quantized layer's float output equals the integer accumulation of
    its codes (computed in float64, exact below 2**53) times 2**(input + weight exponent);
    return, per layer, the largest sum of |x code * w code| + |b code| over its outputs: the
    bound on every partial sum, which must stay below 2**24 for float32 to be exact."""
    seen = values(program, *inputs)
    bounds = []
    for node in program.graph_module.graph.nodes:
        if node.op != "call_function" or not all(
            isinstance(a, torch.fx.Node) and a.target is DEQUANTIZE for a in node.args[:2]
        ):
            continue
        x_dq, w_dq = node.args[:2]
        b_dq = node.args[2] if len(node.args) > 2 else None
        x_codes, w_codes = (seen[dq.args[0].name].double() for dq in (x_dq, w_dq))
        b_codes = None if b_dq is None else seen[b_dq.args[0].name].double()
        exp = seen[x_dq.args[1].name] + seen[w_dq.args[1].name]
        if b_dq is not None:
            assert torch.equal(seen[b_dq.args[1].name], exp)
        if node.target is aten.matmul.default:  # activation x activation (attention)
            acc = torch.matmul(x_codes, w_codes)
            magnitude = torch.matmul(x_codes.abs(), w_codes.abs())
        else:
            rest = tuple(node.args[3:])
            acc = node.target(x_codes, w_codes, b_codes, *rest)
            magnitude = node.target(
                x_codes.abs(), w_codes.abs(), None if b_codes is None else b_codes.abs(), *rest
            )
        scale = torch.ldexp(torch.ones(exp.shape, dtype=torch.float64), exp)
        if node.target not in (aten.linear.default, aten.matmul.default):  # per channel, dim 1
            scale = scale.reshape(-1, *[1] * (acc.dim() - 2))
        assert torch.equal(acc, acc.round())  # integer accumulator
        assert torch.equal(seen[node.name].double(), acc * scale), node.name
        bounds.append(float(magnitude.max()))
    return bounds


def test_qdq_graph_computes_exact_integer_arithmetic(quantized):
    """Each layer's float output equals the integer accumulation of its codes
    (int64, exact) times 2**(input + weight exponent): the graph QDQToShift turns into
    integer kernels computes integer arithmetic already, and no float rounding creeps in."""
    program = quantized["joint"].program
    bounds = assert_integer_accumulation(program, batches(1, 3, seed=5)[0])
    assert len(bounds) == 11


class WideConvs(nn.Module):
    """Two 512 -> 512 3x3 convs: fan-in 4,608, as in resnet's and VGG's last stages."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(512, 512, 3, padding=1)
        self.conv2 = nn.Conv2d(512, 512, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def test_eight_bit_layers_with_fan_in_4608_are_exact_integer_arithmetic():
    """At W8A8 and fan-in 4,608 the worst case (4,608 * 255 * 128 ~ 2**27) exceeds float32's
    24-bit significand, so exactness rests on the actual partial sums staying below 2**24
    (the bound the module docstring states): check both, on inputs the calibration never
    saw, for the signed image input and the unsigned ReLU output."""
    torch.manual_seed(0)
    model = WideConvs().eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(2, 512, 6, 6, generator=gen)]
    program = capture(model, (calib[0],))
    result = PotQuantize(calib, search="mse")(program)
    assert [e["input"] for e in result.report["layers"]] == ["signed", "unsigned"]
    assert all(e["fan_in"] == 4608 for e in result.report["layers"])
    assert all(e["worst_case_acc_bits"] > 24 for e in result.report["layers"])
    x = torch.randn(2, 512, 6, 6, generator=gen) * 1.5  # larger than calibration: clips
    bounds = assert_integer_accumulation(result.program, x)
    assert len(bounds) == 2 and all(b < 2**24 for b in bounds), bounds
    assert max(bounds) > 2**16  # the accumulators really are wide


def test_minmax_clips_nothing_and_wastes_no_bit(folded, quantized):
    result = quantized["minmax"]
    gm = result.program.graph_module
    low, high = qrange(4)
    for node in layer_nodes(result.program):
        codes = gm.get_buffer(node.args[1].args[0].target)
        codes = codes.reshape(codes.shape[0], -1)
        top = codes.abs().amax(dim=1)
        # the smallest exponent that clips nothing: the largest weight lands in the top half
        assert ((top > high // 2) & (top <= -low)).all(), node.name
    # activations: the calibration maximum fits, and would not with the next smaller exponent
    calib = torch.cat(batches(2))
    float_values, quant_values = values(folded, calib), values(result.program, calib)
    for node in result.program.graph_module.graph.find_nodes(op="call_function", target=QUANTIZE):
        source, exp_node, _, bits, signed = node.args
        peak = float(float_values[source.name].abs().max())
        step = 2.0 ** int(gm.get_buffer(exp_node.target))
        low, high = qrange(bits, signed)
        assert peak <= high * step + step / 2 and peak > high * step / 2, source.name
        assert int(quant_values[node.name].max()) <= high


def test_searches_trade_rounding_against_clipping(quantized):
    minmax, mse, joint = (quantized[s].report for s in ("minmax", "mse", "joint"))
    for a, b in zip(minmax["layers"], mse["layers"], strict=True):
        assert b["weight_snr_db"] >= a["weight_snr_db"] - 1e-9, a["module"]
    assert any(
        b["weight_snr_db"] > a["weight_snr_db"] + 0.5
        for a, b in zip(minmax["layers"], mse["layers"], strict=True)
    )
    # (per-tensor MSE is not the network's error: "mse" alone may do better or worse)
    # the joint search starts where "mse" ends and only takes moves that lower the error
    assert joint["calib_error"]["start"] == pytest.approx(mse["calib_error"]["final"])
    assert joint["calib_error"]["joint_steps"] > 0
    assert joint["calib_error"]["final"] < joint["calib_error"]["start"]
    assert joint["calib_error"]["final"] < minmax["calib_error"]["start"]
    assert quantized["joint"].error.snr_db > quantized["minmax"].error.snr_db


def test_unsigned_codes_only_where_the_input_cannot_be_negative(quantized):
    layers = {entry["module"]: entry["input"] for entry in quantized["mse"].report["layers"]}
    assert layers["stem.0"] == "signed"  # the image
    assert layers["res.0"] == "unsigned"  # after a ReLU
    assert layers["se_expand"] == "unsigned"  # ReLU inside the SE block
    assert layers["head"] == "unsigned"  # pool of ReLU outputs, flattened
    assert layers["grouped.0"] == "unsigned"


def test_eight_bits_stay_close_to_float(folded):
    per_tensor = PotQuantize(batches(2), search="mse")(folded)
    assert per_tensor.report["weight_bits"] == per_tensor.report["act_bits"] == 8
    assert all(entry["weight_snr_db"] > 40 for entry in per_tensor.report["layers"])
    assert per_tensor.error.snr_db > 35  # on the example inputs, not the calibration data
    # the joint search may give up one layer's accuracy for the network's (error
    # compensation), and what it learns on the calibration data holds on other inputs
    joint = PotQuantize(batches(2))(folded)
    assert joint.error.snr_db > per_tensor.error.snr_db


def test_onnx_holds_integer_weights_and_matches_exactly(folded, tmp_path):
    calib = batches(2)
    compiled = edgefx.compile(folded, passes=[PotQuantize(calib, search="mse")], backend="onnx")
    assert compiled.report.backend_check.max_abs == 0.0
    x = batches(1, 5, seed=11)[0]
    assert torch.equal(compiled(x), compiled.program(x))
    model = compiled.artifact.model
    types = {i.name: i.data_type for i in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 11
    for layer in layers:  # weights int8 and biases int32 in the file, dequantized at run time
        weight, bias = (producer[name] for name in layer.input[1:3])
        assert weight.op_type == bias.op_type == "DequantizeLinear"
        assert types[weight.input[0]] == onnx.TensorProto.INT8
        assert types[bias.input[0]] == onnx.TensorProto.INT32
    float_model = edgefx.compile(folded, backend="onnx").artifact.model
    weight_bytes = [sum(i.ByteSize() for i in m.graph.initializer) for m in (model, float_model)]
    assert weight_bytes[0] < 0.5 * weight_bytes[1]
    compiled.save(tmp_path / "q")
    loaded = edgefx.load(tmp_path / "q")
    assert torch.equal(loaded(x), compiled(x))


def test_program_with_quantizers_saves_and_loads(quantized, tmp_path):
    program = quantized["mse"].program
    path = program.save(tmp_path / "q.pt2")
    loaded = edgefx.Program.load(path)
    x = batches(1, 3, seed=2)[0]
    assert torch.equal(loaded(x), program(x))


def test_fused_onnxruntime_kernels_are_an_option(folded, tmp_path):
    """onnxruntime's own int8 kernels (QLinearConv, ...) are opt-in and not held to exactness."""
    quantize = PotQuantize(batches(1), search="minmax")
    compiled = edgefx.compile(
        folded,
        passes=[quantize],
        backend="onnx",
        backend_options={"fuse_qdq": True},
        tolerance=0.5,
    )
    assert compiled.report.backend_info["fuse_qdq"] is True
    assert compiled.report.backend_check.snr_db > 20
    # onnxruntime really replaced DQ -> Conv/Gemm -> Q by its int8 kernels: look at the graph
    # it optimised (and only with the option: the default keeps Conv/Gemm in float)
    fused_ops = {"QLinearConv", "ConvInteger", "QGemm", "MatMulInteger", "QLinearMatMul"}
    for fuse, expect in ((True, True), (False, False)):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(tmp_path / f"optimized_{fuse}.onnx")
        if not fuse:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        ort.InferenceSession(
            compiled.artifact.model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        ops = collections.Counter(
            n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node
        )
        found = {op: ops[op] for op in fused_ops if ops[op]}
        assert bool(found) is expect, (fuse, dict(ops))
    # (onnxruntime fuses only the layers its QDQ selectors accept: 3 of the 11 here)


def test_calibration_accepts_loader_style_batches(folded):
    labelled = [(x, torch.zeros(x.shape[0], dtype=torch.long)) for x in batches(3)]
    result = PotQuantize(labelled, search="minmax", calib_batches=2)(folded)
    assert result.report["calibration"] == "2 batches"
    one = PotQuantize(batches(1)[0], search="minmax")(folded)
    assert one.report["calibration"] == "1 batches"
    example = PotQuantize(search="minmax")(folded)
    assert example.report["calibration"] == "example inputs"


def test_excluded_layers_stay_float(folded):
    result = PotQuantize(batches(1), search="minmax", exclude=["head", "stem"])(folded)
    skipped = {s["module"]: s["reason"] for s in result.report["skipped"]}
    assert skipped == {"head": "excluded", "stem.0": "excluded"}
    heads = [n for n in layer_nodes(result.program) if n.target is aten.linear.default]
    assert heads[0].args[1].op == "get_attr" and heads[0].args[0].target is not DEQUANTIZE
    assert len(result.report["layers"]) == 9


def test_a_model_without_layers_is_reported_unchanged():
    program = capture(
        torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Flatten()), (torch.randn(2, 3, 4, 4),)
    )
    result = PotQuantize(search="minmax")(program)
    assert not result.changed and result.report["quantizers"] == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight_bits": 1}, "weight_bits must be an integer from 2 to 8"),
        ({"act_bits": 16}, "act_bits must be an integer from 2 to 8"),
        ({"search": "adaround"}, "search must be one of minmax, mse, joint"),
        ({"calib": 3}, "calib must be an iterable of batches or a tensor, got int"),
        ({"calib": []}, "calib holds no batches"),
        ({"calib": ["x"]}, "calibration batch 0 is a str"),
        ({"exclude": "fc"}, "exclude must be a list of module paths"),
        ({"sweeps": -1}, "sweeps must be an integer >= 0"),
        ({"search_samples": 0}, "search_samples must be a positive integer"),
        ({"objective": "kl"}, "objective must be one of output, bn_stats"),
        ({"objective": "bn_stats", "fold_batchnorm": False}, "needs fold_batchnorm=True"),
        ({"attention": 1}, "attention must be True or False"),
    ],
)
def test_bad_configuration_is_refused_eagerly(kwargs, message):
    with pytest.raises(PassError, match=message):
        PotQuantize(**kwargs)


def test_calibration_batch_that_does_not_fit_is_refused(folded):
    calib = [batches(1)[0], torch.randn(4, 3, 8)]
    with pytest.raises(PassError, match=r"calibration batch 1 does not fit .*rank 4") as info:
        PotQuantize(calib)(folded)
    assert "hint" in str(info.value)


def test_weights_too_small_for_the_code_still_quantize(folded):
    """An all-zero channel gets codes 0 (exponent 0), not a NaN or an error."""
    gm = folded.copy_graph()
    weight = gm.get_parameter(layer_nodes(folded)[0].args[1].target)
    with torch.no_grad():
        weight[0].zero_()
    result = PotQuantize(batches(1), search="mse")(folded.with_graph(gm))
    assert math.isfinite(result.error.snr_db)
    codes = result.program.graph_module.get_buffer(
        layer_nodes(result.program)[0].args[1].args[0].target
    )
    assert codes[0].abs().max() == 0


@pytest.mark.parametrize("fixture", ["resnet18_folded", "mobilenet_v2_folded"])
def test_torchvision_models_quantize_and_lower_exactly(fixture, request):
    """Residual adds, ReLU6 (hardtanh: unsigned), depthwise convs and a linear head."""
    folded, _ = request.getfixturevalue(fixture)
    gen = torch.Generator().manual_seed(3)
    size = 4 if folded.dynamic_batch else 1  # mobilenet_v2 is captured with a static batch
    calib = [torch.randn(size, 3, 32, 32, generator=gen) for _ in range(8 // size)]
    compiled = edgefx.compile(folded, passes=[PotQuantize(calib, search="mse")], backend="onnx")
    (result,) = compiled.report.passes
    convs = sum(n.target is aten.conv2d.default for n in folded.graph_module.graph.nodes)
    assert len(result.report["layers"]) == convs + 1 and not result.report["skipped"]
    assert result.error.snr_db > 20
    assert compiled.report.backend_check.max_abs == 0.0
    unsigned = [e for e in result.report["layers"] if e["input"] == "unsigned"]
    assert len(unsigned) >= convs // 2


def test_joint_search_trials_resume_where_a_move_takes_effect(quantized):
    """A trial run from the first node a move changes gives the error a full run gives."""
    from edgefx.passes.pot_quantize import _ResumableRun

    program = quantized["mse"].program
    gm = program.copy_graph()
    calib = [batches(1, 3, seed=4)[0]]
    with torch.no_grad():
        refs = [[program.graph_module(*calib)]]
        runner = _ResumableRun(gm, [tuple(calib)], [[r.detach() for r in refs[0]]])
        runner.full()
        layer = layer_nodes(program)[4]
        exp_name = layer.args[1].args[1].target
        start = runner.first_user({exp_name})
        assert 0 < start < len(runner.nodes) - 1
        gm.get_buffer(exp_name).add_(1)  # the weights read with twice the scale
        resumed, _ = runner.trial(start)
        fresh = _ResumableRun(gm, [tuple(calib)], runner.refs).full()
    assert resumed == fresh > 0


def test_block_wise_search_scores_every_move_inside_its_block(monkeypatch):
    """scope="block": a move of a quantizer at a block's input (or of a weight) is screened at
    the end of the block that reads it, and only a move that lowers that block's error is run
    on to the outputs (kept if it lowers their error too): fewer whole-network runs than
    quantizers, where scope="network" runs at least one per quantizer."""
    from edgefx.passes.pot_quantize import _ResumableRun

    def block() -> nn.Module:
        return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))

    torch.manual_seed(0)
    model = nn.Sequential(*(block() for _ in range(4))).eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    program = capture(model, (x,))
    calls = collections.Counter()
    for method in ("trial", "window"):
        real = getattr(_ResumableRun, method)

        def counted(self, *args, _real=real, _method=method):
            calls[_method] += 1
            return _real(self, *args)

        monkeypatch.setattr(_ResumableRun, method, counted)
    result = PotQuantize([x], weight_bits=4, act_bits=4, scope="block")(program)
    error, quantizers = result.report["calib_error"], result.report["quantizers"]
    assert error["joint_steps"] > 0 and error["final"] < error["start"]
    assert calls["trial"] < quantizers <= calls["window"]
    calls.clear()
    PotQuantize([x], weight_bits=4, act_bits=4, scope="network")(program)
    assert calls["trial"] >= quantizers and calls["window"] == 0


@pytest.mark.parametrize("scope", ["network", "block"])
def test_joint_search_keeping_only_live_values_takes_the_same_moves(folded, monkeypatch, scope):
    """The search keeps only the values live across a resume point, caches the weights'
    dequantize between trials and fuses each activation's quantize/dequantize into one
    fake-quant kernel; it must take exactly the moves the plain graph run takes."""
    from edgefx.passes.pot_quantize import _ResumableRun

    calib = batches(2, seed=5)
    kwargs = {"weight_bits": 4, "act_bits": 4, "scope": scope}
    held: list[int] = []  # values held after each run
    real_init, real_execute = _ResumableRun.__init__, _ResumableRun._execute

    def execute(self, env, batch, start, stop):
        out = real_execute(self, env, batch, start, stop)
        held.append(len(env))
        return out

    monkeypatch.setattr(_ResumableRun, "_execute", execute)
    lean = PotQuantize(calib, **kwargs)(folded).report
    lean_held, held[:] = max(held), []

    def keep_everything(self, *args, **kw):
        real_init(self, *args, **kw)
        self._constant = set()  # no cache either
        self._fake_quant = {}  # nor fused fake-quant kernels

    monkeypatch.setattr(_ResumableRun, "__init__", keep_everything)
    monkeypatch.setattr(_ResumableRun, "resume_at", lambda self, points, also=(): None)
    everything = PotQuantize(calib, **kwargs)(folded).report
    assert lean["calib_error"] == everything["calib_error"]
    assert lean["calib_error"]["joint_steps"] > 0
    assert lean["layers"] == everything["layers"] and lean["matmuls"] == everything["matmuls"]
    assert lean_held < min(held)  # fewer values held than a run keeping all of them


def test_layers_it_cannot_quantize_are_reported():
    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.up = torch.nn.ConvTranspose2d(4, 2, 2, stride=2)

        def forward(self, x):
            return self.up(torch.relu(self.conv(x)))

    program = capture(Decoder().eval(), (torch.randn(2, 3, 8, 8),))
    result = PotQuantize(search="minmax")(program)
    assert [e["module"] for e in result.report["layers"]] == ["conv"]
    (skipped,) = result.report["skipped"]
    assert skipped["module"] == "up" and "transposed convolution" in skipped["reason"]


class LayerVariants(nn.Module):
    """A conv with padding="same" (captured as aten.conv2d.padding), a conv without bias, a
    conv1d over flattened positions and a linear on 3-D token inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.same = nn.Conv2d(3, 8, 3, padding="same")
        self.nobias = nn.Conv2d(8, 8, 3, bias=False)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.tokens = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.nobias(torch.relu(self.same(x)))
        t = self.conv1d(y.flatten(2))  # [N, 8, positions]
        return self.tokens(t.transpose(1, 2))  # [N, positions, 6]


def test_conv_variants_and_token_linears_are_quantized_exactly():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    calib = [torch.randn(4, 3, 10, 10, generator=gen)]
    program = capture(LayerVariants().eval(), (calib[0][:2],))
    targets = {n.target for n in program.graph_module.graph.nodes}
    assert aten.conv2d.padding in targets and aten.conv1d.default in targets
    compiled = edgefx.compile(program, passes=[PotQuantize(calib, search="mse")], backend="onnx")
    (result,) = compiled.report.passes
    layers = {e["module"]: e for e in result.report["layers"]}
    assert set(layers) == {"same", "nobias", "conv1d", "tokens"}
    assert not result.report["skipped"]
    assert layers["nobias"]["bias"] is False and layers["nobias"]["input"] == "unsigned"
    assert result.error.snr_db > 30
    bounds = assert_integer_accumulation(result.program, torch.randn(3, 3, 10, 10, generator=gen))
    assert len(bounds) == 4
    assert compiled.report.backend_check.max_abs == 0.0


class ConstantProducts(nn.Module):
    """Weighted ops PotQuantize does not quantize: a matmul with a constant, an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(8, 4))
        self.table = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x.abs().sum(-1) * 3).long().clamp(0, 9)
        return self.fc(x @ self.proj) + self.table(ids)


def test_every_weighted_op_left_in_float_is_reported():
    program = capture(ConstantProducts().eval(), (torch.randn(2, 5, 8),))
    result = PotQuantize(search="minmax")(program)
    assert [e["module"] for e in result.report["layers"]] == ["fc"]
    skipped = {e["op"]: e["reason"] for e in result.report["skipped"]}
    assert set(skipped) == {"aten.matmul.default", "aten.embedding.default"}, skipped
    assert "only linear" in skipped["aten.matmul.default"]


class ComputedWeights(nn.Module):
    """Layers whose weight or bias the forward computes from parameters: a weight-standardised
    conv (NF-ResNet's ScaledStdConv2d) and a q/k/v bias ``cat``-ed from q and v biases and
    zeros (BEiT, Swin V2). ``stored()`` is the same model with those values stored."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gain = nn.Parameter(torch.rand(8, 1, 1, 1) + 0.5)
        self.qkv = nn.Linear(8, 24, bias=False)
        self.q_bias = nn.Parameter(torch.randn(8))
        self.v_bias = nn.Parameter(torch.randn(8))

    def std_weight(self) -> torch.Tensor:
        w = self.conv.weight
        flat = torch.nn.functional.batch_norm(
            w.reshape(1, 8, -1), None, None, training=True, momentum=0.0, eps=1e-6
        )
        return flat.reshape_as(w) * self.gain

    def qkv_bias(self) -> torch.Tensor:
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.conv2d(x, self.std_weight(), self.conv.bias, padding=1)
        tokens = torch.relu(y).flatten(2).transpose(1, 2)
        return torch.nn.functional.linear(tokens, self.qkv.weight, self.qkv_bias())

    def stored(self) -> nn.Module:
        conv, qkv = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 24)
        with torch.no_grad():
            conv.weight.copy_(self.std_weight())
            conv.bias.copy_(self.conv.bias)
            qkv.weight.copy_(self.qkv.weight)
            qkv.bias.copy_(self.qkv_bias())
        return nn.Sequential(conv, nn.ReLU(), nn.Flatten(2), Transpose(), qkv)


class Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


def test_weights_computed_from_parameters_are_quantized_like_stored_ones():
    torch.manual_seed(0)
    model = ComputedWeights().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, 6, 6, generator=gen)]
    x = torch.randn(3, 3, 6, 6, generator=gen)
    computed = edgefx.compile(
        capture(model, (calib[0][:2],)),
        passes=[PotQuantize(calib, search="mse")],
        backend="onnx",
    )
    stored = edgefx.compile(
        capture(model.stored().eval(), (calib[0][:2],)),
        passes=[PotQuantize(calib, search="mse")],
        backend="onnx",
    )
    report = computed.report.passes[0].report
    assert report["computed_weights_folded"] == ["conv2d.weight", "linear.bias"]
    assert len(report["layers"]) == 2 and not report["skipped"]
    # quantized from the same values, the two models are the same integer network
    torch.testing.assert_close(computed.program(x), stored.program(x), rtol=0, atol=0)
    assert computed.report.backend_check.max_abs == 0.0
    # the computation is gone from the graph, and the user's model is untouched
    targets = {str(n.target) for n in computed.program.graph_module.graph.nodes}
    assert not any("batch_norm" in t or "cat" in t for t in targets), targets
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class SharedComputedWeight(nn.Module):
    """One weight-standardised kernel read by two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3))
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        y = torch.relu(torch.nn.functional.conv2d(self.stem(x), w, padding=1))
        return torch.nn.functional.conv2d(y, w, padding=1)


def test_a_computed_weight_read_by_two_layers_stays_shared():
    calib = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(9))]
    program = capture(SharedComputedWeight().eval(), (calib[0][:2],))
    compiled = edgefx.compile(program, passes=[PotQuantize(calib)], backend="onnx")
    (result,) = compiled.report.passes
    assert result.report["computed_weights_folded"] == ["conv2d_1.weight", "conv2d_2.weight"]
    gm = result.program.graph_module
    codes = [b for _, b in gm.named_buffers() if tuple(b.shape) == (8, 8, 3, 3)]
    assert len(codes) == 1 and codes[0].dtype == torch.int8  # one constant, not one per layer
    weights = [
        t for t in compiled.artifact.model.graph.initializer if tuple(t.dims) == (8, 8, 3, 3)
    ]
    assert len(weights) == 1 and weights[0].data_type == onnx.TensorProto.INT8
    assert compiled.report.backend_check.max_abs == 0.0


def test_an_excluded_layer_keeps_its_computed_weight():
    model = ComputedWeights().eval()
    program = capture(model, (torch.randn(2, 3, 6, 6),))
    result = PotQuantize(search="minmax", exclude=["linear"])(program)
    assert result.report["computed_weights_folded"] == ["conv2d.weight"]
    assert {e["module"]: e["reason"] for e in result.report["skipped"]} == {"linear": "excluded"}


class Signs(nn.Module):
    """Sign-flipping ops between ReLUs and the layers reading them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        names = ("sub_alpha", "sub", "neg", "mul_neg", "add", "scaled", "clamped")
        self.heads = nn.ModuleDict({name: nn.Conv2d(4, 4, 1) for name in names})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a, b = torch.relu(self.a(x)), torch.relu(self.b(x))
        inputs = {
            "sub_alpha": torch.add(a, b, alpha=-1),
            "sub": a - b,
            "neg": -a,
            "mul_neg": a * -0.5,
            "add": a + b,
            "scaled": a * 2.0 + 1.0,
            "clamped": torch.clamp(self.b(x) - 1.0, min=0.0),
        }
        return [self.heads[name](value) for name, value in inputs.items()]


def test_sign_inference_follows_alpha_sub_and_negation():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    calib = [torch.randn(8, 3, 6, 6, generator=gen)]
    program = capture(Signs().eval(), (calib[0][:2],))
    result = PotQuantize(calib, search="mse")(program)
    signs = {e["module"]: e["input"] for e in result.report["layers"]}
    assert {k.removeprefix("heads."): v for k, v in signs.items() if k.startswith("heads")} == {
        "sub_alpha": "signed",
        "sub": "signed",
        "neg": "signed",
        "mul_neg": "signed",
        "add": "unsigned",
        "scaled": "unsigned",
        "clamped": "unsigned",
    }
    # nothing negative clamped away: every output close to float at 8 bits
    out = result.program(calib[0])
    ref = program(calib[0])
    for y, r in zip(out, ref, strict=True):
        assert NumericError.between([r], [y]).snr_db > 30


def test_batchnorm_is_folded_inside_so_pass_order_does_not_matter(small_program, small_folded):
    calib = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(6))]
    alone = PotQuantize(calib, search="mse")(small_program)
    after_fold = PotQuantize(calib, search="mse")(small_folded[0])
    assert alone.report["batchnorm_folded"] == 2 and after_fold.report["batchnorm_folded"] == 0
    assert alone.report["layers"] == after_fold.report["layers"]
    islands = {e["op"] for e in alone.report["float_islands"]}
    assert not any("batch_norm" in op for op in islands), islands
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(alone.program(x), after_fold.program(x))
    # without the fold, the BatchNorms stay float islands between dequantize and quantize
    kept = PotQuantize(calib, search="mse", fold_batchnorm=False)(small_program)
    assert kept.report["batchnorm_folded"] == 0
    islands = {e["op"]: e for e in kept.report["float_islands"]}
    bn = next(e for op, e in islands.items() if "batch_norm" in op)
    assert bn["count"] == 2 and bn["modules"] == ["bn1", "bn2"]


def test_resnet18_without_fold_batchnorm_quantizes_and_lowers_exactly(resnet18):
    """The issue's first case: PotQuantize alone on a model whose BatchNorms were not folded.
    onnxruntime fused each float BatchNorm into its conv's constant-folded dequantized weights
    (its ORT_ENABLE_ALL level), flipping rounding steps downstream; folded inside the pass,
    there is nothing left to fuse differently."""
    _, _, program = resnet18
    gen = torch.Generator().manual_seed(3)
    calib = [torch.randn(4, 3, 32, 32, generator=gen)]
    compiled = edgefx.compile(program, passes=[PotQuantize(calib, search="mse")], backend="onnx")
    (result,) = compiled.report.passes
    assert result.report["batchnorm_folded"] == 20 and not result.report["skipped"]
    assert compiled.report.backend_check.max_abs == 0.0
    assert compiled.report.quantized_check["equal"] == 1.0


def test_quantized_check_counts_steps():
    from edgefx.compiler import quantized_agreement

    ref = torch.linspace(-0.99, 0.99, 1000)
    step = 2.0**-7  # the 8-bit power-of-two grid covering [-0.99, 0.99]
    flipped = ref.clone()
    flipped[::200] += step  # 5 elements one step off
    check = quantized_agreement([ref], [flipped])
    assert check["step"] == step and check["equal"] == pytest.approx(0.995)
    assert check["beyond_one_step"] == 0.0 and check["max_steps"] == pytest.approx(1.0)
    shifted = ref * 1.1  # a wrong scale: most elements many steps off
    check = quantized_agreement([ref], [shifted])
    assert check["beyond_one_step"] > 0.5 and check["snr_db"] < 30


def test_quantized_check_still_fails_a_wrong_lowering(folded, monkeypatch):
    """A dequantize lowered with the wrong exponent for activations (axis 1) must fail
    compile()'s check, rounding flips or not."""
    from edgefx.ops import pot

    def wrong_dequantize(q, exponent, axis: int):
        zero = pot.op.CastLike(pot.op.Sub(exponent, exponent), q)
        scale = pot._onnx_scale(exponent)
        if axis == 1:  # activations read with twice their scale
            scale = pot.op.Mul(scale, pot.op.Constant(value_float=2.0))
        return pot.op.DequantizeLinear(q, scale, zero, axis=axis)

    translations = dict(pot.ONNX_TRANSLATIONS)
    translations[DEQUANTIZE] = wrong_dequantize
    monkeypatch.setattr(pot, "ONNX_TRANSLATIONS", translations)
    with pytest.raises(edgefx.BackendError, match="disagrees with the quantized Program") as info:
        edgefx.compile(folded, passes=[PotQuantize(batches(1), search="minmax")], backend="onnx")
    assert "quantizer by quantizer (teacher forcing)" in str(info.value)


class OneTie(nn.Module):
    """A hand-quantized Program with one exact rounding tie: x (codes at 2**-4) times 3 is
    quantized at 2**-2, i.e. 3c/4 steps, a tie with an even lower code only for c = 6 (4.5),
    which only element ``tie`` has. The next linear amplifies that element fifty-fold, as a
    transformer's later quantizers spread one early flip."""

    def __init__(self, width: int = 2048, tie: int = 5) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        weight = torch.rand(16, width, generator=gen) * 0.01
        weight[:, tie] = 50.0
        self.register_buffer("weight", weight)
        self.register_buffer("e_in", torch.tensor(-4, dtype=torch.int32))
        self.register_buffer("e_mid", torch.tensor(-2, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pot = torch.ops.edgefx
        y = pot.dequantize_pot(pot.quantize_pot(x, self.e_in, 1, 8, True), self.e_in, 1) * 3.0
        z = pot.dequantize_pot(pot.quantize_pot(y, self.e_mid, 1, 8, True), self.e_mid, 1)
        return torch.nn.functional.linear(z, self.weight)


def _one_tie_program(width: int = 2048, tie: int = 5) -> edgefx.Program:
    codes = torch.arange(width).remainder(8) * 2 % 8  # 0, 2, 4, 6: 3c/4 = 0, 1.5, 3, 4.5
    codes[codes == 6] = 4
    codes[tie] = 6
    x = (codes.float() / 16).repeat(2, 1)
    return capture(OneTie(width, tie).eval(), (x,))


def _float_island_off_by(monkeypatch, factor: float) -> None:
    """Make the ONNX backend compute every Mul by a constant ``factor`` times too high (x 3
    becomes x 3 factor), the way a backend's float island may differ from torch's."""
    import numpy as np

    from edgefx.backends import onnx as onnx_backend

    build = onnx_backend.OnnxBackend.build

    def off_build(self, program):
        artifact = build(self, program)
        model = artifact.model
        constants = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            for name in node.input if node.op_type == "Mul" else ():
                if name in constants and constants[name].data_type == onnx.TensorProto.FLOAT:
                    value = onnx.numpy_helper.to_array(constants[name]) * np.float32(factor)
                    constants[name].CopyFrom(onnx.numpy_helper.from_array(value, name))
        return onnx_backend.OnnxArtifact(model, artifact.node_map)

    monkeypatch.setattr(onnx_backend.OnnxBackend, "build", off_build)


def test_teacher_forcing_passes_one_tie_flip_the_output_check_fails(monkeypatch):
    """One code flipped at an exact tie and amplified: the outputs are many steps apart, so
    the output step check fails, but quantizer by quantizer the backend differs only by that
    one-step flip at a tie, and given its codes the outputs agree: compile() accepts it."""
    from edgefx.compiler import quantized_agreement

    program = _one_tie_program()
    _float_island_off_by(monkeypatch, 1 + 2.0**-20)
    compiled = edgefx.compile(program, backend="onnx")
    output_check = compiled.report.quantized_check
    assert output_check == quantized_agreement(program.run_flat(), compiled.artifact.run(
        program.example_inputs))  # fmt: skip
    assert output_check["beyond_one_step"] == 1.0 and output_check["max_steps"] > 10
    forced = compiled.report.forced_check
    assert forced["passed"] and forced["observed"] == forced["quantizers"] == 2
    (flip,) = forced["flips"]
    assert flip["flips"] == 2 and flip["max_code_diff"] == 1  # the tie, in both batch rows
    assert flip["max_tie_distance"] == 0.0 and forced["output_relative"] < 1e-6
    assert "teacher-forced: 1/2 quantizers flip" in str(compiled.report)
    assert compiled.report.to_dict()["forced_check"]["with_flips"] == 1


def test_teacher_forcing_still_fails_flips_away_from_ties(monkeypatch):
    """The same float island lowered 1 % high, on codes spread over the whole int8 range:
    codes one step off where no tie was near (x 3/4 puts values at k + 1/4, k + 3/4)."""
    _float_island_off_by(monkeypatch, 1.01)
    codes = torch.randint(-127, 128, (2, 2048), generator=torch.Generator().manual_seed(3))
    program = capture(OneTie().eval(), (codes.float() / 16,))
    with pytest.raises(edgefx.BackendError, match="quantizer by quantizer") as info:
        edgefx.compile(program, backend="onnx")
    assert "not within" in str(info.value) or "of its codes one step off" in str(info.value)


def test_teacher_forcing_still_fails_a_wrong_exponent(monkeypatch):
    """A quantize lowered with the exponent one too small (codes doubled): the very first
    quantizer is off by many steps, forced codes or not."""
    from edgefx.ops import pot

    def wrong_quantize(x, exponent, axis: int, bits: int, signed: bool):
        return pot._onnx_quantize_pot(x, pot.op.Sub(exponent, pot.op.CastLike(
            pot.op.Constant(value_int=1), exponent)), axis, bits, signed)  # fmt: skip

    translations = dict(pot.ONNX_TRANSLATIONS)
    translations[QUANTIZE] = wrong_quantize
    monkeypatch.setattr(pot, "ONNX_TRANSLATIONS", translations)
    with pytest.raises(edgefx.BackendError, match="quantizer by quantizer") as info:
        edgefx.compile(_one_tie_program(), backend="onnx")
    assert "steps apart" in str(info.value)


def test_four_bit_weights_are_packed_two_a_byte_in_onnx(resnet18_folded):
    """At W4 the ONNX weights are INT4 initializers (opset 21 DequantizeLinear): the file's
    initializers are about half their W8 size, and the outputs still match exactly."""
    folded, _ = resnet18_folded
    calib = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(8))]
    sizes, kinds = {}, {}
    for bits in (8, 4):
        compiled = edgefx.compile(
            folded, passes=[PotQuantize(calib, weight_bits=bits, search="minmax")], backend="onnx"
        )
        assert compiled.report.backend_check.max_abs == 0.0
        model = compiled.artifact.model
        sizes[bits] = sum(t.ByteSize() for t in model.graph.initializer)
        kinds[bits] = collections.Counter(
            onnx.TensorProto.DataType.Name(t.data_type)
            for t in model.graph.initializer
            if len(t.dims) >= 2
        )
    assert kinds[8]["INT8"] == 21 and not kinds[8]["INT4"]  # 20 convs + fc
    assert kinds[4]["INT4"] == 21 and not kinds[4]["INT8"]
    assert 0.45 < sizes[4] / sizes[8] < 0.55, sizes


class SharedConv(nn.Module):
    """One conv module called twice: its weight is read by two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        return self.shared(torch.relu(self.shared(y)))


def test_a_weight_shared_by_two_layers_is_stored_once():
    torch.manual_seed(0)
    calib = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(9))]
    program = capture(SharedConv().eval(), (calib[0][:2],))
    compiled = edgefx.compile(program, passes=[PotQuantize(calib)], backend="onnx")
    (result,) = compiled.report.passes
    entries = [e for e in result.report["layers"] if e["module"] == "shared"]
    assert len(entries) == 2 and entries[0]["weight_exp"] == entries[1]["weight_exp"]
    gm = result.program.graph_module
    codes = [b for name, b in gm.named_buffers() if b.dtype == torch.int8]
    assert sorted(c.shape[0] * c[0].numel() for c in codes) == [3 * 9 * 8, 8 * 9 * 8]
    weights = [
        t for t in compiled.artifact.model.graph.initializer if tuple(t.dims) == (8, 8, 3, 3)
    ]
    assert len(weights) == 1 and weights[0].data_type == onnx.TensorProto.INT8
    assert compiled.report.backend_check.max_abs == 0.0
    assert_integer_accumulation(result.program, calib[0])


def test_calibration_batch_with_wrong_channels_is_refused(folded):
    with pytest.raises(PassError, match=r"calibration batch 0 does not fit") as info:
        PotQuantize([torch.randn(4, 5, 16, 16)])(folded)
    assert "calib yields the model's inputs" in str(info.value)


def _vit_small(depth: int = 2):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_patch16_224", img_size=32, patch_size=8, depth=depth, num_classes=10
    ).eval()


def test_vision_transformer_attention_products_are_quantized():
    """DeiT (2 blocks, 32x32): linears and the two attention products (q.k^T, attn.v) run on
    integer codes; LayerNorm, softmax and GELU stay float islands; ONNX compiles and agrees
    within compile()'s step check."""
    gen = torch.Generator().manual_seed(4)
    calib = [torch.randn(4, 3, 32, 32, generator=gen)]
    program = capture(_vit_small(), (calib[0][:2],))
    compiled = edgefx.compile(program, passes=[PotQuantize(calib, search="mse")], backend="onnx")
    (result,) = compiled.report.passes
    report = result.report
    assert len(report["matmuls"]) == 4 and not report["skipped"]
    # q, k^T and v signed; the softmax output unsigned
    assert [m["inputs"] for m in report["matmuls"]] == [
        ["signed", "signed"],
        ["unsigned", "signed"],
    ] * 2
    assert len(report["layers"]) == 1 + 2 * 4 + 1  # patch conv, qkv/proj/fc1/fc2 per block, head
    islands = {e["op"] for e in report["float_islands"]}
    assert {"layer_norm", "_softmax", "gelu"} <= islands, islands
    assert "scaled_dot_product_attention" not in islands
    assert result.error.snr_db > 20
    assert compiled.report.quantized_check is not None
    bounds = assert_integer_accumulation(result.program, torch.randn(2, 3, 32, 32, generator=gen))
    assert len(bounds) == len(report["layers"]) + 4 and max(bounds) < 2**24
    onnx_ops = collections.Counter(n.op_type for n in compiled.artifact.model.graph.node)
    assert onnx_ops["MatMul"] >= 4 and onnx_ops["Softmax"] == 2


def test_attention_can_stay_whole():
    calib = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))]
    program = capture(_vit_small(depth=1), (calib[0],))
    result = PotQuantize(calib, search="minmax", attention=False)(program)
    assert result.report["matmuls"] == []
    islands = {e["op"] for e in result.report["float_islands"]}
    assert "scaled_dot_product_attention" in islands


class MaskedAttention(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(x.shape[0], 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masked_attention_is_written_out_as_sdpa_computes_it(kind):
    """A boolean mask (False: excluded) or a float one (added to the scores, Swin's relative
    position bias) is applied between the two products, which are then quantized."""
    from edgefx.passes.pot_quantize import _decompose_attention

    gen = torch.Generator().manual_seed(6)
    if kind == "bool":
        mask = torch.rand(2, 5, 5, generator=gen) > 0.4
        mask[..., 0] = True  # no row fully excluded
    else:
        mask = torch.randn(2, 5, 5, generator=gen)
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, generator=gen)
    program = capture(MaskedAttention(mask).eval(), (x,))
    gm = program.copy_graph()
    matmuls, skipped = _decompose_attention(gm)
    assert len(matmuls) == 2 and not skipped
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], program.graph_module(x)[0], rtol=1e-5, atol=1e-6)
    result = PotQuantize([x], search="minmax")(program)
    assert len(result.report["matmuls"]) == 2 and not result.report["skipped"]


class ExplicitAttention(nn.Module):
    """Attention written out as timm's Swin does: scaled q @ k^T, plus a bias, softmax, @ v;
    and a Gram matrix x @ x^T that is no attention."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.bias = nn.Parameter(torch.randn(2, 5, 5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).reshape(x.shape[0], 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        attn = ((q * 0.35) @ k.transpose(-2, -1) + self.bias).softmax(dim=-1)
        return attn @ v, x @ x.transpose(-2, -1)


def test_attention_written_out_in_the_model_is_quantized():
    from edgefx.passes.pot_quantize import _explicit_attention

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 16, generator=gen)
    torch.manual_seed(0)
    program = capture(ExplicitAttention().eval(), (x,))
    gm = program.graph_module
    products = [n for n in gm.graph.nodes if n.target == aten.matmul.default]
    assert len(products) == 3 and _explicit_attention(gm) == products[:2]  # not the Gram
    result = PotQuantize([x], search="minmax")(program)
    inputs = [m["inputs"] for m in result.report["matmuls"]]
    assert inputs == [["signed", "signed"], ["unsigned", "signed"]]
    quantized_gm = result.program.graph_module
    matmuls = [n for n in quantized_gm.graph.nodes if n.target == aten.matmul.default]
    read = [[a.target == DEQUANTIZE for a in n.args[:2]] for n in matmuls]
    assert read == [[True, True], [True, True], [False, False]]


def test_hugging_face_vit_attention_products_are_quantized():
    """HF ViT passes SDPA an all-True boolean mask: its q.k^T and attn.v are quantized as for
    timm, and the ONNX model agrees with the Program quantizer by quantizer."""
    model = _hf_vit(layers=1)
    calib = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))]
    program = capture(model, (calib[0][:2],))
    compiled = edgefx.compile(program, passes=[PotQuantize(calib, search="minmax")])
    report = compiled.report.passes[0].report
    assert len(report["matmuls"]) == 2 and not report["skipped"]
    inputs = [m["inputs"] for m in report["matmuls"]]
    assert inputs == [["signed", "signed"], ["unsigned", "signed"]]
    islands = {e["op"] for e in report["float_islands"]}
    assert "masked_fill.Scalar" in islands and "scaled_dot_product_attention" not in islands
    assert not islands & {"arange", "ge.Scalar", "logical_not"}  # the mask rounds nothing
    assert compiled.report.forced_check["passed"]


def _timm(name: str, **kwargs):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, num_classes=10, **kwargs)


def _torchvision(name: str):
    torchvision = pytest.importorskip("torchvision")
    return getattr(torchvision.models, name)(num_classes=10)


def _hf_vit(layers: int = 2):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "analysis"))
    from vit_models import hf_vit

    return hf_vit(layers=layers)


# (factory, input size): the sweep of architectures PotQuantize must handle
SWEEP = {
    "mobilenet_v3_small": (lambda: _torchvision("mobilenet_v3_small"), 64),
    "efficientnet_b0": (lambda: _torchvision("efficientnet_b0"), 64),
    "regnet_y_400mf": (lambda: _torchvision("regnet_y_400mf"), 64),
    "convnext_tiny": (lambda: _torchvision("convnext_tiny"), 64),
    "deit_tiny": (lambda: _timm("deit_tiny_patch16_224", img_size=64), 64),
    "swin_t": (lambda: _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=2), 64),
    "vit_b_16": (lambda: _torchvision("vit_b_16"), 224),
    "hf_vit": (_hf_vit, 32),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SWEEP))
def test_sweep_quantizes_at_w8a8_and_compiles_to_onnx(name):
    """W8A8 PotQuantize (per-tensor search, BN folded inside) then backend="onnx": compile()
    accepts it (exact, or within the documented step check); the figures are printed."""
    from conftest import randomize_batchnorm

    factory, size = SWEEP[name]
    torch.manual_seed(0)
    model = randomize_batchnorm(factory().eval())
    for module in model.modules():  # torchvision's ViT head starts at zero: outputs all equal
        if isinstance(module, torch.nn.Linear) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.02)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, size, size, generator=gen)]
    program = capture(model, (calib[0][:2],))
    compiled = edgefx.compile(program, passes=[PotQuantize(calib, search="mse")], backend="onnx")
    (result,) = compiled.report.passes
    check = compiled.report.quantized_check
    print(
        f"{name}: layers {len(result.report['layers'])}, matmuls {len(result.report['matmuls'])}"
        f", SNR vs float {result.error.snr_db:.1f} dB, onnx equal {check['equal']:.4f}, "
        f">1 step {check['beyond_one_step']:.2e}, max steps {check['max_steps']:.2f}, "
        f"onnx SNR {check['snr_db']:.1f} dB"
    )
    forced = compiled.report.forced_check
    print(
        f"{name}: teacher-forced: {forced['observed']}/{forced['quantizers']} quantizers "
        f"observed, {forced['with_flips']} flip codes ({forced['flipped']} codes), worst share "
        f"{forced['worst_share']:.2e}, max code diff {forced['max_code_diff']}, max tie distance "
        f"{forced['max_tie_distance']:.2e} steps, outputs given the codes "
        f"{forced['output_relative']:.2e} of scale"
    )
    assert forced["passed"] and forced["observed"] == forced["quantizers"]
    assert result.report["layers"] and 10 < result.error.snr_db < float("inf")


def test_joint_search_can_reconstruct_batchnorm_statistics(small_program, small_folded):
    """RAPQ's objective: the folded convs' per-channel output mean/std against the BatchNorms'
    beta/|gamma|; the search only takes moves that lower it."""
    calib = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(10))]
    kwargs = {"weight_bits": 4, "act_bits": 4}
    result = PotQuantize(calib, objective="bn_stats", **kwargs)(small_program)
    error = result.report["calib_error"]
    assert error["joint_steps"] > 0 and error["final"] < error["start"]
    output = PotQuantize(calib, **kwargs)(small_program).report["calib_error"]
    assert error["start"] != output["start"]  # a different objective, not the output MSE
    with pytest.raises(PassError, match="needs BatchNorms after convs"):
        PotQuantize(calib, objective="bn_stats")(small_folded[0])


def test_block_wise_trials_compute_the_block_output_a_full_run_computes(quantized, folded):
    """scope="block": a trial runs from the move's first user to the end of its block only;
    that block output equals what a full run gives, and the search still reports the
    network's error before and after."""
    from edgefx.passes.pot_quantize import _block_ends, _ResumableRun

    program = quantized["mse"].program
    gm = program.copy_graph()
    calib = [batches(1, 3, seed=4)[0]]
    with torch.no_grad():
        refs = [[program.graph_module(*calib)]]
        runner = _ResumableRun(gm, [tuple(calib)], refs)
        runner.full()
        layer = layer_nodes(program)[4]
        exp_name = layer.args[1].args[1].target
        start = runner.first_user({exp_name})
        first = runner.nodes[start]
        end = _block_ends(gm)[first]
        assert runner.position[end] < len(runner.nodes) - 2  # a block, not the network
        gm.get_buffer(exp_name).add_(1)
        fresh = _ResumableRun(gm, [tuple(calib)], refs)
        fresh.full()
        want = fresh.envs[0][end]
        _, envs = runner.window(first, end, [torch.zeros_like(want)])
        assert torch.equal(envs[0][end], want)
    result = PotQuantize(batches(2), weight_bits=4, act_bits=4, scope="block")(folded)
    error = result.report["calib_error"]
    assert error["joint_steps"] > 0 and math.isfinite(error["final"])
