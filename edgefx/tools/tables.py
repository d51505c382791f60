"""Rich tables of analysis results, for the CLI and reports."""

from __future__ import annotations

from typing import Literal

from rich.table import Table

from edgefx.analysis.cost import CostReport, NodeCost

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
