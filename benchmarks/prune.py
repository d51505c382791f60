"""ChannelPrune sweep: MACs ratio next to onnxruntime latency ratio, per budget and rounding.

For each model, in one run on one machine: capture once (dynamic batch), then for the dense
model (``FoldBatchNorm`` only) and each MACs budget x ``round_to`` setting
``edgefx.compile(program, passes=[ChannelPrune(macs=f, round_to=r), FoldBatchNorm()],
backend="onnx")``; the ONNX model is then timed in an onnxruntime CPU session with one
intra-op thread at batch 1 and batch 8, alternately run by run with the dense model
(medians of ``--repeat`` runs each), so a change in the machine's load hits both.
``--latency`` budgets add rows pruned with ``ChannelPrune(latency=f, backend="onnx")``
(bisection on the latency predicted from per-layer onnxruntime timings, see
edgefx.analysis.latency) and show the predicted ratio next to the measured one.
``--widths 0.1,0.25`` adds designed rows at those widths (no budget): the latency the
narrowest networks of the architecture still take: about the floor channel pruning, which
keeps every layer, approaches.
``--uniform`` adds, per MACs budget, a row pruned with
``ChannelPrune(macs=f, allocation="uniform")``: every set of coupled channels cut by the same
fraction instead of one global ranking.
``--pass-time`` models are captured at 224x224 and only the ChannelPrune pass (macs=0.5) is
timed. ``--designed`` adds, for models with a width knob (torchvision mobilenet_v2's
``width_mult``, MNASNet's ``alpha``; convnext_tiny's stage widths and deit_small's embedding
dimension scaled, heads of 64 kept, so deit_small at 0.5 is deit_tiny), one row per MACs
budget for the architecture designed at the width whose MACs come closest to that budget,
timed against the dense model the same way: the latency ratio a network drawn narrower
reaches at that MACs ratio, the yardstick for a pruned one.

Random weights (nothing is downloaded), so accuracy is not measured: BatchNorm scaling
factors are drawn from U(0, 1) (seeded) so the ranking has something to rank; models without
BatchNorm are ranked by weight magnitude (importance="auto"). The SNR column says how far the
pruned outputs are from the dense ones before any fine-tuning.

    python benchmarks/prune.py --models resnet50,mobilenet_v2,deit_small_patch16_224 \\
        --budgets 0.75,0.5,0.3 --round-to 1,8 --latency 0.75,0.5,0.3 \\
        --pass-time resnet50,vit_base_patch16_224
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torchvision
from common import (
    RESULTS,
    header,
    latency_ms,
    load_average,
    load_text,
    snr_db,
    write_results,
)

SEED = 0


def _convnext_tiny(width: float) -> torch.nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    dims = [max(8, round(d * width / 8) * 8) for d in (96, 192, 384, 768)]
    depths = (3, 3, 9, 3)
    setting = [
        CNBlockConfig(d, dims[i + 1] if i + 1 < len(dims) else None, n)
        for i, (d, n) in enumerate(zip(dims, depths, strict=True))
    ]
    return ConvNeXt(setting, stochastic_depth_prob=0.1)


def _deit_small(width: float) -> torch.nn.Module:
    import timm

    heads = max(1, round(6 * width))  # head_dim 64 as in the DeiT family (3 heads: deit_tiny)
    return timm.create_model(
        "deit_small_patch16_224", pretrained=False, embed_dim=64 * heads, num_heads=heads
    )


# the architecture designed narrower by its authors' own width knob, as a yardstick for a
# pruned model at that MACs ratio (deit_small at width 0.5 is deit_tiny)
DESIGNED_WIDTH: dict[str, Any] = {
    "mobilenet_v2": lambda w: torchvision.models.mobilenet_v2(width_mult=w),
    "mnasnet1_0": lambda w: torchvision.models.MNASNet(alpha=w),
    "convnext_tiny": _convnext_tiny,
    "deit_small_patch16_224": _deit_small,
}


def designed_width(name: str, budget: float, size: int) -> float:
    """The width (to 0.01) whose designed model's MACs ratio is closest to ``budget``."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size)

    @functools.cache  # the last step compares the two ends again
    def ratio(width: float) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            DESIGNED_WIDTH[name](width).eval()(x)
        return counter.get_total_flops()

    dense = ratio(1.0)
    lo, hi = 0.1, 1.0  # MACs grow with the width (in steps where channels are rounded)
    while hi - lo > 0.01:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) / dense < budget else (lo, mid)
    return round(min((lo, hi), key=lambda w: abs(ratio(w) / dense - budget)), 3)


def _randomize_gammas(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=gen))


def _session(compiled: Any) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    model = compiled.artifact.model.SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _paired_latencies(
    dense: ort.InferenceSession,
    pruned: ort.InferenceSession,
    size: int,
    batches: list[int],
    repeat: int,
) -> dict[int, tuple[float, float]]:
    """(dense ms, pruned ms) medians per batch, the two timed alternately run by run so a
    change in the machine's load hits both alike (the ratio is what the table is about).
    The dense row pairs the dense model with itself: its ratio shows the timing noise."""
    result = {}
    for batch in batches:
        x = np.random.default_rng(SEED).standard_normal((batch, 3, size, size), np.float32)
        runs = [
            lambda s=session, x=x: s.run(None, {s.get_inputs()[0].name: x})
            for session in (dense, pruned)
        ]
        for run in runs:
            for _ in range(3):  # warm-up
                run()
        times: list[list[float]] = [[], []]
        for r in range(repeat):
            # ABBA order: whichever goes second in a pair is more often preempted on a
            # loaded machine, so each goes second half of the time
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                times[i].append(latency_ms(runs[i], 1, warmup=0))
        result[batch] = (statistics.median(times[0]), statistics.median(times[1]))
    return result


def run_model(
    name: str,
    budgets: list[float],
    rounds: list[int],
    size: int,
    batches: list[int],
    repeat: int,
    on_row: Any = None,
    latency_budgets: tuple[float, ...] = (),
    designed: bool = False,
    uniform: bool = False,
    widths: tuple[float, ...] = (),
) -> list[dict[str, Any]]:
    """Rows for ``name``; ``on_row(row)`` after each one (to keep partial results)."""
    import edgefx
    from edgefx.frontend import capture
    from edgefx.frontend.zoo import resolve_model
    from edgefx.passes import ChannelPrune, FoldBatchNorm

    model = resolve_model(name, (1, 3, size, size)).model
    _randomize_gammas(model)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(SEED))
    program = capture(model, (x,))
    rows: list[dict[str, Any]] = []
    reference = None
    dense_session = None
    configs = [
        (1.0, None, None, None, "global"),
        *((b, r, None, None, "global") for b in budgets for r in rounds),
        *((b, 8, None, None, "uniform") for b in (budgets if uniform else ())),
        *((None, 8, f, None, "global") for f in latency_budgets),
        *(
            (b, None, None, designed_width(name, b, size), "global")
            for b in (budgets if designed and name in DESIGNED_WIDTH else ())
        ),
        *((None, None, None, w, "global") for w in (widths if name in DESIGNED_WIDTH else ())),
    ]
    dense_macs = None
    for budget, round_to, latency, width, allocation in configs:
        what = (
            f"designed width {width:g}"
            if width is not None
            else (f"latency<={latency:g}" if latency is not None else f"macs<={budget:g}")
        ) + (f" {allocation}" if allocation != "global" else "")
        passes: list[Any] = [FoldBatchNorm()]
        if width is not None:
            narrow = DESIGNED_WIDTH[name](width).eval()
            _randomize_gammas(narrow)
            source = capture(narrow, (x,))
        else:
            source = program
        if latency is not None:
            passes.insert(0, ChannelPrune(latency=latency, backend="onnx", batch=batches[0]))
        elif round_to is not None:
            passes.insert(0, ChannelPrune(macs=budget, round_to=round_to, allocation=allocation))
        start = time.perf_counter()
        try:
            compiled = edgefx.compile(source, passes=passes, backend="onnx", progress=False)
        except edgefx.EdgefxError as exc:
            print(f"[prune] {name} {what} round_to={round_to}: {exc}", file=sys.stderr)
            rows.append(
                {
                    "model": name,
                    "budget": budget,
                    "latency_budget": latency,
                    "allocation": allocation,
                    "round_to": round_to,
                    "error": str(exc),
                }
            )
            if on_row:
                on_row(rows[-1])
            continue
        compile_s = time.perf_counter() - start
        dense_macs = dense_macs or compiled.report.captured.macs
        out = compiled.program(x)
        if reference is None:
            reference = out
        session = _session(compiled)
        dense_session = dense_session or session
        paired = _paired_latencies(dense_session, session, size, batches, repeat)
        ms = {b: pruned for b, (_, pruned) in paired.items()}
        dense = {b: d for b, (d, _) in paired.items()}
        final = compiled.report.final
        prune = compiled.report.passes[0] if round_to is not None else None
        rows.append(
            {
                "model": name,
                "budget": budget,
                "latency_budget": latency,
                "allocation": allocation,
                "predicted_latency_ratio": None
                if prune is None
                else prune.report.get("predicted_latency_ratio"),
                "mac_ops_only_ratio": None
                if prune is None
                else prune.report.get("mac_ops_only_ratio"),
                "round_to": round_to,
                "designed_width": width,
                "macs": final.macs,
                "params": final.params,
                "macs_ratio": final.macs / dense_macs,
                "snr_db": None if prune is None else snr_db(out, reference),
                "ort_ms": {str(b): v for b, v in ms.items()},
                "dense_ms": {str(b): v for b, v in dense.items()},
                "latency_ratio": {str(b): ms[b] / dense[b] for b in batches},
                "prune_s": None if prune is None else prune.wall_s,
                "compile_s": compile_s,
            }
        )
        if on_row:
            on_row(rows[-1])
        ratios = ", ".join(f"b{b} {ms[b] / dense[b]:.2f}" for b in batches)
        print(
            f"[prune] {name} {what} "
            f"round_to={round_to}: MACs "
            f"{rows[-1]['macs_ratio']:.3f}, latency {ratios}",
            file=sys.stderr,
        )
    return rows


def pass_time(name: str) -> dict[str, Any]:
    from edgefx.frontend import capture
    from edgefx.frontend.zoo import resolve_model
    from edgefx.passes import ChannelPrune

    model = resolve_model(name).model
    _randomize_gammas(model)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(SEED))
    program = capture(model, (x,))
    pruning = ChannelPrune(macs=0.5)
    start = time.perf_counter()
    result = pruning(program)
    total = time.perf_counter() - start
    row = {"model": name, "run_s": result.wall_s, "with_checks_s": total}
    print(f"[prune] pass time {name}: {result.wall_s:.1f} s ({total:.1f} s)", file=sys.stderr)
    return row


def render(data: dict[str, Any]) -> str:
    batches = data["batches"]
    load = data["load_average"]
    lines = [
        "# ChannelPrune: MACs ratio vs onnxruntime latency ratio",
        "",
        f"Produced by `{data['command']}` on {data['machine']} ({data['date']}; "
        f"{load_text(load)}: 1-minute averages, "
        "on a machine of that many cores a load above it means other jobs ran meanwhile); "
        f"{data['size']}x{data['size']} inputs, onnxruntime CPU with one intra-op thread, "
        f"median of {data['repeat']} runs after 3 warm-up runs; each pruned model is timed "
        "alternately, run by run, with the dense one (`dense ms`), so load changes hit "
        "both. Random weights, BatchNorm gammas drawn from U(0, 1); models without "
        "BatchNorm ranked by weight magnitude. `SNR` compares the pruned with the dense "
        "outputs (no fine-tuning); the dense row is the reference itself, so it has none. "
        "`latency` is the pruned model's latency over the dense model's at that batch (the "
        "dense row times the dense model against itself: its distance from 1 is the noise); the "
        "target is a latency ratio within 10% of the MACs ratio and never above 1. A budget "
        '`latency f` prunes with `ChannelPrune(latency=f, backend="onnx")`; `predicted` is '
        "the latency ratio its model predicted (at the first batch size; layers timed alone "
        "plus the ops without MACs, calibrated on the whole graph), `layers only` what the "
        "layers and other MAC ops alone predict. A budget `f uniform` is the MACs budget f "
        'with `allocation="uniform"` (every set of coupled channels cut by the same fraction). '
        "A budget `designed width w` is no pruning "
        "but the same architecture built narrower (`mobilenet_v2(width_mult=w)`; convnext / "
        "deit widths scaled, heads of 64 kept: deit_small at 0.5 is deit_tiny; random "
        "weights), at the width whose MACs come closest to a MACs budget: the latency ratio "
        "a network drawn at that MACs ratio reaches, the yardstick for a pruned one.",
        "",
        "| model | budget | round_to | MACs ratio | predicted | layers only | params | SNR dB | "
        + " | ".join(f"dense ms b{b} | ms b{b} | latency b{b}" for b in batches)
        + " | prune s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|" + "--:|--:|--:|" * len(batches) + "--:|",
    ]
    for r in data["rows"]:
        budget = (
            f"designed width {r['designed_width']:g}"
            if r.get("designed_width") is not None
            else f"{r['budget']:g}"
            if r.get("latency_budget") is None
            else f"latency {r['latency_budget']:g}"
        ) + (" uniform" if r.get("allocation") == "uniform" else "")
        if "error" in r:
            lines.append(f"| {r['model']} | {budget} | {r['round_to']} | {r['error']} |")
            continue
        predicted, layers_only = (
            "-" if r.get(k) is None else f"{r[k]:.3f}"
            for k in ("predicted_latency_ratio", "mac_ops_only_ratio")
        )
        snr = (
            "-"
            if r.get("designed_width") is not None
            else "reference"
            if r["round_to"] is None
            else ("exact" if r["snr_db"] is None else f"{r['snr_db']:.1f}")
        )
        cells = " | ".join(
            f"{r['dense_ms'][str(b)]:.2f} | {r['ort_ms'][str(b)]:.2f} "
            f"| {r['latency_ratio'][str(b)]:.3f}"
            for b in batches
        )
        prune_s = "-" if r["prune_s"] is None else f"{r['prune_s']:.1f}"
        lines.append(
            f"| {r['model']} | {budget} | {r['round_to'] or '-'} | {r['macs_ratio']:.3f} "
            f"| {predicted} | {layers_only} | {r['params'] / 1e6:.2f} M | {snr} | {cells} "
            f"| {prune_s} |"
        )
    if data.get("stopped"):
        lines += ["", data["stopped"]]
    if data.get("pass_time"):
        lines += [
            "",
            "ChannelPrune(macs=0.5) pass time at 224x224 (`run`: the pass itself, including "
            "its re-export of the slimmed graph; `with checks`: plus the PassManager's runs "
            "of both graphs and their costs):",
            "",
            "| model | run s | with checks s |",
            "|---|--:|--:|",
        ]
        for r in data["pass_time"]:
            lines.append(f"| {r['model']} | {r['run_s']:.1f} | {r['with_checks_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2,deit_small_patch16_224")
    parser.add_argument("--budgets", default="0.75,0.5,0.3")
    parser.add_argument("--round-to", default="1,8")
    parser.add_argument("--latency", default="", help="latency budgets, e.g. 0.75,0.5,0.3")
    parser.add_argument(
        "--designed",
        action="store_true",
        help="for "
        + ", ".join(DESIGNED_WIDTH)
        + ": rows for the architecture designed narrower at each MACs budget (no pruning)",
    )
    parser.add_argument(
        "--uniform",
        action="store_true",
        help="rows for each MACs budget with allocation='uniform' (round_to 8)",
    )
    parser.add_argument(
        "--widths",
        default="",
        help="designed-narrow rows at these widths (e.g. 0.1,0.25: how far down the latency "
        "of the narrowest networks of the architecture goes)",
    )
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--pass-time", default="")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default="prune", help="results file name: OUT/STEM.md, .json")
    args = parser.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    rounds = [int(r) for r in args.round_to.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    load_start = load_average()  # reported: the figures mean little on a busy machine
    data = {
        **header("prune.py", argv),
        "load_average": {"start": load_start, "end": load_start},
        "size": args.size,
        "repeat": args.repeat,
        "batches": batches,
        "rows": [],
        "pass_time": [],
    }

    def keep(row: dict[str, Any]) -> None:  # results so far, written after every row
        data["rows"].append(row)
        data["load_average"]["end"] = load_average()
        write_results(args.out, args.stem, data, render(data))

    for name in args.models.split(","):
        latency = tuple(float(f) for f in args.latency.split(",") if f)
        run_model(
            name,
            budgets,
            rounds,
            args.size,
            batches,
            args.repeat,
            keep,
            latency,
            args.designed,
            args.uniform,
            tuple(float(w) for w in args.widths.split(",") if w),
        )
    for name in [m for m in args.pass_time.split(",") if m]:
        data["pass_time"].append(pass_time(name))
        data["load_average"]["end"] = load_average()
        write_results(args.out, args.stem, data, render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
