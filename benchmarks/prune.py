"""ChannelPrune sweep: MACs, params, output agreement and onnxruntime latency per MACs budget.

For each model and each budget (fraction of MACs kept), in one run on one machine:
``edgefx.compile(model, x, passes=[ChannelPrune(macs=f), FoldBatchNorm()], backend="onnx")``,
then the median onnxruntime latency at batch 1 over ``--repeat`` runs (after warm-up), and
the latency ratio to the unpruned model compiled the same way (``FoldBatchNorm`` only).

Random weights (nothing is downloaded), so accuracy is not measured: the BatchNorm scaling
factors are drawn from U(0, 1) (seeded) so the ranking has something to rank; the SNR column
says how far the pruned outputs are from the unpruned ones before any fine-tuning.

    python benchmarks/prune.py --models resnet18,mobilenet_v2 --budgets 0.75,0.5,0.3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, header, latency_ms, snr_db, write_results

SEED = 0


def _randomize_gammas(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=gen))


def run_model(name: str, budgets: list[float], size: int, repeat: int) -> list[dict[str, Any]]:
    import edgefx
    from edgefx.frontend.zoo import resolve_model
    from edgefx.passes import ChannelPrune, FoldBatchNorm

    resolved = resolve_model(name)
    model = resolved.model
    _randomize_gammas(model)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(SEED))
    rows = []
    reference = None
    base_ms = None
    for budget in [1.0, *budgets]:
        passes = (
            [FoldBatchNorm()] if budget == 1.0 else [ChannelPrune(macs=budget), FoldBatchNorm()]
        )
        start = time.perf_counter()
        compiled = edgefx.compile(model, (x,), passes=passes, backend="onnx", progress=False)
        compile_s = time.perf_counter() - start
        out = compiled(x)
        if reference is None:
            reference = out
        ms = latency_ms(lambda c=compiled: c(x), repeat)
        base_ms = base_ms or ms
        final = compiled.report.final
        rows.append(
            {
                "model": name,
                "budget": budget,
                "macs": final.macs,
                "params": final.params,
                "macs_ratio": final.macs / compiled.report.captured.macs,
                "snr_db": snr_db(out, reference),
                "ort_ms": ms,
                "speedup": base_ms / ms,
                "compile_s": compile_s,
                "threshold": None
                if budget == 1.0
                else compiled.report.passes[0].report["threshold"],
            }
        )
        print(
            f"[prune] {name} macs<={budget:g}: {final.macs / 1e6:.1f} M MACs, "
            f"{ms:.2f} ms ({base_ms / ms:.2f}x)",
            file=sys.stderr,
        )
    return rows


def render(data: dict[str, Any]) -> str:
    lines = [
        "# ChannelPrune: MACs budget vs onnxruntime latency",
        "",
        f"Produced by `{data['command']}` on {data['machine']} ({data['date']}); "
        f"median of {data['repeat']} runs at batch 1, {data['size']}x{data['size']}, after 5 "
        "warm-up runs; onnxruntime CPU, default threads. Random weights with BatchNorm gammas "
        "drawn from U(0, 1); `SNR` compares pruned with unpruned outputs (no fine-tuning).",
        "",
        "| model | MACs budget | MACs | MACs ratio | params | threshold | SNR dB | ORT ms "
        "| speed-up |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in data["rows"]:
        snr = "exact" if r["snr_db"] is None else f"{r['snr_db']:.1f}"
        threshold = "-" if r["threshold"] is None else f"{r['threshold']:.3f}"
        lines.append(
            f"| {r['model']} | {r['budget']:g} | {r['macs'] / 1e6:.1f} M | {r['macs_ratio']:.3f} "
            f"| {r['params'] / 1e6:.2f} M | {threshold} | {snr} | {r['ort_ms']:.2f} "
            f"| {r['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,resnet50")
    parser.add_argument("--budgets", default="0.75,0.5,0.3")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = []
    for name in args.models.split(","):
        rows.extend(run_model(name, budgets, args.size, args.repeat))
    data = {**header("prune.py", argv), "size": args.size, "repeat": args.repeat, "rows": rows}
    write_results(args.out, "prune", data, render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
