"""ChannelPrune(latency=...): bisection on a latency predicted from a per-layer table. The
mechanism is tested with deterministic cost models passed as ``measure=``; one smoke test
per runtime measures for real and checks only that it runs, caches and reports (wall-clock
figures are for benchmarks/prune.py)."""

from __future__ import annotations

import sys

import pytest
import torch
from prune_models import Couplings, randomize

from edgefx import EdgefxError, PassError
from edgefx.analysis.latency import LatencyTable, LayerShape
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
    reachable = float(info.value.message.rsplit("leaves ", 1)[1])
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


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_measured_latency_table_smoke(program, backend, tmp_path, monkeypatch):
    """Real timings: only that it runs, reports and caches (no figure is asserted)."""
    monkeypatch.setenv("EDGEFX_CACHE", str(tmp_path))
    first = ChannelPrune(latency=0.9, backend=backend)(program)
    report = first.report
    assert report["latency_backend"] == backend
    assert 0 < report["predicted_latency_ratio"] <= 0.9
    assert report["predicted_dense_ms"] > 0 and report["layer_timings"]["measured"] > 0
    assert report["timing_noise"] is not None
    (cache,) = (tmp_path / "latency").iterdir()
    assert backend in cache.name
    again = ChannelPrune(latency=0.9, backend=backend)(program)
    assert again.report["layer_timings"]["measured"] == 0  # all from the cache file
    assert again.report["groups_removed"] == report["groups_removed"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"latency": 0}, "latency must be a fraction"),
        ({"latency": 1.5}, "latency must be a fraction"),
        ({"latency": 0.5, "macs": 0.5}, "exactly one of"),
        ({"latency": 0.5, "backend": "tvm"}, "no per-layer latency table for backend 'tvm'"),
        ({"latency": 0.5, "backend": "cuda"}, "no per-layer latency table"),
        ({"latency": 0.5, "measure": "fast"}, "measure must be a function"),
        ({"latency": 0.5, "batch": 0}, "batch must be an integer"),
        ({"latency": 0.5, "threads": 1.5}, "threads must be an integer"),
    ],
)
def test_bad_latency_configuration_is_refused_eagerly(kwargs, message):
    with pytest.raises(PassError, match=message):
        ChannelPrune(**kwargs)


def test_a_latency_budget_on_a_runtime_that_is_not_installed_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    with pytest.raises(PassError, match="needs onnxruntime, which is not installed") as info:
        ChannelPrune(latency=0.5, backend="onnx")
    assert "backend='torch'" in info.value.hint
    ChannelPrune(latency=0.5, backend="torch")  # the other runtime is still fine
