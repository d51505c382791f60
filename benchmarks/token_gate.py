"""TokenGate speed: dense vs top-k gated DeiT-S at MACs budgets, onnxruntime CPU and torch eager.

For each configuration, in one run on one machine: ``edgefx.compile(model, x,
passes=[TokenGate(macs=f)], backend="onnx")`` (dense: no pass), then median latencies at
batch 1 and batch 32 of the onnxruntime artifact and of the Program's graph in torch eager.
Measurements are interleaved (one call of every configuration per round) so that load on a
shared machine hits all configurations alike. The ideal speed-up is 1 / (measured MACs
ratio of the gated graph, edgefx.analysis.cost).

Random weights (nothing is downloaded): this measures speed only, not accuracy.

    python benchmarks/token_gate.py --budgets 0.65,0.5 --repeat 30 --repeat-large 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, header, load_average, load_text, write_results

SEED = 0


def _time_ms(run) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--budgets", default="0.65,0.5")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=30, help="rounds at batch 1")
    parser.add_argument("--repeat-large", type=int, default=6, help="rounds at the large batch")
    parser.add_argument("--large-batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load_start = load_average()  # reported: the figures mean little on a busy machine

    import timm

    import edgefx
    from edgefx.passes import TokenGate

    torch.manual_seed(SEED)
    model = timm.create_model(args.model, pretrained=False, img_size=args.size).eval()
    gen = torch.Generator().manual_seed(SEED)
    x1 = torch.randn(1, 3, args.size, args.size, generator=gen)
    xb = torch.randn(args.large_batch, 3, args.size, args.size, generator=gen)
    budgets = [float(b) for b in args.budgets.split(",")]

    configs: list[dict[str, Any]] = []
    for budget in [1.0, *budgets]:
        passes = [] if budget == 1.0 else [TokenGate(macs=budget)]
        start = time.perf_counter()
        compiled = edgefx.compile(model, (x1,), passes=passes, backend="onnx", progress=False)
        compile_s = time.perf_counter() - start
        program = compiled.report.passes[-1].program if passes else None
        if program is None:
            from edgefx.frontend import capture

            program = capture(model, (x1,))
        report = compiled.report.passes[0].report if passes else {}
        configs.append(
            {
                "name": "dense" if budget == 1.0 else f"topk macs={budget:g}",
                "requested": budget,
                "compiled": compiled,
                "program": program,
                "macs": compiled.report.final.macs,
                "report": report,
                "compile_s": compile_s,
            }
        )
        print(f"compiled {configs[-1]['name']} in {compile_s:.0f} s", file=sys.stderr, flush=True)
    dense_macs = configs[0]["macs"]

    def runners(cfg: dict[str, Any], x: torch.Tensor) -> dict[str, Any]:
        gm = cfg["program"].graph_module

        def eager() -> None:
            with torch.no_grad():
                gm(x)

        return {"ort": lambda: cfg["compiled"](x), "eager": eager}

    times: dict[tuple[str, str, int], list[float]] = {}
    for x, rounds, warm in ((x1, args.repeat, 5), (xb, args.repeat_large, 1)):
        batch = x.shape[0]
        fns = {cfg["name"]: runners(cfg, x) for cfg in configs}
        for fn in (f for per in fns.values() for f in per.values()):
            for _ in range(warm):
                fn()
        for _ in range(rounds):
            for name, per in fns.items():
                for backend, fn in per.items():
                    times.setdefault((name, backend, batch), []).append(_time_ms(fn))
        print(f"measured batch {batch}", file=sys.stderr, flush=True)

    rows = []
    for cfg in configs:
        ratio = cfg["macs"] / dense_macs
        row: dict[str, Any] = {
            "config": cfg["name"],
            "macs_requested": cfg["requested"],
            "macs": cfg["macs"],
            "macs_ratio": round(ratio, 4),
            "ideal_speedup": round(1 / ratio, 3),
            "tokens_after_gates": cfg["report"].get("tokens_after_gates"),
            "gates": cfg["report"].get("gates"),
            "keep_rate": cfg["report"].get("keep_rate"),
            "compile_s": round(cfg["compile_s"], 1),
        }
        for backend in ("ort", "eager"):
            for batch in (1, args.large_batch):
                ms = statistics.median(times[(cfg["name"], backend, batch)])
                base = statistics.median(times[("dense", backend, batch)])
                row[f"{backend}_b{batch}_ms"] = round(ms, 2)
                row[f"{backend}_b{batch}_speedup"] = round(base / ms, 3)
        rows.append(row)

    meta = header("token_gate.py", argv)
    meta["repeats"] = {"batch 1": args.repeat, f"batch {args.large_batch}": args.repeat_large}
    data = {**meta, "model": args.model, "size": args.size, "rows": rows}
    big = args.large_batch
    lines = [
        f"# TokenGate speed: {args.model} ({args.size}px, random weights)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']} ("
        f"{load_text({'start': load_start, 'end': load_average()})}; "
        "medians of interleaved rounds); "
        f"{meta['date']}; torch {torch.__version__}.  ",
        f"Rounds: {args.repeat} at batch 1, {args.repeat_large} at batch {big} (median).  ",
        "Speed-up = dense median / gated median, same backend and batch; ideal = 1 / MACs ratio "
        "(MACs measured on the gated graph by edgefx.analysis.cost).",
        "",
        f"| config | MACs ratio | ideal | tokens after gates | ORT b1 ms (x) | ORT b{big} ms (x) "
        f"| eager b1 ms (x) | eager b{big} ms (x) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['macs_ratio']:.3f} | {r['ideal_speedup']:.2f}x | "
            f"{r['tokens_after_gates'] or '-'} | "
            f"{r['ort_b1_ms']:.1f} ({r['ort_b1_speedup']:.2f}x) | "
            f"{r[f'ort_b{big}_ms']:.0f} ({r[f'ort_b{big}_speedup']:.2f}x) | "
            f"{r['eager_b1_ms']:.1f} ({r['eager_b1_speedup']:.2f}x) | "
            f"{r[f'eager_b{big}_ms']:.0f} ({r[f'eager_b{big}_speedup']:.2f}x) |"
        )
    write_results(args.out, "token_gate", data, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
