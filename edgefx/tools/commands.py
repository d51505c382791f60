"""The bodies of ``edgefx inspect``, ``diff`` and ``profile`` (cli.py parses, these run)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from edgefx.errors import ArtifactError, EdgefxError
from edgefx.tools.target import Target, load_target

# "wrote FILE" notes go to stderr: stdout may be JSON for a machine
notes = Console(stderr=True, markup=False, highlight=False)


def load(spec: str, args: argparse.Namespace) -> Target:
    return load_target(
        spec,
        getattr(args, "input_shape", None),
        dynamic_batch=not getattr(args, "static_batch", False),
    )


def _sort(args: argparse.Namespace) -> str:
    # --top N means the N costliest unless another order is asked for
    return "macs" if args.top is not None and args.sort == "graph" else args.sort


def _quant_rows(target: Target, reference: Target | None = None) -> list[Any]:
    from edgefx.tools.quant import float_weights, quant_layers, reported_sqnr

    if target.program is None:
        raise ArtifactError(
            f"--quant reads a Program's quantize/dequantize nodes; {target.name} has none",
            hint="inspect the compiled folder (it holds program.pt2) or a .pt2 file",
        )
    weights = float_weights(reference.program) if reference and reference.program else None
    return quant_layers(target.program, weights, reported_sqnr(target.pass_reports()))


def write_picture(
    args: argparse.Namespace,
    graph: Any,
    tables: list[Any],
    *,
    data: dict[str, float] | None,
    title: str,
) -> None:
    """--svg FILE / --html FILE: the picture, and the HTML report around it."""
    from edgefx.tools.render import html_page, rich_html, strip_xml_header, svg_of

    if not (args.svg or args.html):
        return
    start = time.perf_counter()
    svg = svg_of(graph, metric=args.color, data=data, expand=args.expand, title=title)
    if args.svg:
        Path(args.svg).parent.mkdir(parents=True, exist_ok=True)
        Path(args.svg).write_text(svg)
        notes.print(f"wrote {args.svg} ({time.perf_counter() - start:.1f} s)")
    if args.html:
        page = html_page(
            title,
            [
                ("Graph", f'<div class="picture">{strip_xml_header(svg)}</div>'),
                ("Tables", rich_html(tables)),
            ],
            note=f"coloured by {args.color}; repeated blocks "
            + ("expanded" if args.expand else "collapsed (--expand draws them all)"),
        )
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        Path(args.html).write_text(page)
        notes.print(f"wrote {args.html}")


def inspect(args: argparse.Namespace, target: Target, console: Console) -> bool:
    """Print the layer (or node) table and what else was asked; True if it printed JSON
    (nothing else may follow on stdout)."""
    from edgefx.tools.tables import cost_table, layer_table, quant_table

    graph = target.graph()
    quant = _quant_rows(target) if args.quant or args.color == "quant-error" else None
    if args.model_explorer:
        _export_model_explorer(target, args.model_explorer, None)
    if args.json:
        data: dict[str, Any] = graph.to_dict()
        if args.nodes and target.program is not None:
            data["nodes"] = target.program.cost().to_dict()["nodes"]
        if quant is not None:
            data["quant"] = [q.to_dict() for q in quant]
        print(json.dumps(data, indent=1))
        return True
    tables: list[Any] = []
    if target.program is not None:
        console.print(target.program)
    if args.nodes and target.program is not None:
        tables.append(cost_table(target.program.cost(), top=args.top, sort=_sort(args)))
    else:
        tables.append(layer_table(graph, top=args.top, sort=_sort(args)))
    if quant is not None and args.quant:
        tables.append(quant_table(quant))
    for table in tables:
        console.print(table)
    metric_data = None
    if args.color == "quant-error" and quant is not None:
        metric_data = {q.module: q.weight_sqnr_db for q in quant if q.weight_sqnr_db is not None}
    write_picture(args, graph, tables, data=metric_data, title=f"edgefx inspect {target.name}")
    return False


def diff(args: argparse.Namespace, console: Console) -> int:
    from edgefx.tools.diff import diff_targets

    a, b = load(args.a, args), load(args.b, args)
    result = diff_targets(a, b)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return 0
    table = result.table(show_all=args.all)
    console.print(table)
    data = None
    if args.color in ("channels", "tokens"):
        data = result.channels_kept() if args.color == "channels" else _tokens_kept(result)
    elif args.color == "quant-error":
        data = {c.module: c.weight_sqnr_db for c in result.changes if c.weight_sqnr_db is not None}
    write_picture(args, b.graph(), [table], data=data, title=f"edgefx diff {a.name} -> {b.name}")
    return 0


def _tokens_kept(result: Any) -> dict[str, float]:
    return {
        c.module: c.b.tokens / c.a.tokens
        for c in result.changes
        if c.a and c.b and c.a.tokens and c.b.tokens is not None
    }


def profile(args: argparse.Namespace, console: Console) -> int:
    from edgefx.tools.profile import latency_data, onnx_node_times
    from edgefx.tools.profile import profile as run_profile

    target = load(args.target, args)
    if args.model_explorer:  # before the runs, not after
        _check_onnx_for_model_explorer(target)
    report = run_profile(
        target, runs=args.runs, warmup=args.warmup, threads=args.threads, batch=args.batch
    )
    if args.model_explorer:
        _export_model_explorer(target, args.model_explorer, onnx_node_times(report, target))
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0
    table = report.table(nodes=args.nodes, top=args.top)
    console.print(table)
    if report.unmapped_ms:
        console.print(f"{report.unmapped_ms:.4f} ms in kernels with no FX origin")
    write_picture(
        args,
        target.graph(),
        [table],
        data=latency_data(target, report),
        title=f"edgefx profile {target.name}",
    )
    return 0


def _check_onnx_for_model_explorer(target: Target) -> None:
    if target.onnx_path is None:
        raise EdgefxError(
            f"--model-explorer writes node data for an ONNX model; {target.name} has none",
            hint="give an .onnx file or a folder from `edgefx compile --backend onnx -o DIR`",
        )


def _export_model_explorer(target: Target, path: str, latency: dict[str, float] | None) -> None:
    from edgefx.tools.model_explorer import macs_per_node, write_node_data

    _check_onnx_for_model_explorer(target)
    model = target.onnx_model
    values = latency if latency is not None else macs_per_node(model, target.node_map)
    what = "latency (ms)" if latency is not None else "MACs"
    write_node_data(path, model, values, name=f"edgefx {what}")
    notes.print(f"wrote {path}: {what} of {len(values)} nodes for Model Explorer")
