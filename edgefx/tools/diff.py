"""What changed between two versions of a model: layers added, removed or changed (channels,
tokens, output shape, weight dtype and bits), MACs and params per layer and in total.

Layers are matched by source module path, which passes keep (``nn_module_stack``) and the
ONNX backend writes into node names, so a diff works across a pass (two Programs) and across
formats (a Program and its ONNX model). When both sides are Programs and B quantized A's
float weights, each layer's weight SQNR is computed from the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from edgefx.analysis.cost import human
from edgefx.errors import EdgefxError
from edgefx.tools.layers import Layer, LayerGraph

# Fields compared between matched layers; ops only when both sides are the same format.
_FIELDS = ("channels", "tokens", "output_shape", "weight_dtype", "weight_bits")
MIN_SHARED = 0.5
"""Below this share of weighted layers in common, A and B are taken as unrelated models."""


class DiffError(EdgefxError):
    """Two models that cannot be compared layer by layer."""


@dataclass
class LayerChange:
    module: str
    status: str  # "added", "removed", "changed", "same"
    a: Layer | None
    b: Layer | None
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    weight_sqnr_db: float | None = None

    @property
    def macs_delta(self) -> int:
        return (self.b.macs if self.b else 0) - (self.a.macs if self.a else 0)

    @property
    def params_delta(self) -> int:
        return (self.b.params if self.b else 0) - (self.a.params if self.a else 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "status": self.status,
            "changed": {k: list(v) for k, v in self.changed.items()},
            "macs": [self.a.macs if self.a else None, self.b.macs if self.b else None],
            "params": [self.a.params if self.a else None, self.b.params if self.b else None],
            "macs_delta": self.macs_delta,
            "params_delta": self.params_delta,
            "weight_sqnr_db": self.weight_sqnr_db,
        }


@dataclass
class GraphDiff:
    a: LayerGraph
    b: LayerGraph
    changes: list[LayerChange]

    def of(self, status: str) -> list[LayerChange]:
        return [c for c in self.changes if c.status == status]

    @property
    def macs_delta(self) -> int:
        return self.b.total_macs - self.a.total_macs

    @property
    def params_delta(self) -> int:
        return self.b.total_params - self.a.total_params

    def channels_kept(self) -> dict[str, float]:
        """module -> B's channels / A's channels, for layers in both."""
        kept = {}
        for c in self.changes:
            if c.a and c.b and c.a.channels and c.b.channels is not None:
                kept[c.module] = c.b.channels / c.a.channels
        return kept

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": {
                "name": self.a.name,
                "source": self.a.source,
                "total_macs": self.a.total_macs,
                "total_params": self.a.total_params,
            },
            "b": {
                "name": self.b.name,
                "source": self.b.source,
                "total_macs": self.b.total_macs,
                "total_params": self.b.total_params,
            },
            "macs_delta": self.macs_delta,
            "params_delta": self.params_delta,
            "counts": {s: len(self.of(s)) for s in ("added", "removed", "changed", "same")},
            "layers": [c.to_dict() for c in self.changes],
        }

    def table(self, *, show_all: bool = False) -> Table:
        table = Table(
            title=f"diff {self.a.name} ({self.a.source}) -> {self.b.name} ({self.b.source})"
        )
        for column, justify in (
            ("module", "left"),
            ("status", "left"),
            ("what changed", "left"),
            ("MACs A -> B", "right"),
            ("ΔMACs", "right"),
            ("params A -> B", "right"),
            ("Δparams", "right"),
            ("w SQNR dB", "right"),
        ):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for c in self.changes:
            if c.status == "same" and not show_all:
                continue
            what = "; ".join(
                f"{k} {_text(v[0])} -> {_text(v[1])}"
                for k, v in c.changed.items()
                if k not in ("macs", "params")  # they have their own columns
            )
            table.add_row(
                c.module,
                c.status,
                what,
                f"{_h(c.a and c.a.macs)} -> {_h(c.b and c.b.macs)}",
                _signed(c.macs_delta),
                f"{_h(c.a and c.a.params)} -> {_h(c.b and c.b.params)}",
                _signed(c.params_delta),
                "" if c.weight_sqnr_db is None else f"{c.weight_sqnr_db:.1f}",
                style={"added": "green", "removed": "red"}.get(c.status),
            )
        table.add_section()
        ratio = f" ({self.b.total_macs / self.a.total_macs:.1%})" if self.a.total_macs else ""
        table.add_row(
            "total",
            ", ".join(f"{len(self.of(s))} {s}" for s in ("added", "removed", "changed", "same")),
            "",
            f"{human(self.a.total_macs)} -> {human(self.b.total_macs)}{ratio}",
            _signed(self.macs_delta),
            f"{human(self.a.total_params)} -> {human(self.b.total_params)}",
            _signed(self.params_delta),
            "",
            style="bold",
        )
        return table


def _h(value: int | None) -> str:
    return "-" if value is None else human(value)


def _signed(value: int) -> str:
    return "0" if value == 0 else ("+" if value > 0 else "-") + human(abs(value))


def _text(value: Any) -> str:
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return "-" if value is None else str(value)


def diff_graphs(a: LayerGraph, b: LayerGraph, *, sqnr: dict[str, float] | None = None) -> GraphDiff:
    """Match layers by module; refuse two unrelated models (DiffError)."""
    weighted_a = {m for m, layer in a.layers.items() if layer.params}
    weighted_b = {m for m, layer in b.layers.items() if layer.params}
    union = weighted_a | weighted_b
    shared = weighted_a & weighted_b
    if not set(a.layers) & set(b.layers) or (union and len(shared) / len(union) < MIN_SHARED):
        example_a = ", ".join(sorted(weighted_a)[:3]) or ", ".join(list(a.layers)[:3])
        example_b = ", ".join(sorted(weighted_b)[:3]) or ", ".join(list(b.layers)[:3])
        raise DiffError(
            f"{a.name} and {b.name} look like different models: they share "
            f"{len(shared)} of {len(union)} layers with weights",
            hint=f"A has {example_a}...; B has {example_b}... diff compares one model before "
            "and after a pass, or a Program and its ONNX model",
        )
    same_format = a.source == b.source
    fields = _FIELDS + (("ops",) if same_format else ())
    changes = []
    for module, la in a.layers.items():
        lb = b.layers.get(module)
        if lb is None:
            changes.append(LayerChange(module, "removed", la, None))
            continue
        changed = {}
        for name in fields:
            va, vb = getattr(la, name), getattr(lb, name)
            if name == "ops":
                va, vb = tuple(va), tuple(vb)
            if va != vb:
                changed[name] = (va, vb)
        if la.macs != lb.macs:
            changed.setdefault("macs", (la.macs, lb.macs))
        if la.params != lb.params:
            changed.setdefault("params", (la.params, lb.params))
        status = "changed" if changed else "same"
        changes.append(LayerChange(module, status, la, lb, changed))
    changes.extend(
        LayerChange(m, "added", None, lb) for m, lb in b.layers.items() if m not in a.layers
    )
    for c in changes:
        if sqnr and c.module in sqnr:
            c.weight_sqnr_db = sqnr[c.module]
    return GraphDiff(a, b, changes)


def diff_targets(a: Any, b: Any) -> GraphDiff:
    """Diff two Targets (see edgefx.tools.target): Programs when both have one, with the
    weight SQNR of every layer B quantized; a Program against an ONNX model otherwise."""
    from edgefx.tools.quant import float_weights, quant_layers

    sqnr = None
    if a.program is not None and b.program is not None:
        reference = float_weights(a.program)
        sqnr = {
            q.module: q.weight_sqnr_db
            for q in quant_layers(b.program, reference)
            if q.weight_sqnr_db is not None
        }
    return diff_graphs(a.graph(), b.graph(), sqnr=sqnr)
