"""TVM on x86 at batch 1: untuned (TVM's default schedules), MetaSchedule-tuned, onnxruntime
and torch eager, medians side by side in one run, with compile and tuning times.

    python benchmarks/tvm.py --models resnet18,mobilenet_v2,deit_small --tune-trials 64

Random weights; every backend gets the same BatchNorm-folded Program; static batch 1 (tuning
needs static shapes). The tuning database goes to --work-dir (reused by later runs: tasks that
already hold enough records there are not tuned again, and the table says how many were).
Latencies are interleaved: every round calls each backend once, so load on a shared machine
hits them alike; the load average is recorded at the start and the end of the run and when
each model's timing starts."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# this file is named tvm.py: with its folder first on sys.path, `import tvm` would import it
HERE = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
from common import RESULTS, header, load_average, write_results  # noqa: E402

import edgefx  # noqa: E402
from edgefx.frontend import capture  # noqa: E402
from edgefx.passes import FoldBatchNorm, PassManager  # noqa: E402

MODELS = {"resnet18": "resnet18", "mobilenet_v2": "mobilenet_v2",
          "deit_small": "timm:deit_small_patch16_224"}  # fmt: skip
WARMUP = 3


def build_model(name: str, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    if name == "deit_small":  # timm sizes the position embedding for --size
        import timm

        model = timm.create_model("deit_small_patch16_224", pretrained=False, img_size=size)
        return model.eval(), x
    from edgefx.frontend.zoo import resolve_model

    return resolve_model(MODELS[name], (1, 3, size, size)).model.eval(), x


def timed_compile(
    program: edgefx.Program, backend: str, **options
) -> tuple[edgefx.Compiled, float]:
    start = time.perf_counter()
    compiled = edgefx.compile(program, backend=backend, progress=False, backend_options=options)
    return compiled, time.perf_counter() - start


def interleaved_medians(runs: dict[str, tuple], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """{name: median ms of ``run(x)``}; ``runs`` maps a name to (run, its number of rounds):
    every round calls each run that still has rounds left once, after WARMUP calls each."""
    for run, _ in runs.values():
        for _ in range(WARMUP):
            run(x)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(rounds):
        for name, (run, limit) in runs.items():
            if round_index < limit:
                start = time.perf_counter()
                run(x)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,deit_small")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--repeat-untuned", type=int, default=5, help="untuned TVM is slow")
    parser.add_argument("--tune-trials", type=int, default=64)
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache/edgefx/tuning/bench"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    load = {"start": load_average()}
    print(f"TVM benchmark: {', '.join(names)} at {args.size}x{args.size}, "
          f"{args.tune_trials} trials; load average {load['start']} at the start "
          f"({os.cpu_count()} cores)", flush=True)  # fmt: skip

    rows = []
    for name in names:
        model, x = build_model(name, args.size)
        program = capture(model, (x,), dynamic_batch=False, name=name)
        program, _ = PassManager([FoldBatchNorm()]).run(program)
        row: dict = {"model": name}
        untuned, row["untuned_compile_s"] = timed_compile(program, "tvm")
        row["untuned_rel_err"] = untuned.report.backend_check.relative
        tuned = None
        if args.tune_trials:
            # a work dir per model: the database of one model's run is reusable on its own
            tuned, row["tuned_compile_s"] = timed_compile(
                program, "tvm", tune_trials=args.tune_trials,
                work_dir=Path(args.work_dir) / f"{name}-{args.size}", progress=False,
            )  # fmt: skip
            row["tuning"] = tuned.artifact.build_info["tuning"]
            row["tuned_rel_err"] = tuned.report.backend_check.relative
        ort, row["ort_compile_s"] = timed_compile(program, "onnx")
        runs = {"torch_ms": (model, args.repeat), "ort_ms": (ort, args.repeat),
                "tvm_untuned_ms": (untuned, args.repeat_untuned)}  # fmt: skip
        if tuned is not None:
            runs["tvm_tuned_ms"] = (tuned, args.repeat)
        row["load_at_timing"] = load_average()
        with torch.no_grad():
            row.update(interleaved_medians(runs, x, max(args.repeat, args.repeat_untuned)))
        rows.append(row)
        print(row, flush=True)
        load["end"] = load_average()
        write_table(args, argv, rows, load)  # after every model: a cut-short run leaves a table
    return 0


def write_table(args: argparse.Namespace, argv: list[str] | None, rows: list[dict],
                load: dict[str, float]) -> None:  # fmt: skip
    data = {**header("tvm.py", argv), "load_average": load, "rows": rows}
    data["versions"].update(tuned_versions())
    md = [
        "# TVM vs onnxruntime vs torch eager on x86 (batch 1)",
        "",
        f"Produced by `{data['command']}` on {data['machine']} ({data['date']}); "
        f"load average {load['start']} at the start, {load['end']} at the end (the column "
        "'load' is the load average when that model's timing began; on 2 cores, anything "
        "much above 0 inflates the figures). "
        f"{args.size}x{args.size}, batch 1, random weights, BatchNorm folded; interleaved "
        f"medians of {args.repeat} rounds ({args.repeat_untuned} for untuned TVM); every "
        "backend with its default threads. TVM tuned: MetaSchedule with the stated trials over "
        "the whole model, tuned task by task (a task that fails keeps TVM's default schedule; "
        "tasks whose records were already in the work dir are reused, not tuned again).",
        "",
        "| model | load | torch ms | ORT ms | TVM untuned ms | TVM tuned ms | tuned/ORT | "
        "trials | tasks tuned / reused / failed | tuning + compile s | untuned compile s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        t = r.get("tuning") or {}
        tuned_ms = r.get("tvm_tuned_ms")
        ratio = f"{tuned_ms / r['ort_ms']:.2f}x" if tuned_ms else "-"
        tasks = (f"{t['tasks_tuned']} / {t['tasks_reused']} / {len(t['tasks_failed'])}"
                 if t else "-")  # fmt: skip
        md.append(
            f"| {r['model']} | {r['load_at_timing']} | {r['torch_ms']:.1f} | {r['ort_ms']:.1f} | "
            f"{r['tvm_untuned_ms']:.1f} | {f'{tuned_ms:.1f}' if tuned_ms else '-'} | "
            f"{ratio} | {t.get('tune_trials', '-')} | {tasks} | "
            f"{r.get('tuned_compile_s', 0):.0f} | {r['untuned_compile_s']:.0f} |"
        )
    failures = {f"{r['model']}: {k}": v for r in rows
                for k, v in (r.get("tuning") or {}).get("tasks_failed", {}).items()}  # fmt: skip
    if failures:
        md += ["", "Tasks MetaSchedule failed on (they keep TVM's default schedule):", ""]
        md += [f"- {k}: `{v}`" for k, v in list(failures.items())[:20]]
    write_results(Path(args.out), "tvm", data, "\n".join(md) + "\n")


def tuned_versions() -> dict[str, str]:
    from edgefx.backends.tvm.backend import tvm_versions

    return {**tvm_versions(), "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
