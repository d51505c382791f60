"""How long inspection takes on large graphs: capture, the layer table, and the SVG with
repeated blocks collapsed and expanded (median of --repeat runs each, capture once).

python benchmarks/inspect_large.py --models timm:vit_base_patch16_224,convnext_base
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import RESULTS, header, write_results

from edgefx.frontend import capture
from edgefx.frontend.zoo import resolve_model
from edgefx.tools.layers import program_graph
from edgefx.tools.render import collapse, render_graph, to_svg
from edgefx.tools.tables import layer_table


def seconds(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="timm:vit_base_patch16_224,convnext_base")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        resolved = resolve_model(name)
        start = time.perf_counter()
        program = capture(resolved.model, resolved.example_inputs, name=resolved.name)
        capture_s = time.perf_counter() - start
        table_s, graph = seconds(
            lambda p=program: (g := program_graph(p), layer_table(g))[0], args.repeat
        )
        groups = {g.id: len(g.members) for g in collapse(graph).values()}
        svg_s, svg = seconds(lambda g=graph: to_svg(render_graph(g)), args.repeat)
        svg_expanded_s, svg_expanded = seconds(
            lambda g=graph: to_svg(render_graph(g, expand=True)), args.repeat
        )
        rows.append(
            {
                "model": name,
                "nodes": len(graph.atoms),
                "layers": len(graph.layers),
                "boxes_expanded": len(graph.segments),
                "collapsed_groups": groups,
                "capture_s": round(capture_s, 2),
                "layer_table_s": round(table_s, 2),
                "svg_collapsed_s": round(svg_s, 2),
                "svg_expanded_s": round(svg_expanded_s, 2),
                "svg_collapsed_kb": round(len(svg) / 1024),
                "svg_expanded_kb": round(len(svg_expanded) / 1024),
            }
        )
        print(rows[-1], file=sys.stderr)
    head = header("inspect_large.py", argv)
    lines = [
        "# Inspection of large graphs: time per step",
        "",
        f"Produced by `{head['command']}` on {head['machine']} ({head['date']}), a machine "
        "shared with other jobs (timings are upper bounds). Median of "
        f"{args.repeat} runs per step; capture once. `layer table` = cost analysis + "
        "rollup by module + rich table; `svg` = graphviz layout and SVG text.",
        "",
        "| model | nodes | layers | boxes (expanded) | collapsed | capture s | layer table s "
        "| svg collapsed s | svg expanded s |",
        "|---|--:|--:|--:|---|--:|--:|--:|--:|",
    ]
    for r in rows:
        collapsed = ", ".join(
            f"{k.removeprefix('group:')} x{v}" for k, v in r["collapsed_groups"].items()
        )
        lines.append(
            f"| {r['model']} | {r['nodes']} | {r['layers']} | {r['boxes_expanded']} | "
            f"{collapsed} | {r['capture_s']} | {r['layer_table_s']} | {r['svg_collapsed_s']} "
            f"| {r['svg_expanded_s']} |"
        )
    write_results(args.out, "inspect_large", {**head, "rows": rows}, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
