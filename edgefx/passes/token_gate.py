"""TokenGate: drop uninformative patch tokens inside a Vision Transformer (AS-ViT / EViT).

At a few blocks (default: like AS-ViT's 4th, 7th and 10th of 12, scaled to the depth) a gate
scores every patch token by the attention the CLS token pays to it, summed over heads with
head-importance weights, and keeps the best ones; the blocks after it run on fewer tokens.

    s_j = sum_h w_h * softmax(q_cls K_h^T * scale)[j],    w_h = |O_h| / sum_h' |O_h'|

The CLS row is recomputed from q_cls and K (O(N d) per head), so a fused
``scaled_dot_product_attention`` stays fused; an explicit-softmax attention gives its row for
free. O_h is head h's attention output (Frobenius norm per image). Without a CLS token the
mean attention over the queries is used (O(N^2 d) per head, recomputed; reported).

``mode="topk"``: each gate keeps a static number of patch tokens (``keep`` rate per gate, a
cumulative per-gate schedule, or found for a MACs budget), in their original order (the top-k
indices are sorted: a sort of k indices, not an argsort of all scores), prefix tokens (CLS,
distillation, registers) always kept; with ``fuse=True`` the dropped tokens are merged into
one extra token weighted by their scores (EViT). Shapes stay static, so the gated graph
exports to ONNX. No host synchronisation: no ``.item()``, no data-dependent shapes.

``mode="threshold"``: per-gate score thresholds; the number of kept tokens varies per image.
To keep every image's result independent of its batch mates while shapes stay static, a
dropped token is not removed: it is zeroed and masked out of every later attention with an
additive -inf bias (the fused attention takes the bias as its mask). This is exact per image
and exports with static shapes, but it saves no time: speed needs ``mode="topk"``.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from edgefx.analysis.cost import graph_cost
from edgefx.analysis.vit import (
    AttentionBlock,
    ViTStructure,
    analysis_batch,
    concrete_values,
    find_blocks,
    node_by_name,
    token_axes,
)
from edgefx.errors import PassError
from edgefx.passes.base import Pass
from edgefx.passes.fine_tune import FineTune
from edgefx.passes.rewrite import remove_dead_code
from edgefx.program import Program

aten = torch.ops.aten
_RESHAPES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
_AS_VIT_GATES = (4, 7, 10)  # AS-ViT gates after these blocks of a 12-block DeiT-S
_INT_MAX = 9223372036854775807


def default_gates(depth: int) -> list[int]:
    """AS-ViT's gates after blocks 4, 7 and 10 of 12 (1-based), scaled to ``depth``: 0-based
    block indices whose attention scores the tokens, deduplicated."""
    gates = sorted({min(depth - 1, max(0, round(depth * p / 12) - 1)) for p in _AS_VIT_GATES})
    return gates


# ----------------------------------------------------------------------------- gate kernels
def _scores(
    q: torch.Tensor,
    k: torch.Tensor,
    head_out: torch.Tensor,
    probs: torch.Tensor | None,
    *,
    scale: float,
    uses_cls: bool,
    prefix: int,
    alive: torch.Tensor | None = None,
) -> torch.Tensor:
    """(batch, patch tokens) scores: head-importance weighted CLS (or mean) attention.

    ``alive`` (threshold mode, (batch, tokens) bool): tokens dropped by earlier gates are
    masked out of the recomputed row, of the head norms and of the mean over queries, so the
    scores are those of the masked attention the block itself computes."""
    if probs is None:
        queries = q[:, :, :1, :] if uses_cls else q
        logits = torch.matmul(queries, k.transpose(-2, -1)) * scale
        if alive is not None:
            logits = logits + attention_bias(alive, logits.dtype)
        probs = torch.softmax(logits, dim=-1)
    if uses_cls:
        rows = probs[:, :, 0, :]
    elif alive is None:
        rows = probs.mean(2)
    else:
        live = alive[:, None, :, None].to(probs.dtype)
        rows = (probs * live).sum(2) / live.sum(2)
    if alive is not None:
        head_out = head_out * alive[:, None, :, None].to(head_out.dtype)
    norms = torch.linalg.vector_norm(head_out, dim=(2, 3))  # (batch, heads)
    weights = norms / norms.sum(-1, keepdim=True)
    scores = (rows * weights.unsqueeze(-1)).sum(1)  # (batch, tokens)
    return scores[:, prefix:]


def topk_gate(
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    head_out: torch.Tensor,
    probs: torch.Tensor | None,
    *,
    keep: int,
    prefix: int,
    scale: float,
    uses_cls: bool,
    fuse: bool,
) -> torch.Tensor:
    """Keep the prefix tokens and the ``keep`` best-scored patch tokens of ``x`` (batch,
    tokens, dim) in their original order; with ``fuse`` append the score-weighted mean of the
    dropped ones."""
    scores = _scores(q, k, head_out, probs, scale=scale, uses_cls=uses_cls, prefix=prefix)
    patches = x[:, prefix:]
    dim = x.shape[-1]
    best = torch.topk(scores, keep, dim=1).indices
    # original order: sort the k kept indices (ONNX TopK on k values, not an argsort of all)
    order = torch.topk(best, keep, dim=1, largest=False).values
    kept = torch.gather(patches, 1, order.unsqueeze(-1).expand(-1, -1, dim))
    parts = [x[:, :prefix], kept]
    dropped = patches.shape[1] - keep
    if fuse and dropped > 0:
        low = torch.topk(scores, dropped, dim=1, largest=False)
        rest = torch.gather(patches, 1, low.indices.unsqueeze(-1).expand(-1, -1, dim))
        weights = low.values / low.values.sum(1, keepdim=True)
        parts.append((rest * weights.unsqueeze(-1)).sum(1, keepdim=True))
    return torch.cat(parts, dim=1)


def threshold_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    head_out: torch.Tensor,
    probs: torch.Tensor | None,
    alive: torch.Tensor | None,
    *,
    threshold: float,
    prefix: int,
    scale: float,
    uses_cls: bool,
) -> torch.Tensor:
    """(batch, tokens) bool: which tokens live on after this gate, per image. A patch token
    lives if it was alive and its score reaches ``threshold``; prefix tokens always live.
    Dead tokens' scores are not renormalised away: their attention is already 0."""
    scores = _scores(
        q, k, head_out, probs, scale=scale, uses_cls=uses_cls, prefix=prefix, alive=alive
    )
    batch = scores.shape[0]
    keep = torch.cat(
        [torch.ones(batch, prefix, dtype=torch.bool, device=scores.device), scores >= threshold],
        dim=1,
    )
    return keep if alive is None else keep & alive


def apply_mask(x: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Zero the dead tokens of ``x`` (batch, tokens, dim)."""
    return x * alive.unsqueeze(-1).to(x.dtype)


def attention_bias(alive: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, 1, tokens) additive bias: 0 for live keys, -inf for dead ones. ``alive`` is
    a bool mask, or a training gate's 0/1 float mask (the bias carries no gradient)."""
    if alive.dtype != torch.bool:
        alive = alive.detach() > 0.5
    zero = torch.zeros((), dtype=dtype, device=alive.device)
    ninf = torch.full((), float("-inf"), dtype=dtype, device=alive.device)
    return torch.where(alive, zero, ninf)[:, None, None, :]


def compact_tokens(x: torch.Tensor, alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the tokens dead in every image of the batch: ``x`` (batch, tokens, dim) and
    ``alive`` (batch, tokens) become (batch, k, ...) with k the largest count alive in one
    image (at least 2, so that attention never sees a single token; a pad is a dead token).
    Each image keeps its live tokens first, in their original order, then dead ones: an
    image's result does not depend on its batch mates, only the work does (at batch 1, k is
    the image's own count). k is data-dependent: torch.export records it as an unbacked size
    and ONNX's TopK takes it as a tensor."""
    tokens = x.shape[1]
    count = alive.sum(1).max().item()
    torch._check(count >= 1)
    torch._check(count <= tokens)
    k = torch.sym_max(count, min(2, tokens))
    torch._check(k >= min(2, tokens))
    torch._check(k <= tokens)
    position = torch.arange(tokens, device=x.device)
    key = alive.to(torch.int64) * tokens + (tokens - 1 - position)  # live first, in order
    index = torch.topk(key, k, dim=1).indices
    kept = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return kept, torch.gather(alive, 1, index)


# ----------------------------------------------------------------------------- the pass
class TokenGate(Pass):
    """Drop low-attention patch tokens inside a ViT (AS-ViT/EViT gates; static top-k or
    per-image thresholds).

    Args:
        keep: ``mode="topk"``: a rate in (0, 1] every gate keeps of the patch tokens reaching
            it (EViT's keep rate), or a schedule, one fraction per gate of the *original*
            patch tokens kept after it (non-increasing, each in (0, 1]). Default 0.7.
        mode: "topk" (static counts, faster) or "threshold" (per-image counts, masked).
        gates: 0-based indices of the blocks whose attention scores the tokens; the tokens
            are dropped right after that block's attention residual (its MLP already runs on
            fewer). Default: AS-ViT's 4/7/10 of 12 scaled to the depth.
        macs: instead of ``keep``, a fraction of the model's MACs in (0, 1]: one keep rate
            for every gate is found so that the measured MACs of the gated graph meet it.
        calib: ``mode="threshold"``: images (tensors or (x, y) batches) the kept-token counts
            are reported on (mean/min/max per gate). Top-k counts are static, so the MACs
            budget needs no data; a ``calib`` given there is not used (the report says so).
        fuse: merge the dropped tokens of each gate into one token (EViT).
        threshold: ``mode="threshold"``: one score threshold or one per gate; a token is kept
            while its score >= threshold (scores sum to 1 over the tokens). ``-inf`` keeps all.
            With ``macs=`` instead, the thresholds are calibrated on ``calib`` (the example
            inputs if None): one keep rate for every gate, each gate's threshold at that
            quantile of the scores reaching it, bisected so that the mean MACs the kept
            tokens need (per image; :class:`GateCost`) meet the budget.
        train: ``mode="threshold"`` with ``macs=``: labelled batches for budget-aware
            threshold training (AS-ViT): starting from the calibrated thresholds, the weights
            and thresholds train with straight-through soft gates on the task loss plus
            ``macs_weight * (MACs ratio - macs)**2`` for ``epochs`` at ``lr`` (thresholds at
            ``threshold_lr``, in units of the mean patch score; ``temperature`` of the soft
            gate in the same units), through :class:`~edgefx.passes.FineTune`'s loop. The
            thresholds are then re-calibrated to meet the budget on ``calib`` (a common
            shift, training keeps their ratios) and the hard gates compile.
        distill: with ``train``: the weight of a distillation term (DynamicViT), the KL
            divergence from the dense model's output distribution (its softmax, the model as
            given, frozen) to the gated one's, added to the task loss. It keeps the gated
            model's predictions near the dense model's instead of refitting the training
            labels. 0 turns it off.
        average_last: with ``train``: the weights and thresholds are averaged over the last
            this many epochs (SWA-style, :class:`~edgefx.passes.FineTune`'s ``average_last``)
            before the thresholds are shifted to the budget; 0 (default) keeps the last step's.
    """

    name = "TokenGate"

    def __init__(
        self,
        keep: float | Sequence[float] | None = None,
        *,
        mode: str = "topk",
        gates: Sequence[int] | None = None,
        macs: float | None = None,
        calib: Any = None,
        fuse: bool = False,
        threshold: float | Sequence[float] | None = None,
        train: Any = None,
        epochs: int = 1,
        lr: float = 1e-4,
        threshold_lr: float = 0.05,
        macs_weight: float = 2.0,
        temperature: float = 0.5,
        distill: float = 0.0,
        average_last: int = 0,
        progress: bool | None = None,
        compact: bool = True,
    ) -> None:
        if mode not in ("topk", "threshold"):
            raise PassError(f"mode must be 'topk' or 'threshold', got {mode!r}")
        if mode == "topk":
            if threshold is not None:
                raise PassError("threshold= is for mode='threshold'", hint="use keep= or macs=")
            if keep is not None and macs is not None:
                raise PassError(
                    "TokenGate takes keep= or macs=, not both",
                    hint="TokenGate(macs=0.65) finds the keep rate for you",
                )
            if keep is None and macs is None:
                keep = 0.7
        else:
            if keep is not None:
                raise PassError("keep= is for mode='topk'", hint="use threshold= or macs=")
            if (threshold is None) == (macs is None):
                raise PassError(
                    "mode='threshold' needs threshold= (one score threshold or one per gate) "
                    "or macs= (a budget the thresholds are calibrated to), not both",
                    hint="e.g. TokenGate(mode='threshold', threshold=0.005) or "
                    "TokenGate(mode='threshold', macs=0.65, calib=images, train=loader)",
                )
        if train is not None:
            if mode != "threshold" or macs is None:
                raise PassError(
                    "train= is budget-aware threshold training: it needs mode='threshold' and "
                    "macs=",
                    hint="TokenGate(mode='threshold', macs=0.65, train=loader, epochs=3)",
                )
            for label, value in (
                ("threshold_lr", threshold_lr),
                ("macs_weight", macs_weight),
                ("temperature", temperature),
            ):
                if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                    raise PassError(f"{label} must be a positive number, got {value!r}")
            if isinstance(distill, bool) or not (
                isinstance(distill, (int, float)) and distill >= 0 and math.isfinite(distill)
            ):
                raise PassError(
                    f"distill must be a number >= 0 (the distillation loss weight), got "
                    f"{distill!r}",
                    hint="e.g. distill=1.0; 0 trains on the labels alone",
                )
            # validates data, epochs, lr and builds the training loop TokenGate reuses
            self._tune = FineTune(
                train, epochs=epochs, lr=lr, average_last=average_last, progress=progress
            )
        if keep is not None:
            _check_keep(keep)
        if macs is not None and not (
            isinstance(macs, (int, float)) and not isinstance(macs, bool) and 0 < macs <= 1
        ):
            raise PassError(
                f"macs must be a fraction of the original MACs in (0, 1], got {macs!r}",
                hint="TokenGate(macs=0.65) keeps at most 65% of them",
            )
        if threshold is not None:
            values = [threshold] if isinstance(threshold, (int, float)) else list(threshold)
            if not values or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and not math.isnan(t)
                for t in values
            ):
                raise PassError(
                    f"threshold must be a number or a list of numbers, got {threshold!r}"
                )
        if gates is not None:
            if isinstance(gates, (str, bytes)) or not all(
                isinstance(g, int) and not isinstance(g, bool) for g in gates
            ):
                raise PassError(f"gates must be a list of block indices, got {gates!r}")
            gates = list(gates)
            if not gates:
                raise PassError("gates is empty", hint="leave it out for AS-ViT's positions")
            if sorted(set(gates)) != gates:
                raise PassError(
                    f"gates must be strictly increasing block indices, got {gates}",
                    hint="e.g. gates=[3, 6, 9]",
                )
            if isinstance(keep, (list, tuple)) and len(keep) != len(gates):
                raise PassError(
                    f"the keep schedule has {len(keep)} entries for {len(gates)} gates",
                    hint="give one fraction per gate",
                )
        if not isinstance(fuse, bool):
            raise PassError(f"fuse must be True or False, got {fuse!r}")
        if fuse and mode == "threshold":
            raise PassError("fuse=True is for mode='topk'")
        self.keep = list(keep) if isinstance(keep, (list, tuple)) else keep
        self.mode = mode
        self.gates = gates
        self.macs = macs
        self.calib = calib
        self.fuse = fuse
        self.threshold = list(threshold) if isinstance(threshold, (list, tuple)) else threshold
        self.train = train
        if not isinstance(compact, bool):
            raise PassError(f"compact must be True or False, got {compact!r}")
        self.compact = compact if mode == "threshold" else None
        if train is not None:
            self.epochs, self.lr, self.threshold_lr = epochs, lr, threshold_lr
            self.macs_weight, self.temperature = macs_weight, temperature
            self.distill = distill
            if average_last:
                self.average_last = average_last

    def __repr__(self) -> str:
        hidden = ("calib", "train", "_tune", "_kept")
        shown = {k: v for k, v in vars(self).items() if v is not None and k not in hidden}
        for data in ("calib", "train"):
            if getattr(self, data) is not None:
                shown[data] = f"<{type(getattr(self, data)).__name__}>"
        return f"TokenGate({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    # --------------------------------------------------------------------- run
    def run(self, program: Program) -> tuple[Program, dict[str, Any]]:
        gm = program.graph_module
        batch = analysis_batch(program.example_inputs, program.dynamic_batch)
        values = concrete_values(gm, program.example_inputs, batch)
        vit = find_blocks(gm, program.example_inputs, batch, values=values)
        gates = self._gate_blocks(vit)
        base_macs = graph_cost(gm, program.example_inputs).total_macs
        report: dict[str, Any] = {
            "mode": self.mode,
            "gates": [vit.blocks[g].module for g in gates],
            "gate_blocks": gates,
            "tokens": vit.tokens,
            "prefix_tokens": vit.prefix_tokens,
            "prefix_sources": list(vit.prefix_sources),
            "scores": "CLS attention row"
            if vit.uses_cls
            else "mean attention over queries (no CLS token found)",
            "notes": list(vit.notes),
            "attention": sorted({vit.blocks[g].kind for g in gates}),
        }
        if self.mode == "topk":
            gated, counts, rate = self._topk(program, vit, gates, base_macs, values)
            report.update(
                {
                    "keep_rate": rate,
                    "patch_tokens_kept": counts,
                    "tokens_after_gates": [vit.prefix_tokens + c for c in counts],
                    "fused_token": self.fuse,
                }
            )
        else:
            gated, thresholds = self._threshold(program, vit, gates, batch)
            report["thresholds"] = thresholds
        after_macs = graph_cost(gated.graph_module, gated.example_inputs).total_macs
        report["macs_before"] = base_macs
        report["macs_after"] = after_macs
        report["macs_ratio"] = after_macs / base_macs
        if self.macs is not None:
            report["macs_requested"] = self.macs
        if self.mode == "threshold":
            report["macs_note"] = (
                "the graph drops the tokens dead in every image of a batch (a data-dependent "
                "token count; masks the rest), so its MACs depend on the batch: macs_after is "
                "its cost on the example inputs; macs_effective, the mean over the calibration "
                "images of what each needs alone (batch 1)"
                if self.compact
                else "the graph masks dropped tokens (static shapes), so it still computes "
                "macs_after; macs_effective is the mean MACs the kept tokens need per image "
                "(what compact=True computes at batch 1)"
            )
            if self.macs is not None:
                report.update(self._budget)
                report["macs_effective"] = round(self._budget["macs_effective_ratio"] * base_macs)
                report["macs_ratio"] = self._budget["macs_effective_ratio"]
        if self.mode == "topk" and self.calib is not None:
            report["calib"] = "not used: top-k keeps a static number of tokens per gate"
        if self.mode == "threshold":
            report["tokens_kept"] = self._kept
            report["tokens_kept_on"] = "calib" if self.calib is not None else "example inputs"
        return gated, report

    def _gate_blocks(self, vit: ViTStructure) -> list[int]:
        depth = len(vit.blocks)
        gates = self.gates if self.gates is not None else default_gates(depth)
        bad = [g for g in gates if not 0 <= g < depth]
        if bad:
            raise PassError(
                f"gate block(s) {bad} out of range: the model has {depth} blocks (0..{depth - 1})",
                module=vit.blocks[-1].module,
                hint=f"gates are 0-based block indices; default here: {default_gates(depth)}",
            )
        if isinstance(self.keep, list) and len(self.keep) != len(gates):
            raise PassError(
                f"the keep schedule has {len(self.keep)} entries for {len(gates)} gates ({gates})",
                hint="give one fraction per gate, or gates= to match",
            )
        if isinstance(self.threshold, list) and len(self.threshold) != len(gates):
            raise PassError(
                f"{len(self.threshold)} thresholds for {len(gates)} gates ({gates})",
                hint="give one threshold per gate, or a single number",
            )
        if vit.patch_tokens < 1:
            raise PassError("the model has no patch tokens to drop")
        return gates

    # --------------------------------------------------------------------- top-k
    def _counts(self, vit: ViTStructure, gates: list[int], rate: float | None) -> list[int]:
        patches = vit.patch_tokens
        counts: list[int] = []
        incoming = patches
        for i, _ in enumerate(gates):
            if isinstance(self.keep, list):
                count = max(1, round(self.keep[i] * patches))
                count = min(count, incoming)
            else:
                count = max(1, round((rate if rate is not None else self.keep) * incoming))
            counts.append(count)
            incoming = count + (1 if self.fuse and count < incoming else 0)
        return counts

    def _topk(
        self,
        program: Program,
        vit: ViTStructure,
        gates: list[int],
        base_macs: int,
        values: dict[fx.Node, Any],
    ) -> tuple[Program, list[int], float | None]:
        gm0 = program.graph_module
        first = node_by_name(gm0)[vit.blocks[gates[0]].attention_residual]
        tags = {n.name: t for n, t in token_axes(gm0, first, values, vit.tokens).items()}
        if self.macs is None:
            counts = self._counts(vit, gates, None)
            gm = _build_topk(program, vit, gates, counts, self.fuse, tags)
            return program.with_graph(gm, repr(self)).refreshed(), counts, None
        target = self.macs * base_macs

        def measured(rate: float) -> tuple[int, fx.GraphModule | None, list[int]]:
            counts = self._counts(vit, gates, rate)
            # a graph sharing the parameters: only its MACs are read
            gm = _build_topk(program, vit, gates, counts, self.fuse, tags, share=True)
            return graph_cost(gm, program.example_inputs).total_macs, None, counts

        low, high = 0.0, 1.0
        macs, gm, counts = measured(high) if self.macs == 1 else (base_macs + 1, None, [])
        if macs > target:
            macs, gm, counts = measured(1e-9)  # one token per gate: the least gates can do
            if macs > target:
                raise PassError(
                    f"a MACs budget of {self.macs:g} cannot be met by dropping tokens at blocks "
                    f"{gates}: keeping one patch token per gate still needs "
                    f"{macs / base_macs:.3f} of the MACs",
                    hint="gate earlier blocks (gates=[...]) or ask for more MACs",
                )
            best = (1e-9, gm, counts)
            for _ in range(9):  # 2**-9 resolves one token in 196 (DeiT at 224)
                mid = (low + high) / 2
                macs, gm, counts = measured(mid)
                if macs <= target:
                    low, best = mid, (mid, gm, counts)
                else:
                    high = mid
            rate, gm, counts = best
        else:
            rate = 1.0
        gm = _build_topk(program, vit, gates, counts, self.fuse, tags)
        gated = program.with_graph(gm, repr(self)).refreshed()
        return gated, counts, rate

    # --------------------------------------------------------------------- threshold
    def _threshold(
        self,
        program: Program,
        vit: ViTStructure,
        gates: list[int],
        batch: int | None,
    ) -> tuple[Program, list[float]]:
        batches = _calib_batches(self.calib, program.example_inputs)
        budget: dict[str, Any] = {}
        if self.macs is None:
            thresholds = (
                list(self.threshold)
                if isinstance(self.threshold, list)
                else [float(self.threshold)] * len(gates)
            )
            gm = _build_threshold(program, vit, gates, thresholds, batch)
        else:
            cost = gate_cost(program, vit, gates)
            gm = _build_threshold(program, vit, gates, [-math.inf] * len(gates), batch)
            thresholds, ratio = _calibrate_thresholds(gm, batches, cost, self.macs)
            budget["calibrated_thresholds"] = thresholds
            budget["calibrated_macs_ratio"] = ratio
            if self.train is not None:
                program, trained, report = _train_gates(
                    program,
                    vit,
                    gates,
                    thresholds,
                    cost,
                    self.macs,
                    self._tune,
                    threshold_lr=self.threshold_lr,
                    macs_weight=self.macs_weight,
                    temperature=self.temperature,
                    distill=self.distill,
                )
                budget["training"] = report
                budget["trained_thresholds"] = trained
                # training moves the thresholds near the budget; a common shift (bisected like
                # the keep rate) puts the mean MACs on calib at or under it
                gm = _build_threshold(program, vit, gates, trained, batch)
                thresholds, ratio = _shift_to_budget(gm, batches, cost, self.macs, trained)
            budget["macs_effective_ratio"] = ratio
            self._budget = budget
        if self.compact:
            gm = _build_threshold(program, vit, gates, thresholds, batch, compact=True)
        self._kept = [_stats(c) for c in threshold_kept(gm, batches)]
        return program.with_graph(gm, repr(self)).refreshed(), thresholds


def _check_keep(keep: object) -> None:
    def is_fraction(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1

    if isinstance(keep, (list, tuple)):
        if not keep:
            raise PassError("the keep schedule is empty", hint="e.g. keep=[0.7, 0.5, 0.35]")
        bad = [v for v in keep if not is_fraction(v)]
        if bad:
            raise PassError(
                f"keep fractions must be in (0, 1], got {bad[0]!r} in {list(keep)}",
                hint="a schedule gives, per gate, the fraction of the patch tokens kept after it",
            )
        for i in range(1, len(keep)):
            if keep[i] > keep[i - 1]:
                raise PassError(
                    f"the keep schedule {list(keep)} increases the tokens at gate {i} "
                    f"({keep[i - 1]} -> {keep[i]}): dropped tokens cannot come back",
                    hint="fractions are of the original patch tokens: make them non-increasing",
                )
    elif not is_fraction(keep):
        raise PassError(
            f"keep must be a fraction in (0, 1] or a list of them, got {keep!r}",
            hint="keep=0.7 keeps 70% of the patch tokens at every gate; keep=1.0 keeps all",
        )


# ----------------------------------------------------------------------------- rewriting
def _gate_inputs(nodes: dict[str, fx.Node], block: AttentionBlock) -> tuple:
    probs = nodes[block.attention] if block.kind == "softmax" else None
    return (
        nodes[block.query],
        nodes[block.key],
        nodes[block.head_output],
        probs,
    )


def _build_topk(
    program: Program,
    vit: ViTStructure,
    gates: list[int],
    counts: list[int],
    fuse: bool,
    tags_by_name: dict[str, list],
    *,
    share: bool = False,
) -> fx.GraphModule:
    """A copy of the graph with a top-k gate after each gate block's attention residual, and
    every later op that spells out the token count resized. ``share``: the copy shares the
    parameters with ``program`` (for measuring only: nothing may change them)."""
    if share:
        gm = fx.GraphModule(program.graph_module, copy.deepcopy(program.graph_module.graph))
    else:
        gm = program.copy_graph()
    nodes = node_by_name(gm)
    tags = {nodes[name]: t for name, t in tags_by_name.items()}
    graph = gm.graph
    removed: dict[fx.Node, int] = {}  # gate node -> tokens removed from the stream so far
    incoming = vit.patch_tokens
    for g, count in zip(gates, counts, strict=True):
        block = vit.blocks[g]
        residual = nodes[block.attention_residual]
        with graph.inserting_after(residual):
            gate = graph.call_function(
                topk_gate,
                (residual, *_gate_inputs(nodes, block)),
                {
                    "keep": count,
                    "prefix": vit.prefix_tokens,
                    "scale": block.scale,
                    "uses_cls": vit.uses_cls,
                    "fuse": fuse,
                },
            )
        gate.meta.update({k: v for k, v in residual.meta.items() if k != "val"})
        residual.replace_all_uses_with(gate, delete_user_cb=lambda user, g=gate: user is not g)
        after = count + (1 if fuse and count < incoming else 0)
        removed[gate] = vit.patch_tokens - after
        incoming = after
    _drop_see_all_masks(gm, nodes, vit, gates[0])
    _resize_after_gates(gm, tags, removed)
    if share:
        gm.graph.eliminate_dead_code()  # parameters are shared: delete nothing from them
    else:
        remove_dead_code(gm)
    gm.recompile()
    return gm


def _drop_see_all_masks(
    gm: fx.GraphModule, nodes: dict[str, fx.Node], vit: ViTStructure, first_gate: int
) -> None:
    """After a gate the tokens are fewer than a mask built for all of them: a mask that hides
    nothing (Hugging Face's ViT) is dropped there, which changes nothing it computes."""
    for block in vit.blocks[first_gate + 1 :]:
        if block.see_all_mask is None:
            continue
        core = nodes[block.attention]
        args = list(core.args)
        kwargs = dict(core.kwargs)
        if len(args) > 3:
            args[3] = None
        kwargs.pop("attn_mask", None)
        core.args, core.kwargs = tuple(args), kwargs


def _resize_after_gates(
    gm: fx.GraphModule,
    tags: dict[fx.Node, list],
    removed: dict[fx.Node, int],
    *,
    dynamic: bool = False,
) -> None:
    """Every op after a gate that names the token count (reshape sizes, expand sizes, slice
    ends) gets the count it will see: the original minus what the gates before it removed.
    ``dynamic``: the count is data-dependent, so a size must be inferred (-1) or read off the
    tensor; a reshape that already infers another axis is refused."""
    graph = gm.graph
    dropped: dict[fx.Node, int] = dict(removed)
    for node in list(graph.nodes):
        if node in removed:
            continue
        before = max((dropped.get(a, 0) for a in node.all_input_nodes), default=0)
        if before == 0:
            continue
        dropped[node] = before
        for tag in tags.get(node, []):
            if node.target in _RESHAPES or node.target is aten.expand.default:
                sizes = list(node.args[1])
                old = sizes[tag.axis]
                if node.target is aten.expand.default or -1 not in sizes:
                    sizes[tag.axis] = -1
                elif dynamic:
                    raise PassError(
                        "a per-batch token count cannot resize a reshape that already infers "
                        "another axis",
                        node=node.name,
                        op=str(node.target),
                        hint="use TokenGate(mode='threshold', compact=False) (masked tokens)",
                    )
                elif isinstance(old, int):
                    sizes[tag.axis] = old // tag.count * (tag.count - before)
                else:
                    with graph.inserting_before(node):
                        per = graph.call_function(operator.floordiv, (old, tag.count))
                        sizes[tag.axis] = graph.call_function(
                            operator.mul, (per, tag.count - before)
                        )
                node.args = (node.args[0], sizes, *node.args[2:])
            elif node.target is aten.slice.Tensor and len(node.args) > 3:
                rank = node.args[0].meta["val"].dim()
                dim, end = node.args[1] % rank, node.args[3]
                if (
                    dim == tag.axis
                    and isinstance(end, int)
                    and tag.count * tag.inner <= end < _INT_MAX
                ):
                    node.args = (*node.args[:3], _INT_MAX, *node.args[4:])


def _build_threshold(
    program: Program,
    vit: ViTStructure,
    gates: list[int],
    thresholds: list[float],
    batch: int | None = None,
    *,
    compact: bool = False,
) -> fx.GraphModule:
    """A copy of the graph where each gate computes a per-image keep mask; dead tokens are
    zeroed in the stream and masked out of every later attention. ``compact``: tokens dead in
    the whole batch are also removed (:func:`compact_tokens`: a data-dependent token count),
    and every later op that names the token count is resized."""
    gm = program.copy_graph()
    tags = None
    if compact:
        gm0 = program.graph_module
        values = concrete_values(gm0, program.example_inputs, batch)
        first = node_by_name(gm0)[vit.blocks[gates[0]].attention_residual]
        tags = {n.name: t for n, t in token_axes(gm0, first, values, vit.tokens).items()}
    by_block = dict(zip(gates, thresholds, strict=True))

    def hard_gate(graph: fx.Graph, block: AttentionBlock, inputs: tuple, alive) -> fx.Node:
        return graph.call_function(
            threshold_mask,
            (*inputs, alive),
            {
                "threshold": float(by_block[block.index]),
                "prefix": vit.prefix_tokens,
                "scale": block.scale,
                "uses_cls": vit.uses_cls,
            },
        )

    streams = _insert_threshold_gates(gm, vit, gates, hard_gate, compact=compact)
    if compact:
        nodes = node_by_name(gm)
        _resize_after_gates(
            gm,
            {nodes[name]: t for name, t in tags.items()},
            dict.fromkeys(streams, 1),
            dynamic=True,
        )
        _drop_see_all_masks(gm, nodes, vit, gates[0])
        gm.recompile()
    return gm


def _insert_threshold_gates(
    gm: fx.GraphModule,
    vit: ViTStructure,
    gates: list[int],
    make_gate: Callable[[fx.Graph, AttentionBlock, tuple, fx.Node | None], fx.Node],
    *,
    compact: bool = False,
) -> list[fx.Node]:
    """Insert a gate after each gate block's attention residual of ``gm`` (in place):
    ``make_gate(graph, block, (q, k, head_out, probs), alive)`` adds the node computing the
    tokens alive after it; dead tokens are zeroed in the stream and masked out of every later
    attention; with ``compact`` the stream is compacted first (:func:`compact_tokens`).
    Returns the new stream node after each gate."""
    nodes = node_by_name(gm)
    graph = gm.graph
    alive: fx.Node | None = None
    streams: list[fx.Node] = []
    for block in vit.blocks:
        if alive is not None:
            _mask_attention(gm, nodes, block, alive)
        if block.index not in gates:
            continue
        residual = nodes[block.attention_residual]
        with graph.inserting_after(residual):
            mask = make_gate(graph, block, _gate_inputs(nodes, block), alive)
        new_nodes = [mask]
        stream, alive = residual, mask
        if compact:
            with graph.inserting_after(mask):
                packed = graph.call_function(compact_tokens, (residual, mask))
            with graph.inserting_after(packed):
                stream = graph.call_function(operator.getitem, (packed, 0))
            with graph.inserting_after(stream):
                alive = graph.call_function(operator.getitem, (packed, 1))
            new_nodes += [packed, stream, alive]
        with graph.inserting_after(new_nodes[-1]):
            zeroed = graph.call_function(apply_mask, (stream, alive))
        new_nodes.append(zeroed)
        for new in new_nodes:
            new.meta.update({k: v for k, v in residual.meta.items() if k != "val"})
        residual.replace_all_uses_with(
            zeroed, delete_user_cb=lambda user, keep=tuple(new_nodes): user not in keep
        )
        streams.append(zeroed)
    gm.recompile()
    return streams


def _mask_attention(
    gm: fx.GraphModule, nodes: dict[str, fx.Node], block: AttentionBlock, alive: fx.Node
) -> None:
    graph = gm.graph
    core = nodes[block.attention]
    if block.kind == "sdpa":
        with graph.inserting_before(core):
            bias = graph.call_function(attention_bias, (alive, torch.float32))
        bias.meta.update({k: v for k, v in core.meta.items() if k != "val"})
        kwargs = dict(core.kwargs)
        args = list(core.args)
        if len(args) > 3:
            args[3] = bias
        else:
            kwargs["attn_mask"] = bias
        core.args, core.kwargs = tuple(args), kwargs
    else:
        logits = core.args[0]
        with graph.inserting_before(core):
            bias = graph.call_function(attention_bias, (alive, torch.float32))
            biased = graph.call_function(aten.add.Tensor, (logits, bias))
        for new in (bias, biased):
            new.meta.update({k: v for k, v in core.meta.items() if k != "val"})
        core.args = (biased, *core.args[1:])


# ----------------------------------------------------------------------------- reporting
def _calib_batches(calib: Any, fallback: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if calib is None:
        return [fallback[0]]
    if isinstance(calib, torch.Tensor):
        return [calib]
    batches = []
    for item in calib:
        x = item[0] if isinstance(item, (list, tuple)) else item
        if not isinstance(x, torch.Tensor):
            raise PassError(
                f"calibration batches must be tensors or (x, y) pairs, got {type(x).__name__}"
            )
        batches.append(x)
    if not batches:
        raise PassError("calib is empty", hint="pass a few batches of images")
    return batches


def threshold_kept(gm: fx.GraphModule, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per gate, the number of tokens alive after it for every image of ``batches``, read off
    a graph built by ``_build_threshold`` (before it is re-exported)."""
    return [counts for _, counts in _run_gates(gm, batches)]


def _stats(counts: torch.Tensor) -> dict[str, float]:
    counts = counts.double()
    return {
        "mean": round(float(counts.mean()), 2),
        "min": int(counts.min()),
        "max": int(counts.max()),
        "images": int(counts.numel()),
    }


# ----------------------------------------------------------------------------- threshold budgets
@dataclass(frozen=True)
class GateCost:
    """The MACs of a gated ViT as a function of the tokens each segment runs on.

    Segment k runs from gate k to the next; with t_k tokens (prefix included) in it,

        MACs(t) = constant + sum_k linear[k] * t_k + quadratic[k] * t_k**2

    (token-wise layers are linear in t, attention is quadratic). The coefficients are fitted
    to the MACs :func:`graph_cost` measures on top-k gated graphs at 2G+1 token schedules and
    checked on another one, so they are the measured cost, not a model of it. In threshold mode
    this is the per-image cost of the tokens an image keeps."""

    constant: float
    linear: tuple[float, ...]
    quadratic: tuple[float, ...]
    dense: int  # MACs of the ungated graph (per image): ratios are to it, gates' cost included
    prefix: int

    def macs(self, tokens: torch.Tensor) -> torch.Tensor:
        """(images,) MACs for ``tokens`` (images, gates): tokens alive after each gate,
        prefix included. Differentiable in ``tokens``."""
        linear = torch.tensor(self.linear, dtype=tokens.dtype)
        quadratic = torch.tensor(self.quadratic, dtype=tokens.dtype)
        return self.constant + (tokens * linear + tokens * tokens * quadratic).sum(-1)


def gate_cost(program: Program, vit: ViTStructure, gates: list[int]) -> GateCost:
    """Fit :class:`GateCost` on measured top-k graphs (see there)."""
    gm0 = program.graph_module
    batch = analysis_batch(program.example_inputs, program.dynamic_batch)
    values = concrete_values(gm0, program.example_inputs, batch)
    first = node_by_name(gm0)[vit.blocks[gates[0]].attention_residual]
    tags = {n.name: t for n, t in token_axes(gm0, first, values, vit.tokens).items()}
    patches, prefix, g = vit.patch_tokens, vit.prefix_tokens, len(gates)
    images = int(program.example_inputs[0].shape[0])

    def measured(counts: list[int]) -> float:
        gm = _build_topk(program, vit, gates, counts, False, tags, share=True)
        return graph_cost(gm, program.example_inputs).total_macs / images

    levels = sorted({max(1, round(patches / 2)), max(1, round(patches / 4))}, reverse=True)
    schedules = [[patches] * g]
    for k in range(g):
        schedules += [[patches] * k + [level] * (g - k) for level in levels]
    rows, macs = [], []
    for counts in schedules:
        t = [prefix + c for c in counts]
        rows.append([1.0, *t, *(c * c for c in t)])
        macs.append(measured(counts))
    solution = torch.linalg.lstsq(
        torch.tensor(rows, dtype=torch.float64), torch.tensor(macs, dtype=torch.float64)[:, None]
    ).solution[:, 0]
    cost = GateCost(
        constant=float(solution[0]),
        linear=tuple(float(v) for v in solution[1 : 1 + g]),
        quadratic=tuple(float(v) for v in solution[1 + g :]),
        dense=round(graph_cost(gm0, program.example_inputs).total_macs / images),
        prefix=prefix,
    )
    check = sorted((max(1, round(patches * f)) for f in (0.8, 0.55, 0.3, 0.2)[:g]), reverse=True)
    check = (check + [check[-1]] * g)[:g]
    predicted = float(cost.macs(torch.tensor([[prefix + c for c in check]], dtype=torch.float64)))
    actual = measured(check)
    if abs(predicted - actual) > 1e-6 * cost.dense + 1:
        raise PassError(
            f"the gated graph's MACs are not linear plus quadratic in its token counts "
            f"(predicted {predicted:.0f}, measured {actual:.0f} at {check} patch tokens)",
            module=vit.blocks[gates[0]].module,
            hint="threshold budgets need that cost shape; use TokenGate(macs=...) (top-k)",
        )
    return cost


class _ScoreRecorder(torch.fx.Interpreter):
    """Runs a threshold-gated graph and records, per gate, the scores of the patch tokens
    alive entering it and each image's count of tokens alive after it."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.op == "call_function" and n.target is threshold_mask:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            q, k, head_out, probs, alive = args
            scores = _scores(
                q,
                k,
                head_out,
                probs,
                scale=kwargs["scale"],
                uses_cls=kwargs["uses_cls"],
                prefix=kwargs["prefix"],
                alive=alive,
            )
            prefix = kwargs["prefix"]
            before = (
                torch.ones_like(scores, dtype=torch.bool) if alive is None else alive[:, prefix:]
            )
            self.seen.append((scores[before], value.sum(1)))
        return value


def _run_gates(
    gm: fx.GraphModule, batches: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per gate over all ``batches``: (the scores of the patch tokens alive entering it, flat;
    the tokens alive after it, per image). Batches may differ in token count (compacted)."""
    per_gate: list[list[tuple]] = []
    with torch.no_grad():
        for x in batches:
            recorder = _ScoreRecorder(gm)
            recorder.run(x)
            for i, seen in enumerate(recorder.seen):
                if len(per_gate) <= i:
                    per_gate.append([])
                per_gate[i].append(seen)
    return [(torch.cat([s for s, _ in seen]), torch.cat([c for _, c in seen])) for seen in per_gate]


def _set_thresholds(gm: fx.GraphModule, thresholds: Sequence[float]) -> None:
    gate_nodes = list(gm.graph.find_nodes(op="call_function", target=threshold_mask))
    for node, value in zip(gate_nodes, thresholds, strict=True):
        node.kwargs = {**node.kwargs, "threshold": float(value)}
    gm.recompile()  # the generated code holds the thresholds as literals


def _effective_ratio(gm: fx.GraphModule, batches: Sequence[torch.Tensor], cost: GateCost):
    """(mean ratio of the MACs the kept tokens need to the dense MACs, per-gate kept counts)
    over ``batches`` for the thresholds set in ``gm``."""
    kept = threshold_kept(gm, batches)
    tokens = torch.stack(kept, dim=1).double()
    return float(cost.macs(tokens).mean()) / cost.dense, kept


def _thresholds_for_rate(
    gm: fx.GraphModule, batches: Sequence[torch.Tensor], rate: float, offset: Sequence[float]
) -> list[float]:
    """Per gate in turn, the score threshold that keeps ``rate`` of the patch tokens still
    alive there (pooled over ``batches``), earlier gates already thresholded; ``offset`` is
    added to each (see :meth:`TokenGate._threshold`)."""
    n = len(offset)
    thresholds = [-math.inf] * n
    for k in range(n):
        _set_thresholds(gm, thresholds)
        alive, _ = _run_gates(gm, batches)[k]
        drop = min(alive.numel() - 1, round((1 - rate) * alive.numel()))
        ordered = torch.sort(alive).values
        # midway between the last dropped and the first kept score: no score sits on it, so
        # float rounding cannot flip a token (the training gates compare in other units)
        value = float(ordered[drop - 1] + ordered[drop]) / 2 if drop > 0 else -math.inf
        thresholds[k] = value + offset[k]
    _set_thresholds(gm, thresholds)
    return thresholds


def _calibrate_thresholds(
    gm: fx.GraphModule,
    batches: Sequence[torch.Tensor],
    cost: GateCost,
    target: float,
    offset: Sequence[float] | None = None,
) -> tuple[list[float], float]:
    """Bisection on one keep rate for every gate (thresholds at the matching score quantiles
    over ``batches``) to the largest rate whose mean effective MACs ratio is <= ``target``.
    Returns (thresholds, achieved ratio); ``gm``'s gates are left set to them."""
    offset = (
        list(offset)
        if offset is not None
        else [0.0] * len(list(gm.graph.find_nodes(op="call_function", target=threshold_mask)))
    )
    best = _thresholds_for_rate(gm, batches, 1e-9, offset)
    ratio, _ = _effective_ratio(gm, batches, cost)
    if ratio > target:
        raise PassError(
            f"a MACs budget of {target:g} cannot be met by dropping tokens at these gates: "
            f"keeping the fewest tokens still needs {ratio:.3f} of the MACs",
            hint="gate earlier blocks (gates=[...]) or ask for more MACs",
        )

    def at(rate: float) -> tuple[list[float], float]:
        thresholds = _thresholds_for_rate(gm, batches, rate, offset)
        return thresholds, _effective_ratio(gm, batches, cost)[0]

    best, best_ratio = _bisect(at, target, (best, ratio), steps=10, keep_more_up=True)
    _set_thresholds(gm, best)
    return best, best_ratio


def _bisect(
    at: Callable[[float], tuple[list[float], float]],
    target: float,
    fallback: tuple[list[float], float],
    *,
    steps: int,
    keep_more_up: bool,
) -> tuple[list[float], float]:
    """Bisection on [0, 1] for the thresholds ``at(x)`` keeping the most tokens whose MACs
    ratio is <= ``target``; ``keep_more_up``: a larger x keeps more tokens. ``fallback``: a
    result known to meet the target."""
    low, high, best = 0.0, 1.0, fallback
    for _ in range(steps):
        mid = (low + high) / 2
        thresholds, ratio = at(mid)
        meets = ratio <= target
        if meets:
            best = (thresholds, ratio)
        if meets == keep_more_up:
            low = mid
        else:
            high = mid
    return best


# ----------------------------------------------------------------------------- threshold training
class _SoftThresholdGate(torch.nn.Module):
    """A threshold gate that trains (AS-ViT): the forward pass keeps exactly the tokens the
    hard gate keeps; the backward pass sees ``sigmoid((s - threshold) / temperature)`` (a
    straight-through estimator), so the threshold and the weights under the scores get
    gradients. The threshold is a parameter in units of the mean patch score (1 / patches),
    so one learning rate suits every model. Records the tokens alive after it (``count``,
    (batch,), prefix included) for the MACs loss."""

    def __init__(self, threshold: float, patches: int, temperature: float, **kwargs: Any):
        super().__init__()
        self.patches = patches
        start = threshold * patches if math.isfinite(threshold) else -1.0
        self.threshold = torch.nn.Parameter(torch.tensor(float(start)))
        self.temperature = temperature
        self.kwargs = kwargs
        self.count: torch.Tensor | None = None

    def value(self) -> float:
        """The threshold in score units (what the hard gate compares against)."""
        return float(self.threshold.detach()) / self.patches

    def forward(self, q, k, head_out, probs, alive):
        hard_before = None if alive is None else alive.detach() > 0.5
        scores = _scores(q, k, head_out, probs, alive=hard_before, **self.kwargs)
        z = scores * self.patches - self.threshold
        soft = torch.sigmoid(z / self.temperature)
        hard = (z >= 0).to(soft.dtype)
        patch = hard + (soft - soft.detach())  # exactly `hard` forward: s - s == 0
        prefix = self.kwargs["prefix"]
        mask = torch.cat([torch.ones_like(patch[:, :1]).expand(-1, prefix), patch], dim=1)
        if alive is not None:
            mask = mask * alive
        self.count = mask.sum(1)
        return mask


def _train_gates(
    program: Program,
    vit: ViTStructure,
    gates: list[int],
    thresholds: list[float],
    cost: GateCost,
    target: float,
    tune: Any,
    *,
    threshold_lr: float,
    macs_weight: float,
    temperature: float,
    distill: float = 0.0,
) -> tuple[Program, list[float], dict[str, Any]]:
    """Budget-aware threshold training: the weights and the thresholds of soft gates on
    ``program``'s trainable module, task loss + ``macs_weight * (MACs ratio - target)**2``
    (the mean over the batch of each image's MACs for the tokens it keeps), + ``distill *
    KL(dense || gated)`` on the output distributions when ``distill`` > 0. Returns the Program
    with trained weights (no gates), the trained thresholds and the training report."""
    module, soft = soft_gated(program, vit, gates, thresholds, temperature)
    seen: dict[str, Any] = {}
    hook = None
    if distill:
        teacher = program.trainable().eval().requires_grad_(False)

        def keep(_module: torch.nn.Module, args: tuple, output: Any) -> None:
            seen["args"], seen["output"] = args, output

        hook = module.register_forward_hook(keep)

    def extra_loss() -> torch.Tensor:
        tokens = torch.stack([g.count for g in soft], dim=1)
        ratio = cost.macs(tokens).mean() / cost.dense
        loss = macs_weight * (ratio - target) ** 2
        if distill:
            with torch.no_grad():
                dense = teacher(*seen["args"])
            loss = loss + distill * _distillation(seen["output"], dense)
        return loss

    groups = [{"params": [g.threshold for g in soft], "lr": threshold_lr, "weight_decay": 0.0}]
    try:
        report = tune.fit(module, program, extra_loss=extra_loss, extra_params=groups)
    finally:
        if hook is not None:
            hook.remove()
    report["distill"] = distill
    trained = program.with_weights(module)
    return trained, [g.value() for g in soft], report


def _distillation(student: Any, teacher: Any) -> torch.Tensor:
    """KL(teacher || student) of the softmax over the last axis, batch mean; a model with
    several outputs is distilled on its first."""
    if isinstance(student, (tuple, list)):
        student, teacher = student[0], teacher[0]
    return torch.nn.functional.kl_div(
        torch.log_softmax(student, dim=-1),
        torch.log_softmax(teacher, dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def soft_gated(
    program: Program,
    vit: ViTStructure,
    gates: list[int],
    thresholds: list[float],
    temperature: float = 0.5,
) -> tuple[torch.nn.Module, list[_SoftThresholdGate]]:
    """``program.trainable()`` with a training threshold gate after each gate block: the
    module and its gates (in order)."""
    module = program.trainable()
    soft: list[_SoftThresholdGate] = []

    def soft_gate(graph: fx.Graph, block: AttentionBlock, inputs: tuple, alive) -> fx.Node:
        gate = _SoftThresholdGate(
            thresholds[len(soft)],
            vit.patch_tokens,
            temperature,
            prefix=vit.prefix_tokens,
            scale=block.scale,
            uses_cls=vit.uses_cls,
        )
        name = f"_token_gate_{len(soft)}"
        module.graph.add_submodule(name, gate)
        soft.append(gate)
        return graph.call_module(name, (*inputs, alive))

    _insert_threshold_gates(module.graph, vit, gates, soft_gate)
    module.graph.recompile()
    return module, soft


def _shift_to_budget(
    gm: fx.GraphModule,
    batches: Sequence[torch.Tensor],
    cost: GateCost,
    target: float,
    thresholds: list[float],
) -> tuple[list[float], float]:
    """The smallest common shift of ``thresholds`` (bisected in score units; negative when
    the trained thresholds keep fewer tokens than the budget allows) whose mean effective MACs
    ratio on ``batches`` is <= ``target``; ``gm``'s gates are left set to the result."""

    def at(shift: float) -> tuple[list[float], float]:
        shifted = [t + shift for t in thresholds]
        _set_thresholds(gm, shifted)
        return shifted, _effective_ratio(gm, batches, cost)[0]

    best, ratio = at(0.0)
    if ratio <= target:
        # under budget: lower the thresholds (keep more tokens) as far as the budget allows; a
        # shift of -1 keeps every patch token, so the search is on [0, 1] downwards
        best, ratio = _bisect(lambda x: at(-x), target, (best, ratio), steps=20, keep_more_up=True)
        _set_thresholds(gm, best)
        return best, ratio
    top, top_ratio = at(1.0)  # scores sum to 1: a shift of 1 drops every patch token
    if top_ratio > target:
        raise PassError(
            f"the trained thresholds cannot meet a MACs budget of {target:g} (keeping the "
            f"fewest tokens still needs {top_ratio:.3f})",
            hint="gate earlier blocks (gates=[...]) or ask for more MACs",
        )
    best, ratio = _bisect(at, target, (top, top_ratio), steps=20, keep_more_up=False)
    _set_thresholds(gm, best)
    return best, ratio
