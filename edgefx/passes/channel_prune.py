"""ChannelPrune: remove the channels BatchNorm scaling factors rank least important.

Network Slimming / AdaPruner: a channel's importance is |gamma| of the BatchNorm that scales
it; coupled channels (a residual add, a concat, a depthwise conv, a flatten into a linear
layer; see :mod:`edgefx.analysis.depgraph`) are removed together, ranked by the mean |gamma|
over their BatchNorms. One global threshold decides: with ``macs=f`` it is found by bisection
as the lowest threshold whose pruned network needs at most ``f`` of the original MACs; with
``threshold=t`` it is given. Then the layers are physically slimmed: conv, linear and
BatchNorm weights lose the removed rows/columns, depthwise convs their groups, and reshapes,
splits and layer norms their sizes.

Lossy in general (fine-tune afterwards); exact when the removed channels carry nothing
(|gamma| = 0 with beta = 0 before a ReLU). Run it before FoldBatchNorm, which removes the
BatchNorms it reads.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from edgefx.analysis.depgraph import ChannelDependencyGraph, ChannelGroup
from edgefx.errors import PassError
from edgefx.passes.base import Pass
from edgefx.passes.rewrite import check_module_paths, remove_dead_code, under
from edgefx.program import Program

aten = torch.ops.aten
_RESHAPES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
_GROUPED = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}


class ChannelPrune(Pass):
    """Remove BatchNorm-ranked channel groups down to a MACs budget or below a threshold.

    Args:
        macs: fraction of the original MACs to keep, in (0, 1] (e.g. 0.5 halves them).
        threshold: alternatively, remove every group whose mean |gamma| is below this.
        min_keep: every channel class keeps at least this fraction of its channels (and at
            least one), so no layer disappears.
        exclude: module paths (prefixes) whose channels are never removed, e.g. ``["fc"]``.
    """

    name = "ChannelPrune"

    def __init__(
        self,
        macs: float | None = None,
        *,
        threshold: float | None = None,
        min_keep: float = 0.1,
        exclude: Sequence[str] = (),
    ) -> None:
        if (macs is None) == (threshold is None):
            raise PassError(
                "ChannelPrune needs exactly one of macs= or threshold=",
                hint="e.g. ChannelPrune(macs=0.5) keeps at most half of the MACs",
            )
        if macs is not None and not (isinstance(macs, (int, float)) and 0 < macs <= 1):
            raise PassError(
                f"macs must be a fraction of the original MACs in (0, 1], got {macs!r}",
                hint="ChannelPrune(macs=0.5) keeps at most half of them",
            )
        if threshold is not None and not (isinstance(threshold, (int, float)) and threshold >= 0):
            raise PassError(f"threshold must be a number >= 0, got {threshold!r}")
        if not (isinstance(min_keep, (int, float)) and 0 <= min_keep <= 1):
            raise PassError(f"min_keep must be a fraction in [0, 1], got {min_keep!r}")
        check_module_paths("exclude", exclude, example='["fc", "layer4"]')
        self.macs = macs
        self.threshold = threshold
        self.min_keep = min_keep
        self.exclude = tuple(exclude)

    # ------------------------------------------------------------------ the pass
    def run(self, program: Program) -> tuple[Program, dict[str, Any]]:
        gm = program.copy_graph()
        dep = ChannelDependencyGraph(gm)
        candidates, skipped = self._candidates(dep)
        cost = program.cost()
        base = {c.node: c.macs for c in cost.nodes}
        estimate = _MacsModel(gm, dep, base)

        if self.macs is not None:
            budget = self.macs * cost.total_macs
            if not candidates and cost.total_macs > budget:
                why = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
                raise PassError(
                    f"ChannelPrune cannot remove any channel of {program.name} ({why})",
                    hint="ChannelPrune ranks channels by BatchNorm scaling factors; a model "
                    "without BatchNorm (or with every BatchNorm fixed) cannot be pruned by it",
                )
            count = self._bisect(dep, candidates, estimate, budget)
        else:
            count = sum(g.importance < self.threshold for g in candidates)
        removed = self._select(dep, candidates, count)
        threshold = candidates[count - 1].importance if count else None

        left = {cls.id: cls.size for cls in dep.classes}
        for group in removed:
            for cls_id, _ in group.channels:
                left[cls_id] -= 1
        report: dict[str, Any] = {
            "target_macs": self.macs,
            "threshold": threshold if self.threshold is None else self.threshold,
            "groups_removed": len(removed),
            "channels_removed": sum(len(g.channels) for g in removed),
            "estimated_macs": estimate(left),
            "layers": _layer_report(dep, left),
            "dependency_graph": dep.summary(),
            "not_ranked": skipped,
        }
        if removed:
            _slim(gm, dep, removed)
            remove_dead_code(gm)
            new = program.with_graph(gm, repr(self)).refreshed()
        else:
            new = program.with_graph(gm, repr(self))
        return new, report

    def _candidates(self, dep: ChannelDependencyGraph) -> tuple[list[ChannelGroup], dict]:
        """Removable groups, least important first; and counts of those that are not."""
        skipped: dict[str, int] = defaultdict(int)
        excluded = {
            cls.id
            for cls in dep.classes
            if any(under(m, p) for m in cls.modules for p in self.exclude)
        }
        candidates = []
        for group in dep.groups:
            if group.fixed is not None:
                skipped["fixed: " + group.fixed.split(" (")[0]] += 1
            elif group.importance is None:
                skipped["no BatchNorm ranks them"] += 1
            elif any(c in excluded for c, _ in group.channels):
                skipped["excluded"] += 1
            else:
                candidates.append(group)
        candidates.sort(key=lambda g: (g.importance, g.id))
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
        estimate: _MacsModel,
        budget: float,
    ) -> int:
        """The fewest least-important candidates whose removal meets ``budget``."""

        def macs_after(count: int) -> int:
            left = {cls.id: cls.size for cls in dep.classes}
            for group in self._select(dep, candidates, count):
                for cls_id, _ in group.channels:
                    left[cls_id] -= 1
            return estimate(left)

        lo, hi = 0, len(candidates)
        if macs_after(hi) > budget:
            reachable = macs_after(hi) / max(estimate.total, 1)
            raise PassError(
                f"ChannelPrune cannot reach {self.macs:.3g} of the MACs: removing every "
                f"removable channel (min_keep={self.min_keep}) leaves {reachable:.3g}",
                hint="ask for a larger macs=, lower min_keep, or exclude fewer modules",
            )
        while lo < hi:
            mid = (lo + hi) // 2
            if macs_after(mid) <= budget:
                hi = mid
            else:
                lo = mid + 1
        return lo


class _MacsModel:
    """MACs of the graph for given channel counts per class, from the measured per-node MACs:
    a convolution or linear layer scales with its kept output channels times its kept input
    channels per group; other ops keep their MACs."""

    def __init__(self, gm: fx.GraphModule, dep: ChannelDependencyGraph, base: dict[str, int]):
        self.total = sum(base.values())
        self.terms: list[tuple[int, int | None, int | None]] = []  # (macs, out class, in class)
        self.fixed = 0
        for node in gm.graph.nodes:
            macs = base.get(node.name, 0)
            if not macs:
                continue
            out_axis = dep.axis_of(node)
            in_axis = dep.axis_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            if node.target in _GROUPED or node.target is aten.convolution.default:
                depthwise = (
                    _groups(node) > 1 and in_axis is not None and (in_axis.size == _groups(node))
                )
                out_id = dep.class_of(out_axis).id if out_axis else None
                in_id = dep.class_of(in_axis).id if in_axis and not depthwise else None
                self.terms.append((macs, out_id, in_id))
            elif node.target in (aten.linear.default, aten.mm.default, aten.matmul.default):
                out_id = dep.class_of(out_axis).id if out_axis else None
                in_id = dep.class_of(in_axis).id if in_axis else None
                self.terms.append((macs, out_id, in_id))
            else:
                self.fixed += macs
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


def _groups(node: fx.Node) -> int:
    if node.target is aten.convolution.default:
        return int(node.args[8])
    return int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))


def _layer_report(dep: ChannelDependencyGraph, left: dict[int, int]) -> list[dict[str, Any]]:
    rows = []
    for cls in dep.classes:
        if left[cls.id] != cls.size and cls.modules:
            rows.append({"modules": cls.modules[:4], "channels": cls.size, "kept": left[cls.id]})
    return rows


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
                if shape[out.dim] != -1:
                    shape[out.dim] = len(index)
                    node.args = (node.args[0], shape, *node.args[2:])
        elif node.target is aten.layer_norm.default:
            if out is not None and (index := kept(out)) is not None:
                node.args = (node.args[0], [len(index)], *node.args[2:])
        elif node.target in _GROUPED or node.target is aten.convolution.default:
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
