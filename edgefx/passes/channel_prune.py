"""ChannelPrune: remove the channels BatchNorm scaling factors rank least important.

Network Slimming / AdaPruner: a channel's importance is |gamma| of the BatchNorm that scales
it; coupled channels (a residual add, a concat, a depthwise conv, a flatten into a linear
layer; see :mod:`edgefx.analysis.depgraph`) are removed together, ranked by the mean |gamma|
over their BatchNorms. One global threshold decides: with ``macs=f`` it is found by bisection
as the lowest threshold whose pruned network needs at most ``f`` of the original MACs; with
``threshold=t`` it is given (``allocation="uniform"`` instead cuts every set of coupled
channels by the same fraction). Then the layers are physically slimmed: conv, linear and
BatchNorm weights lose the removed rows/columns, depthwise convs their groups, and reshapes,
splits and layer norms their sizes.

Lossy in general (fine-tune afterwards); exact when the removed channels carry nothing
(|gamma| = 0 with beta = 0 before a ReLU). Run it before FoldBatchNorm, which removes the
BatchNorms it reads.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import math
import operator
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from edgefx.analysis.depgraph import ChannelDependencyGraph, ChannelGroup, class_sizes_after
from edgefx.analysis.graph import ACTIVATIONS, CONVS, COPIES
from edgefx.analysis.latency import (
    FREE_OPS,
    TIMERS,
    GraphTimer,
    LatencyTable,
    LayerShape,
    check_runtime,
    concrete,
    default_cache,
    graph_inputs,
    timer_for,
    traffic,
)
from edgefx.errors import EdgefxError, PassError, first_line
from edgefx.passes.base import Pass
from edgefx.passes.rewrite import check_module_paths, remove_dead_code, under, unmerge_heads
from edgefx.program import Program

aten = torch.ops.aten
_RESHAPES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}


IMPORTANCES = ("auto", "bn", "l1", "l2", "norm")
ALLOCATIONS = ("global", "uniform")
_PROBES = 2  # pruned graphs a latency budget times whole to calibrate its prediction
Importance = str | Callable[[ChannelGroup], float]


class ChannelPrune(Pass):
    """Remove the least important channel groups down to a MACs or latency budget, or below
    a threshold.

    Args:
        macs: fraction of the original MACs to keep, in (0, 1] (e.g. 0.5 halves them).
        threshold: alternatively, remove every group whose score is below this.
        latency: alternatively, a fraction of the predicted latency to keep, in (0, 1]: every
            conv2d / linear layer is timed alone at the channel counts the bisection asks
            about (a table cached per machine, see :mod:`edgefx.analysis.latency`), and the
            graph's latency is predicted as the layers' sum plus the ops without MACs
            (elementwise, norms, pooling, softmax, copies) as a function of the bytes they
            move per channel class, fitted to the whole graph timed dense and at up to two
            probes (pruned as the prediction says); the bisection runs on that prediction
            instead of MACs. The same ranking decides which groups go; only how many
            differs.
        backend: the runtime the latency table is measured on: ``"onnx"`` (onnxruntime
            CPU, ``threads`` intra-op threads; the default), ``"torch"`` (eager aten ops) or
            ``"tvm"`` (one-op Relax modules built for this host's CPU, untuned).
        measure: instead of ``backend``, a function ``(LayerShape) -> seconds`` (a cost
            model, or a timer for another runtime); its results are not cached on disk.
            Ops without MACs are then left out of the prediction, unless ``measure_graph``
            is given too.
        measure_graph: with ``measure``, a function ``(GraphModule, inputs) -> seconds`` for
            a whole graph (dense, or a probe), which calibrates the part ops without MACs
            take.
        batch: the batch size layers are timed at when the graph's batch is dynamic.
        threads: intra-op threads the latency table is measured with (every runtime).
        importance: how groups are ranked: ``"bn"`` mean |gamma| of their BatchNorms;
            ``"l1"`` / ``"l2"`` the norm of each producing conv/linear layer's weights for the
            channel, divided by that layer's mean (so layers compare), averaged over the
            coupled layers; ``"norm"`` mean |gamma| of the LayerNorms over them; a callable
            ``(ChannelGroup) -> float``; ``"auto"`` (default): BatchNorm where a group has
            BatchNorms, ``"l2"`` elsewhere. A group nothing ranks is never removed.
        round_to: kept channel counts become multiples of this (fast SIMD kernels) where a
            layer's channels are removed in single units and it has at least ``2 * round_to``
            of them; 1 turns it off. Default: 8 with ``macs=``, 1 with ``threshold=`` (a
            threshold says exactly what to remove).
        compensate: a removed channel's BatchNorm output is on average its beta, which the
            next layer kept receiving through the activation: fold ``act(beta)`` times that
            layer's weights into its bias (conv/linear fed through elementwise ops only).
            Exact for a constant channel away from the borders; a zero-padded conv sees less
            of it at the border, so there it is an approximation.
        min_keep: every channel class keeps at least this fraction of its channels (and at
            least one), so no layer disappears.
        exclude: module paths (prefixes) whose channels are never removed, e.g. ``["fc"]``.
        allocation: how removal is spread over the layers: ``"global"`` (default) one
            ranking over the whole network, so the budget falls where scores are lowest
            (Network Slimming); ``"uniform"`` every set of coupled channels loses the same
            fraction, ranked within it (a network drawn narrower; Torch-Pruning without
            global pruning). Either way coupled channels go together and the budget is met
            by bisection. On the digits-trained models global was the more accurate on
            resnet18 and the ViT and within a point on mobilenet_v2, and no slower
            (``benchmarks/results/real_data_prune_uniform.md``, ``prune_uniform.md``).
    """

    name = "ChannelPrune"

    def __init__(
        self,
        macs: float | None = None,
        *,
        threshold: float | None = None,
        latency: float | None = None,
        backend: str = "onnx",
        measure: Callable[[LayerShape], float] | None = None,
        measure_graph: GraphTimer | None = None,
        batch: int = 1,
        threads: int = 1,
        importance: Importance = "auto",
        round_to: int | None = None,
        compensate: bool = True,
        min_keep: float = 0.1,
        exclude: Sequence[str] = (),
        allocation: str = "global",
    ) -> None:
        if sum(v is not None for v in (macs, threshold, latency)) != 1:
            raise PassError(
                "ChannelPrune needs exactly one of macs=, latency= or threshold=",
                hint="e.g. ChannelPrune(macs=0.5) keeps at most half of the MACs",
            )
        if latency is not None:
            _check_latency(latency, backend, measure, measure_graph, batch, threads)
        if macs is not None and not (isinstance(macs, (int, float)) and 0 < macs <= 1):
            raise PassError(
                f"macs must be a fraction of the original MACs in (0, 1], got {macs!r}",
                hint="ChannelPrune(macs=0.5) keeps at most half of them",
            )
        if threshold is not None and not (isinstance(threshold, (int, float)) and threshold >= 0):
            raise PassError(f"threshold must be a number >= 0, got {threshold!r}")
        if allocation not in ALLOCATIONS:
            raise PassError(
                f"unknown allocation {allocation!r}",
                hint=f"one of {', '.join(map(repr, ALLOCATIONS))}",
            )
        if threshold is not None and allocation != "global":
            raise PassError(
                f"allocation={allocation!r} orders groups for a budget; threshold= removes "
                "exactly the groups scored below it",
                hint=f"give macs= or latency= with allocation={allocation!r}",
            )
        if not (callable(importance) or importance in IMPORTANCES):
            raise PassError(
                f"unknown importance {importance!r}",
                hint=f"one of {', '.join(map(repr, IMPORTANCES))} or a function "
                "(ChannelGroup) -> float",
            )
        if round_to is not None and not (
            isinstance(round_to, int) and not isinstance(round_to, bool) and round_to >= 1
        ):
            raise PassError(
                f"round_to must be an integer >= 1, got {round_to!r}",
                hint="round_to=8 keeps multiples of 8 channels; round_to=1 turns rounding off",
            )
        if not (isinstance(min_keep, (int, float)) and 0 <= min_keep <= 1):
            raise PassError(f"min_keep must be a fraction in [0, 1], got {min_keep!r}")
        check_module_paths("exclude", exclude, example='["fc", "layer4"]')
        self.macs = macs
        self.threshold = threshold
        self.latency = latency
        if latency is not None:
            self.backend = backend if measure is None else None
            self.measure = measure
            self.measure_graph = measure_graph
            self.batch = batch
            self.threads = threads
        self.importance = importance
        self.allocation = allocation
        self.round_to = round_to
        self.compensate = bool(compensate)
        self.min_keep = min_keep
        self.exclude = tuple(exclude)

    @property
    def report_round_to(self) -> int:
        """The rounding this pass applies (``round_to`` or its default)."""
        return self._round

    @property
    def _round(self) -> int:
        if self.round_to is not None:
            return self.round_to
        return 1 if self.threshold is not None else 8

    # ------------------------------------------------------------------ the pass
    def run(self, program: Program) -> tuple[Program, dict[str, Any]]:
        gm = program.copy_graph()
        unmerge_heads(gm)  # nn.MultiheadAttention folds its heads into the batch
        dep = ChannelDependencyGraph(gm)
        scores = _scores(dep, self.importance)
        candidates, skipped = self._candidates(dep, scores)
        cost = program.cost()
        base = {c.node: c.macs for c in cost.nodes}
        estimate = _MacsModel(gm, dep, base)
        units = _RoundingUnits(dep, self._round)

        if not candidates:
            why = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
            raise PassError(
                f"ChannelPrune cannot remove any channel of {program.name} ({why})",
                hint="with importance='bn' only BatchNorm-ranked channels can go; "
                "importance='auto' (the default) ranks the others by weight magnitude"
                if self.importance == "bn"
                else "the channels are fixed by the ops that read them (see the reasons)",
            )
        if self.allocation == "uniform":
            _interleave(candidates)
        latency_report: dict[str, Any] = {}
        if self.macs is not None:
            budget = self.macs * cost.total_macs
            count = self._bisect(
                dep, candidates, estimate, budget, units, self.macs, "MACs", skipped
            )
        elif self.latency is not None:
            table = self._latency_table()
            predict = _LatencyModel(gm, dep, base, table, self.batch)
            full = {cls.id: cls.size for cls in dep.classes}
            count = self._latency_count(
                program, gm, dep, candidates, units, table, predict, skipped
            )
            dense = predict(full)
            table.save()
            chosen = units.rounded(self._select(dep, candidates, count), candidates, self._floor)
            kept = class_sizes_after(dep, chosen)
            latency_report = {
                "target_latency": self.latency,
                "latency_backend": self.backend or "callable",
                "predicted_latency_ratio": predict(kept) / dense,
                # what the layers and other MAC ops alone would predict (non-MAC ops left out)
                "mac_ops_only_ratio": predict.with_macs(kept) / predict.with_macs(full),
                "predicted_dense_ms": dense * 1e3,
                **predict.breakdown(),
                "timed_layers": predict.timed,
                "layer_timings": {"measured": table.measured, "cached": table.cached},
                "graph_timings": dict(table.graphs),
                "timing_noise": table.noise(),
            }
        else:
            count = sum(scores[g.id][0] < self.threshold for g in candidates)
        removed = units.rounded(self._select(dep, candidates, count), candidates, self._floor)
        threshold = scores[candidates[count - 1].id][0] if count else None

        left = class_sizes_after(dep, removed)
        ranked_by: dict[str, int] = defaultdict(int)
        for group in dep.groups:
            if group.id in scores:
                ranked_by[scores[group.id][1]] += 1
        report: dict[str, Any] = {
            "target_macs": self.macs,
            "threshold": threshold if self.threshold is None else self.threshold,
            "importance": self.importance if isinstance(self.importance, str) else "callable",
            "round_to": self._round,
            "allocation": self.allocation,
            "groups_removed": len(removed),
            "channels_removed": sum(len(g.channels) for g in removed),
            "estimated_macs": estimate(left),
            "ranked_by": dict(ranked_by),
            "layers": _layer_report(dep, left, scores),
            "dependency_graph": dep.summary(),
            "not_ranked": skipped,
            "kept_whole": _fixed_report(dep),
            **latency_report,
        }
        if removed:
            folds = _compensation(gm, dep, removed) if self.compensate else []
            _slim(gm, dep, removed)
            for layer, delta in folds:
                _add_to_bias(gm, layer, delta)
            gm.recompile()
            if self.compensate:
                report["compensated_layers"] = len(folds)
            remove_dead_code(gm)
            new = program.with_graph(gm, repr(self)).refreshed()
        else:  # nothing removed: the graph as it came (not the heads-unmerged copy)
            new = program.with_graph(program.copy_graph(), repr(self))
        return new, report

    def _candidates(
        self, dep: ChannelDependencyGraph, scores: dict[int, tuple[float, str]]
    ) -> tuple[list[ChannelGroup], dict]:
        """Removable groups, least important first; and counts of those that are not."""
        skipped: dict[str, int] = defaultdict(int)
        excluded = {
            cls.id
            for cls in dep.classes
            if any(under(m, p) for m in cls.modules for p in self.exclude)
        }
        unranked = {
            "bn": "no BatchNorm ranks them",
            "norm": "no LayerNorm ranks them",
        }.get(self.importance if isinstance(self.importance, str) else "", "nothing ranks them")
        candidates = []
        for group in dep.groups:
            if group.fixed is not None:
                skipped["fixed: " + group.fixed.split(" (")[0]] += 1
            elif group.id not in scores:
                skipped[unranked] += 1
            elif any(c in excluded for c, _ in group.channels):
                skipped["excluded"] += 1
            else:
                candidates.append(group)
        candidates.sort(key=lambda g: (scores[g.id][0], g.id))
        return candidates, dict(skipped)

    def _floor(self, size: int) -> int:
        return max(1, math.ceil(self.min_keep * size))

    def _select(
        self, dep: ChannelDependencyGraph, candidates: list[ChannelGroup], count: int
    ) -> list[ChannelGroup]:
        """The first ``count`` candidates, skipping any that would empty a class below its
        ``min_keep`` floor (so the selection for count + 1 contains that for count)."""
        left = {cls.id: cls.size for cls in dep.classes}
        chosen = []
        for group in candidates[:count]:
            per_class: dict[int, int] = defaultdict(int)
            for cls_id, _ in group.channels:
                per_class[cls_id] += 1
            if all(left[c] - n >= self._floor(dep.classes[c].size) for c, n in per_class.items()):
                for c, n in per_class.items():
                    left[c] -= n
                chosen.append(group)
        return chosen

    def _bisect(
        self,
        dep: ChannelDependencyGraph,
        candidates: list[ChannelGroup],
        estimate: Callable[[dict[int, int]], float],
        budget: float,
        units: _RoundingUnits,
        fraction: float,
        what: str,
        not_ranked: dict[str, int],
    ) -> int:
        """The fewest least-important candidates whose removal (rounded) meets ``budget``
        by ``estimate`` (MACs, or predicted latency). An unreachable budget is refused with
        the reachable figure and the commonest reasons in ``not_ranked`` (channels fixed by
        an op, excluded, not ranked: :meth:`_candidates`' second result, the report's
        ``not_ranked``)."""

        def cost_after(count: int) -> float:
            chosen = units.rounded(self._select(dep, candidates, count), candidates, self._floor)
            return estimate(class_sizes_after(dep, chosen))

        lo, hi = 0, len(candidates)
        if cost_after(hi) > budget:
            full = estimate({cls.id: cls.size for cls in dep.classes})
            reachable = cost_after(hi) / max(full, 1e-30)
            arg = "macs" if what == "MACs" else "latency"
            most = sorted(not_ranked.items(), key=lambda item: -item[1])[:3]
            stays = ", ".join(f"{n} {reason}" for reason, n in most)
            raise PassError(
                f"ChannelPrune cannot reach {fraction:.3g} of the {what}: removing every "
                f"removable channel (min_keep={self.min_keep}) leaves {reachable:.3g}"
                + (f"; kept whole: {stays}" if stays else ""),
                hint=f"ask for a larger {arg}=, lower min_keep, or exclude fewer modules",
            )
        while lo < hi:
            mid = (lo + hi) // 2
            if cost_after(mid) <= budget:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _latency_count(
        self,
        program: Program,
        gm: fx.GraphModule,
        dep: ChannelDependencyGraph,
        candidates: list[ChannelGroup],
        units: _RoundingUnits,
        table: LatencyTable,
        predict: _LatencyModel,
        not_ranked: dict[str, int],
    ) -> int:
        """How many candidates the latency budget removes (``not_ranked`` as for
        :meth:`_bisect`). Where the table can time whole
        graphs, the prediction is calibrated on them: the dense graph, and *probes*, the
        graph pruned as the prediction so far says (first the layers alone, then the
        calibrated model), until the answer is a graph already measured or
        :data:`_PROBES` probes were timed; the final bisection uses every measurement."""
        full = {cls.id: cls.size for cls in dep.classes}

        def answer() -> tuple[int, list[ChannelGroup]]:
            budget = self.latency * predict(full)
            try:
                count = self._bisect(
                    dep, candidates, predict, budget, units, self.latency, "latency", not_ranked
                )
            except PassError:
                if not table.can_time_graphs or predict.calibration:
                    raise
                count = len(candidates)  # the layers alone cannot: probe removing all it can
            chosen = self._select(dep, candidates, count)
            return count, units.rounded(chosen, candidates, self._floor)

        count, chosen = answer()
        if not table.can_time_graphs:
            return count
        measured: dict[frozenset[int], tuple[dict[int, int], float]] = {}
        probes: list[int] = []
        while len(probes) < _PROBES and frozenset(g.id for g in chosen) not in measured:
            # the dense graph with every probe: the anchor that cancels load changes
            todo = {frozenset(): [], frozenset(g.id for g in chosen): chosen}
            points = self._whole_graph_points(program, gm, dep, list(todo.values()), table)
            measured.update(zip(todo, points, strict=True))
            probes.append(len(chosen))
            predict.calibrate(list(measured.values()))
            count, chosen = answer()
        predict.calibration["probe_groups_removed"] = probes
        return count

    def _whole_graph_points(
        self,
        program: Program,
        gm: fx.GraphModule,
        dep: ChannelDependencyGraph,
        removals: list[list[ChannelGroup]],
        table: LatencyTable,
    ) -> list[tuple[dict[int, int], float]]:
        """The whole graph timed with each set of groups removed (slimmed like the result
        will be; [] the dense graph), together: (channel counts, seconds) each."""
        inputs = graph_inputs(program.example_inputs, program.dynamic_batch, self.batch)
        points = []
        for groups in removals:
            slimmed = gm
            if groups:
                slimmed = copy.deepcopy(gm)
                _slim(slimmed, dep, groups)
            points.append((class_sizes_after(dep, groups), slimmed))
        try:
            seconds = table.graph_seconds([(graph, inputs) for _, graph in points])
        except EdgefxError:
            raise
        except Exception as exc:
            raise PassError(
                f"timing the whole {program.name} on backend {self.backend!r} for the latency "
                f"model failed: {first_line(exc)}",
                hint="time on another backend=, or pass measure= (a cost model) alone",
            ) from exc
        assert seconds is not None
        return [(left, t) for (left, _), t in zip(points, seconds, strict=True)]

    def _latency_table(self) -> LatencyTable:
        if self.measure is not None:
            return LatencyTable(self.measure, graph_timer=self.measure_graph)
        timer = timer_for(self.backend, self.threads)
        return LatencyTable(timer, default_cache(self.backend, timer.threads))


def _scores(dep: ChannelDependencyGraph, importance: Importance) -> dict[int, tuple[float, str]]:
    """(score, what ranked it) per removable group id; groups nothing ranks are left out."""
    if callable(importance):
        scores = {}
        for group in dep.prunable_groups():
            value = importance(group)
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise PassError(
                        f"the importance function returned a tensor of shape "
                        f"{tuple(value.shape)} for channel group {group.id} "
                        f"({_group_modules(dep, group)}); it must return one number",
                        hint="score a whole group, e.g. lambda group: float(...)",
                    )
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PassError(
                    f"the importance function returned {type(value).__name__} for channel "
                    f"group {group.id} ({_group_modules(dep, group)}); it must return a number",
                    hint="score a whole group, e.g. lambda group: float(...)",
                )
            if not math.isfinite(value):
                raise PassError(
                    f"the importance function returned {value} for channel group {group.id} "
                    f"({_group_modules(dep, group)})",
                    hint="scores must be finite numbers",
                )
            scores[group.id] = (float(value), "callable")
        return scores
    per_channel: dict[str, dict[tuple[int, int], list[float]]] = {}
    if importance in ("bn", "auto"):
        per_channel["bn"] = _norm_values(dep.norms)
    if importance == "norm":
        per_channel["norm"] = _norm_values(dep.layer_norms)
    if importance in ("l1", "l2", "auto"):
        p = 1 if importance == "l1" else 2
        per_channel["l1" if p == 1 else "l2"] = _magnitudes(dep, p)
    scores = {}
    for group in dep.prunable_groups():
        for method, values in per_channel.items():  # "bn" first: auto prefers BatchNorm
            found = [v for ch in group.channels for v in values.get(ch, ())]
            if found:
                scores[group.id] = (sum(found) / len(found), method)
                break
    return scores


def _interleave(candidates: list[ChannelGroup]) -> None:
    """Reorder ``candidates`` (least important first) so that every set of coupled classes
    (the groups with channels in the same classes) loses the same fraction of its groups as
    removal goes on: each group is keyed by its rank within its set over the set's size (the
    sort is stable: equal keys keep the importance order)."""
    by_set: dict[tuple[int, ...], list[ChannelGroup]] = defaultdict(list)
    for group in candidates:
        by_set[tuple(sorted({c for c, _ in group.channels}))].append(group)
    key = {
        group.id: (rank + 1) / len(groups)
        for groups in by_set.values()
        for rank, group in enumerate(groups)
    }
    candidates.sort(key=lambda g: key[g.id])


def _norm_values(norms: Sequence[Any]) -> dict[tuple[int, int], list[float]]:
    values: dict[tuple[int, int], list[float]] = defaultdict(list)
    for norm in norms:
        for i, value in enumerate(norm.gamma.tolist()):
            values[(norm.class_id, i)].append(value)
    return values


def _magnitudes(dep: ChannelDependencyGraph, p: int) -> dict[tuple[int, int], list[float]]:
    """Per channel: the p-norm of each producing layer's weights for it over that layer's
    mean, so a channel scores ~1 in a layer of equal channels whatever the layer's scale."""
    values: dict[tuple[int, int], list[float]] = defaultdict(list)
    for member in dep.weights:
        weight = member.weight.float().movedim(member.dim, 0).flatten(1)
        norms = weight.norm(p=p, dim=1)
        norms = norms / norms.mean().clamp_min(1e-12)
        for i, value in enumerate(norms.tolist()):
            values[(member.class_id, i)].append(value)
    return values


def _group_modules(dep: ChannelDependencyGraph, group: ChannelGroup) -> str:
    modules = [
        m for c in dict.fromkeys(c for c, _ in group.channels) for m in dep.classes[c].modules
    ]
    return ", ".join(dict.fromkeys(m for m in modules if m)) or "no module"


class _RoundingUnits:
    """Where kept channel counts can be rounded to multiples of ``n``: a set of classes whose
    channels only ever go in groups of one shape (the same channel count in each of the same
    classes), so removing k more groups removes k from each; one such set is a *unit*."""

    def __init__(self, dep: ChannelDependencyGraph, n: int) -> None:
        self.n = n
        self.unit_of: dict[int, tuple] = {}  # group id -> its unit's signature
        self.size: dict[tuple, int] = {}  # signature -> groups in the unit
        if n <= 1:
            return
        signature_of: dict[int, tuple] = {}
        classes_of: dict[tuple, set[int]] = defaultdict(set)
        signatures_per_class: dict[int, set[tuple]] = defaultdict(set)
        for group in dep.groups:
            per_class: dict[int, int] = defaultdict(int)
            for cls_id, _ in group.channels:
                per_class[cls_id] += 1
            signature = tuple(sorted(per_class.items()))
            signature_of[group.id] = signature
            for cls_id in per_class:
                signatures_per_class[cls_id].add(signature)
            classes_of[signature].add(group.id)
        for signature, groups in classes_of.items():
            shared = any(len(signatures_per_class[c]) > 1 for c, _ in signature)
            if not shared and len(groups) >= 2 * n:
                self.size[signature] = len(groups)
                for gid in groups:
                    self.unit_of[gid] = signature

    def rounded(
        self,
        chosen: list[ChannelGroup],
        candidates: list[ChannelGroup],
        floor: Callable[[int], int],
    ) -> list[ChannelGroup]:
        """``chosen`` plus, in every unit, the next least important candidates of that unit
        until its kept count is a multiple of ``n`` (never below ``n`` or the floor)."""
        if self.n <= 1 or not chosen:
            return chosen
        removed_in: dict[tuple, int] = defaultdict(int)
        taken = {g.id for g in chosen}
        for group in chosen:
            if group.id in self.unit_of:
                removed_in[self.unit_of[group.id]] += 1
        extra: dict[tuple, int] = {}
        for signature, removed in removed_in.items():
            size = self.size[signature]
            kept = size - removed
            target = kept - kept % self.n
            # class c holds k channels of each of the unit's groups: its floor in groups
            smallest = max(self.n, *(math.ceil(floor(k * size) / k) for _, k in signature))
            if target < smallest:
                target = kept  # rounding down would go below the floor: leave it
            if target < kept:
                extra[signature] = kept - target
        if not extra:
            return chosen
        result = list(chosen)
        for group in candidates:
            signature = self.unit_of.get(group.id)
            if signature in extra and extra[signature] > 0 and group.id not in taken:
                result.append(group)
                extra[signature] -= 1
        return result


class _MacsModel:
    """MACs of the graph for given channel counts per class, from the measured per-node MACs:
    a convolution or linear layer scales with its kept output channels times its kept input
    channels per group; other ops keep their MACs."""

    def __init__(self, gm: fx.GraphModule, dep: ChannelDependencyGraph, base: dict[str, int]):
        self.total = sum(base.values())
        self.terms: list[tuple[int, int | None, int | None]] = []  # (macs, out class, in class)
        self.fixed = 0
        self.term_of: dict[str, tuple[int | None, int | None]] = {}  # node -> its classes
        for node in gm.graph.nodes:
            macs = base.get(node.name, 0)
            if not macs:
                continue
            count = len(self.terms)
            out_axis = dep.axis_of(node)
            in_axis = dep.axis_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            if node.target in CONVS or node.target is aten.convolution.default:
                depthwise = (
                    _groups(node) > 1 and in_axis is not None and (in_axis.size == _groups(node))
                )
                out_id = dep.class_of(out_axis).id if out_axis else None
                in_id = dep.class_of(in_axis).id if in_axis and not depthwise else None
                self.terms.append((macs, out_id, in_id))
            elif node.target is aten.scaled_dot_product_attention.default and out_axis:
                self.terms.append((macs, dep.class_of(out_axis).id, None))  # per head
            elif node.target in (aten.matmul.default, aten.bmm.default) and not _is_constant(
                node.args[1]
            ):
                # attention written out: scores or scores @ v, per head (the output's class)
                self.terms.append((macs, dep.class_of(out_axis).id if out_axis else None, None))
            elif node.target in (aten.linear.default, aten.mm.default, aten.matmul.default):
                out_id = dep.class_of(out_axis).id if out_axis else None
                in_id = dep.class_of(in_axis).id if in_axis else None
                self.terms.append((macs, out_id, in_id))
            else:
                self.fixed += macs
            if len(self.terms) > count:
                self.term_of[node.name] = self.terms[-1][1:]
        self.size = {cls.id: cls.size for cls in dep.classes}

    def __call__(self, left: dict[int, int]) -> int:
        total = float(self.fixed)
        for macs, out_id, in_id in self.terms:
            scale = 1.0
            for cls_id in (out_id, in_id):
                if cls_id is not None:
                    scale *= left[cls_id] / self.size[cls_id]
            total += macs * scale
        return round(total)


class _LatencyModel:
    """Predicted seconds of the graph at given channel counts per class (the model of
    :mod:`edgefx.analysis.latency`): the run overhead; every conv2d and linear layer with a
    constant weight looked up in the latency table at its kept input and output channels,
    less the run overhead its one-op measurement included; other ops with MACs (attention,
    products of computed tensors) scaled like the MACs model and converted at the timed
    layers' dense seconds per MAC; and the ops without MACs, a fixed part plus the bytes
    they read and write, each tensor scaled by its class's kept fraction, with the two
    constants fitted by :meth:`calibrate` to whole-graph measurements (zero without any)."""

    def __init__(
        self,
        gm: fx.GraphModule,
        dep: ChannelDependencyGraph,
        base: dict[str, int],
        table: LatencyTable,
        batch: int,
    ) -> None:
        self.table = table
        self.size = {cls.id: cls.size for cls in dep.classes}
        self.layers: list[tuple[LayerShape, int | None, int | None]] = []
        untimed: list[tuple[int, int | None, int | None]] = []
        timed_macs = 0
        macs_model = _MacsModel(gm, dep, base)
        # bytes the ops without MACs read and write, per channel class (None: fixed)
        self.moved: dict[int | None, int] = defaultdict(int)
        constant_class = {
            axis.node: dep.class_of(axis).id for axis in dep.graph.nodes if axis.constant
        }
        for node in gm.graph.nodes:
            macs = base.get(node.name, 0)
            shape = _layer_shape(node, batch) if macs else None
            term = macs_model.term_of.get(node.name, (None, None))
            if shape is not None:
                self.layers.append((shape, *term))
                timed_macs += macs
            elif macs:
                untimed.append((macs, *term))
            else:
                for source, size in traffic(node, batch):
                    self.moved[_class_of_value(dep, source, constant_class)] += size
        self.timed = len(self.layers)
        self.untimed = untimed
        self.run_overhead = table.overhead()
        full = dict(self.size)
        dense_layers = sum(self._layer(shape, o, i, full) for shape, o, i in self.layers)
        self.seconds_per_mac = dense_layers / timed_macs if timed_macs else 0.0
        self.knots: list[tuple[float, float]] = []  # (bytes moved, residual seconds)
        self.calibration: dict[str, Any] = {}

    def _layer(
        self, shape: LayerShape, out_id: int | None, in_id: int | None, left: dict[int, int]
    ) -> float:
        out = left[out_id] if out_id is not None else shape.out_channels
        if shape.depthwise:  # its inputs follow its outputs (channel multiplier m)
            multiplier = shape.out_channels // shape.in_channels
            seconds = self.table(shape.with_channels(out // multiplier, out))
        else:
            inp = left[in_id] if in_id is not None else shape.in_channels
            seconds = self.table(shape.with_channels(inp, out))
        return max(0.0, seconds - self.run_overhead)

    def moved_bytes(self, left: dict[int, int]) -> float:
        """Bytes the ops without MACs read and write at these channel counts."""
        return sum(
            size * (left[cls_id] / self.size[cls_id] if cls_id is not None else 1.0)
            for cls_id, size in self.moved.items()
        )

    def with_macs(self, left: dict[int, int]) -> float:
        """Seconds of the run overhead, the layers and the other ops with MACs."""
        total = self.run_overhead + sum(
            self._layer(shape, o, i, left) for shape, o, i in self.layers
        )
        for macs, out_id, in_id in self.untimed:
            scale = 1.0
            for cls_id in (out_id, in_id):
                if cls_id is not None:
                    scale *= left[cls_id] / self.size[cls_id]
            total += macs * scale * self.seconds_per_mac
        return total

    def __call__(self, left: dict[int, int]) -> float:
        total = self.with_macs(left) + self.residual(self.moved_bytes(left))
        return max(total, self.run_overhead)  # no run is faster than an empty one

    def calibrate(self, points: list[tuple[dict[int, int], float]]) -> None:
        """Fit the residual to measured whole graphs: ``points`` are (channel counts,
        seconds), the dense graph first. The residual r = measured - :meth:`with_macs` at
        each point is the time of the ops without MACs plus whatever the layers take inside
        the graph beyond their solo timings (caches, fusion). Between measured points it is
        linear in the bytes the ops without MACs move (r = a + s x bytes through the two
        nearest; beyond them, the nearest segment continued), so the prediction equals every
        measurement; a segment's s may come out negative (the layers alone predict too fast
        a pruned graph). One point: r = s x bytes (r = a when r is negative)."""
        if not points:
            return
        residuals = [(t - self.with_macs(left), self.moved_bytes(left)) for left, t in points]
        knots: dict[float, float] = {}
        for r, size in residuals:
            knots.setdefault(size, r)  # the first measurement of a size (the dense graph's)
        self.knots = sorted((size, r) for size, r in knots.items())
        if len(self.knots) == 1:
            ((size, r),) = self.knots
            # a single point through the origin (all per byte), or a constant when negative
            self.knots = [(0.0, 0.0), (size, r)] if r > 0 and size else [(0.0, r), (1.0, r)]
        self.calibration = {
            "measured_ms": [seconds * 1e3 for _, seconds in points],
            "residual_ms": [r * 1e3 for r, _ in residuals],
            "non_mac_mb": [size / 2**20 for _, size in residuals],
        }

    def residual(self, size: float) -> float:
        """The residual at ``size`` bytes moved: interpolated between the knots; below the
        smallest, its segment continued where it falls with the bytes (a negative slope
        there, from noise or the layers' own error, would grow without bound: held flat),
        never below min(0, the knot's residual)."""
        if not self.knots:
            return 0.0
        sizes = [k for k, _ in self.knots]
        index = min(max(bisect.bisect_left(sizes, size), 1), len(self.knots) - 1)
        (b1, r1), (b2, r2) = self.knots[index - 1], self.knots[index]
        slope = (r2 - r1) / (b2 - b1)
        if size >= b1:
            return r1 + slope * (size - b1)
        return max(r1 + max(slope, 0.0) * (size - b1), min(0.0, r1))

    def breakdown(self) -> dict[str, Any]:
        """The dense prediction's parts and the calibration, for the report (ms)."""
        full = dict(self.size)
        residual = self.residual(self.moved_bytes(full))
        return {
            "predicted_parts_ms": {
                "overhead": self.run_overhead * 1e3,
                "layers_and_mac_ops": (self.with_macs(full) - self.run_overhead) * 1e3,
                "residual": residual * 1e3,
            },
            "calibration": self.calibration or None,
        }


def _class_of_value(
    dep: ChannelDependencyGraph, node: fx.Node, constant_class: dict[str, int]
) -> int | None:
    """The channel class of ``node``'s output: its axis's, or for a constant seen through
    views (a class token expanded to the batch) the constant's; None: its size is fixed."""
    axis = dep.axis_of(node)
    if axis is not None:
        return dep.class_of(axis).id
    while node.op == "call_function" and node.target in FREE_OPS and node.args:
        if not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return constant_class.get(node.name) if node.op == "get_attr" else None


def _layer_shape(node: fx.Node, batch: int) -> LayerShape | None:
    """The conv2d / linear layer ``node`` computes, with a dynamic batch set to ``batch``;
    None for anything else (timed by MACs instead)."""
    if node.op != "call_function" or not node.args or not _is_constant(node.args[1]):
        return None
    x, weight = node.args[0].meta.get("val"), node.args[1].meta.get("val")
    if x is None or weight is None:
        return None
    dims = [concrete(d, batch) for d in x.shape]
    bias = len(node.args) > 2 and node.args[2] is not None
    if node.target is aten.linear.default and weight.dim() == 2:
        return LayerShape(
            "linear",
            int(weight.shape[1]),
            int(weight.shape[0]),
            rows=math.prod(dims[:-1]),
            bias=bias,
        )
    if node.target is aten.conv2d.default:
        stride, padding, dilation, groups = (
            _arg_or(node, i, default) for i, default in ((3, 1), (4, 0), (5, 1), (6, 1))
        )
    elif node.target is aten.convolution.default and not node.args[6]:
        stride, padding, dilation, groups = (node.args[i] for i in (3, 4, 5, 8))
    else:
        return None
    if x.dim() != 4 or isinstance(padding, str):
        return None
    return LayerShape(
        "conv2d",
        int(dims[1]),
        int(weight.shape[0]),
        batch=dims[0],
        size=(dims[2], dims[3]),
        kernel=(int(weight.shape[2]), int(weight.shape[3])),
        stride=_pair(stride),
        padding=_pair(padding),
        dilation=_pair(dilation),
        groups=int(groups),
        bias=bias,
    )


def _arg_or(node: fx.Node, index: int, default: Any) -> Any:
    names = {3: "stride", 4: "padding", 5: "dilation", 6: "groups"}
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(names[index], default)


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    values = [int(v) for v in value]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _check_latency(
    latency: object,
    backend: object,
    measure: object,
    measure_graph: object,
    batch: object,
    threads: object,
) -> None:
    if not (isinstance(latency, (int, float)) and 0 < latency <= 1):
        raise PassError(
            f"latency must be a fraction of the predicted latency in (0, 1], got {latency!r}",
            hint="ChannelPrune(latency=0.5) keeps at most half of it",
        )
    for name, value in (("batch", batch), ("threads", threads)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise PassError(f"{name} must be an integer >= 1, got {value!r}")
    if measure_graph is not None and (measure is None or not callable(measure_graph)):
        raise PassError(
            f"measure_graph must be a function (GraphModule, inputs) -> seconds given "
            f"together with measure=, got {measure_graph!r}"
            + ("" if measure is not None else " without measure="),
            hint="a backend= times the whole graph itself",
        )
    if measure is not None:
        if not callable(measure):
            raise PassError(
                f"measure must be a function (LayerShape) -> seconds, got {measure!r}",
                hint="or leave it out and name a backend: backend='onnx'",
            )
        return
    if backend not in TIMERS:
        raise PassError(
            f"no per-layer latency table for backend {backend!r}",
            hint=f"backend= is one of {', '.join(map(repr, TIMERS))}, or pass "
            "measure=(LayerShape) -> seconds",
        )
    try:
        check_runtime(backend)
    except EdgefxError as exc:
        raise PassError(f"a latency budget: {exc.message}", hint=exc.hint) from exc.__cause__


def _is_constant(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _groups(node: fx.Node) -> int:
    if node.target is aten.convolution.default:
        return int(node.args[8])
    return int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))


def _layer_report(
    dep: ChannelDependencyGraph, left: dict[int, int], scores: dict[int, tuple[float, str]]
) -> list[dict[str, Any]]:
    ranked: dict[int, set[str]] = defaultdict(set)
    for group in dep.groups:
        if group.id in scores:
            for cls_id, _ in group.channels:
                ranked[cls_id].add(scores[group.id][1])
    rows = []
    for cls in dep.classes:
        if left[cls.id] != cls.size and cls.modules:
            rows.append(
                {
                    "modules": cls.modules[:4],
                    "channels": cls.size,
                    "kept": left[cls.id],
                    "ranked_by": sorted(ranked[cls.id]),
                }
            )
    return rows


def _fixed_report(dep: ChannelDependencyGraph) -> list[dict[str, Any]]:
    """The layers whose channels cannot be removed, with the first reason (no silent
    no-ops: a Swin V2 attention block whose heads stay is listed here)."""
    return [
        {"modules": cls.modules[:4], "channels": cls.size, "reason": cls.fixed[0]}
        for cls in dep.classes
        if cls.fixed and cls.modules
    ]


# ---------------------------------------------------------------------- bias compensation
_ELEMENTWISE = ACTIVATIONS | COPIES


def _compensation(
    gm: fx.GraphModule, dep: ChannelDependencyGraph, removed: list[ChannelGroup]
) -> list[tuple[fx.Node, torch.Tensor]]:
    """What the removed BatchNorm-scaled channels still feed forward, per conv / linear layer
    reading them (see ChannelPrune's ``compensate``), computed with the unslimmed weights and
    cut to the layer's kept outputs: (layer, amount to add to its bias)."""
    gone: dict[int, list[int]] = defaultdict(list)
    for group in removed:
        for cls_id, index in group.channels:
            gone[cls_id].append(index)
    nodes = {n.name: n for n in gm.graph.nodes}
    folds = []
    for norm in dep.norms:
        if norm.class_id not in gone:
            continue
        bn = nodes[norm.node]
        beta = bn.args[2]
        if not (isinstance(beta, fx.Node) and beta.op == "get_attr"):
            continue
        index = torch.tensor(sorted(gone[norm.class_id]))
        mean_output = _get_constant(gm, beta.target).detach().index_select(0, index)
        for consumer, chain in _consumers(bn):
            value = mean_output
            for op in chain:  # the activations between, applied to the constant
                value = op.target(value, *op.args[1:], **op.kwargs)
            if not bool(value.abs().max() > 0):
                continue
            weight = _get_constant(gm, consumer.args[1].target).detach()
            if consumer.target is aten.linear.default:
                delta = weight.index_select(1, index) @ value
            else:
                delta = weight.index_select(1, index).flatten(2).sum(2) @ value
            out = dep.axis_of(consumer)
            cut = sorted(gone.get(dep.class_of(out).id, ())) if out is not None else []
            if cut:
                delta = delta[[i for i in range(len(delta)) if i not in set(cut)]]
            folds.append((consumer, delta))
    return folds


def _consumers(bn: fx.Node) -> list[tuple[fx.Node, list[fx.Node]]]:
    """(conv or linear reading ``bn``'s output as its input, elementwise ops in between),
    following only single chains of elementwise ops; anything else is left alone."""
    out = bn
    if bn.target is not aten.batch_norm.default:  # the _native_ variants: item 0
        items = [u for u in bn.users if u.target is operator.getitem and u.args[1] == 0]
        if len(items) != 1:
            return []
        out = items[0]
    found = []
    stack = [(out, [])]
    while stack:
        node, chain = stack.pop()
        for user in node.users:
            if user.target in _ELEMENTWISE and user.args[0] is node:
                stack.append((user, [*chain, user]))
            elif _reads_channels(user, node):
                found.append((user, chain))
    return found


def _reads_channels(layer: fx.Node, value: fx.Node) -> bool:
    """``layer`` is a conv (one group) or a linear layer over ``value``'s channel dim, with a
    constant weight."""
    if not (layer.args and layer.args[0] is value and len(layer.args) > 1):
        return False
    weight = layer.args[1]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return False
    if layer.target is aten.linear.default:
        return value.meta["val"].dim() == 2  # (batch, channels)
    return layer.target in CONVS and _groups(layer) == 1


def _get_constant(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner_path, _, leaf = target.rpartition(".")
    return getattr(gm.get_submodule(owner_path) if owner_path else gm, leaf)


def _add_to_bias(gm: fx.GraphModule, layer: fx.Node, delta: torch.Tensor) -> None:
    bias = layer.args[2] if len(layer.args) > 2 else layer.kwargs.get("bias")
    if isinstance(bias, fx.Node) and bias.op == "get_attr":
        with torch.no_grad():
            _get_constant(gm, bias.target).add_(delta.to(_get_constant(gm, bias.target).dtype))
        return
    # no bias yet: one next to the weight
    owner_path, _, _ = layer.args[1].target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    leaf = "bias" if not hasattr(owner, "bias") else f"bias_{layer.name}"
    owner.register_parameter(leaf, torch.nn.Parameter(delta.clone(), requires_grad=False))
    target = f"{owner_path}.{leaf}" if owner_path else leaf
    with gm.graph.inserting_before(layer):
        node = gm.graph.get_attr(target)
    node.meta["val"] = delta
    args = list(layer.args)
    while len(args) < 3:
        args.append(None)
    args[2] = node
    layer.args = tuple(args)


# ---------------------------------------------------------------------- physical slimming
def _slim(gm: fx.GraphModule, dep: ChannelDependencyGraph, removed: list[ChannelGroup]) -> None:
    """Cut the removed channels out of every constant and fix every size argument."""
    gone: dict[int, set[int]] = defaultdict(set)
    for group in removed:
        for cls_id, index in group.channels:
            gone[cls_id].add(index)
    keep = {
        cls.id: torch.tensor([i for i in range(cls.size) if i not in gone[cls.id]])
        for cls in dep.classes
        if gone.get(cls.id)
    }

    def kept(axis: Any) -> torch.Tensor | None:
        return keep.get(dep.class_of(axis).id) if axis is not None else None

    # constants: every axis of every constant in a class that lost channels
    cuts: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for cls in dep.classes:
        if cls.id in keep:
            for axis in cls.axes:
                if axis.constant:
                    cuts[axis.node][axis.dim] = keep[cls.id]
    for target, dims in cuts.items():
        _replace_constant(gm, target, dims)

    # size arguments of the ops whose channel counts changed
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        out = dep.axis_of(node)
        if node.target in _RESHAPES or node.target is aten.expand.default:
            if out is not None and (index := kept(out)) is not None:
                shape = list(node.args[1])
                for dim, size in _part_sizes(out, index):
                    if shape[dim] != -1:
                        shape[dim] = size
                node.args = (node.args[0], shape, *node.args[2:])
        elif node.target is aten.layer_norm.default:
            if out is not None and (index := kept(out)) is not None:
                node.args = (node.args[0], [len(index)], *node.args[2:])
        elif node.target in CONVS or node.target is aten.convolution.default:
            source = dep.axis_of(node.args[0])
            groups = _groups(node)
            if groups > 1 and source is not None and source.size == groups:
                index = kept(source)
                if index is not None:
                    _set_groups(node, len(index))
        elif node.target in _SPLITS:
            source = dep.axis_of(node.args[0])
            index = kept(source)
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            rank = node.args[0].meta["val"].dim()
            if index is not None and dim % rank == source.dim:
                sizes = [int(v.shape[source.dim]) for v in node.meta["val"]]
                bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
                new_sizes = [int(((index >= lo) & (index < hi)).sum()) for lo, hi in _pairs(bounds)]
                node.target = aten.split_with_sizes.default
                node.args = (node.args[0], new_sizes, source.dim)
                node.kwargs = {}
    gm.recompile()


def _part_sizes(axis: Any, index: torch.Tensor) -> list[tuple[int, int]]:
    """(dim, kept size) of every dim ``axis`` occupies once only ``index`` is kept: heads x
    head dim keep whole heads, so the kept channels are a block of whole slices."""
    if not axis.sub:
        return [(axis.dim, len(index))]
    sizes = [size for _, size in axis.sub]
    coords = torch.stack(torch.unravel_index(index, sizes))
    kept = [int(row.unique().numel()) for row in coords]
    if math.prod(kept) != len(index):
        raise PassError(f"channels kept at {axis} are not whole heads (internal error)")
    return [(dim, n) for (dim, _), n in zip(axis.sub, kept, strict=True)]


def _pairs(bounds: list[int]) -> list[tuple[int, int]]:
    return list(itertools.pairwise(bounds))


def _set_groups(node: fx.Node, groups: int) -> None:
    index = 8 if node.target is aten.convolution.default else 6
    if len(node.args) > index:
        node.args = (*node.args[:index], groups, *node.args[index + 1 :])
    else:
        node.kwargs = {**node.kwargs, "groups": groups}


def _replace_constant(gm: fx.GraphModule, target: str, dims: dict[int, torch.Tensor]) -> None:
    owner_path, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, leaf)
    new = old.detach()
    for dim, index in sorted(dims.items()):
        new = new.index_select(dim, index)
    new = new.contiguous()
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(new, requires_grad=old.requires_grad)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = new
    else:
        setattr(owner, leaf, new)
    for node in gm.graph.find_nodes(op="get_attr", target=target):
        node.meta["val"] = new
