"""Training a Program: its graph as an ``nn.Module`` that trains, and back into a Program.

A Program's graph is captured in inference form: a BatchNorm is
``aten._native_batch_norm_legit_no_training`` (running statistics only), dropout is gone,
PotQuantize's weights are integer codes read through ``edgefx::dequantize_pot`` and its
activations go through ``quantize_pot -> dequantize_pot``, whose rounding has no gradient.
:func:`trainable` rewrites a deep copy of the graph so that it trains:

- every inference BatchNorm becomes a small module calling ``F.batch_norm`` with the module's
  own ``training`` flag: batch statistics and running-statistic updates under ``.train()``,
  the running statistics under ``.eval()`` (the running statistics stay buffers);
- an ``aten.dropout`` node still in the graph follows ``.train()``/``.eval()`` the same way.
  torch.export drops ``nn.Dropout`` from an eval-mode capture altogether, so there is usually
  none left to activate (the report counts the ones found);
- every floating-point parameter (also those a pass replaced or reshaped, e.g. ChannelPrune's
  cut weights or FoldBatchNorm's folded ones) is a leaf ``nn.Parameter`` with
  ``requires_grad=True``;
- quantization-aware training: a ``quantize_pot -> dequantize_pot`` pair becomes one
  straight-through fake-quantizer (forward: the same rounding and clamping as the graph's own
  kernels; backward: identity where the value was inside the clamping range, zero where it was
  clamped). Integer weight and bias codes become float parameters holding their dequantized
  values (exact: a code times a power of two), fake-quantized the same way in the forward
  pass; :func:`with_weights` turns them back into codes with the graph's ``quantize_pot``.
  Exponents stay fixed: QAT moves the weights onto the grid PotQuantize chose.

``with_weights(program, module)`` writes the trained values into a copy of the Program's
graph: same graph, same buffers and parameter names, nothing re-captured.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from edgefx.errors import InputError, PassError
from edgefx.ops.pot import dequantize_pot, qrange, quantize_pot

if TYPE_CHECKING:
    from edgefx.program import Program

__all__ = ["TrainableProgram", "fake_quantize_pot", "trainable", "with_weights"]

aten = torch.ops.aten
_BN_INFERENCE = aten._native_batch_norm_legit_no_training.default
_DROPOUT = aten.dropout.default
_QUANTIZE = torch.ops.edgefx.quantize_pot.default
_DEQUANTIZE = torch.ops.edgefx.dequantize_pot.default
_INT32_BITS = 32


# ---------------------------------------------------------------------------- fake quantization
class _FakeQuantizePot(torch.autograd.Function):
    """``dequantize_pot(quantize_pot(x))`` with a straight-through gradient."""

    @staticmethod
    def forward(ctx, x, exponent, axis: int, bits: int, signed: bool):  # type: ignore[override]
        if bits == _INT32_BITS:  # int32 bias codes: the graph's DQ reads them, nothing clamps
            scale = _scale(exponent, x, axis)
            out = torch.round(x / scale) * scale
            ctx.save_for_backward(torch.ones((), dtype=torch.bool))
            return out
        out = dequantize_pot(quantize_pot(x, exponent, axis, bits, signed), exponent, axis)
        low, high = qrange(bits, signed)
        scaled = x / _scale(exponent, x, axis)
        # inside the range the rounding passes the gradient through; clamped values get none
        ctx.save_for_backward((scaled >= low - 0.5) & (scaled <= high + 0.5))
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def _scale(exponent: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    scale = torch.ldexp(torch.ones_like(exponent, dtype=x.dtype), exponent.to(torch.int32))
    if exponent.dim() == 1:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    return scale


def fake_quantize_pot(
    x: torch.Tensor, exponent: torch.Tensor, axis: int, bits: int, signed: bool
) -> torch.Tensor:
    """Quantize to ``bits``-bit codes with scale ``2**exponent`` and back, with a
    straight-through gradient (``bits=32``: int32 bias codes, rounding only)."""
    return _FakeQuantizePot.apply(x, exponent, axis, bits, signed)


# ---------------------------------------------------------------------------- mode-aware ops
class _BatchNorm(nn.Module):
    """An inference BatchNorm node made trainable: batch statistics (and running-statistic
    updates, in place on the graph's buffers) in training mode, running statistics in eval."""

    def __init__(self, momentum: float, eps: float, source: str) -> None:
        super().__init__()
        self.momentum, self.eps, self.source = momentum, eps, source

    def forward(self, x, weight, bias, running_mean, running_var):
        return F.batch_norm(
            x, running_mean, running_var, weight, bias, self.training, self.momentum, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.source}, momentum={self.momentum}, eps={self.eps}"


class _Dropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


# ---------------------------------------------------------------------------- the module
@dataclass(frozen=True)
class QuantizedTensor:
    """Integer codes of the Program that train as a float parameter."""

    codes: str  # the Program's buffer of codes
    parameter: str  # the float parameter standing for it in the trainable module
    exponent: str  # the buffer of exponents (unchanged by training)
    axis: int
    bits: int
    signed: bool


class TrainableProgram(nn.Module):
    """A Program's graph rewritten to train (see the module docstring). Call it like the
    model; ``.train()`` / ``.eval()`` switch BatchNorm (and dropout) like an eager model.
    ``program.with_weights(module)`` makes a Program of the trained values."""

    def __init__(
        self,
        graph: fx.GraphModule,
        source_code: str,
        quantized: list[QuantizedTensor],
        summary: dict[str, Any],
    ) -> None:
        super().__init__()
        self.graph = graph
        self.source_code = source_code  # the Program's graph code: with_weights checks it
        self.quantized = quantized
        self.summary = summary

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.graph(*inputs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.summary.items())


def trainable(program: Program, *, weight_bits: int | None = None) -> TrainableProgram:
    """The Program's graph as a module that trains (a deep copy: the Program is untouched).

    ``weight_bits``: the width of integer weight codes (int8 buffers read by
    ``dequantize_pot``) to keep during QAT. By default it is read from the PotQuantize entry in
    the Program's history; without one, the narrowest width that holds every code is used.
    The module starts in training mode.
    """
    gm = program.copy_graph()
    graph = gm.graph
    summary = {"batchnorms": 0, "dropouts": 0, "fake_quantizers": 0, "quantized_weights": 0}

    for index, node in enumerate(list(graph.find_nodes(op="call_function", target=_BN_INFERENCE))):
        _train_batchnorm(gm, node, index)
        summary["batchnorms"] += 1
    for index, node in enumerate(list(graph.find_nodes(op="call_function", target=_DROPOUT))):
        name = f"_train_dropout_{index}"
        gm.add_submodule(name, _Dropout(float(node.args[1])))
        with graph.inserting_before(node):
            new = graph.call_module(name, (node.args[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        summary["dropouts"] += 1

    history_bits = _history_weight_bits(program.history)
    quantized: list[QuantizedTensor] = []
    for node in list(graph.find_nodes(op="call_function", target=_DEQUANTIZE)):
        source, exponent, axis = node.args[:3]
        if isinstance(source, fx.Node) and source.target is _QUANTIZE:
            x, q_exponent, q_axis, bits, signed = source.args[:5]
            if q_exponent is not exponent or q_axis != axis:
                raise PassError(
                    "a quantize_pot/dequantize_pot pair with different exponents cannot be "
                    "trained with a straight-through estimator",
                    node=node.name,
                    op="edgefx::dequantize_pot",
                    hint="PotQuantize shares one exponent per pair; was the graph edited?",
                )
            args: tuple = (x, exponent, axis, bits, signed)
        elif isinstance(source, fx.Node) and source.op == "get_attr":
            entry = _train_codes(gm, node, source, weight_bits or history_bits)
            quantized.append(entry)
            with graph.inserting_before(node):
                param = graph.get_attr(entry.parameter)
            args = (param, exponent, axis, entry.bits, entry.signed)
            summary["quantized_weights"] += 1
        else:
            continue  # dequantizing a computed value: leave it (no rounding to train through)
        with graph.inserting_before(node):
            new = graph.call_function(fake_quantize_pot, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        summary["fake_quantizers"] += 1
    graph.eliminate_dead_code()
    gm.recompile()

    count = 0
    for param in gm.parameters():
        if param.is_floating_point():
            param.requires_grad_(True)
            count += param.numel()
    summary["trainable_parameters"] = count
    module = TrainableProgram(gm, program.graph_module.code, quantized, summary)
    return module.train()


def _train_batchnorm(gm: fx.GraphModule, node: fx.Node, index: int) -> None:
    x, weight, bias, mean, var, momentum, eps = node.args
    owner = _module_path(node) or node.name
    for user in node.users:
        if user.target is not operator.getitem or user.args[1] != 0:
            raise PassError(
                "a BatchNorm whose saved statistics are read by the graph cannot be made trainable",
                node=user.name,
                module=owner,
                op=str(node.target),
                hint="edgefx graphs use only the normalised output of an inference BatchNorm",
            )
    if not isinstance(mean, fx.Node) or not isinstance(var, fx.Node):
        raise PassError(
            "a BatchNorm without running statistics cannot switch to training mode",
            node=node.name,
            module=owner,
            op=str(node.target),
        )
    name = f"_train_bn_{index}"
    gm.add_submodule(name, _BatchNorm(float(momentum), float(eps), owner))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (x, weight, bias, mean, var))
    new.meta = {k: v for k, v in node.meta.items() if k != "val"}
    for user in list(node.users):
        user.replace_all_uses_with(new)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)


def _train_codes(
    gm: fx.GraphModule, dequantize: fx.Node, codes_node: fx.Node, weight_bits: int | None
) -> QuantizedTensor:
    """Register the float parameter standing for integer codes read by ``dequantize``."""
    _, exponent_node, axis = dequantize.args[:3]
    codes = _attr(gm, codes_node)
    exponent = _attr(gm, exponent_node)
    if codes.dtype == torch.int32:
        bits, signed = _INT32_BITS, True
    elif codes.dtype in (torch.int8, torch.uint8):
        signed = codes.dtype == torch.int8
        bits = weight_bits or _narrowest_bits(codes, signed)
        low, high = qrange(bits, signed)
        if int(codes.min()) < low or int(codes.max()) > high:
            raise PassError(
                f"integer codes do not fit {bits} bits ({'signed' if signed else 'unsigned'})",
                node=codes_node.name,
                op="edgefx::dequantize_pot",
                hint="pass trainable(weight_bits=...) with the width PotQuantize used",
            )
    else:
        raise PassError(
            f"dequantize_pot reads codes of dtype {codes.dtype}; QAT knows int8, uint8 and int32",
            node=codes_node.name,
            op="edgefx::dequantize_pot",
        )
    name = re.sub(r"\W", "_", f"{codes_node.target}_float")
    with torch.no_grad():
        value = dequantize_pot(codes, exponent, axis)
    gm.register_parameter(name, nn.Parameter(value))
    return QuantizedTensor(
        codes=str(codes_node.target),
        parameter=name,
        exponent=str(exponent_node.target),
        axis=int(axis),
        bits=bits,
        signed=signed,
    )


def _narrowest_bits(codes: torch.Tensor, signed: bool) -> int:
    low_code, high_code = int(codes.min()), int(codes.max())
    for bits in range(2, 9):
        low, high = qrange(bits, signed)
        if low <= low_code and high_code <= high:
            return bits
    return 8


def _history_weight_bits(history: tuple[str, ...]) -> int | None:
    """``weight_bits`` of the (last) PotQuantize recorded in a Program's history."""
    found = None
    for entry in history:
        if entry.startswith("PotQuantize("):
            match = re.search(r"weight_bits=(\d+)", entry)
            found = int(match.group(1)) if match else found
    return found


def _attr(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


# ---------------------------------------------------------------------------- back to a Program
def with_weights(program: Program, module: nn.Module, applied: str | None = None) -> Program:
    """A new Program: ``program``'s graph holding the values trained in ``module`` (made by
    ``program.trainable()``); QAT weights go back into integer codes."""
    if not isinstance(module, TrainableProgram):
        raise InputError(
            f"with_weights expects the module made by program.trainable(), got "
            f"{type(module).__name__}",
            hint="module = program.trainable(); train it; program.with_weights(module)",
        )
    if module.source_code != program.graph_module.code:
        raise InputError(
            "the module was made from a different Program (its graph differs)",
            hint="call with_weights on the Program whose trainable() made the module",
        )
    gm = program.copy_graph()
    trained = dict(module.graph.named_parameters())
    trained.update(module.graph.named_buffers())
    codes = {q.codes: q for q in module.quantized}
    with torch.no_grad():
        for name, target in [*gm.named_parameters(), *gm.named_buffers()]:
            entry = codes.get(name)
            if entry is not None:
                exponent = trained[entry.exponent]
                value = trained[entry.parameter].detach()
                if entry.bits == _INT32_BITS:
                    new = torch.round(value.double() / _scale(exponent, value.double(), entry.axis))
                    new = new.clamp(-(1 << 31), (1 << 31) - 1).to(torch.int32)
                else:
                    new = quantize_pot(value, exponent, entry.axis, entry.bits, entry.signed)
            else:
                new = trained[name].detach()
            if new.shape != target.shape or new.dtype != target.dtype:
                raise InputError(
                    f"trained value of {name} is {new.dtype}{list(new.shape)}, the Program "
                    f"holds {target.dtype}{list(target.shape)}",
                    hint="train the module from program.trainable() without resizing it",
                )
            target.copy_(new)
    return program.with_graph(gm, applied)
