"""Pictures of every stage of a compile: beside the readable graph (``NN-PASS.py``) and the
pass report (``NN-PASS.json``) that the PassManager dumps, write each stage's SVG, its
Program (``NN-PASS.pt2``, for ``edgefx diff``) and an ``index.html`` that walks through the
stages with what each pass changed.

The passes never import tools, so the PassManager calls this through its ``dump_hook``, which
``edgefx.compile(..., dump_dir=D)`` (and so ``edgefx compile --dump-dir D``) sets to
``draw_stages``.
"""

from __future__ import annotations

import html
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgefx.analysis.cost import human
from edgefx.passes.base import stage_stem
from edgefx.program import Program
from edgefx.tools.diff import diff_graphs
from edgefx.tools.layers import program_graph
from edgefx.tools.render import RenderError, html_page, rich_html, strip_xml_header, svg_of

INDEX = "index.html"


def draw_stages(dump_dir: str | Path, captured: Program, results: Sequence[Any]) -> Path | None:
    """The PassManager's dump hook: ``render_stages``, or a warning saying why there are no
    pictures (graphviz missing) while the readable graphs are still written."""
    try:
        return render_stages(dump_dir, captured, results)
    except RenderError as exc:
        warnings.warn(f"{dump_dir}: no stage pictures or index.html: {exc}", stacklevel=2)
        return None


def render_stages(
    dump_dir: str | Path,
    captured: Program,
    results: Sequence[Any],
    *,
    metric: str = "macs",
    save_programs: bool = True,
) -> Path:
    """Write ``NN-PASS.svg`` (and ``.pt2``) per stage and ``index.html``; return its path.
    ``results`` are the PassResults of the passes run on ``captured``, in order."""
    from edgefx.tools.quant import float_weights, quant_layers

    dump = Path(dump_dir)
    dump.mkdir(parents=True, exist_ok=True)
    stages: list[tuple[str, Program, Any]] = [(stage_stem(0, "captured"), captured, None)]
    stages += [(stage_stem(i, r.name), r.program, r) for i, r in enumerate(results, start=1)]
    sections = []
    previous = None
    for stem, program, result in stages:
        graph = program_graph(program)
        svg = svg_of(graph, metric=metric, title=stem)
        (dump / f"{stem}.svg").write_text(svg)
        if save_programs:
            program.save(dump / f"{stem}.pt2")
        parts = [
            f"<p>{len(graph.layers)} layers, {human(graph.total_macs)} MACs, "
            f"{human(graph.total_params)} params. Files: {html.escape(stem)}.py (graph), "
            f"{html.escape(stem)}.svg"
            + (f", {html.escape(stem)}.pt2" if save_programs else "")
            + "</p>"
        ]
        if result is not None:
            err = result.error
            parts.append(
                f"<p>{html.escape(result.name)}: {'changed' if result.changed else 'no change'}"
                f", {result.wall_s:.2f} s, output error max abs {err.max_abs:.3g} "
                f"(SNR {err.snr_db:.1f} dB)</p>"
            )
        if previous is not None:
            prev_program, prev_graph = previous
            sqnr = {
                q.module: q.weight_sqnr_db
                for q in quant_layers(program, float_weights(prev_program))
                if q.weight_sqnr_db is not None
            }
            change = diff_graphs(prev_graph, graph, sqnr=sqnr)
            parts.append(rich_html([change.table()]))
        parts.append(
            f'<details open><summary>graph</summary><div class="picture">'
            f"{strip_xml_header(svg)}</div></details>"
        )
        sections.append((stem, "".join(parts)))
        previous = (program, graph)
    index = dump / INDEX
    index.write_text(
        html_page(
            f"edgefx stages of {captured.name}",
            sections,
            note="each stage: its figures, what the pass changed (diff against the stage "
            f"before) and its graph coloured by {metric}; repeated blocks collapsed",
        )
    )
    return index
