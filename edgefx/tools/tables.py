"""Rich tables of analysis results, for the CLI and reports."""

from __future__ import annotations

from typing import Literal

from rich.table import Table

from edgefx.analysis.cost import CostReport, NodeCost, human
from edgefx.analysis.depgraph import ChannelDependencyGraph
from edgefx.analysis.vit import ViTStructure
from edgefx.tools.layers import BlockTokens, Layer, LayerGraph
from edgefx.tools.quant import QuantLayer

__all__ = [
    "block_table",
    "channel_table",
    "cost_table",
    "human",
    "layer_table",
    "quant_table",
    "token_table",
]

CostSort = Literal["graph", "macs", "params"]

_SORT_KEYS = {
    "macs": lambda cost: cost.macs,
    "params": lambda cost: cost.params,
}


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


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "" if shape is None else "x".join(map(str, shape))


def _ops_text(ops: list[str], limit: int = 4) -> str:
    return ", ".join(ops[:limit]) + (f" +{len(ops) - limit}" if len(ops) > limit else "")


def layer_table(
    graph: LayerGraph, *, top: int | None = None, sort: CostSort = "graph", title: str = ""
) -> Table:
    """One row per source module (ops folded in, plumbing hidden), at most ``top`` rows,
    then a total row over the whole graph (equal to the cost analysis's totals)."""
    if sort not in ("graph", *_SORT_KEYS):
        raise ValueError(f"sort must be 'graph', 'macs' or 'params', not {sort!r}")
    if top is not None and top < 0:
        raise ValueError(f"top must be >= 0, not {top}")
    rows: list[Layer] = list(graph.layers.values())
    if sort != "graph":
        rows.sort(key=_SORT_KEYS[sort], reverse=True)
    hidden = 0 if top is None else max(len(rows) - top, 0)
    rows = rows[: len(rows) - hidden]
    table = Table(title=title or f"Layers of {graph.name} (one row per source module)")
    for column, justify in (
        ("module", "left"),
        ("kind", "left"),
        ("ops", "left"),
        ("output shape", "left"),
        ("MACs", "right"),
        ("params", "right"),
        ("weights", "left"),
        ("% MACs", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]

    def share(macs: int) -> str:
        return f"{100 * macs / graph.total_macs:.1f}%" if graph.total_macs else "-"

    for layer in rows:
        weights = ""
        if layer.weight_dtype:
            weights = layer.weight_dtype + (
                f" ({layer.weight_bits} bit codes)" if layer.weight_bits is not None else ""
            )
        calls = f" x{layer.calls}" if layer.calls > 1 else ""
        table.add_row(
            layer.module + calls,
            layer.kind,
            _ops_text(layer.ops),
            _shape_text(layer.output_shape),
            human(layer.macs),
            human(layer.params),
            weights,
            share(layer.macs),
        )
    if hidden:
        table.add_row(f"… {hidden} more layers", "", "", "", "", "", "", "", style="dim")
    table.add_section()
    table.add_row(
        "total",
        f"{len(graph.layers)} layers",
        f"{sum(1 for a in graph.atoms.values() if not a.plumbing)} ops",
        "",
        human(graph.total_macs),
        human(graph.total_params),
        "",
        share(graph.total_macs),
        style="bold",
    )
    return table


def quant_table(rows: list[QuantLayer], title: str = "Quantized layers") -> Table:
    """Bits, exponents (scale 2**exp), accumulator exponent and weight SQNR per layer."""
    table = Table(title=title)
    for column, justify in (
        ("module", "left"),
        ("op", "left"),
        ("w bits", "right"),
        ("w exp", "right"),
        ("input", "left"),
        ("in exp", "right"),
        ("acc exp (shift)", "right"),
        ("bias exp", "right"),
        ("w SQNR dB", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]

    def span(pair: tuple[int, int] | None) -> str:
        if pair is None:
            return ""
        return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}..{pair[1]}"

    for row in rows:
        bits = str(row.weight_bits) if row.weight_bits is not None else "?"
        if row.weight_code_bits != row.weight_bits:
            bits += f" ({row.weight_code_bits} used)"
        inp = ""
        if row.input_bits is not None:
            inp = f"{'int' if row.input_signed else 'uint'}{row.input_bits}"
        sqnr = "" if row.weight_sqnr_db is None else f"{row.weight_sqnr_db:.1f}"
        if row.sqnr_source == "report":
            sqnr += " (report)"
        table.add_row(
            row.module,
            row.op,
            bits,
            span(row.weight_exp),
            inp,
            "" if row.input_exp is None else str(row.input_exp),
            span(row.acc_exp),
            span(row.bias_exp),
            sqnr,
        )
    if not rows:
        table.caption = "no layer reads power-of-two quantized weights (edgefx::dequantize_pot)"
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


def token_table(rows: list[BlockTokens], gate_passes: list[str]) -> Table:
    """Tokens into and out of every attention block, and the gates (see
    ``layers.block_tokens``). ``gate_passes``: the TokenGate entries of the Program's
    history."""
    table = Table(title="Tokens through the attention blocks")
    for column, justify in (("block", "left"), ("attention", "left"), ("tokens in", "right"),
                            ("tokens out", "right"), ("gate", "left")):  # fmt: skip
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        gate = row.gate
        if gate == "top-k" and row.tokens_in and row.tokens_out is not None:
            gate += f": keeps {row.tokens_out} of {row.tokens_in}"
        elif gate == "threshold" and row.tokens_in and row.tokens_out is not None:
            # data-dependent: what the example inputs kept (a masking gate keeps the shape)
            gate += (
                f": kept {row.tokens_out} of {row.tokens_in} on the example inputs"
                if row.tokens_out < row.tokens_in
                else ": no token dropped from the shape on the example inputs"
            )
        table.add_row(
            row.block,
            row.attention,
            "" if row.tokens_in is None else str(row.tokens_in),
            "" if row.tokens_out is None else str(row.tokens_out),
            gate,
        )
    table.caption = "; ".join(f"applied: {entry}" for entry in gate_passes) or None
    return table
