"""Rich tables of analysis results, for the CLI and reports."""

from __future__ import annotations

from typing import Literal

from rich.table import Table

from edgefx.analysis.cost import CostReport, NodeCost
from edgefx.analysis.depgraph import ChannelDependencyGraph
from edgefx.analysis.vit import ViTStructure

CostSort = Literal["graph", "macs", "params"]

_SORT_KEYS = {
    "macs": lambda cost: cost.macs,
    "params": lambda cost: cost.params,
}


def human(number: float) -> str:
    """Three significant digits and a unit: 1_814_073_344 -> '1.81 G', 11_689_512 -> '11.7 M'."""
    for unit, divisor in (("", 1), ("K", 1e3), ("M", 1e6), ("G", 1e9)):
        text = f"{number / divisor:.3g}"
        if abs(float(text)) < 1000:  # after rounding: 999_999 is '1 M', not '1e+03 K'
            return f"{text} {unit}".rstrip()
    return f"{number / 1e12:.3g} T"


def cost_table(report: CostReport, *, top: int | None = None, sort: CostSort = "graph") -> Table:
    """One row per node (graph order, or the heaviest first by ``macs``/``params``), at most
    ``top`` of them, then a total row over the whole graph."""
    if sort not in ("graph", *_SORT_KEYS):
        raise ValueError(f"sort must be 'graph', 'macs' or 'params', not {sort!r}")
    if top is not None and top < 0:
        raise ValueError(f"top must be >= 0, not {top}")
    rows: list[NodeCost] = list(report.nodes)
    if sort != "graph":
        rows.sort(key=_SORT_KEYS[sort], reverse=True)  # stable: ties stay in graph order
    hidden = 0 if top is None else max(len(rows) - top, 0)
    rows = rows[: len(rows) - hidden]

    table = Table(title="Cost per node", show_footer=False)
    table.add_column("module")
    table.add_column("op")
    table.add_column("output shape")
    table.add_column("MACs", justify="right")
    table.add_column("params", justify="right")
    table.add_column("% MACs", justify="right")

    def share(macs: int) -> str:
        return f"{100 * macs / report.total_macs:.1f}%" if report.total_macs else "-"

    for cost in rows:
        shape = "" if cost.output_shape is None else "x".join(map(str, cost.output_shape))
        table.add_row(
            cost.module, cost.op, shape, human(cost.macs), human(cost.params), share(cost.macs)
        )
    if hidden:
        table.add_row(f"… {hidden} more nodes", "", "", "", "", "", style="dim")
    table.add_section()
    table.add_row(
        "total",
        f"{len(report.nodes)} nodes",
        "",
        human(report.total_macs),
        human(report.total_params),
        share(report.total_macs),
        style="bold",
    )
    return table


def channel_table(dep: ChannelDependencyGraph) -> Table:
    """One row per channel class of a graph's activations (what ChannelPrune may cut): the
    modules producing it, its width, how BatchNorm ranks it, and why it is fixed if it is."""
    gammas: dict[int, list[float]] = {}
    for norm in dep.norms:
        gammas.setdefault(norm.class_id, []).extend(norm.gamma.tolist())
    removable: dict[int, int] = {}
    for group in dep.prunable_groups():
        for cls_id in {c for c, _ in group.channels}:
            removable[cls_id] = removable.get(cls_id, 0) + 1

    table = Table(title="Channel classes (channels removed together share a group)")
    for column, justify in (
        ("modules", "left"),
        ("channels", "right"),
        ("|gamma| min / median / max", "right"),
        ("removable", "right"),
        ("fixed because", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for cls in dep.classes:
        if all(axis.constant for axis in cls.axes):
            continue
        values = sorted(gammas.get(cls.id, []))
        ranked = (
            f"{values[0]:.3g} / {values[len(values) // 2]:.3g} / {values[-1]:.3g}"
            if values
            else "no BatchNorm"
        )
        names = [m for m in cls.modules if m] or [str(a) for a in cls.axes if not a.constant]
        modules = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
        table.add_row(
            modules,
            str(cls.size),
            ranked,
            str(removable.get(cls.id, 0)),
            cls.fixed[0] if cls.fixed else "",
            style="dim" if cls.fixed else None,
        )
    summary = dep.summary()
    table.caption = (
        f"{summary['classes']} classes, {summary['groups']} groups, "
        f"{summary['prunable_groups']} removable"
    )
    return table


def block_table(vit: ViTStructure) -> Table:
    """One row per transformer block found by edgefx.analysis.vit (what TokenGate gates)."""
    table = Table(title="Transformer blocks (pre-norm attention + MLP)")
    for column, justify in (
        ("#", "right"),
        ("block", "left"),
        ("attention", "left"),
        ("kind", "left"),
        ("heads x dim", "right"),
        ("tokens", "right"),
        ("width", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for b in vit.blocks:
        table.add_row(
            str(b.index),
            b.module,
            b.attention_module,
            "fused SDPA" if b.kind == "sdpa" else "explicit softmax",
            f"{b.heads} x {b.head_dim}",
            str(b.tokens),
            str(b.embed_dim),
        )
    prefix = (
        f"{vit.prefix_tokens} prefix token(s) ({', '.join(vit.prefix_sources)}), "
        f"{vit.patch_tokens} patch tokens; scores: CLS attention row"
        if vit.uses_cls
        else f"no prefix tokens, {vit.patch_tokens} patch tokens; scores: mean attention over "
        "the queries"
    )
    table.caption = prefix + "".join(f"; {n}" for n in vit.notes if vit.uses_cls)
    return table
