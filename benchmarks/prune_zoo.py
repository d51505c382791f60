"""ChannelPrune coverage across the model zoo: which models prune at a MACs budget, which
are refused (and why), which fail; the MACs ratio reached, the pass time, and whether the
pruned model lowered to ONNX matches the pruned Program.

For each model of benchmarks/zoo.py's list (every torchvision classifier and the timm
families; random weights, nothing downloaded) in a fresh subprocess: resolve it, make its
random weights non-degenerate as the zoo sweep does (``zoo.make_nondegenerate``), draw the
BatchNorm gammas from U(0.1, 1) (so BatchNorm ranking has something to rank), capture it
with a dynamic batch, run ``ChannelPrune(macs=BUDGET)`` (importance "auto"), then
``edgefx.compile(pruned, backend="onnx")`` and compare onnxruntime with the pruned Program
at batch 1 and batch 4 (max abs error / max |Program output| <= 1e-4).

Status: ``pruned``; ``refused`` (ChannelPrune said why: nothing removable, budget out of
reach); ``failed`` (capture, the pass or ONNX raised, or the process timed out / died).

    python benchmarks/prune_zoo.py --models all                  # the full table (hours)
    python benchmarks/prune_zoo.py --models resnet18,timm:convnext_atto --size 64 --out /tmp/pz
    python benchmarks/prune_zoo.py --models all --resume         # finish an interrupted run
    python benchmarks/prune_zoo.py --one resnet18                # one model, in-process
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zoo import (
    ZooError,
    _leaves,
    _one_line,
    _peak_rss_mb,
    add_sweep_arguments,
    commit_and_machine,
    emit_one,
    failure_reason,
    make_nondegenerate,
    pass_result,
    pass_sweep,
    produced_by,
    relative_error,
    resolve_sized,
    run_one_isolated,
    select_models,
)

SCRIPT = "benchmarks/prune_zoo.py"
TOLERANCE = 1e-4
RUN_BATCH = 4
GAMMA_SEED = 3
DEFAULT_TIMEOUT_S = 1200


def _gammas(model: Any) -> None:
    import torch

    generator = torch.Generator().manual_seed(GAMMA_SEED)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=generator) * 0.9 + 0.1)


def prune_model(name: str, budget: float, size: int | None) -> dict[str, Any]:
    """Prune ``name`` at ``budget`` and check its ONNX lowering; never raises for a model
    that fails (the result says where and why)."""
    import torch

    import edgefx
    from edgefx.errors import PassError
    from edgefx.frontend import capture
    from edgefx.passes import ChannelPrune

    result = pass_result(name, SCRIPT, budget=budget)
    start = time.perf_counter()
    try:
        model, x1 = resolve_sized(name, size, result)
        generator = torch.Generator().manual_seed(1)
        x4 = tuple(torch.randn((RUN_BATCH, *x.shape[1:]), generator=generator) for x in x1)
        make_nondegenerate(model, x1, batch=RUN_BATCH)
        _gammas(model)
        result["stage"] = "capture"
        program = capture(model, x1)
        result["stage"] = "prune"
        try:
            pruned = ChannelPrune(macs=budget)(program)
        except PassError as exc:
            result.update(status="refused", reason=_one_line(exc.message))
            return result
        report = pruned.report
        result.update(
            macs=pruned.before.macs,
            macs_ratio=pruned.after.macs / pruned.before.macs,
            params_ratio=pruned.after.params / pruned.before.params,
            prune_s=round(pruned.wall_s, 2),
            groups_removed=report["groups_removed"],
            ranked_by=report["ranked_by"],
            kept_whole=[
                f"{'/'.join(r['modules'][:2])}: {r['reason']}"
                for r in report["kept_whole"]
                if r["reason"] not in ("model input", "model output")
            ],
        )
        result["stage"] = "onnx"
        compiled = edgefx.compile(
            pruned.program, backend="onnx", progress=False, tolerance=math.inf
        )
        result["onnx_rel_err_b1"] = relative_error(
            pruned.program.run_flat(list(x1)), _leaves(compiled(*x1))
        )
        result["onnx_rel_err_b4"] = relative_error(
            pruned.program.run_flat(list(x4)), _leaves(compiled(*x4))
        )
        worst = max(result["onnx_rel_err_b1"], result["onnx_rel_err_b4"])
        result["onnx_match"] = worst <= TOLERANCE
        result.update(status="pruned", stage=None)
    except Exception as exc:  # a failing model is a result, not a crash of the sweep
        result.update(status="failed", reason=failure_reason(exc), error=str(exc)[:4000])
    finally:
        result["total_s"] = round(time.perf_counter() - start, 2)
        result["peak_rss_mb"] = _peak_rss_mb()
    return result


def run_in_subprocess(name: str, budget: float, size: int | None, timeout: float) -> dict:
    """:func:`prune_model` in a fresh interpreter (memory isolation), killed at ``timeout``."""
    start = time.perf_counter()
    options = ["--budget", str(budget), *([] if size is None else ["--size", str(size)])]
    result, reason = run_one_isolated(Path(__file__).resolve(), name, options, timeout)
    return result or {
        **pass_result(name, SCRIPT, budget=budget),
        "stage": None,
        "reason": reason,
        "total_s": round(time.perf_counter() - start, 2),
    }


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def render(data: dict[str, Any]) -> str:
    results = data["results"]
    done = [results[n] for n in data["models"] if n in results]
    lines = [
        f"# ChannelPrune across the model zoo at macs={data['budget']:g}",
        "",
        *produced_by(data),
        *commit_and_machine(data),
        "- random weights made non-degenerate as in zoo.md, BatchNorm gammas U(0.1, 1); "
        "captured with a dynamic batch"
        + (
            f" at {data['size']}x{data['size']}"
            if data.get("size")
            else " at each model's default input size"
        )
        + "; `ChannelPrune(macs="
        f"{data['budget']:g})` (importance auto, round_to 8); the pruned Program lowered with "
        '`edgefx.compile(..., backend="onnx")` and compared at batch 1 and 4 (ONNX match: '
        f"max abs error / max |output| <= {TOLERANCE:g}). `prune s` is the pass alone.",
        "",
    ]
    for source in ("torchvision", "timm"):
        rows = sorted((r for r in done if r["source"] == source), key=lambda r: r["model"])
        if not rows:
            continue
        count = {s: sum(r["status"] == s for r in rows) for s in ("pruned", "refused", "failed")}
        match = sum(bool(r.get("onnx_match")) for r in rows)
        lines += [
            f"## {source}: {count['pruned']} pruned ({count['pruned'] / len(rows):.0%}), "
            f"{count['refused']} refused, {count['failed']} failed of {len(rows)} run; "
            f"ONNX matches {match} of {count['pruned']} pruned",
            "",
            "| model | status | MACs | MACs ratio | params ratio | prune s | ONNX match "
            "| ranked by | kept whole / reason |",
            "|---|---|--:|--:|--:|--:|---|---|---|",
        ]
        for r in rows:
            if r["status"] == "pruned":
                onnx = (
                    "yes"
                    if r.get("onnx_match")
                    else (
                        f"**no** ({r.get('onnx_rel_err_b1', 0):.1e} / "
                        f"{r.get('onnx_rel_err_b4', 0):.1e})"
                    )
                )
                ranked = ", ".join(f"{k} {v}" for k, v in r.get("ranked_by", {}).items())
                kept = r.get("kept_whole") or []
                note = "; ".join(kept[:3]) + (f"; +{len(kept) - 3} more" if len(kept) > 3 else "")
            else:
                onnx, ranked, note = "", "", f"{r.get('stage') or ''}: {r.get('reason')}"
            macs = "" if r.get("macs") is None else f"{r['macs'] / 1e9:.3g} G"
            lines.append(
                f"| {r['model'].removeprefix('timm:')} | {r['status']} "
                f"| {macs} | {_ratio(r.get('macs_ratio'))} "
                f"| {_ratio(r.get('params_ratio'))} | {r.get('prune_s') or ''} | {onnx} "
                f"| {ranked} | {note.replace('|', '/')} |"
            )
        lines.append("")
    return "\n".join(lines)


def sweep(names: Sequence[str], args: argparse.Namespace, command: str) -> dict[str, Any]:
    return pass_sweep(
        names,
        args.out,
        "prune_zoo",
        settings={"budget": args.budget, "size": args.size},
        run=lambda name: run_in_subprocess(name, args.budget, args.size, args.timeout),
        render=render,
        line=lambda r: f"{r['status']} {_ratio(r.get('macs_ratio'))} {r.get('reason') or ''}",
        command=command,
        resume=args.resume,
        jobs=args.jobs,
        script=SCRIPT,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sweep_arguments(parser, timeout=DEFAULT_TIMEOUT_S)
    parser.add_argument("--budget", type=float, default=0.5, help="ChannelPrune(macs=BUDGET)")
    args = parser.parse_args(argv)
    if args.one:
        emit_one(prune_model(args.one, args.budget, args.size), args.result_file)
        return 0
    try:
        data = sweep(select_models(args.models), args, shlex.join(["python", SCRIPT, *argv]))
    except ZooError as exc:
        print(f"[prune_zoo] {exc}", file=sys.stderr, flush=True)
        return 2
    counts = {
        s: sum(r["status"] == s for r in data["results"].values())
        for s in ("pruned", "refused", "failed")
    }
    print(f"[prune_zoo] {counts}; wrote {args.out / 'prune_zoo.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
