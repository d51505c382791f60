"""ChannelPrune(latency=...): bisection on a latency predicted from a per-layer table and a
whole-graph calibration of the ops without MACs. The mechanism is tested with deterministic
cost models passed as ``measure=`` / ``measure_graph=``; one smoke test per runtime measures
for real and checks only that it runs, caches and reports; one test compares the predicted
latency ratio with a measured one on eager torch, old model against new (ratios, not
wall-clock figures, which are for benchmarks/prune.py)."""

from __future__ import annotations

import sys

import pytest
import torch
from prune_models import Couplings, deit_small, randomize
from torch import fx, nn

from edgefx import EdgefxError, PassError
from edgefx.analysis.latency import FREE_OPS, LatencyTable, LayerShape
from edgefx.frontend import capture
from edgefx.passes import ChannelPrune


@pytest.fixture(scope="module")
def program():
    torch.manual_seed(0)
    return capture(randomize(Couplings()), (torch.randn(2, 3, 16, 16),))


def layer_count(program) -> int:
    ops = {torch.ops.aten.conv2d.default, torch.ops.aten.linear.default}
    return sum(1 for n in program.graph_module.graph.nodes if n.target in ops)


@pytest.mark.parametrize("budget", [0.7, 0.5])
def test_latency_proportional_to_macs_prunes_like_a_macs_budget(program, budget):
    by_macs = ChannelPrune(macs=budget)(program)
    by_latency = ChannelPrune(latency=budget, measure=lambda s: s.macs * 1e-9)(program)
    assert by_latency.report["groups_removed"] == by_macs.report["groups_removed"]
    assert by_latency.after.macs == by_macs.after.macs
    assert by_latency.report["predicted_latency_ratio"] <= budget
    assert by_latency.report["latency_backend"] == "callable"
    assert by_latency.report["timed_layers"] == layer_count(program)
    assert by_latency.report["timing_noise"] is None  # a cost model has none


def test_a_fixed_cost_per_layer_makes_a_latency_budget_prune_more(program):
    """With 20 us per layer whatever its width, half the latency needs more than half the
    MACs removed; a budget below the fixed part is refused with the reachable figure."""

    def overhead_and_macs(shape: LayerShape) -> float:
        return 20e-6 + shape.macs * 1e-9

    by_macs = ChannelPrune(macs=0.5)(program)
    by_latency = ChannelPrune(latency=0.5, measure=overhead_and_macs)(program)
    assert by_latency.report["predicted_latency_ratio"] <= 0.5
    assert by_latency.report["groups_removed"] > by_macs.report["groups_removed"]
    assert by_latency.after.macs < by_macs.after.macs
    assert by_latency.report["estimated_macs"] == by_latency.after.macs
    dense = by_latency.report["predicted_dense_ms"] * 1e-3
    floor = layer_count(program) * 20e-6 / dense
    with pytest.raises(PassError, match=r"cannot reach 0\.1 of the latency") as info:
        ChannelPrune(latency=0.1, measure=overhead_and_macs)(program)
    reachable = float(info.value.message.split("leaves ", 1)[1].split(";")[0])
    assert reachable > floor  # every layer keeps its 20 us and some MACs


def test_layers_are_timed_at_the_channel_counts_asked_about(program):
    seen: list[LayerShape] = []

    def record(shape: LayerShape) -> float:
        seen.append(shape)
        return shape.macs * 1e-9

    result = ChannelPrune(latency=0.5, measure=record)(program)
    assert {s.kind for s in seen} == {"conv2d", "linear"}
    dense = seen[: layer_count(program)]  # every layer at its full width comes first
    for shape in seen:  # then the same layers, narrower
        assert any(
            shape == layer.with_channels(shape.in_channels, shape.out_channels)
            and shape.in_channels <= layer.in_channels
            and shape.out_channels <= layer.out_channels
            for layer in dense
        ), shape
        assert shape.batch == 1  # a dynamic batch is timed at batch=1
    assert any(s not in dense for s in seen)  # narrower widths were asked about too
    depthwise = [s for s in seen if s.depthwise]
    assert depthwise and all(s.groups == s.in_channels == s.out_channels for s in depthwise)
    assert len(seen) == result.report["layer_timings"]["measured"]
    assert result.report["layer_timings"]["cached"] > 0  # each shape measured once


def test_a_table_entry_is_measured_once_and_a_noisy_one_again():
    calls = []

    def noisy(shape: LayerShape) -> tuple[float, float]:
        calls.append(shape)
        return (1e-3 * len(calls), 0.5 if len(calls) == 1 else 0.05)

    table = LatencyTable(noisy)
    shape = LayerShape("linear", 16, 8, rows=4)
    assert table(shape) == pytest.approx(2e-3)  # the first (spread 0.5) was taken again
    assert table(shape) == pytest.approx(2e-3)
    assert len(calls) == 2 and table.measured == 1 and table.cached == 1
    assert table.noise() == pytest.approx(0.05)


def test_a_cost_model_returning_nonsense_is_refused_naming_the_layer(program):
    with pytest.raises(EdgefxError, match=r"returned nan for LayerShape\(kind="):
        ChannelPrune(latency=0.5, measure=lambda s: float("nan"))(program)


@pytest.fixture(scope="module")
def conv_heavy():
    """Three 3x3 convs at 32x32 (dynamic batch): most of the time in the convolutions, so a
    latency budget is reachable on any runtime however loaded the machine."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for cin, cout in ((3, 32), (32, 64), (64, 64)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    model = randomize(nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    return capture(model, (torch.randn(2, 3, 32, 32),))


@pytest.mark.parametrize("backend", ["onnx", "torch", pytest.param("tvm", marks=pytest.mark.slow)])
def test_measured_latency_table_smoke(conv_heavy, backend, tmp_path, monkeypatch):
    """Real timings: only that it runs, reports and caches (no figure is asserted)."""
    monkeypatch.setenv("EDGEFX_CACHE", str(tmp_path))
    program = conv_heavy
    first = ChannelPrune(latency=0.8, backend=backend)(program)
    report = first.report
    assert report["latency_backend"] == backend
    assert 0 < report["predicted_latency_ratio"] <= 0.8
    assert report["predicted_dense_ms"] > 0 and report["layer_timings"]["measured"] > 0
    assert report["timing_noise"] is not None
    probes = len(report["calibration"]["probe_groups_removed"])
    assert 1 <= probes <= 2
    assert report["graph_timings"]["measured"] == 1 + probes  # the dense graph and probes
    assert all(ms > 0 for ms in report["calibration"]["measured_ms"])
    (cache,) = (tmp_path / "latency").iterdir()
    assert backend in cache.name
    again = ChannelPrune(latency=0.8, backend=backend)(program)
    assert again.report["layer_timings"]["measured"] == 0  # all from the cache file
    assert again.report["graph_timings"] == {"measured": 0, "cached": 2 * probes}
    assert again.report["calibration"] == report["calibration"]
    assert again.report["groups_removed"] == report["groups_removed"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"latency": 0}, "latency must be a fraction"),
        ({"latency": 1.5}, "latency must be a fraction"),
        ({"latency": 0.5, "macs": 0.5}, "exactly one of"),
        ({"latency": 0.5, "backend": "cuda"}, "no per-layer latency table for backend 'cuda'"),
        ({"latency": 0.5, "measure_graph": lambda gm, x: 1.0}, "without measure="),
        ({"latency": 0.5, "measure": len, "measure_graph": 3}, "measure_graph must be a"),
        ({"latency": 0.5, "measure": "fast"}, "measure must be a function"),
        ({"latency": 0.5, "batch": 0}, "batch must be an integer"),
        ({"latency": 0.5, "threads": 1.5}, "threads must be an integer"),
    ],
)
def test_bad_latency_configuration_is_refused_eagerly(kwargs, message):
    with pytest.raises(PassError, match=message):
        ChannelPrune(**kwargs)


@pytest.mark.parametrize(
    ("backend", "module", "package"),
    [("onnx", "onnxruntime", "onnxruntime"), ("tvm", "tvm", "apache-tvm")],
)
def test_a_latency_budget_on_a_runtime_that_is_not_installed_is_refused(
    monkeypatch, backend, module, package
):
    monkeypatch.setitem(sys.modules, module, None)  # import MODULE now fails
    with pytest.raises(PassError, match=f"needs {module}, which is not installed") as info:
        ChannelPrune(latency=0.5, backend=backend)
    assert f"pip install {package}" in info.value.hint and "backend='torch'" in info.value.hint
    ChannelPrune(latency=0.5, backend="torch")  # the other runtime is still fine


def test_tvm_timer_builds_and_times_one_op_modules(tmp_path):
    """The TVM timer (LLVM for this host, untuned): a conv (with bias), a depthwise conv and
    a linear layer each built as a one-op Relax module and timed; a run's overhead; two small
    graphs imported and timed together. Only that the figures are there (no speed asserted);
    the whole pass on TVM is the slow smoke test above."""
    from edgefx.analysis.latency import TvmTimer, default_cache, graph_inputs, timer_for

    timer = timer_for("tvm", threads=1, repeat=3)
    assert isinstance(timer, TvmTimer) and timer.target.kind.name == "llvm"
    shapes = [
        LayerShape("conv2d", 8, 8, size=(8, 8), kernel=(3, 3), padding=(1, 1)),
        LayerShape("conv2d", 8, 8, size=(8, 8), kernel=(3, 3), padding=(1, 1), groups=8),
        LayerShape("linear", 16, 8, rows=4, bias=False),
    ]
    for shape in shapes:
        median, spread = timer(shape)
        assert median > 0 and spread >= 0
    assert timer.overhead() > 0
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    program = capture(model, (torch.randn(1, 3, 8, 8),), dynamic_batch=False)
    inputs = graph_inputs(program.example_inputs, False, 1)
    narrow = capture(model[:2], (torch.randn(1, 3, 8, 8),), dynamic_batch=False)
    timings = timer.graphs([(program.graph_module, inputs), (narrow.graph_module, inputs)])
    assert len(timings) == 2 and all(median > 0 for median, _ in timings)
    cache = default_cache("tvm", 1)
    assert cache.name.startswith("tvm-0.") and "1thread" in cache.name


# ------------------------------------------------------------------ ops without MACs
def simulated_graph_seconds(
    gm: fx.GraphModule,
    inputs,
    fixed: float = 2e-5,
    per_byte: float = 4e-10,
    floor: float = 0.0,
) -> float:
    """A deterministic 'runtime' for whole graphs: 1 ns per MAC (the cost model the layers are
    timed with below), plus ``fixed`` seconds, plus for each op without MACs ``per_byte``
    for every byte it reads and writes, or ``floor`` if that is more (an op's overhead,
    which the latency model does not have). The shapes come from running the graph on real
    inputs, not from the pass's channel classes, so a pruned graph is measured as it is."""
    from edgefx.analysis.cost import graph_cost

    values: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            first = out[0] if isinstance(out, (tuple, list)) and out else out
            if isinstance(first, torch.Tensor):
                values[n.name] = first
            return out

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    macs = {c.node: c.macs for c in graph_cost(gm, inputs).nodes}
    seconds = sum(macs.values()) * 1e-9 + fixed
    for node in gm.graph.nodes:
        if node.op != "call_function" or macs.get(node.name) or node.target in FREE_OPS:
            continue
        moved = 0
        for tensor in [node, *(a for a in node.all_input_nodes if a.op != "get_attr")]:
            if tensor.name in values:
                moved += values[tensor.name].numel() * values[tensor.name].element_size()
        seconds += max(per_byte * moved, floor if moved else 0.0)
    return seconds


def one_ns_per_mac(shape: LayerShape) -> float:
    return shape.macs * 1e-9


@pytest.fixture(scope="module")
def small_deit():
    return capture(deit_small(depth=1, image=32), (torch.randn(2, 3, 32, 32),))


@pytest.mark.parametrize(("model", "per_byte"), [("program", 4e-10), ("small_deit", 4e-8)])
def test_ops_without_macs_are_accounted_per_channel_class(model, per_byte, request):
    """With the whole graph measured by a runtime whose non-MAC ops cost a fixed part plus a
    price per byte, the calibrated prediction of the pruned graph's latency ratio equals that
    runtime's figure for the pruned graph (re-run on its real shapes), while the layers alone
    predict a different one: every tensor an op without MACs reads or writes is charged to
    the right channel class (Couplings: concat, split, squeeze-excite, flatten; DeiT:
    LayerNorm, softmax-free sdpa, heads, MLP, residual stream)."""
    program = request.getfixturevalue(model)
    inputs = tuple(x[:1] for x in program.example_inputs)  # timed at batch 1

    def runtime(gm: fx.GraphModule, inputs) -> float:
        return simulated_graph_seconds(gm, inputs, per_byte=per_byte)

    result = ChannelPrune(latency=0.6, measure=one_ns_per_mac, measure_graph=runtime)(program)
    report = result.report
    truth = runtime(result.program.graph_module, inputs) / runtime(program.graph_module, inputs)
    assert report["predicted_latency_ratio"] == pytest.approx(truth, rel=1e-6)
    assert report["predicted_latency_ratio"] <= 0.6
    calibration = report["calibration"]
    for residual, mb in zip(calibration["residual_ms"], calibration["non_mac_mb"], strict=True):
        assert residual == pytest.approx((2e-5 + per_byte * mb * 2**20) * 1e3, rel=1e-6)
    # the model without the non-MAC ops is off by more than 0.05 on these graphs
    assert abs(report["mac_ops_only_ratio"] - truth) > 0.05
    # the dense graph and the probes (the layers' answer, then the calibrated one)
    assert report["graph_timings"]["measured"] == 1 + len(calibration["probe_groups_removed"])
    assert 1 <= len(calibration["probe_groups_removed"]) <= 2


def test_without_a_graph_timer_the_ops_without_macs_are_left_out(program):
    report = ChannelPrune(latency=0.6, measure=one_ns_per_mac)(program).report
    assert report["calibration"] is None
    assert report["predicted_latency_ratio"] == report["mac_ops_only_ratio"]
    assert report["predicted_parts_ms"]["residual"] == 0


class ElementwiseHeavy(nn.Module):
    """1x1 convs between long chains of elementwise ops on 48x48 maps: most of the time is
    not in the convolutions, and the ops on the 3-channel input do not shrink at all."""

    def __init__(self, width: int = 64, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 1)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(blocks))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(6):
            x = torch.tanh(x * 1.1 + 0.1)
        x = self.stem(x)
        for conv in self.convs:
            x = conv(x)
            for _ in range(4):
                x = torch.sigmoid(x) * x + 0.5
        return self.head(x.mean((2, 3)))


def test_the_prediction_follows_a_runtime_its_model_does_not_describe():
    """A runtime where each op without MACs costs its bytes or an overhead floor, whichever
    is more (at pruned widths the floor takes over: not linear in the bytes), and whose
    speed drifts between calls (a load that grows). The probes, each timed with the dense
    graph as the anchor, bring the prediction within a hundredth of the runtime's ratio for
    the pruned graph; the layers alone are far off (they are a small part of the time)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 48, 48)
    program = capture(ElementwiseHeavy().eval(), (x,), dynamic_batch=False)
    dense_params = sum(p.numel() for p in program.graph_module.parameters())
    load = [1.0]

    def runtime(gm: fx.GraphModule, inputs) -> float:
        if sum(p.numel() for p in gm.parameters()) == dense_params:
            load[0] *= 1.3  # the dense graph starts every call: the machine got busier
        return load[0] * simulated_graph_seconds(gm, inputs, 0, 1e-9, floor=1e-4)

    result = ChannelPrune(latency=0.6, measure=one_ns_per_mac, measure_graph=runtime, round_to=1)(
        program
    )
    report = result.report
    truth = simulated_graph_seconds(result.program.graph_module, (x,), 0, 1e-9, 1e-4) / (
        simulated_graph_seconds(program.graph_module, (x,), 0, 1e-9, 1e-4)
    )
    assert len(report["calibration"]["probe_groups_removed"]) == 2
    assert abs(report["predicted_latency_ratio"] - truth) < 0.01, (report, truth)
    assert abs(report["mac_ops_only_ratio"] - truth) > 0.1
    assert truth <= 0.61
