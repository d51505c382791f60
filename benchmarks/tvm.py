"""TVM on x86 at batch 1: untuned (TVM's default schedules), MetaSchedule-tuned, onnxruntime
and torch eager, medians side by side in one run, with compile and tuning times.

    python benchmarks/tvm.py --models resnet18,mobilenet_v2,deit_small --tune-trials 64

Random weights; every backend gets the same BatchNorm-folded Program; static batch 1 (tuning
needs static shapes). The tuning database goes to --work-dir (reused by later runs)."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

# this file is named tvm.py: with its folder first on sys.path, `import tvm` would import it
HERE = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
from common import RESULTS, header, latency_ms, write_results  # noqa: E402

import edgefx  # noqa: E402
from edgefx.frontend import capture  # noqa: E402
from edgefx.passes import FoldBatchNorm, PassManager  # noqa: E402

MODELS = {"resnet18": "resnet18", "mobilenet_v2": "mobilenet_v2",
          "deit_small": "timm:deit_small_patch16_224"}  # fmt: skip


def build_model(name: str, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    from edgefx.frontend.zoo import resolve_model

    torch.manual_seed(0)
    resolved = resolve_model(MODELS[name], (1, 3, size, size))
    return resolved.model.eval(), resolved.example_inputs[0]


def timed_compile(
    program: edgefx.Program, backend: str, **options
) -> tuple[edgefx.Compiled, float]:
    start = time.perf_counter()
    compiled = edgefx.compile(program, backend=backend, progress=False, backend_options=options)
    return compiled, time.perf_counter() - start


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

    rows = []
    for name in args.models.split(","):
        model, x = build_model(name, args.size)
        program = capture(model, (x,), dynamic_batch=False, name=name)
        program, _ = PassManager([FoldBatchNorm()]).run(program)
        row: dict = {"model": name}
        untuned, row["untuned_compile_s"] = timed_compile(program, "tvm")
        tuned = None
        if args.tune_trials:
            tuned, row["tuned_compile_s"] = timed_compile(
                program, "tvm", tune_trials=args.tune_trials, work_dir=args.work_dir,
                progress=False,
            )  # fmt: skip
            row["tuning"] = tuned.artifact.build_info["tuning"]
            row["tuned_rel_err"] = tuned.report.backend_check.relative
        ort, row["ort_compile_s"] = timed_compile(program, "onnx")
        row["untuned_rel_err"] = untuned.report.backend_check.relative
        with torch.no_grad():
            row["torch_ms"] = latency_ms(lambda m=model, x=x: m(x), args.repeat)
        row["ort_ms"] = latency_ms(lambda c=ort, x=x: c(x), args.repeat)
        row["tvm_untuned_ms"] = latency_ms(
            lambda c=untuned, x=x: c(x), args.repeat_untuned, warmup=1
        )
        if tuned is not None:
            row["tvm_tuned_ms"] = latency_ms(lambda c=tuned, x=x: c(x), args.repeat)
        rows.append(row)
        print(row, flush=True)
        write_table(args, argv, rows)  # after every model: a cut-short run still leaves a table
    return 0


def write_table(args: argparse.Namespace, argv: list[str] | None, rows: list[dict]) -> None:
    data = {**header("tvm.py", argv), "rows": rows}
    data["versions"].update(tuned_versions())
    md = [
        "# TVM vs onnxruntime vs torch eager on x86 (batch 1)",
        "",
        f"Produced by `{data['command']}` on {data['machine']} ({data['date']}); "
        f"{args.size}x{args.size}, batch 1, random weights, BatchNorm folded; medians of "
        f"{args.repeat} runs ({args.repeat_untuned} for untuned TVM); measured on a shared, "
        "loaded 2-core machine, so absolute times are noisy; ratios within a row were taken "
        "minutes apart. TVM tuned: MetaSchedule with the stated trials over the whole model, "
        "tuned task by task (a task that fails keeps TVM's default schedule).",
        "",
        "| model | torch ms | ORT ms | TVM untuned ms | TVM tuned ms | tuned/ORT | trials | "
        "tasks tuned / failed | tuning + compile s | untuned compile s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        t = r.get("tuning") or {}
        tuned_ms = r.get("tvm_tuned_ms")
        ratio = f"{tuned_ms / r['ort_ms']:.2f}x" if tuned_ms else "-"
        md.append(
            f"| {r['model']} | {r['torch_ms']:.1f} | {r['ort_ms']:.1f} | "
            f"{r['tvm_untuned_ms']:.1f} | {f'{tuned_ms:.1f}' if tuned_ms else '-'} | "
            f"{ratio} | "
            f"{t.get('tune_trials', '-')} | "
            f"{t.get('tasks_tuned', '-')} / {len(t.get('tasks_failed', {}))} | "
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
