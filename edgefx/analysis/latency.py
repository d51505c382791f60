"""Latency tables: how long one convolution or linear layer takes at given channel counts on
a runtime, what a run costs there on its own, and how long a whole graph takes; each measured
once and cached.

ChannelPrune's latency budget predicts a graph's latency at any channel counts from these
(see ``ChannelPrune(latency=...)``):

    predicted = o                one run's overhead (a session call, a VM call)
              + sum of layers    every conv2d / linear table entry at the kept channel
                                 counts, less the o each one-op measurement paid
              + other MAC ops    attention products, at the layers' seconds per MAC
              + residual(bytes)  the ops without MACs, as a function of the bytes they read
                                 and write, each tensor scaled by its channel class's kept
                                 fraction (:func:`traffic`: elementwise ops and activations,
                                 BatchNorm, pooling, LayerNorm, softmax, concat, the copies
                                 permutes make; views and indexing move nothing)

The residual is fitted to the whole graph measured end to end on the same runtime: dense,
and pruned as the prediction so far says (*probes*: first what the layers alone would remove
for the budget, then what the calibrated prediction removes). At each measured graph the
residual is what the whole takes beyond o, the layers and the MAC ops: the ops without MACs,
plus whatever the layers cost inside the graph beyond their solo timings (caches, fusion:
onnxruntime folds BatchNorm and ReLU into the conv). Between measured graphs it is linear in
the bytes (a segment may slope either way); below the most pruned one the segment continues
only while it falls (held flat otherwise). So the prediction equals every measurement, and the
final bisection lands next to a measured graph, where interpolation is short. Each probe is
timed with the dense graph, alternately run by run, and scaled by the dense graph's first
time over its new one, so the machine's load changing between probes cancels. Pruning stays a
table lookup per layer plus a few whole-graph timings; the approximations: every non-MAC
byte costs the same whatever the op, and the residual is linear between measurements.

Timers (no edgefx backend is involved: passes may not import one):

- ``"onnx"``: a one-op ONNX model (Conv / Gemm) in an onnxruntime CPU session with
  ``threads`` intra-op threads; the graph exported with ``torch.onnx`` (dynamo).
- ``"torch"``: the eager aten op, and the graph module run eagerly, with ``threads``
  intra-op threads.
- ``"tvm"``: a one-op Relax module (``conv2d`` + bias, or ``linear``) built with
  ``tvm.compile`` for this host's CPU (LLVM, ``mcpu`` of this machine, untuned: TVM's default
  schedules, which are slow loops for convolutions; tuned builds are not modelled) and timed
  with ``time_evaluator`` with TVM's thread pool at ``threads``; the graph imported with
  ``from_exported_program`` and built the same way.

``o`` is the time of a run of one trivial op on one element (``Neg``). Each layer entry is the
median of ``repeat`` runs after warm-up (a graph's: of as many alternate rounds as fit in
about 3 s, 5 to 201); the spread of those runs is kept with a layer's
entry so a report can say how noisy the table is. Entries are cached in memory and in a JSON
file per runtime, machine and thread count (``$EDGEFX_CACHE`` or ``~/.cache/edgefx``), so a
second pruning of the same architecture measures nothing (a graph is keyed by its code and
the shapes of its inputs and constants).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import operator
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx

from edgefx.errors import EdgefxError

TIMERS = ("onnx", "torch", "tvm")
RUNTIME_PACKAGES = {
    "onnx": ("onnxruntime", "onnxruntime"),
    "torch": ("torch", "torch"),
    "tvm": ("tvm", "apache-tvm"),
}
"""backend -> (module it imports, the package that installs it)."""

aten = torch.ops.aten


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

GraphTimer = Callable[[fx.GraphModule, Sequence[torch.Tensor]], "float | tuple[float, float]"]
"""Seconds one run of a whole graph module on the given inputs takes."""


class LatencyTable:
    """Latency of layer shapes, measured with ``timer`` on first use and cached (in memory,
    and in ``cache`` when given). ``measured`` and ``cached`` count the layer lookups of each
    kind; ``spread`` keeps, per measured layer entry, the relative median absolute deviation
    of its runs (the table's noise). A measurement whose runs spread by more than
    ``max_spread`` (the machine was busy) is taken again, up to ``retries`` times, keeping the
    steadiest.

    ``graphs`` times whole graph modules (with ``graph_timer`` one after the other, or with
    the timer's own ``graphs`` method, which runs them alternately so a change in the
    machine's load hits all alike; None when neither exists) and ``overhead`` one run's
    overhead (the timer's ``overhead`` method; zero for a cost model without one); both are
    cached like the layers.

    Once an entry is in the table it is never measured again in that table, so a
    bisection over predictions built from it compares fixed numbers: noise can make the
    prediction slightly wrong, never make the search wander."""

    def __init__(
        self,
        timer: LayerTimer,
        cache: Path | None = None,
        *,
        graph_timer: GraphTimer | None = None,
        max_spread: float = 0.1,
        retries: int = 2,
    ) -> None:
        self.timer = timer
        self.graph_timer = graph_timer
        self.can_time_graphs = graph_timer is not None or hasattr(timer, "graphs")
        self.cache = cache
        self.max_spread = max_spread
        self.retries = retries
        self.entries: dict[str, float] = {}
        self.spread: dict[str, float] = {}
        self.measured = 0
        self.cached = 0
        self.graphs = {"measured": 0, "cached": 0}  # graph lookups of each kind
        self._changed = False
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
        seconds = self._measure(key, lambda: self.timer(shape), "layer", f" for {shape}")
        self.measured += 1
        return seconds

    def graph_seconds(
        self, graphs: Sequence[tuple[fx.GraphModule, Sequence[torch.Tensor]]]
    ) -> list[float] | None:
        """Seconds one run of each (graph module, inputs) takes; those not in the table are
        measured together (None: nothing here times graphs). The first graph is the anchor:
        when it is in the table and others are not, it is timed again with them and their
        times are scaled by its stored time over the new one, so a change in the machine's
        load between two calls cancels out of their ratios."""
        if not self.can_time_graphs:
            return None
        keys = [graph_key(gm, inputs) for gm, inputs in graphs]
        todo = [i for i, key in enumerate(keys) if key not in self.entries]
        self.graphs["cached"] += len(keys) - len(todo)
        if todo:
            anchored = todo[0] != 0
            timed = [0, *todo] if anchored else todo
            if self.graph_timer is not None:
                timer = self.graph_timer
                found = [timer(*graphs[i]) for i in timed]
            else:
                found = self.timer.graphs([graphs[i] for i in timed])  # type: ignore[attr-defined]
            seconds = [t[0] if isinstance(t, tuple) else t for t in found]  # (median, spread)
            for t in seconds:
                self._check(t, "graph", "")
            scale = 1.0
            if anchored:
                anchor, *seconds = seconds
                scale = self.entries[keys[0]] / anchor if anchor > 0 else 1.0
            for i, t in zip(todo, seconds, strict=True):
                self.entries[keys[i]] = float(t) * scale
            self.graphs["measured"] += len(todo)
            self._changed = True
        return [self.entries[key] for key in keys]

    def overhead(self) -> float:
        """Seconds of one run's overhead on the timer's runtime; 0 for a timer that does not
        say."""
        measure = getattr(self.timer, "overhead", None)
        if measure is None:
            return 0.0
        if "overhead:run" not in self.entries:
            self.entries["overhead:run"] = float(measure())
            self._changed = True
        return self.entries["overhead:run"]

    def _measure(self, key: str, timer: Callable[[], Any], kind: str, what: str) -> float:
        seconds = timer()
        if isinstance(seconds, tuple):  # (median, relative spread) from the built-in timers
            for _ in range(self.retries):
                if seconds[1] <= self.max_spread:
                    break
                seconds = min(seconds, timer(), key=lambda m: m[1])
            seconds, self.spread[key] = seconds
        self._check(seconds, kind, what)
        self.entries[key] = float(seconds)
        self._changed = True
        return float(seconds)

    @staticmethod
    def _check(seconds: object, kind: str, what: str) -> None:
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
            raise EdgefxError(
                f"the {kind} timer returned {seconds!r}{what}",
                hint="a timer returns the seconds one run takes, a finite number >= 0",
            )

    def save(self) -> None:
        if self.cache is None or not self._changed:
            return
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seconds": self.entries, "spread": self.spread}))
        tmp.replace(self.cache)

    def noise(self) -> float | None:
        """The largest relative spread among the layer entries measured (None: none)."""
        return max(self.spread.values()) if self.spread else None


def graph_key(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> str:
    """A graph's cache key: its code and the shapes and dtypes of its inputs and constants
    (the values do not change how long it takes)."""
    digest = hashlib.sha256(gm.code.encode())
    for node in gm.graph.find_nodes(op="get_attr"):
        value = _attribute(gm, node.target)
        if isinstance(value, torch.Tensor):
            digest.update(f"{node.target}:{tuple(value.shape)}:{value.dtype};".encode())
    for x in inputs:
        digest.update(f"input:{tuple(x.shape)}:{x.dtype};".encode())
    return "graph:" + digest.hexdigest()[:32]


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


# ------------------------------------------------------------------ what a graph moves
FREE_OPS = frozenset(
    {
        operator.getitem,
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.expand.default,
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.squeeze.default,
        aten.alias.default,
        aten.detach.default,
        aten.dropout.default,
        aten.clone.default,
        aten.contiguous.default,
        aten.slice.Tensor,
        aten.select.int,
        aten.unbind.int,
        aten.split.Tensor,
        aten.split_with_sizes.default,
        aten.t.default,
    }
)
"""Ops that move no data on any of the runtimes (views, indexing; a copy that makes a permuted
tensor contiguous is counted once, on the permute, which copies on onnxruntime and TVM)."""


def concrete(dim: Any, batch: int) -> int:
    """A size with every symbol (the dynamic batch, and windows folded into it) set to
    ``batch``."""
    if isinstance(dim, int):
        return dim
    expr = dim.node.expr
    return int(expr.subs({symbol: batch for symbol in expr.free_symbols}))


def tensor_bytes(node: fx.Node, batch: int) -> int:
    """Bytes of ``node``'s output (item 0 of a tuple), symbols set to ``batch``; 0 for
    non-tensors."""
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)) and val:
        val = val[0]
    if not isinstance(val, torch.Tensor):
        return 0
    return math.prod(concrete(d, batch) for d in val.shape) * val.dtype.itemsize


def traffic(node: fx.Node, batch: int) -> list[tuple[fx.Node, int]]:
    """The tensors a ``call_function`` node reads and writes, as (the node producing it,
    bytes): its output first, then every computed input (constants are left out: small,
    and not activations); [] for ops that move nothing (:data:`FREE_OPS`)."""
    if node.op != "call_function" or node.target in FREE_OPS:
        return []
    moved = [(node, tensor_bytes(node, batch))]
    for source in node.all_input_nodes:
        if source.op != "get_attr":
            moved.append((source, tensor_bytes(source, batch)))
    return [(n, b) for n, b in moved if b]


def is_op(node: fx.Node) -> bool:
    """A node a runtime dispatches as an op (tensor-valued ``call_function``; not getitem)."""
    if node.op != "call_function" or node.target is operator.getitem:
        return False
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) or (
        isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val)
    )


def graph_inputs(
    example_inputs: Sequence[torch.Tensor], dynamic_batch: bool, batch: int
) -> tuple[torch.Tensor, ...]:
    """Inputs to time a graph on: the example inputs, at ``batch`` when the batch is dynamic."""
    if not dynamic_batch:
        return tuple(example_inputs)
    gen = torch.Generator().manual_seed(0)
    out = []
    for x in example_inputs:
        shape = (batch, *x.shape[1:])
        if x.is_floating_point():
            out.append(torch.randn(shape, generator=gen).to(x.dtype))
        else:
            out.append(x[:1].expand(shape).clone())
    return tuple(out)


# ------------------------------------------------------------------------------- timers
def median_and_spread(run: Callable[[], Any], repeat: int, warmup: int = 2) -> tuple[float, float]:
    """(median seconds, relative median absolute deviation) of ``repeat`` calls of ``run()``
    after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return _summary(times)


def _summary(times: Sequence[float]) -> tuple[float, float]:
    median = statistics.median(times)
    mad = statistics.median(abs(t - median) for t in times)
    return median, (mad / median if median > 0 else 0.0)


def _interleaved(
    runs: Sequence[Callable[[], Any]], seconds: float = 3.0, most: int = 201
) -> list[tuple[float, float]]:
    """(median, relative spread) of each run, timed in rounds of one run each, the order
    reversed every other round, so a change in the machine's load hits all alike. As many
    rounds as fit in about ``seconds`` (at least 5, at most ``most``), after one warm-up
    round."""
    once = 0.0
    for run in runs:
        start = time.perf_counter()
        run()
        once += time.perf_counter() - start
    rounds = max(5, min(most, int(seconds / max(once, 1e-9))))
    times: list[list[float]] = [[] for _ in runs]
    order = list(range(len(runs)))
    for r in range(rounds):
        for i in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            runs[i]()
            times[i].append(time.perf_counter() - start)
    return [_summary(t) for t in times]


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


class Timer:
    """A runtime to time on: a layer alone (calling the timer), a trivial op (the overhead
    of a run) and a whole graph module. Subclasses say how to run each."""

    name = ""

    def __init__(self, repeat: int = 9, threads: int = 1) -> None:
        self.repeat = repeat
        self.threads = threads
        self._runs: dict[str, Callable[[], Any]] = {}  # graphs built, by graph_key

    def __call__(self, shape: LayerShape) -> tuple[float, float]:
        return self.layer(shape)

    def layer(self, shape: LayerShape) -> tuple[float, float]:
        raise NotImplementedError

    def overhead(self) -> float:
        """Median seconds of a run of one trivial op on one element."""
        raise NotImplementedError

    def graph_run(self, gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Callable[[], Any]:
        """A function running ``gm`` on ``inputs`` once on this runtime (built here)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _pool(self) -> Iterator[None]:
        yield  # the runtime's threads, set while timing

    def graphs(
        self, graphs: Sequence[tuple[fx.GraphModule, Sequence[torch.Tensor]]]
    ) -> list[tuple[float, float]]:
        """(median seconds, relative spread) of each (graph module, inputs), built first and
        then timed alternately (see :func:`_interleaved`)."""
        runs = []
        for gm, inputs in graphs:  # a graph timed again (an anchor) is not built again
            key = graph_key(gm, inputs)
            if key not in self._runs:
                self._runs[key] = self.graph_run(gm, inputs)
            runs.append(self._runs[key])
        with self._pool():
            return _interleaved(runs)


class TorchTimer(Timer):
    """Eager torch with ``threads`` intra-op threads while timing: a layer as one aten op, a
    graph module run as is."""

    name = "torch"

    @contextlib.contextmanager
    def _pool(self) -> Iterator[None]:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                yield
        finally:
            torch.set_num_threads(before)

    def layer(self, shape: LayerShape) -> tuple[float, float]:
        x, weight, bias = _inputs(shape)
        b = bias if shape.bias else None
        if shape.kind == "linear":
            op: Callable[[], Any] = lambda: torch.nn.functional.linear(x, weight, b)  # noqa: E731
        else:
            op = lambda: torch.nn.functional.conv2d(  # noqa: E731
                x, weight, b, shape.stride, shape.padding, shape.dilation, shape.groups
            )
        with self._pool():
            return median_and_spread(op, self.repeat)

    def overhead(self) -> float:
        x = torch.ones(1)
        run = lambda: aten.neg.default(x)  # noqa: E731
        with self._pool():
            return median_and_spread(run, 51)[0]

    def graph_run(self, gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Callable[[], Any]:
        return lambda: gm(*inputs)


class OnnxTimer(Timer):
    """onnxruntime's CPU provider with ``threads`` intra-op threads: a layer as a one-op ONNX
    model (Conv, or Gemm), a graph exported with ``torch.onnx`` (dynamo)."""

    name = "onnx"

    def _session(self, model: Any) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    @staticmethod
    def _model(nodes: list, inputs: list, inits: list) -> Any:
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            nodes,
            "layer",
            inputs,
            [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
            inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    def layer(self, shape: LayerShape) -> tuple[float, float]:
        from onnx import TensorProto, helper, numpy_helper

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
        x_info = helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))
        session = self._session(self._model([node], [x_info], inits))
        feed = {"X": x.numpy()}
        return median_and_spread(lambda: session.run(None, feed), self.repeat)

    def overhead(self) -> float:
        from onnx import TensorProto, helper

        nodes = [helper.make_node("Neg", ["X"], ["Y"])]
        x_info = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])
        session = self._session(self._model(nodes, [x_info], []))
        feed = {"X": torch.ones(1).numpy()}
        return median_and_spread(lambda: session.run(None, feed), 51)[0]

    def graph_run(self, gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Callable[[], Any]:
        from edgefx.ops import onnx_translations
        from edgefx.program import quiet_torch_logs

        with quiet_torch_logs(), contextlib.redirect_stdout(io.StringIO()):
            ep = torch.export.export(gm, tuple(inputs), strict=False)
            model = torch.onnx.export(
                ep,
                dynamo=True,
                verbose=False,
                optimize=True,
                custom_translation_table=onnx_translations(),
            ).model_proto
        session = self._session(model)
        feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
        return lambda: session.run(None, feed)


class TvmTimer(Timer):
    """Apache TVM on this host's CPU (LLVM, ``mcpu`` of this machine, untuned default
    schedules), TVM's thread pool at ``threads`` while timing: a layer as a one-op Relax
    module (``conv2d`` + bias add, or ``linear``) with its weights as constants, a graph
    imported with ``from_exported_program``; ``time_evaluator`` medians."""

    name = "tvm"

    def __init__(self, repeat: int = 9, threads: int = 1) -> None:
        super().__init__(repeat, threads)
        import tvm

        self._tvm = tvm
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        self.target = tvm.target.Target({"kind": "llvm", "mcpu": cpu})

    @contextlib.contextmanager
    def _pool(self) -> Iterator[None]:
        threads = self._tvm.get_global_func("runtime.NumThreads")
        configure = self._tvm.get_global_func("runtime.config_threadpool")
        before = int(threads())
        configure(1, self.threads)  # affinity mode 1: the big cores (every core on x86)
        try:
            yield
        finally:
            configure(1, before)

    def _build(self, mod: Any, inputs: Sequence[torch.Tensor]) -> tuple[Any, list[Any]]:
        """The module built into a VM, and the inputs as TVM tensors."""
        vm = self._tvm.relax.VirtualMachine(
            self._tvm.compile(mod, target=self.target), self._tvm.cpu()
        )
        return vm, [self._tvm.runtime.tensor(x.numpy()) for x in inputs]

    def _time(self, mod: Any, inputs: Sequence[torch.Tensor], repeat: int) -> tuple[float, float]:
        vm, args = self._build(mod, inputs)
        with self._pool():
            vm["main"](*args)  # warm-up
            evaluator = vm.time_evaluator("main", self._tvm.cpu(), number=1, repeat=repeat)
            return _summary(evaluator(*args).results)

    def _function(self, x_shape: Sequence[int], body: Callable[[Any], Any]) -> Any:
        relax = self._tvm.relax
        builder = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType(list(x_shape), "float32"))
        with builder.function("main", [x]):
            with builder.dataflow():
                out = builder.emit_output(body(builder, x))
            builder.emit_func_output(out)
        return builder.get()

    def layer(self, shape: LayerShape) -> tuple[float, float]:
        relax = self._tvm.relax
        x, weight, bias = _inputs(shape)
        w = relax.const(weight.numpy())

        def body(builder: Any, value: Any) -> Any:
            if shape.kind == "linear":
                b = relax.const(bias.numpy()) if shape.bias else None
                return builder.emit(relax.op.linear(value, w, b))
            y = builder.emit(
                relax.op.nn.conv2d(
                    value,
                    w,
                    strides=shape.stride,
                    padding=(*shape.padding, *shape.padding),
                    dilation=shape.dilation,
                    groups=shape.groups,
                )
            )
            if shape.bias:
                y = builder.emit(relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1).numpy())))
            return y

        return self._time(self._function(x.shape, body), [x], self.repeat)

    def overhead(self) -> float:
        relax = self._tvm.relax

        def body(builder: Any, value: Any) -> Any:
            return builder.emit(relax.op.negative(value))

        return self._time(self._function([1], body), [torch.ones(1)], 51)[0]

    def graph_run(self, gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Callable[[], Any]:
        from tvm.relax.frontend.torch import from_exported_program

        from edgefx.ops import tvm_converters
        from edgefx.program import quiet_torch_logs

        with quiet_torch_logs():
            ep = torch.export.export(gm, tuple(inputs), strict=False).run_decompositions()
        mod = from_exported_program(
            ep,
            keep_params_as_input=False,
            custom_convert_map=tvm_converters(),
            run_ep_decomposition=False,
        )
        vm, args = self._build(mod, inputs)
        return lambda: vm["main"](*args)


def timer_for(backend: str, threads: int = 1, repeat: int = 9) -> Timer:
    """The timer of ``backend`` (one of :data:`TIMERS`); EdgefxError when its runtime is not
    installed."""
    if backend not in TIMERS:
        raise EdgefxError(
            f"no latency timer for backend {backend!r}",
            hint=f"one of {', '.join(map(repr, TIMERS))}",
        )
    check_runtime(backend)
    timer: type[Timer] = {"onnx": OnnxTimer, "torch": TorchTimer, "tvm": TvmTimer}[backend]
    return timer(repeat=repeat, threads=threads)


def check_runtime(backend: str) -> None:
    """EdgefxError naming the package to install when ``backend``'s runtime is missing."""
    module, package = RUNTIME_PACKAGES[backend]
    try:
        __import__(module)
    except ImportError as exc:
        raise EdgefxError(
            f"timing on backend {backend!r} needs {module}, which is not installed",
            hint=f"pip install {package}, or use "
            + " or ".join(f"backend={b!r}" for b in TIMERS if b != backend),
        ) from exc


def default_cache(timer: str, threads: int) -> Path:
    """The cache file of a runtime on this machine."""
    base = Path(os.environ.get("EDGEFX_CACHE") or Path.home() / ".cache" / "edgefx")
    machine = f"{platform.machine()}-{os.cpu_count()}cpu-{platform.node()}"
    version = torch.__version__
    if timer == "onnx":
        import onnxruntime

        version = onnxruntime.__version__
    elif timer == "tvm":
        import tvm

        version = tvm.__version__
    name = f"{timer}-{version}-{threads}thread-{machine}.json"
    return base / "latency" / "".join(c if c.isalnum() or c in "-._" else "_" for c in name)
