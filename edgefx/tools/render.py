"""Pictures of a LayerGraph with graphviz: boxes grouped by source module, coloured by a
metric, with a legend; repeated blocks collapsed; and the offline HTML report around them.

Repeated blocks: sibling modules in a row with the same structure (the same sub-modules
running the same ops on the same shapes, e.g. ``layer1.0`` and ``layer1.1``, or a ViT's
``blocks.0`` ... ``blocks.11``) are drawn as one box ``blocks.0 … blocks.11 (12x Block)``
holding their summed figures, so a 24-block model stays readable; ``expand=True`` draws
every module.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgefx.analysis.cost import human
from edgefx.errors import EdgefxError
from edgefx.tools.layers import TOP, LayerGraph, Segment


class RenderError(EdgefxError):
    """A picture that cannot be drawn: unknown metric, missing data, graphviz missing."""


@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # legend title
    needs: str  # where its data comes from, for the error when it is missing ("" = none)
    additive: bool  # a collapsed group sums it (else: worst of its members)
    hot_is_high: bool  # high values get the hot colours (False: low values, e.g. SQNR)
    fmt: str  # how a value prints: "pct", "human", "ratio", "db", "ms"


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("macs", "share of MACs", "", True, True, "pct"),
        Metric("params", "parameters", "", True, True, "human"),
        Metric(
            "channels",
            "channels kept (B / A)",
            "a reference model: `edgefx diff A B --svg F --color channels`",
            False,
            False,
            "ratio",
        ),
        Metric(
            "tokens",
            "tokens kept (B / A)",
            "a reference model: `edgefx diff A B --svg F --color tokens`",
            False,
            False,
            "ratio",
        ),
        Metric(
            "quant-error",
            "weight SQNR (dB, low = large error)",
            "a quantized Program and its float weights: `edgefx diff FLOAT QUANT --color "
            "quant-error`, or a compiled folder whose report has them",
            False,
            False,
            "db",
        ),
        Metric(
            "latency",
            "measured latency (ms)",
            "a profile: `edgefx profile COMPILED_DIR --svg F`",
            True,
            True,
            "ms",
        ),
    )
}

# ColorBrewer YlOrRd, 9 classes: cold (light) to hot (dark)
PALETTE = (
    "#ffffcc",
    "#ffeda0",
    "#fed976",
    "#feb24c",
    "#fd8d3c",
    "#fc4e2a",
    "#e31a1c",
    "#bd0026",
    "#800026",
)
NO_DATA = "#e8e8e8"


def check_metric(name: str) -> Metric:
    if name not in METRICS:
        raise RenderError(f"unknown metric {name!r}", hint=f"choose one of: {', '.join(METRICS)}")
    return METRICS[name]


def format_value(metric: Metric, value: float) -> str:
    if metric.fmt == "pct":
        return f"{100 * value:.1f}%"
    if metric.fmt == "human":
        return human(value)
    if metric.fmt == "ratio":
        return f"{value:.2f}"
    if metric.fmt == "db":
        return "exact" if math.isinf(value) else f"{value:.1f} dB"
    return f"{value:.3f} ms"


def segment_values(
    graph: LayerGraph, metric: Metric, data: dict[str, float] | None
) -> dict[str, float]:
    """The metric per segment. ``data``: per module (channels, tokens, quant-error) or per
    graph node (latency, in ms)."""
    if metric.needs and not data:
        raise RenderError(
            f"no data for metric {metric.name!r} here", hint=f"it needs {metric.needs}"
        )
    values: dict[str, float] = {}
    for seg in graph.segments:
        if metric.name == "macs":
            values[seg.id] = seg.macs / graph.total_macs if graph.total_macs else 0.0
        elif metric.name == "params":
            values[seg.id] = float(seg.params)
        elif metric.name == "latency":
            times = [data[a] for a in seg.atoms if a in data]
            if times:
                values[seg.id] = sum(times)
        elif seg.module in data:
            values[seg.id] = float(data[seg.module])
    return values


# ----------------------------------------------------------------------------- collapsing
def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _child_of(prefix: str, module: str) -> str | None:
    """The child of ``prefix`` on the way to ``module`` (None if not under it)."""
    if module == TOP:
        return TOP if prefix == "" else None
    if prefix and not module.startswith(prefix + "."):
        return None
    rest = module[len(prefix) + 1 :] if prefix else module
    head = rest.split(".", 1)[0]
    return f"{prefix}.{head}" if prefix else head


def _under(path: str, module: str) -> bool:
    return module == path or module.startswith(path + ".")


@dataclass
class Group:
    """A run of sibling blocks with one structure, drawn as one box."""

    id: str
    members: list[str]  # module paths of the blocks
    kind: str
    segments: list[Segment]


def collapse(graph: LayerGraph) -> dict[str, Group]:
    """segment id -> the Group it is folded into (only segments in repeated runs)."""
    segs = graph.segments
    folded: dict[str, Group] = {}

    def signature(path: str) -> tuple:
        return tuple(
            (s.module[len(path) :], tuple(s.ops), s.output_shape)
            for s in segs
            if _under(path, s.module)
        )

    def visit(prefix: str) -> None:
        children: list[str] = []
        for s in segs:
            child = _child_of(prefix, s.module)
            if child is not None and child not in children:
                children.append(child)
        i = 0
        while i < len(children):
            child = children[i]
            is_container = any(s.module.startswith(child + ".") for s in segs)
            j = i + 1
            if is_container:
                sig = signature(child)
                while j < len(children) and signature(children[j]) == sig:
                    j += 1
            if j - i >= 2:
                members = children[i:j]
                members_segs = [s for s in segs if any(_under(m, s.module) for m in members)]
                layer = graph.layers.get(members[0])
                group = Group(
                    f"group:{members[0]}..{members[-1]}",
                    members,
                    layer.kind if layer else "",
                    members_segs,
                )
                for s in members_segs:
                    folded[s.id] = group
            else:
                for k in range(i, j):
                    if any(s.module.startswith(children[k] + ".") for s in segs):
                        visit(children[k])
            i = j

    visit("")
    return folded


# ----------------------------------------------------------------------------- drawing
def _graphviz() -> Any:
    try:
        import graphviz
    except ImportError:
        raise RenderError(
            "pictures need the graphviz Python package",
            hint='pip install "graphviz>=0.21" (or edgefx[dev]), and Debian\'s graphviz '
            "package for the dot program: apt-get install graphviz",
        ) from None
    return graphviz


def _colour(metric: Metric, value: float | None, low: float, high: float) -> tuple[str, str]:
    """(fill, font colour) for ``value`` on the palette spanning [low, high]."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NO_DATA, "black"
    if math.isinf(value):
        t = 1.0 if value > 0 else 0.0
    elif high > low:
        t = (min(max(value, low), high) - low) / (high - low)
    else:
        t = 1.0 if high > 0 else 0.0
    if not metric.hot_is_high:
        t = 1.0 - t
    index = min(int(t * len(PALETTE)), len(PALETTE) - 1)
    return PALETTE[index], "white" if index >= 6 else "black"


def _range(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isinf(v) and not math.isnan(v)]
    if not finite:
        return 0.0, 0.0
    return min(finite), max(finite)


def _legend(metric: Metric, low: float, high: float, missing: bool) -> str:
    cells = []
    steps = len(PALETTE)
    for i in range(steps):
        t = i / (steps - 1)
        value = low + (high - low) * (t if metric.hot_is_high else 1 - t)
        fill, font = _colour(metric, value, low, high)
        text = html.escape(format_value(metric, value))
        cells.append(f'<TD BGCOLOR="{fill}"><FONT COLOR="{font}" POINT-SIZE="9">{text}</FONT></TD>')
    if missing:
        cells.append(f'<TD BGCOLOR="{NO_DATA}"><FONT POINT-SIZE="9">no data</FONT></TD>')
    return (
        f'<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="4">'
        f'<TR><TD COLSPAN="{len(cells)}"><B>{html.escape(metric.label)}</B></TD></TR>'
        f"<TR>{''.join(cells)}</TR></TABLE>>"
    )


def render_graph(
    graph: LayerGraph,
    *,
    metric: str = "macs",
    data: dict[str, float] | None = None,
    expand: bool = False,
    title: str = "",
) -> Any:
    """A graphviz Digraph of ``graph``: one box per module run (or per repeated-block group
    unless ``expand``), nested in clusters by module path, filled by ``metric``."""
    spec = check_metric(metric)
    values = segment_values(graph, spec, data)
    graphviz = _graphviz()
    folded = {} if expand else collapse(graph)

    # units: what gets a box; each has a cluster path, a label, a value
    unit_of: dict[str, str] = {}
    units: dict[str, dict[str, Any]] = {}
    containers = {_parent(s.module) for s in graph.segments if s.module != TOP}

    def cluster_of(module: str) -> str:
        # a block's own ops (a residual add) sit inside the block's cluster
        if module == TOP:
            return ""
        return module if module in containers else _parent(module)

    for seg in graph.segments:
        group = folded.get(seg.id)
        if group is None:
            unit_of[seg.id] = seg.id
            layer = graph.layers.get(seg.module)
            name = seg.module + (f" ({seg.index + 1})" if seg.index else "")
            lines = [name, ", ".join(seg.ops[:3]) + (" …" if len(seg.ops) > 3 else "")]
            if seg.output_shape:
                lines.append("x".join(map(str, seg.output_shape)))
            if seg.macs:
                lines.append(f"{human(seg.macs)} MACs")
            units[seg.id] = {
                "cluster": cluster_of(seg.module),
                "lines": lines,
                "value": values.get(seg.id),
                "tooltip": f"{seg.module} ({layer.kind if layer else ''}): "
                f"{len(seg.atoms)} nodes, {human(seg.macs)} MACs, {human(seg.params)} params",
            }
            continue
        unit_of[seg.id] = group.id
        if group.id not in units:
            member_values = [values[s.id] for s in group.segments if s.id in values]
            if not member_values:
                value = None
            elif spec.additive:
                value = sum(member_values)
            else:  # the worst member
                value = max(member_values) if spec.hot_is_high else min(member_values)
            macs = sum(s.macs for s in group.segments)
            params = sum(s.params for s in group.segments)
            units[group.id] = {
                "cluster": _parent(group.members[0]),
                "lines": [
                    f"{group.members[0]} … {group.members[-1]}",
                    f"{len(group.members)}x {group.kind} (collapsed)".replace("x  (", "x ("),
                    f"{human(macs)} MACs, {human(params)} params",
                ],
                "value": value,
                "tooltip": f"{len(group.members)} blocks of one structure: "
                + ", ".join(group.members),
                "group": True,
            }

    shown = [u["value"] for u in units.values() if u["value"] is not None]
    low, high = _range(shown)
    if spec.fmt == "pct":
        low = 0.0
    missing = any(u["value"] is None for u in units.values())

    dot = graphviz.Digraph(
        name="edgefx",
        graph_attr={
            "rankdir": "TB",
            "fontname": "Helvetica",
            "fontsize": "11",
            "nodesep": "0.25",
            "ranksep": "0.3",
            "newrank": "true",
            "label": title or graph.name,
            "labelloc": "t",
        },
    )
    dot.attr("node", shape="box", style="rounded,filled", fontname="Helvetica", fontsize="10")
    dot.attr("edge", arrowsize="0.6", color="#555555")

    # nested clusters by module path
    tree: dict[str, list[str]] = {}
    for unit_id, unit in units.items():
        tree.setdefault(unit["cluster"], []).append(unit_id)
    paths = set(tree)
    for path in list(paths):
        while path:
            path = _parent(path)
            paths.add(path)
    children: dict[str, list[str]] = {}
    for path in sorted(paths - {""}):
        children.setdefault(_parent(path), []).append(path)

    def draw(container: Any, path: str) -> None:
        for unit_id in tree.get(path, []):
            unit = units[unit_id]
            fill, font = _colour(spec, unit["value"], low, high)
            lines = list(unit["lines"])
            if unit["value"] is not None and not (spec.name == "macs" and not unit["value"]):
                lines.append(f"{spec.name}: {format_value(spec, unit['value'])}")
            container.node(
                _dot_id(unit_id),
                label="\n".join(line for line in lines if line),
                fillcolor=fill,
                fontcolor=font,
                tooltip=unit["tooltip"],
                penwidth="2" if unit.get("group") else "1",
                peripheries="2" if unit.get("group") else "1",
            )
        for sub in children.get(path, []):
            with container.subgraph(name=f"cluster_{_dot_id(sub)}") as cluster:
                cluster.attr(label=sub, style="rounded,dashed", color="#999999", fontsize="10")
                draw(cluster, sub)

    draw(dot, "")
    for name in graph.inputs:
        dot.node(
            _dot_id(f"input:{name}"),
            label=f"input {name}",
            shape="oval",
            style="filled",
            fillcolor="#dde8f7",
        )
    for name in graph.outputs:
        dot.node(
            _dot_id(f"output:{name}"), label=name, shape="oval", style="filled", fillcolor="#dde8f7"
        )
    seen: set[tuple[str, str]] = set()
    for a, b in graph.edges:
        ua, ub = unit_of.get(a, a), unit_of.get(b, b)
        if ua != ub and (ua, ub) not in seen:
            seen.add((ua, ub))
            dot.edge(_dot_id(ua), _dot_id(ub))
    with dot.subgraph(name="cluster_legend") as legend:
        legend.attr(label="", style="invis")
        legend.node("legend", label=_legend(spec, low, high, missing), shape="plaintext", style="")
    return dot


def _dot_id(text: str) -> str:
    """graphviz node ids: quoting handles anything but ':' (port syntax) and '#'."""
    return text.replace(":", "__").replace("#", "_call")


def to_svg(dot: Any) -> str:
    """The SVG text of a Digraph (runs graphviz's ``dot``)."""
    graphviz = _graphviz()
    try:
        return dot.pipe(format="svg", encoding="utf-8")
    except graphviz.ExecutableNotFound:
        raise RenderError(
            "graphviz's `dot` program is not installed",
            hint="install the Debian package graphviz: apt-get install graphviz",
        ) from None
    except graphviz.CalledProcessError as exc:
        raise RenderError(f"graphviz failed: {str(exc.stderr or exc)[:300]}") from None


def svg_of(graph: LayerGraph, **options: Any) -> str:
    return to_svg(render_graph(graph, **options))


# ----------------------------------------------------------------------------- HTML
_STYLE = """
body { font-family: Helvetica, Arial, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.picture { overflow: auto; border: 1px solid #ccc; padding: 0.5em; max-height: 80vh; }
.picture svg { max-width: none; }
pre.table { font-family: Menlo, Consolas, monospace; font-size: 12px; line-height: 1.25; }
nav a { margin-right: 1em; }
.note { color: #555; font-size: 0.9em; }
"""


def rich_html(renderables: Sequence[Any], width: int = 160) -> str:
    """Rich tables as a self-contained HTML fragment (inline styles, no scripts)."""
    from rich.console import Console

    console = Console(record=True, width=width, file=io.StringIO(), color_system="truecolor")
    for item in renderables:
        console.print(item)
    return console.export_html(inline_styles=True, code_format='<pre class="table">{code}</pre>')


def html_page(title: str, sections: Sequence[tuple[str, str]], note: str = "") -> str:
    """One offline HTML page: ``sections`` are (heading, HTML body) pairs."""
    nav = "".join(
        f'<a href="#s{i}">{html.escape(heading)}</a>' for i, (heading, _) in enumerate(sections)
    )
    body = "".join(
        f'<section id="s{i}"><h2>{html.escape(heading)}</h2>{content}</section>'
        for i, (heading, content) in enumerate(sections)
    )
    note_html = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{note_html}<nav>{nav}</nav>{body}</body></html>\n"
    )


def strip_xml_header(svg: str) -> str:
    """Inline SVG: drop the XML declaration and DOCTYPE graphviz writes."""
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg
