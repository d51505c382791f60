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
import json
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
from common import RESULTS, header, load_average, load_text, write_results  # noqa: E402

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
    parser.add_argument(
        "--tune-trials",
        default="64",
        help="MetaSchedule trials per model: N for every model, or MODEL=N,... (0: no tuning)",
    )
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache/edgefx/tuning/bench"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--tuned-by",
        default="",
        help="the tvm.json file(s), comma-separated, of the run(s) that tuned the work dir's "
        "databases: their tuning times are shown beside this run's timings (which reuse them)",
    )
    args = parser.parse_args(argv)
    earlier = {}
    for path in filter(None, args.tuned_by.split(",")):
        tuning_run = json.loads(Path(path).read_text())
        earlier.update({r["model"]: {**r["tuning"], "tuned_compile_s": r.get("tuned_compile_s"),
                                     "command": tuning_run["command"], "date": tuning_run["date"],
                                     "load_average": tuning_run.get("load_average")}
                        for r in tuning_run["rows"]
                        if (r.get("tuning") or {}).get("tasks_tuned")})  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models.split(",")
    trials = parse_trials(args.tune_trials, names)
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
        if trials[name]:
            # a work dir per model: the database of one model's run is reusable on its own
            tuned, row["tuned_compile_s"] = timed_compile(
                program, "tvm", tune_trials=trials[name],
                work_dir=Path(args.work_dir) / f"{name}-{args.size}", progress=False,
            )  # fmt: skip
            row["tuning"] = tuned.artifact.build_info["tuning"]
            if name in earlier:
                row["tuned_by"] = earlier[name]
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


def parse_trials(text: str, names: list[str]) -> dict[str, int]:
    """``--tune-trials``: "N" for every model or "MODEL=N,..." (unnamed models get 0)."""
    if "=" not in text:
        return dict.fromkeys(names, int(text))
    given = {k: int(v) for k, v in (item.split("=") for item in text.split(","))}
    unknown = set(given) - set(names)
    if unknown:
        raise SystemExit(f"--tune-trials names models not in --models: {sorted(unknown)}")
    return {name: given.get(name, 0) for name in names}


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
    tuned_by = {r["model"]: r["tuned_by"] for r in rows if r.get("tuned_by")}
    for r in rows:
        t = r.get("tuning") or {}
        tuned_ms = r.get("tvm_tuned_ms")
        ratio = f"{tuned_ms / r['ort_ms']:.2f}x" if tuned_ms else "-"
        tasks = (f"{t['tasks_tuned']} / {t['tasks_reused']} / {len(t['tasks_failed'])}"
                 if t else "-")  # fmt: skip
        tuning_s = f"{r.get('tuned_compile_s', 0):.0f}"
        if r["model"] in tuned_by:  # the database came from an earlier run: its figures
            by = tuned_by[r["model"]]
            tasks = f"{by['tasks_tuned']} / {by['tasks_reused']} / {len(by['tasks_failed'])}"
            tuning_s = f"{by['tuned_compile_s']:.0f} (tuning run)"
        md.append(
            f"| {r['model']} | {r['load_at_timing']} | {r['torch_ms']:.1f} | {r['ort_ms']:.1f} | "
            f"{r['tvm_untuned_ms']:.1f} | {f'{tuned_ms:.1f}' if tuned_ms else '-'} | "
            f"{ratio} | {t.get('tune_trials', '-')} | {tasks} | "
            f"{tuning_s} | {r['untuned_compile_s']:.0f} |"
        )
    runs = {(by["command"], by["date"]): by for by in tuned_by.values()}
    for (command, date), by in runs.items():
        key = (command, date)
        models = ", ".join(m for m, b in tuned_by.items() if (b["command"], b["date"]) == key)
        md += ["", f"The tuning databases of {models} were made by `{command}` ({date}; "
               f"{load_text(by.get('load_average'))}); this run applied them (its own "
               "'tasks reused' are in tvm.json), so the tasks and tuning seconds shown for them "
               "are the tuning run's, at the load stated there."]  # fmt: skip
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
