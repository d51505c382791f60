"""PotQuantize sweep: bit widths and exponent searches vs output fidelity, size and latency.

For each model, in one run on one machine: the float model compiled with ``FoldBatchNorm``,
then ``FoldBatchNorm + PotQuantize(calib, weight_bits=W, act_bits=A, search=S)`` for each
configuration, all to the ONNX backend. Per row: the output SNR against the float model and
the SNR of the centred outputs (each output minus its mean over the held-out inputs: the part
that depends on the input; a random-weight model can give every input nearly the same logits,
as mobilenet_v2 here predicts one class for all of them, which made the former "top-1 agree"
column vacuous), on ``--held-out`` inputs the calibration never saw; the bytes of the ONNX
initializers (weights), the time PotQuantize took, and the median onnxruntime latency at
batch 1 twice: Q/DQ run as written (the bit-exact default) and fused into onnxruntime's int8
kernels (``fuse_qdq``), each with its ratio to the float model's latency.

Random weights (nothing is downloaded; ``make_nondegenerate`` from zoo.py sets BatchNorm
statistics from a random batch) and random-normal inputs for calibration and held-out data:
the SNRs measure how faithfully the quantized network reproduces the
float one, not ImageNet accuracy.

    python benchmarks/quantize.py --models resnet18,mobilenet_v2

``--search-models resnet50,vit_base_patch16_224`` adds a second table: the wall and CPU time
of PotQuantize at 224x224 with ``--search-images`` calibration images for each of
``--searches``: the per-tensor "mse" search (where the joint one starts), the joint search
scored on the network's outputs, the block-wise one, and RAPQ's BatchNorm-statistics
objective; with the number of quantizers, moves taken, the objective before and after, and
the output SNR against the float model on ``--search-held-out`` other inputs. Without
``--models`` only that table is refreshed:

    python benchmarks/quantize.py --models "" --search-models resnet50,vit_base_patch16_224
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, header, latency_ms, load_average, load_text, snr_db, write_results
from zoo import make_nondegenerate

from edgefx import EdgefxError

SEED = 0
CONFIGS = ("8/8:minmax", "8/8:mse", "8/8:joint", "4/8:joint", "4/4:joint")


def _initializer_bytes(compiled: Any) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in compiled.artifact.model.graph.initializer)


def run_model(
    name: str, configs: list[str], size: int, repeat: int, calib_n: int, held_out: int
) -> list[dict[str, Any]]:
    import edgefx
    from edgefx.frontend.zoo import resolve_model
    from edgefx.passes import FoldBatchNorm, PotQuantize

    model = resolve_model(name).model
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(SEED))
    make_nondegenerate(model, (x,), batch=8)
    gen = torch.Generator().manual_seed(SEED + 1)
    calib = [torch.randn(8, 3, size, size, generator=gen) for _ in range(calib_n // 8)]
    test = torch.randn(held_out, 3, size, size, generator=gen)

    float_compiled = edgefx.compile(model, (x,), [FoldBatchNorm()], "onnx", progress=False)
    float_out = float_compiled(test)
    float_ms = latency_ms(lambda: float_compiled(x), repeat)
    float_bytes = _initializer_bytes(float_compiled)
    rows = [
        {
            "model": name,
            "config": "float",
            "snr_db": None,
            "centred_snr_db": None,
            "float_classes": int(float_out.argmax(1).unique().numel()),
            "weight_bytes": float_bytes,
            "pass_s": 0.0,
            "ort_ms": float_ms,
            "ort_fused_ms": float_ms,
            "float_ms": float_ms,
        }
    ]
    for config in configs:
        bits, _, search = config.partition(":")
        weight_bits, act_bits = (int(b) for b in bits.split("/"))
        quantize = PotQuantize(
            calib, weight_bits=weight_bits, act_bits=act_bits, search=search, search_samples=8
        )
        compiled = edgefx.compile(
            float_compiled.program, passes=[quantize], backend="onnx", progress=False
        )
        (result,) = compiled.report.passes
        fused = edgefx.compile(
            compiled.program,
            backend="onnx",
            backend_options={"fuse_qdq": True},
            tolerance=1.0,
            progress=False,
        )
        out = compiled(test)
        # float, Q/DQ and fused measured back to back, so drift on the machine hits all three
        float_ms = latency_ms(lambda: float_compiled(x), repeat)
        rows.append(
            {
                "model": name,
                "config": config,
                "snr_db": snr_db(out, float_out),
                "centred_snr_db": snr_db(out - out.mean(0), float_out - float_out.mean(0)),
                "float_classes": int(float_out.argmax(1).unique().numel()),
                "weight_bytes": _initializer_bytes(compiled),
                "pass_s": result.wall_s,
                "joint_steps": result.report["calib_error"]["joint_steps"],
                "ort_ms": latency_ms(lambda c=compiled: c(x), repeat),
                "ort_fused_ms": latency_ms(lambda c=fused: c(x), repeat),
                "float_ms": float_ms,
            }
        )
        del compiled, fused  # their onnxruntime thread pools must not compete with the next
        gc.collect()
        r = rows[-1]
        print(
            f"[quantize] {name} {config}: SNR {r['snr_db']:.1f} dB, "
            f"centred {r['centred_snr_db']:.1f} dB, "
            f"{r['ort_ms']:.2f} ms / fused {r['ort_fused_ms']:.2f} ms (float {r['float_ms']:.2f})",
            file=sys.stderr,
        )
    for r in rows:
        r["ratio"] = r["float_ms"] / r["ort_ms"]
        r["fused_ratio"] = r["float_ms"] / r["ort_fused_ms"]
        r["size_ratio"] = r["weight_bytes"] / float_bytes
    return rows


# (label, PotQuantize keyword arguments) of the search-time table
SEARCHES = {
    "mse": {"search": "mse"},
    "joint": {"search": "joint"},
    "joint block": {"search": "joint", "scope": "block"},
    "joint bn_stats": {"search": "joint", "objective": "bn_stats"},
}


def search_time(name: str, images: int, variants: list[str], held_out: int) -> list[dict[str, Any]]:
    """Wall and CPU time of each exponent search on ``name`` at 224x224, and the quantized
    model's output SNR against the float model on ``held_out`` other random inputs."""
    from edgefx.frontend import capture
    from edgefx.frontend.zoo import resolve_model
    from edgefx.passes import FoldBatchNorm, PassManager, PotQuantize

    model = resolve_model(name).model
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(SEED))
    make_nondegenerate(model, (x,), batch=4)
    unfolded = capture(model, (x,))
    folded, _ = PassManager([FoldBatchNorm()]).run(unfolded)
    gen = torch.Generator().manual_seed(SEED + 2)
    calib = [torch.randn(images, 3, 224, 224, generator=gen)]
    test = torch.randn(held_out, 3, 224, 224, generator=gen)
    with torch.no_grad():
        (float_out,) = folded.run_flat([test])
    rows = []
    for label in variants:
        kwargs = SEARCHES[label]
        # RAPQ's objective reads the BatchNorms, which PotQuantize folds itself
        program = unfolded if kwargs.get("objective") == "bn_stats" else folded
        row: dict[str, Any] = {"model": name, "images": images, "search": label}
        cpu = time.process_time()
        try:
            result = PotQuantize(calib, search_samples=images, **kwargs)(program)
        except EdgefxError as exc:  # bn_stats on a model without BatchNorm
            rows.append({**row, "refused": str(exc).splitlines()[0]})
            continue
        row["wall_s"] = result.wall_s
        # CPU seconds of this process (all threads): unlike the wall time, barely moved by
        # other jobs on a shared machine; on 2 cores the wall time is at least half of it
        row["cpu_s"] = round(time.process_time() - cpu, 1)
        calib_error = result.report["calib_error"]
        row.update(
            quantizers=result.report["quantizers"],
            moves=calib_error["joint_steps"],
            start_error=calib_error["start"],
            final_error=calib_error["final"],
        )
        with torch.no_grad():
            (out,) = result.program.run_flat([test])
        row["held_out_snr_db"] = snr_db(out, float_out)
        rows.append(row)
        print(f"[quantize] search time {name}: {row}", file=sys.stderr)
        del result
        gc.collect()
    return rows


def render(data: dict[str, Any]) -> str:
    lines = [
        "# PotQuantize: bit widths and searches vs fidelity, size and onnxruntime latency",
        "",
        f"Produced by `{data['command']}` on {data['machine']} ({data['date']}); "
        f"{data['size']}x{data['size']}, calibration {data['calib']} random-normal images "
        f"(the joint search scores 8 of them), fidelity on {data['held_out']} other ones; "
        f"latency: median of {data['repeat']} runs at batch 1 after 5 warm-up runs, "
        "onnxruntime CPU, default threads. Random weights: `SNR` compares the quantized outputs "
        "with the float model's, not with labels; `centred SNR` compares the outputs minus "
        "their mean over the held-out inputs (the input-dependent part); `classes` = distinct "
        "top-1 classes the float model gives the held-out inputs (1 = a top-1 agreement "
        "would say nothing). `W/A:search` = weight "
        "bits / activation bits : exponent search. `ORT ms` runs Q/DQ as written (bit-exact), "
        "`fused` lets onnxruntime use its int8 kernels; `x` = float latency / this latency, "
        "the float model measured right before each row (`float ms`).",
        "",
        "| model | W/A:search | SNR dB | centred SNR dB | classes | weights | size "
        "| PotQuantize s | float ms "
        "| ORT ms | x | fused ms | x |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in data["rows"]:
        snr = "-" if r["snr_db"] is None else f"{r['snr_db']:.1f}"
        centred = "-" if r["centred_snr_db"] is None else f"{r['centred_snr_db']:.1f}"
        lines.append(
            f"| {r['model']} | {r['config']} | {snr} | {centred} | {r['float_classes']} "
            f"| {r['weight_bytes'] / 2**20:.2f} MiB | {r['size_ratio']:.2f} | {r['pass_s']:.1f} "
            f"| {r['float_ms']:.2f} | {r['ort_ms']:.2f} | {r['ratio']:.2f} "
            f"| {r['ort_fused_ms']:.2f} | {r['fused_ratio']:.2f} |"
        )
    lines += search_section(data)
    return "\n".join(lines) + "\n"


def search_section(data: dict[str, Any]) -> list[str]:
    """The search timing table (markdown lines), if the run measured it."""
    if not data.get("search"):
        return []
    lines: list[str] = []
    run = data.get("search_run") or data
    where = (
        f"Produced by `{run['command']}` on {run['machine']} ({run['date']}; "
        f"{load_text(run.get('load_average'))})"
        if "search_run" in data
        else "Measured on the machine above"
    )
    lines += [
        "",
        "## Search time at 224x224",
        "",
        f"{where}. PotQuantize(search=..., search_samples={data['search_images']}) at W8A8 "
        f"with {data['search_images']} random-normal calibration images, on the model after "
        "FoldBatchNorm (`joint bn_stats`: on the unfolded model, since RAPQ's objective reads "
        "the BatchNorms PotQuantize folds itself). `s`: seconds of the whole pass "
        "(calibration, per-tensor exponents, search), wall time and, in brackets, CPU seconds "
        "of the process (all threads; on a quiet 2-core machine the wall time is at least "
        "half of it). `objective`: what the search minimises, before and after it (the "
        "relative squared output error on the calibration images; for bn_stats the "
        "BatchNorm-statistics distance, not comparable across rows). `held-out SNR`: the "
        "quantized model's outputs against the float model's on "
        f"{data.get('held_out_search', '?')} other random inputs, the figure comparable "
        "across rows.",
        "",
        "| model | search | quantizers | s | moves | objective start | objective final "
        "| held-out SNR dB |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in data["search"]:
        if "refused" in r:
            lines.append(f"| {r['model']} | {r['search']} | refused: {r['refused']} |||||||")
            continue
        secs = f"{r['wall_s']:.1f} ({r['cpu_s']:.0f} CPU)"
        lines.append(
            f"| {r['model']} | {r['search']} | {r['quantizers']} | {secs} | {r['moves']} "
            f"| {r['start_error']:.3g} | {r['final_error']:.3g} | {r['held_out_snr_db']:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--calib", type=int, default=32, help="calibration images (x8)")
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--search-models", default="")
    parser.add_argument("--search-images", type=int, default=4)
    parser.add_argument("--searches", default=",".join(SEARCHES), help="rows of the search table")
    parser.add_argument("--search-held-out", type=int, default=8)
    args = parser.parse_args(argv)
    rows = []
    start = time.perf_counter()
    load = {"start": load_average()}
    search = [
        row
        for name in filter(None, args.search_models.split(","))
        for row in search_time(
            name, args.search_images, args.searches.split(","), args.search_held_out
        )
    ]
    load["end"] = load_average()
    previous = args.out / "quantize.json"
    if not args.models and search and previous.is_file():
        # only the search table: the sweep's rows (and their header) stay as they were
        data = json.loads(previous.read_text())
        data.update(
            search=search,
            search_images=args.search_images,
            held_out_search=args.search_held_out,
            search_run={**header("quantize.py", argv), "load_average": load},
        )
        md = (args.out / "quantize.md").read_text()
        md = md.split("\n## Joint search time")[0].split("\n## Search time")[0]
        write_results(args.out, "quantize", data, md.rstrip("\n") + "\n" + "\n".join(
            search_section(data)) + "\n")  # fmt: skip
        return 0
    for name in filter(None, args.models.split(",")):
        rows.extend(
            run_model(
                name, args.configs.split(","), args.size, args.repeat, args.calib, args.held_out
            )
        )
    data = {
        **header("quantize.py", argv),
        "size": args.size,
        "calib": args.calib,
        "held_out": args.held_out,
        "repeat": args.repeat,
        "total_s": time.perf_counter() - start,
        "rows": rows,
        "search": search,
        "search_images": args.search_images,
        "held_out_search": args.search_held_out,
    }
    write_results(args.out, "quantize", data, render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
