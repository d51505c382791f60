"""PotQuantize across the model zoo: which models quantize at W8A8, which are refused (and
why), which fail; the pass and compile times, how closely the ONNX artifact follows the
quantized Program, and how far the quantized Program is from the float model.

For each model of benchmarks/zoo.py's list (every torchvision classifier and the timm
families; random weights, nothing downloaded) in a fresh subprocess: resolve it, make its
random weights non-degenerate as the zoo sweep does (``zoo.make_nondegenerate``), capture it
with a dynamic batch, then

    edgefx.compile(program, passes=[PotQuantize(calib, search=SEARCH)], backend="onnx")

at W8A8 (BatchNorms folded inside the pass) with ``--calib-images`` random-normal
calibration images. compile()'s own check decides whether the ONNX artifact agrees with the
quantized Program (exact to 1e-4, or within its documented quantization-step check; see
``edgefx.compiler.QUANTIZED_*``); when it refuses, the model is recorded as failed at stage
``check`` with compile()'s reason, and compiled again with ``tolerance=inf`` only to show the
figures. Then the float Program, the quantized Program and the ONNX artifact run on
``--held-out`` other random-normal images: the SNR of the quantized outputs (Program and
ONNX) against the float ones.

Status: ``quantized``; ``refused`` (PotQuantize said why, or found nothing to quantize);
``failed`` (capture, the pass, the ONNX export or compile()'s check raised, or the process
timed out / died). The agreement figures are whatever ``compiled.report.quantized_check``
holds (and any check field a newer CompileReport adds, shown under "more checks").

The default search is ``"mse"`` (per tensor), said in the table's title: the joint search
costs about two forward passes per quantizer and sweep (issue #8: about 25 minutes on a
ViT-B on this machine), which over 141 models would dwarf everything else measured here;
``--search joint`` runs it (not timed here).

    python benchmarks/quantize_zoo.py --models all --jobs 2 --timeout 1800   # the full table
    python benchmarks/quantize_zoo.py --models ci --out /tmp/qz                # the CI subset
    python benchmarks/quantize_zoo.py --models resnet18,timm:levit_128s --size 64 --out /tmp/qz
    python benchmarks/quantize_zoo.py --models all --jobs 2 --resume   # finish an interrupted run
    python benchmarks/quantize_zoo.py --one timm:deit_tiny_patch16_224 --size 64

Duration of the full run (141 models at their default sizes, 2 cores): estimated 7 to 11
hours of per-model time, so about 3.5 to 5.5 hours at ``--jobs 2`` (zoo.md's ONNX sweep ran
3.0 hours of per-model time in 1 h 44 min at --jobs 2). How: ``--models ci`` here (2-core
machine shared with other jobs, load average 6 to 8) took 1.5 times zoo.json's per-model
time on the four CNNs (243 s against 162 s) and 7.6 times on deit_tiny and swin_tiny (554 s
against 73 s: the quantized graph's ONNX export took 74 to 105 s against 10 to 25 s for the
float one, and both failed compile()'s check, so each was compiled twice). Applied to
zoo.json's 99 other models (7,077 s) at 1.5x and its 42 attention / token-mixer models
(3,608 s) at 4x (checks passing) to 7.6x. The search is not what costs: PotQuantize took 1.5
to 17 s of those. ``--timeout 1800`` caps the largest (vit_h_14, vit_l_16); regnet_y_128gf
peaked at 18 GB in the ONNX sweep and may be killed for memory here (recorded as failed).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zoo import (
    ZooError,
    _error_stage,
    _leaves,
    _one_line,
    _peak_rss_mb,
    _si,
    add_sweep_arguments,
    commit_and_machine,
    emit_one,
    failure_reason,
    input_sensitivity,
    make_nondegenerate,
    pass_result,
    pass_sweep,
    produced_by,
    resolve_sized,
    run_one_isolated,
    select_models,
)

SCRIPT = "benchmarks/quantize_zoo.py"
SEARCHES = ("mse", "joint", "minmax")
DEFAULT_SEARCH = "mse"
CALIB_IMAGES = 4
HELD_OUT = 4
RUN_BATCH = 4  # make_nondegenerate's BatchNorm batch
CALIB_SEED = 4
HELD_OUT_SEED = 5
DEFAULT_TIMEOUT_S = 1800
# CompileReport fields of today; any other one a newer compile() adds (another check) is
# recorded and shown as it is
_KNOWN_REPORT_FIELDS = frozenset(
    {
        "model",
        "backend",
        "capture_s",
        "captured",
        "passes",
        "build_s",
        "backend_check",
        "backend_check_skipped",
        "backend_info",
        "quantized_check",
    }
)
# quantized_check keys the table has columns for; the others go to "more checks"
_STEP_COLUMNS = ("equal", "beyond_one_step", "max_steps", "snr_db")
_STEP_SHOWN = frozenset({*_STEP_COLUMNS, "step", "within_one_step"})


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def _snr(reference: Sequence[Any], actual: Sequence[Any]) -> float | None:
    """SNR of ``actual`` against ``reference`` in dB (None when they are equal)."""
    from edgefx.analysis.numerics import NumericError

    return _finite(NumericError.between(reference, actual).snr_db)


def _checks(report: Any) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """compile()'s quantized check as it reports it, and any check fields it has beyond
    today's (JSON-ready, as in the manifest)."""
    fields = report.to_dict()
    return fields.get("quantized_check"), {
        k: v for k, v in fields.items() if k not in _KNOWN_REPORT_FIELDS
    }


def _refusal(exc: Exception) -> bool:
    """A PassError the pass raised to refuse the graph, not one saying the pass is broken."""
    from edgefx.errors import PassError

    return isinstance(exc, PassError) and "bug in the pass" not in (exc.hint or "")


def quantize_model(
    name: str, *, search: str, size: int | None, calib_images: int, held_out: int
) -> dict[str, Any]:
    """Quantize ``name`` at W8A8, compile it to ONNX and measure it; never raises for a model
    that fails (the result says where and why)."""
    import torch

    import edgefx
    from edgefx.compiler import quantized_agreement
    from edgefx.errors import BackendError
    from edgefx.frontend import capture
    from edgefx.passes import PotQuantize

    result = pass_result(name, SCRIPT, search=search)
    start = time.perf_counter()
    try:
        model, x1 = resolve_sized(name, size, result)

        def images(count: int, seed: int) -> tuple[torch.Tensor, ...]:
            generator = torch.Generator().manual_seed(seed)
            return tuple(
                torch.randn((count, *x.shape[1:]), generator=generator, dtype=x.dtype) for x in x1
            )

        make_nondegenerate(model, x1, batch=RUN_BATCH)
        result["stage"] = "capture"
        program = capture(model, x1)
        result["stage"] = "quantize"
        quantize = PotQuantize([images(calib_images, CALIB_SEED)], search=search)
        begin = time.perf_counter()
        try:
            compiled = edgefx.compile(program, passes=[quantize], backend="onnx", progress=False)
        except BackendError as exc:
            if _error_stage(exc) != "check":
                raise
            # compile() refused the artifact: that is the result; compile again without the
            # check, only to show how far apart the two are
            result["check_refused"] = _one_line(exc.message)
            begin = time.perf_counter()
            compiled = edgefx.compile(
                program, passes=[quantize], backend="onnx", progress=False, tolerance=math.inf
            )
        report = compiled.report
        (quantized,) = report.passes
        details = quantized.report
        result.update(
            macs=report.captured.macs,
            pass_s=round(quantized.wall_s, 2),
            compile_s=round(time.perf_counter() - begin, 2),
            build_s=round(report.build_s, 2),
            layers=len(details["layers"]),
            matmuls=len(details.get("matmuls", [])),
            skipped=len(details["skipped"]),
            skipped_reasons=Counter(s["reason"] for s in details["skipped"]).most_common(),
            float_islands=len(details.get("float_islands", [])),
            batchnorm_folded=details.get("batchnorm_folded"),
            example_snr_db=_finite(quantized.error.snr_db),
            onnx_rel_err=report.backend_check.relative if report.backend_check else None,
        )
        result["quantized_check"], result["more_checks"] = _checks(report)
        if not result["layers"] and not result["matmuls"]:
            reasons = "; ".join(f"{n}x {r}" for r, n in result["skipped_reasons"][:3])
            result.update(
                status="refused",
                stage=None,
                reason=f"nothing quantized: {reasons or 'no conv or linear layer'}",
            )
            return result

        result["stage"] = "held-out"
        test = images(held_out, HELD_OUT_SEED)
        with torch.no_grad():
            reference = program.run_flat(list(test))
            quantized_out = compiled.program.run_flat(list(test))
        onnx_out = _leaves(compiled(*test))
        result.update(
            sensitivity=input_sensitivity(reference),
            snr_db=_snr(reference, quantized_out),
            centred_snr_db=_snr(
                [r - r.mean(0) for r in reference], [q - q.mean(0) for q in quantized_out]
            ),
            onnx_snr_db=_snr(reference, onnx_out),
            held_out_check={
                k: _finite(v) for k, v in quantized_agreement(quantized_out, onnx_out).items()
            },
        )
        if "check_refused" in result:
            result.update(stage="check", reason=result["check_refused"])
        else:
            result.update(status="quantized", stage=None)
    except Exception as exc:  # a failing model is a result, not a crash of the sweep
        if result["stage"] == "quantize":
            result["stage"] = {"passes": "quantize", "backend": "onnx"}.get(
                _error_stage(exc), _error_stage(exc)
            )
        status = "refused" if result["stage"] == "quantize" and _refusal(exc) else "failed"
        result.update(status=status, reason=failure_reason(exc), error=str(exc)[:4000])
    finally:
        result["total_s"] = round(time.perf_counter() - start, 2)
        result["peak_rss_mb"] = _peak_rss_mb()
    return result


def run_in_subprocess(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`quantize_model` in a fresh interpreter (memory isolation), killed at timeout."""
    start = time.perf_counter()
    options = [
        "--search",
        args.search,
        "--calib-images",
        str(args.calib_images),
        "--held-out",
        str(args.held_out),
        *([] if args.size is None else ["--size", str(args.size)]),
    ]
    result, reason = run_one_isolated(Path(__file__).resolve(), name, options, args.timeout)
    return result or {
        **pass_result(name, SCRIPT, search=args.search),
        "stage": None,
        "reason": reason,
        "total_s": round(time.perf_counter() - start, 2),
    }


# --------------------------------------------------------------------------- table
def _num(x: Any, spec: str = ".3g") -> str:
    if isinstance(x, str):  # to_dict writes inf / nan as text
        return x
    return "" if x is None else format(x, spec)


def _more(result: dict[str, Any]) -> str:
    """The check figures the table has no column for (a newer compile()'s), as key=value:
    numbers as they are, a dict's numbers as key.name=value, a list by its length."""
    q = result.get("quantized_check") or {}
    fields = {
        **{k: v for k, v in q.items() if k not in _STEP_SHOWN},
        **(result.get("more_checks") or {}),
    }
    parts = []
    for key, value in fields.items():
        if isinstance(value, dict):
            parts += [
                f"{key}.{k}={_num(v)}"
                for k, v in value.items()
                if isinstance(v, (int, float, str)) and not isinstance(v, bool)
            ]
        elif isinstance(value, list):
            parts.append(f"{key}: {len(value)} entries")
        elif value is not None:
            parts.append(f"{key}={_num(value)}")
    return "; ".join(parts)


def _row(r: dict[str, Any]) -> str:
    q = r.get("quantized_check") or {}
    steps = [_num(q.get(k), ".4g") for k in _STEP_COLUMNS]
    status = r["status"] if r["status"] != "failed" else f"**failed** ({r.get('stage')})"
    note = r.get("reason") or ""
    if r.get("skipped"):
        top = "; ".join(f"{n}x {reason}" for reason, n in (r.get("skipped_reasons") or [])[:2])
        note = f"{note}; " if note else ""
        note += f"{r['skipped']} left in float ({top})"
    cells = [
        r["model"].removeprefix("timm:"),
        status,
        _si(r.get("macs")),
        _num(r.get("layers")),
        _num(r.get("matmuls")),
        _num(r.get("pass_s"), ".1f"),
        _num(r.get("compile_s"), ".1f"),
        *steps,
        _more(r),
        _num(r.get("snr_db"), ".1f"),
        _num(r.get("centred_snr_db"), ".1f"),
        _num(r.get("onnx_snr_db"), ".1f"),
        _num(r.get("total_s"), ".0f"),
        note,
    ]
    return "| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |"


def render(data: dict[str, Any]) -> str:
    results = data["results"]
    done = [results[n] for n in data["models"] if n in results]
    size = f"{data['size']}x{data['size']}" if data.get("size") else "each model's default size"
    lines = [
        f"# PotQuantize across the model zoo: W8A8, search={data['search']!r}",
        "",
        *produced_by(data),
        *commit_and_machine(data),
        f"- random weights made non-degenerate as in zoo.md; captured at batch 1 with a "
        f"dynamic batch at {size}; `edgefx.compile(program, passes=[PotQuantize(calib, "
        f'search={data["search"]!r})], backend="onnx")` at W8A8 (BatchNorms folded inside '
        f"the pass) with {data['calib_images']} random-normal calibration images"
        + (
            " (the per-tensor search: `--search joint` runs the joint one)"
            if data["search"] == "mse"
            else ""
        )
        + ".",
        "- **ONNX vs the quantized Program** on the example input, as compile() checks it "
        "(`report.quantized_check`): `equal` = share of output elements bit-equal, "
        "`>1 step` = share more than one step of an 8-bit grid over the output range off, "
        "`max steps`, `SNR` between the two in dB; `more checks` = any other figure the "
        "report holds. A model compile() refuses is **failed (check)** with its reason; its "
        "figures come from compiling again with `tolerance=inf`.",
        f"- **vs float** on {data['held_out']} held-out random-normal images: SNR in dB of "
        "the quantized Program's outputs against the float Program's, the same for the "
        "outputs minus their mean over the images (`centred`: the input-dependent part) and "
        "of the ONNX artifact's outputs. `PotQuantize s` = the pass alone; `compile s` = "
        "compile() with the pass, the ONNX export and its check; `total s` = the whole "
        "model (resolve, capture, compile, held-out runs).",
        "",
    ]
    for source in ("torchvision", "timm"):
        rows = sorted((r for r in done if r["source"] == source), key=lambda r: r["model"])
        if not rows:
            continue
        count = Counter(r["status"] for r in rows)
        exact = sum(
            (r.get("quantized_check") or {}).get("equal") == 1
            for r in rows
            if r["status"] == "quantized"
        )
        lines += [
            f"## {source}: {count['quantized']} quantized, {count['refused']} refused, "
            f"{count['failed']} failed of {len(rows)} run; ONNX bit-equal on "
            f"{exact} of {count['quantized']} quantized",
            "",
            "| model | status | MACs | layers | matmuls | PotQuantize s | compile s "
            "| ONNX equal | >1 step | max steps | ONNX SNR dB | more checks "
            "| SNR vs float dB | centred | ONNX vs float dB | total s | reason / notes |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|---|",
            *map(_row, rows),
            "",
        ]
    return "\n".join(lines)


def _line(r: dict[str, Any]) -> str:
    if r["status"] == "quantized":
        q = r.get("quantized_check") or {}
        return (
            f"quantized: {r.get('layers')} layers, {r.get('matmuls')} matmuls, "
            f"{r.get('pass_s')} s; ONNX equal {_num(q.get('equal'), '.4g')}; "
            f"SNR vs float {_num(r.get('snr_db'), '.1f')} dB"
        )
    return f"{r['status']} ({r.get('stage')}): {r.get('reason')}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sweep_arguments(parser, timeout=DEFAULT_TIMEOUT_S)
    parser.add_argument(
        "--search",
        choices=SEARCHES,
        default=DEFAULT_SEARCH,
        help=f"PotQuantize's exponent search (default {DEFAULT_SEARCH})",
    )
    parser.add_argument("--calib-images", type=int, default=CALIB_IMAGES)
    parser.add_argument("--held-out", type=int, default=HELD_OUT)
    args = parser.parse_args(argv)
    if args.one:
        emit_one(
            quantize_model(
                args.one,
                search=args.search,
                size=args.size,
                calib_images=args.calib_images,
                held_out=args.held_out,
            ),
            args.result_file,
        )
        return 0
    settings = {
        "search": args.search,
        "size": args.size,
        "calib_images": args.calib_images,
        "held_out": args.held_out,
    }
    try:
        data = pass_sweep(
            select_models(args.models),
            args.out,
            "quantize_zoo",
            settings=settings,
            run=lambda name: run_in_subprocess(name, args),
            render=render,
            line=_line,
            command=shlex.join(["python", SCRIPT, *argv]),
            resume=args.resume,
            jobs=args.jobs,
            script=SCRIPT,
        )
    except ZooError as exc:
        print(f"[quantize_zoo] {exc}", file=sys.stderr, flush=True)
        return 2
    counts = Counter(r["status"] for r in data["results"].values())
    print(f"[quantize_zoo] {dict(counts)}; wrote {args.out / 'quantize_zoo.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
