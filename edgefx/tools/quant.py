"""What a power-of-two quantized Program holds, read off its ``edgefx::quantize_pot`` /
``edgefx::dequantize_pot`` nodes: per layer the weight bits and exponents, the input's bits,
signedness and exponent, the accumulator exponent (input + weight: what a bit-shift
requantization shifts by) and, given the float weights, the weight SQNR."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

import edgefx.ops  # noqa: F401  (registers the edgefx ops read below)
from edgefx.program import Program
from edgefx.tools.layers import code_bits, module_of

aten = torch.ops.aten
_quantize = torch.ops.edgefx.quantize_pot.default
_dequantize = torch.ops.edgefx.dequantize_pot.default
_LAYERS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default}


@dataclass(frozen=True)
class QuantLayer:
    module: str
    op: str
    weight_bits: int | None  # declared by the pass (its history entry), else None
    weight_code_bits: int  # bits the stored codes span
    weight_exp: tuple[int, int]  # min, max over output channels
    input_bits: int | None
    input_signed: bool | None
    input_exp: int | None
    acc_exp: tuple[int, int] | None  # input + weight exponent, min and max
    bias_exp: tuple[int, int] | None
    weight_sqnr_db: float | None  # None without the float weights to compare with
    sqnr_source: str = ""  # "reference" (computed here) or "report" (the pass's own figure)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _attr(gm: torch.fx.GraphModule, node: Any) -> torch.Tensor | None:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, torch.Tensor) else None
    return None


def declared_weight_bits(history: Sequence[str]) -> int | None:
    """``weight_bits`` of the last PotQuantize in a Program's history."""
    for entry in reversed(history):
        match = re.search(r"PotQuantize\(.*weight_bits=(\d+)", entry)
        if match:
            return int(match.group(1))
    return None


def float_weights(program: Program) -> dict[str, torch.Tensor]:
    """module -> float weight of every conv/linear reading a constant float weight."""
    gm = program.graph_module
    weights = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _LAYERS:
            weight = _attr(gm, node.args[1])
            if weight is not None and weight.is_floating_point():
                weights[module_of(node)] = weight.detach()
    return weights


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(signal power / error power); inf when equal."""
    ref = reference.detach().double()
    noise = float(((approx.detach().double() - ref) ** 2).sum())
    signal = float((ref**2).sum())
    return math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal else -math.inf


def quant_layers(
    program: Program,
    reference: dict[str, torch.Tensor] | None = None,
    reported: dict[str, float] | None = None,
) -> list[QuantLayer]:
    """One entry per quantized conv/linear (weights read through ``dequantize_pot``).

    ``reference`` (module -> float weight, see :func:`float_weights`) gives the weight SQNR
    computed here; else ``reported`` (module -> dB from a compile report) is shown."""
    gm = program.graph_module
    declared = declared_weight_bits(program.history)
    rows = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _LAYERS:
            continue
        weight_dq = node.args[1]
        if not (isinstance(weight_dq, torch.fx.Node) and weight_dq.target is _dequantize):
            continue
        codes, exps = _attr(gm, weight_dq.args[0]), _attr(gm, weight_dq.args[1])
        if codes is None or exps is None:
            continue
        module = module_of(node)
        w_exp = (int(exps.min()), int(exps.max()))
        in_bits = in_signed = in_exp = None
        x = node.args[0]
        if isinstance(x, torch.fx.Node) and x.target is _dequantize:
            q = x.args[0]
            if isinstance(q, torch.fx.Node) and q.target is _quantize:
                in_exp_t = _attr(gm, q.args[1])
                in_bits, in_signed = int(q.args[3]), bool(q.args[4])
                in_exp = None if in_exp_t is None else int(in_exp_t.max())
        bias_exp = None
        if len(node.args) > 2 and isinstance(node.args[2], torch.fx.Node):
            bias_dq = node.args[2]
            if bias_dq.target is _dequantize:
                b = _attr(gm, bias_dq.args[1])
                if b is not None:
                    bias_exp = (int(b.min()), int(b.max()))
        sqnr, source = None, ""
        if reference is not None and module in reference:
            dequantized = codes.float() * torch.ldexp(
                torch.ones(exps.shape), exps.to(torch.int32)
            ).reshape(-1, *[1] * (codes.dim() - 1))
            if reference[module].shape == dequantized.shape:
                sqnr, source = sqnr_db(reference[module], dequantized), "reference"
        if sqnr is None and reported and module in reported:
            sqnr, source = float(reported[module]), "report"
        rows.append(
            QuantLayer(
                module=module,
                op=str(node.target).split(".")[-2],
                weight_bits=declared,
                weight_code_bits=code_bits(codes),
                weight_exp=w_exp,
                input_bits=in_bits,
                input_signed=in_signed,
                input_exp=in_exp,
                acc_exp=None if in_exp is None else (in_exp + w_exp[0], in_exp + w_exp[1]),
                bias_exp=bias_exp,
                weight_sqnr_db=sqnr,
                sqnr_source=source,
            )
        )
    return rows


def reported_sqnr(pass_reports: Sequence[dict[str, Any]]) -> dict[str, float]:
    """module -> weight SNR (dB) from the PotQuantize entries of a compile report."""
    found = {}
    for entry in pass_reports:
        if entry.get("pass") == "PotQuantize":
            for layer in (entry.get("report") or {}).get("layers", []):
                if "weight_snr_db" in layer:
                    found[layer["module"]] = float(layer["weight_snr_db"])
    return found
