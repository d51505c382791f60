"""Per-layer latency tables: how long one convolution or linear layer takes at given channel
counts on a runtime, measured once per distinct layer shape and cached.

ChannelPrune's latency budget adds these up over the layers of a graph to predict its
latency at any channel counts (see ``ChannelPrune(latency=...)``). A layer is timed alone:
a one-op ONNX model in onnxruntime (``"onnx"``), or the aten op in eager torch
(``"torch"``); no edgefx backend is involved (passes may not import one). Each entry is the
median of ``repeat`` runs after warm-up; the spread of those runs is kept with it so a
report can say how noisy the table is. Entries are cached in memory and in a JSON file per
runtime, machine and thread count (``$EDGEFX_CACHE`` or ``~/.cache/edgefx``), so a second
pruning of the same architecture measures nothing.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from edgefx.errors import EdgefxError

TIMERS = ("onnx", "torch")


@dataclass(frozen=True)
class LayerShape:
    """One conv2d or linear layer, as timed: ``rows`` is the number of vectors a linear
    layer multiplies (batch x tokens); ``size`` is a conv's input height and width."""

    kind: str  # "conv2d" | "linear"
    in_channels: int
    out_channels: int
    batch: int = 1
    rows: int = 1
    size: tuple[int, int] = (1, 1)
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv2d" and self.groups > 1 and self.groups == self.in_channels

    def with_channels(self, in_channels: int, out_channels: int) -> LayerShape:
        """The same layer with other channel counts (a depthwise conv stays depthwise; a
        grouped conv keeps its groups)."""
        groups = in_channels if self.depthwise else self.groups
        return replace(self, in_channels=in_channels, out_channels=out_channels, groups=groups)

    @property
    def macs(self) -> int:
        if self.kind == "linear":
            return self.rows * self.in_channels * self.out_channels
        h, w = self.out_size
        per_out = (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]
        return self.batch * self.out_channels * h * w * per_out

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(
                self.size, self.padding, self.dilation, self.kernel, self.stride, strict=True
            )
        )

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


LayerTimer = Callable[[LayerShape], "float | tuple[float, float]"]
"""Seconds one run of a layer takes (a cost model, or a measurement: then the median and the
relative spread of the runs)."""


class LatencyTable:
    """Latency of layer shapes, measured with ``timer`` on first use and cached (in memory,
    and in ``cache`` when given). ``measured`` and ``cached`` count the lookups of each kind;
    ``spread`` keeps, per measured entry, the relative median absolute deviation of its
    runs (the table's noise). A measurement whose runs spread by more than ``max_spread``
    (the machine was busy) is taken again, up to ``retries`` times, keeping the steadiest.

    Once an entry is in the table it is never measured again in that table, so a
    bisection over predictions built from it compares fixed numbers: noise can make the
    prediction slightly wrong, never make the search wander."""

    def __init__(
        self,
        timer: LayerTimer,
        cache: Path | None = None,
        *,
        max_spread: float = 0.1,
        retries: int = 2,
    ) -> None:
        self.timer = timer
        self.cache = cache
        self.max_spread = max_spread
        self.retries = retries
        self.entries: dict[str, float] = {}
        self.spread: dict[str, float] = {}
        self.measured = 0
        self.cached = 0
        if cache is not None and cache.is_file():
            try:
                stored = json.loads(cache.read_text())
                self.entries = {k: float(v) for k, v in stored.get("seconds", {}).items()}
                self.spread = {k: float(v) for k, v in stored.get("spread", {}).items()}
            except (ValueError, AttributeError):
                self.entries = {}  # a damaged cache is measured again, not trusted

    def __call__(self, shape: LayerShape) -> float:
        key = shape.key()
        if key in self.entries:
            self.cached += 1
            return self.entries[key]
        seconds = self.timer(shape)
        if isinstance(seconds, tuple):  # (median, relative spread) from the built-in timers
            for _ in range(self.retries):
                if seconds[1] <= self.max_spread:
                    break
                seconds = min(seconds, self.timer(shape), key=lambda m: m[1])
            seconds, self.spread[key] = seconds
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
            raise EdgefxError(
                f"the layer timer returned {seconds!r} for {shape}",
                hint="a timer returns the seconds one run takes, a finite number >= 0",
            )
        self.entries[key] = float(seconds)
        self.measured += 1
        return float(seconds)

    def save(self) -> None:
        if self.cache is None or not self.measured:
            return
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seconds": self.entries, "spread": self.spread}))
        tmp.replace(self.cache)

    def noise(self) -> float | None:
        """The largest relative spread among the entries measured (None: none measured)."""
        return max(self.spread.values()) if self.spread else None


# ------------------------------------------------------------------------------- timers
def _median_and_spread(run: Callable[[], Any], repeat: int, warmup: int = 2) -> tuple[float, float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    mad = statistics.median(abs(t - median) for t in times)
    return median, (mad / median if median > 0 else 0.0)


def _random(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _inputs(shape: LayerShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if shape.kind == "linear":
        x = _random((shape.rows, shape.in_channels))
        weight = _random((shape.out_channels, shape.in_channels), 1)
    else:
        x = _random((shape.batch, shape.in_channels, *shape.size))
        per_group = shape.in_channels // shape.groups
        weight = _random((shape.out_channels, per_group, *shape.kernel), 1)
    return x, weight, _random((shape.out_channels,), 2)


def torch_timer(repeat: int = 9) -> LayerTimer:
    """Time a layer as one eager aten op (torch's current thread count)."""

    def measure(shape: LayerShape) -> tuple[float, float]:
        x, weight, bias = _inputs(shape)
        b = bias if shape.bias else None
        if shape.kind == "linear":
            op: Callable[[], Any] = lambda: torch.nn.functional.linear(x, weight, b)  # noqa: E731
        else:
            op = lambda: torch.nn.functional.conv2d(  # noqa: E731
                x, weight, b, shape.stride, shape.padding, shape.dilation, shape.groups
            )
        with torch.no_grad():
            return _median_and_spread(op, repeat)

    return measure


def onnx_timer(repeat: int = 9, threads: int = 1) -> LayerTimer:
    """Time a layer as a one-op ONNX model (Conv, or Gemm) in an onnxruntime CPU session
    with ``threads`` intra-op threads."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def measure(shape: LayerShape) -> tuple[float, float]:
        x, weight, bias = _inputs(shape)
        inits = [numpy_helper.from_array(weight.numpy(), "W")]
        inputs = ["X", "W"]
        if shape.bias:
            inits.append(numpy_helper.from_array(bias.numpy(), "B"))
            inputs.append("B")
        if shape.kind == "linear":
            node = helper.make_node("Gemm", inputs, ["Y"], transB=1)
        else:
            node = helper.make_node(
                "Conv",
                inputs,
                ["Y"],
                kernel_shape=list(shape.kernel),
                strides=list(shape.stride),
                pads=[*shape.padding, *shape.padding],
                dilations=list(shape.dilation),
                group=shape.groups,
            )
        graph = helper.make_graph(
            [node],
            "layer",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(
            onnx.ModelProto.SerializeToString(model), options, providers=["CPUExecutionProvider"]
        )
        feed = {"X": x.numpy()}
        return _median_and_spread(lambda: session.run(None, feed), repeat)

    return measure


def default_cache(timer: str, threads: int) -> Path:
    """The cache file of a runtime on this machine."""
    base = Path(os.environ.get("EDGEFX_CACHE") or Path.home() / ".cache" / "edgefx")
    machine = f"{platform.machine()}-{os.cpu_count()}cpu-{platform.node()}"
    version = torch.__version__
    if timer == "onnx":
        import onnxruntime

        version = onnxruntime.__version__
    name = f"{timer}-{version}-{threads}thread-{machine}.json"
    return base / "latency" / "".join(c if c.isalnum() or c in "-._" else "_" for c in name)
