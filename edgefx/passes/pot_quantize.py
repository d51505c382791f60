"""PotQuantize: power-of-two post-training quantization (RAPQ-style) of convs and linears.

Every convolution and linear layer with constant weights gets
- its weights stored as ``weight_bits`` integer codes with one power-of-two exponent per
  output channel, read through ``edgefx::dequantize_pot``;
- its input quantized and dequantized (``edgefx::quantize_pot`` -> ``dequantize_pot``) with
  one power-of-two exponent, ``act_bits`` wide, unsigned where the producer cannot be
  negative (ReLU, ReLU6, sigmoid, pools and concats of those), signed otherwise; layers
  reading the same tensor share its quantizer;
- its bias stored as int32 codes on the accumulator's grid, exponent = input + weight
  exponent, which is what integer inference adds to the int32 accumulator.

This is the quantize/dequantize ("QDQ") form: it runs in float, and QDQToShift later turns
each DQ -> conv -> Q chain into integer arithmetic whose requantization is a bit-shift.

Exactness bound: a layer's float32 output equals its integer accumulation
``sum(q_x * q_w) + q_b`` times ``2**(e_x + e_w)`` exactly as long as every partial sum stays
below 2**24 in magnitude (float32 has a 24-bit significand; products of codes and powers of
two are exact, and an integer sum below 2**24 needs no rounding whatever the summation
order). For any input this is guaranteed when ``fan_in * max|q_x| * max|q_w| + max|q_b|
<= 2**24``: at W8A8 (|q_x| <= 255 unsigned, |q_w| <= 128) that is a fan-in of at most 513
(1,024 with signed inputs), so a 3x3 conv over 512 channels (fan-in 4,608, worst case about
2**27) is exact only because real partial sums stay far below the worst case (the tests
check both at that size). Each layer's report entry gives ``worst_case_acc_bits``; where it
exceeds 24, exactness depends on the data, and an integer kernel (int32 accumulator) is the
reference.

Exponents are chosen from calibration data. ``search="minmax"`` takes the smallest exponent
that clips nothing; ``"mse"`` picks, per tensor (per channel for weights), the exponent among
that one and the next smaller ones minimising the squared rounding + clipping error;
``"joint"`` (the default, after RAPQ) starts from ``"mse"`` and adjusts the exponents of the
whole network together: coordinate descent that moves one quantizer's exponent(s) by +-1
while the network's output error on the calibration data falls.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from torch import fx

from edgefx.analysis.graph import CONVS, POOLS
from edgefx.analysis.numerics import NumericError
from edgefx.errors import EdgefxError, PassError
from edgefx.ops.pot import MAX_BITS, MIN_BITS, dequantize_pot, qrange, quantize_pot
from edgefx.passes.base import Pass
from edgefx.passes.fold_batchnorm import FoldBatchNorm
from edgefx.passes.rewrite import (
    add_buffer,
    add_parameter,
    attr_tensor,
    check_module_paths,
    computed_constant,
    module_path,
    remove_dead_code,
    under,
)
from edgefx.program import Program

aten = torch.ops.aten
_quantize = torch.ops.edgefx.quantize_pot.default
_dequantize = torch.ops.edgefx.dequantize_pot.default

_LINEAR = aten.linear.default
# ops with weights that PotQuantize leaves in float (and says so in its report)
_NOT_QUANTIZED = {
    aten.embedding.default: "embedding lookup is not quantized",
    aten.baddbmm.default: "matrix product with a constant is not quantized (only linear)",
    aten.einsum.default: "einsum with a constant is not quantized (only linear)",
    aten.convolution.default: "general convolution (transposed or unusual) is not quantized",
    aten.conv_transpose1d.default: "transposed convolution is not quantized",
    aten.conv_transpose2d.input: "transposed convolution is not quantized",
    aten.conv_transpose3d.input: "transposed convolution is not quantized",
    aten.mm.default: "matrix product with a constant is not quantized (only linear)",
    aten.addmm.default: "matrix product with a constant is not quantized (only linear)",
    aten.matmul.default: "matrix product with a constant is not quantized (only linear)",
    aten.bmm.default: "matrix product with a constant is not quantized (only linear)",
}
_SEARCHES = ("minmax", "mse", "joint")
_OBJECTIVES = ("output", "bn_stats")
_SCOPES = ("network", "block")
_BATCH_NORM = aten._native_batch_norm_legit_no_training.default
_CANDIDATES = 4  # "mse" tries the no-clipping exponent and this many smaller ones
_SAMPLE = 1 << 18  # activation values kept per quantizer for the "mse" search
_INT32 = (-(1 << 31), (1 << 31) - 1)

# ops whose output is never negative, and ops that keep their input's sign
_NONNEGATIVE = {
    aten.relu.default,
    aten.sigmoid.default,
    aten.hardsigmoid.default,
    aten.softmax.int,
    aten._softmax.default,
    aten.abs.default,
}
_NONNEGATIVE |= {aten.exp.default, aten.sqrt.default, aten.rsqrt.default, aten.relu6.default}
_SIGN_KEEPING = {
    *POOLS,
    aten.slice.Tensor,
    aten.select.int,
    aten.expand.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.chunk.default,
    aten.unbind.int,
    aten.sum.dim_IntList,
    aten.amax.default,
    aten.max_pool1d.default,
    aten.max_pool3d.default,
    aten.adaptive_avg_pool1d.default,
    aten.upsample_bilinear2d.vec,
    aten._adaptive_avg_pool2d.default,
    aten.mean.dim,
    aten.reshape.default,
    aten.view.default,
    aten.flatten.using_ints,
    aten.permute.default,
    aten.transpose.int,
    aten.clone.default,
    aten.contiguous.default,
    aten.squeeze.dim,
    aten.unsqueeze.default,
    aten.dropout.default,
    aten.max_pool2d_with_indices.default,
    aten.upsample_nearest2d.vec,
}


@dataclass
class _Layer:
    """A conv or linear layer to quantize."""

    node: fx.Node
    module: str
    weight: torch.Tensor  # float, as captured
    bias: torch.Tensor | None
    input: fx.Node
    weight_exp: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))


@dataclass
class _Activation:
    """One quantized tensor (the input of one or more layers)."""

    node: fx.Node
    signed: bool
    exp: int = 0
    absmax: float = 0.0
    sample: list[torch.Tensor] = field(default_factory=list)


class PotQuantize(Pass):
    """Quantize conv and linear layers with power-of-two scales, from calibration data.

    Args:
        calib: calibration batches: an iterable (e.g. a DataLoader) of input tensors or of
            tuples whose first items are the model's inputs (labels are ignored), or a single
            tensor. Default: the Program's example inputs (fine for testing the flow, not for
            accuracy).
        weight_bits / act_bits: code widths, 2 to 8.
        search: "joint" (default), "mse" or "minmax"; see the module docstring.
        calib_batches: at most this many batches are taken from ``calib`` (all of them
            set the activation ranges).
        search_samples: the joint search measures the output error on this many samples
            (the first ones), since it runs the network twice per quantizer and sweep.
        sweeps: rounds of the joint search.
        exclude: module paths (prefixes) left in float, e.g. ``["fc"]``.
        fold_batchnorm: fold every BatchNorm that follows a conv into it first (as
            ``FoldBatchNorm`` does), so that it is quantized with the conv instead of
            staying a float island between the conv's dequantize and the next quantize
            (where onnxruntime fuses it into the weights its own way; see
            ``compiler.QUANTIZED_CHECK_BITS``). Order with ``FoldBatchNorm`` does not matter.
        attention: quantize the two activation products of attention, q.k^T and attn.v:
            each non-causal ``scaled_dot_product_attention`` is written out as
            matmul -> scale (-> mask) -> softmax -> matmul, and both operands of each matmul
            are quantized (q, k and v signed, the softmax output unsigned), so each product
            is an integer accumulation too. The scale, the mask (added, or -inf where a
            boolean mask is False) and softmax stay float islands.
        objective: what the joint search minimises. "output" (default): the squared error of
            the network's outputs against the float model's, relative to their power, on the
            search samples. "bn_stats" (RAPQ's reconstruction): for every conv a BatchNorm
            followed (folded inside this pass), the squared distance of its quantized
            output's per-channel mean and standard deviation to the BatchNorm's beta and
            |gamma| (what the BatchNorm's running statistics say they are), relative to
            those; needs the model's BatchNorms unfolded. ``calib_error`` reports it.
        scope: how far a trial move of the joint search runs. "network" (default): to the
            outputs, scored on them. "block" (block-wise reconstruction, as BRECQ): first only
            to the end of the last block holding a layer the quantizer feeds (the module path
            up to its first numbered part: ``layer2.1``, ``blocks.3``), scored on that block's
            output against the float model's; only a move that lowers its block's error is
            run on to the outputs, and it is kept only if the output error falls too (block
            errors alone can fall while the outputs get worse). Most trials then cost a block
            instead of the rest of the network.
    """

    name = "PotQuantize"

    def __init__(
        self,
        calib: Any = None,
        *,
        weight_bits: int = 8,
        act_bits: int = 8,
        search: str = "joint",
        calib_batches: int = 8,
        search_samples: int = 16,
        sweeps: int = 2,
        exclude: Sequence[str] = (),
        fold_batchnorm: bool = True,
        attention: bool = True,
        objective: str = "output",
        scope: str = "network",
    ) -> None:
        for label, bits in (("weight_bits", weight_bits), ("act_bits", act_bits)):
            if not (isinstance(bits, int) and MIN_BITS <= bits <= MAX_BITS):
                raise PassError(
                    f"{label} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}",
                    hint="e.g. PotQuantize(weight_bits=4, act_bits=8)",
                )
        if search not in _SEARCHES:
            raise PassError(
                f"search must be one of {', '.join(_SEARCHES)}, got {search!r}",
                hint='"joint" adjusts exponents network-wide; "mse" per tensor; "minmax" clips '
                "nothing",
            )
        if not (isinstance(calib_batches, int) and calib_batches >= 1):
            raise PassError(f"calib_batches must be a positive integer, got {calib_batches!r}")
        if not (isinstance(search_samples, int) and search_samples >= 1):
            raise PassError(f"search_samples must be a positive integer, got {search_samples!r}")
        if not (isinstance(sweeps, int) and sweeps >= 0):
            raise PassError(f"sweeps must be an integer >= 0, got {sweeps!r}")
        check_module_paths("exclude", exclude, example='["conv1", "fc"]')
        if not isinstance(fold_batchnorm, bool):
            raise PassError(f"fold_batchnorm must be True or False, got {fold_batchnorm!r}")
        self.fold_batchnorm = fold_batchnorm
        if not isinstance(attention, bool):
            raise PassError(f"attention must be True or False, got {attention!r}")
        self.attention = attention
        if objective not in _OBJECTIVES:
            raise PassError(
                f"objective must be one of {', '.join(_OBJECTIVES)}, got {objective!r}",
                hint='"output": output MSE against the float model; "bn_stats": RAPQ\'s '
                "BatchNorm-statistics reconstruction",
            )
        if objective == "bn_stats" and not fold_batchnorm:
            raise PassError(
                "objective='bn_stats' reads the BatchNorms this pass folds: it needs "
                "fold_batchnorm=True"
            )
        self.objective = objective
        if scope not in _SCOPES:
            raise PassError(
                f"scope must be one of {', '.join(_SCOPES)}, got {scope!r}",
                hint='"network" scores each move on the outputs; "block" on its block\'s output',
            )
        self.scope = scope
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.search = search
        self.calib_batches = calib_batches
        self.search_samples = search_samples
        self.sweeps = sweeps
        self.exclude = tuple(exclude)
        self._calib = _take_batches(calib, calib_batches)

    def __repr__(self) -> str:
        calib = "example inputs" if self._calib is None else f"{len(self._calib)} batches"
        return (
            f"PotQuantize(calib=<{calib}>, weight_bits={self.weight_bits}, "
            f"act_bits={self.act_bits}, search={self.search!r}, exclude={list(self.exclude)})"
        )

    # ------------------------------------------------------------------ the pass
    def run(self, program: Program) -> tuple[Program, dict[str, Any]]:
        batches = self._batches(program)
        folded = 0
        bn_targets = _bn_targets(program) if self.objective == "bn_stats" else {}
        if self.objective == "bn_stats" and self.search == "joint" and not bn_targets:
            raise PassError(
                f"objective='bn_stats' needs BatchNorms after convs; {program.name} has none",
                hint="run PotQuantize on the model before FoldBatchNorm (it folds them itself)",
            )
        if self.fold_batchnorm:
            folded_program, fold_report = FoldBatchNorm().run(program)
            if fold_report["folded"]:
                program, folded = folded_program, fold_report["folded"]
        gm = program.copy_graph()
        matmuls, attention_skipped = _decompose_attention(gm) if self.attention else ([], [])
        computed = _fold_computed_weights(gm, self.exclude)
        layers, skipped = self._layers(gm)
        skipped += attention_skipped
        if not layers and not matmuls:
            report = {
                "layers": [],
                "skipped": skipped,
                "quantizers": 0,
                "batchnorm_folded": folded,
                "computed_weights_folded": computed,
                "float_islands": _float_islands(gm, set()),
            }
            return program.with_graph(gm, repr(self)), report
        activations = self._activations(layers, matmuls)
        matmul_inputs = {node: tuple(node.args[:2]) for node in matmuls}
        block_ends = _block_ends(gm) if self.scope == "block" else {}
        ends = list(dict.fromkeys(block_ends.values()))
        with torch.no_grad():
            references = _calibrate(gm, activations, batches, ends)
            for act in activations.values():
                act.exp = self._act_exponent(act)
                act.sample.clear()
            for layer in layers:
                layer.weight_exp = self._weight_exponents(layer.weight)
            quantized = _QuantizedGraph(
                gm, layers, activations, self.weight_bits, self.act_bits, matmuls
            )
            search, refs = _first_samples(batches, references, self.search_samples)
            if self.search == "joint":
                targets = {n: bn_targets[n.name] for n in gm.graph.nodes if n.name in bn_targets}
                start_error, final_error, steps = quantized.coordinate_descent(
                    search, refs, self.sweeps, targets, block_ends, ends
                )
            else:
                outputs = len(refs[0]) - len(ends)
                start_error = final_error = quantized.error(search, [r[:outputs] for r in refs])
                steps = 0
        remove_dead_code(gm)
        report = {
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "search": self.search,
            "calibration": "example inputs" if self._calib is None else f"{len(batches)} batches",
            "quantizers": len(layers) + len(activations),
            # relative squared output error on the search samples, per-tensor exponents
            # ("start") and after the joint search ("final")
            "calib_error": {
                "samples": sum(int(b[0].shape[0]) for b in search),
                "start": start_error,
                "final": final_error,
                "joint_steps": steps,
            },
            "layers": [quantized.describe(layer) for layer in layers],
            # activation x activation products (attention): both operands quantized
            "matmuls": [
                {
                    "module": module_path(node) or node.name,
                    "node": node.name,
                    "input_exps": [activations[a].exp for a in matmul_inputs[node]],
                    "inputs": [
                        "signed" if activations[a].signed else "unsigned"
                        for a in matmul_inputs[node]
                    ],
                }
                for node in matmuls
            ],
            "skipped": skipped,
            "batchnorm_folded": folded,
            "computed_weights_folded": computed,
            # ops computed in float between a dequantize and the next quantize: a backend may
            # round them differently (see compiler.QUANTIZED_CHECK_BITS)
            "float_islands": _float_islands(gm, {layer.node for layer in layers} | set(matmuls)),
        }
        return program.with_graph(gm, repr(self)), report

    def _batches(self, program: Program) -> list[tuple[torch.Tensor, ...]]:
        if self._calib is None:
            return [tuple(program.example_inputs)]
        for i, batch in enumerate(self._calib):
            try:
                program.check_inputs(batch[: len(program.input_specs)])
            except EdgefxError as exc:
                raise PassError(
                    f"calibration batch {i} does not fit {program.name}: {exc.message}",
                    hint="calib yields the model's inputs (or tuples starting with them)",
                ) from exc
        return [tuple(b[: len(program.input_specs)]) for b in self._calib]

    def _layers(self, gm: fx.GraphModule) -> tuple[list[_Layer], list[dict[str, str]]]:
        layers, skipped = [], []
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target not in (*CONVS, _LINEAR):
                reason = _left_in_float(gm, node)
                if reason:
                    skipped.append(
                        {
                            "module": module_path(node) or node.name,
                            "op": str(node.target),
                            "reason": reason,
                        }
                    )
                continue
            module = module_path(node) or node.name
            weight = attr_tensor(gm, node.args[1])
            bias_node = node.args[2] if len(node.args) > 2 else None
            bias = attr_tensor(gm, bias_node)
            reason = None
            if any(under(module, p) for p in self.exclude):
                reason = "excluded"
            elif weight is None or (bias_node is not None and bias is None):
                reason = "weight or bias is not a constant"
            elif not weight.is_floating_point():
                reason = f"weight is {weight.dtype}"
            if reason:
                skipped.append({"module": module, "op": str(node.target), "reason": reason})
                continue
            layers.append(_Layer(node, module, weight.detach().float(), bias, node.args[0]))
        return layers, skipped

    def _activations(
        self, layers: list[_Layer], matmuls: list[fx.Node]
    ) -> dict[fx.Node, _Activation]:
        acts: dict[fx.Node, _Activation] = {}
        sources = [layer.input for layer in layers] + [a for n in matmuls for a in n.args[:2]]
        for source in sources:
            if source not in acts:
                acts[source] = _Activation(source, signed=not _nonnegative(source))
        return acts

    def _act_exponent(self, act: _Activation) -> int:
        sample = torch.cat(act.sample) if act.sample else torch.zeros(1)
        _, high = qrange(self.act_bits, act.signed)
        exps = _exponent_candidates(torch.tensor([act.absmax]), high, self.search)[:, 0]
        if len(exps) == 1:
            return int(exps[0])
        errors = [
            float(((_fake_quant(sample, e, self.act_bits, act.signed) - sample) ** 2).sum())
            for e in exps
        ]
        return int(exps[min(range(len(errors)), key=errors.__getitem__)])

    def _weight_exponents(self, weight: torch.Tensor) -> torch.Tensor:
        rows = weight.reshape(weight.shape[0], -1)
        _, high = qrange(self.weight_bits)
        exps = _exponent_candidates(rows.abs().amax(dim=1), high, self.search)  # [k, C]
        if exps.shape[0] == 1:
            return exps[0]
        errors = torch.stack(
            [((_fake_quant(rows, e, self.weight_bits, True) - rows) ** 2).sum(dim=1) for e in exps]
        )
        return exps.gather(0, errors.argmin(dim=0, keepdim=True))[0]


_SDPA = aten.scaled_dot_product_attention.default


def _decompose_attention(gm: fx.GraphModule) -> tuple[list[fx.Node], list[dict[str, str]]]:
    """Write every ``scaled_dot_product_attention`` out as
    ``matmul(softmax(matmul(q, k^T) * scale + mask), v)`` (in place); return the matmuls
    (with those of attention the model writes out itself, see ``_explicit_attention``), and
    the attentions left whole (causal, dropout, grouped-query) with the reason.

    A mask is applied as SDPA applies it: a float mask is added to the scaled scores, a
    boolean one sets the scores it excludes (False) to -inf. Hugging Face ViT passes an
    all-True boolean mask, Swin its relative position bias (plus the shifted windows' mask)
    as a float one; either stays float, between the two quantized products."""
    matmuls, skipped = [], []
    for node in list(gm.graph.find_nodes(op="call_function", target=_SDPA)):
        q, k, v = node.args[:3]
        options = dict(zip(("attn_mask", "dropout_p", "is_causal"), node.args[3:], strict=False))
        options.update(node.kwargs)
        mask = options.get("attn_mask")
        reason = None
        if options.get("is_causal"):
            reason = "causal attention is not quantized"
        elif options.get("dropout_p", 0.0) or options.get("enable_gqa"):
            reason = "attention with dropout or grouped queries is not quantized"
        elif "val" not in q.meta:
            reason = "attention without shape information is not quantized"
        elif mask is not None and not (isinstance(mask, fx.Node) and "val" in mask.meta):
            reason = "attention with a mask of unknown type is not quantized"
        if reason:
            skipped.append(
                {"module": module_path(node) or node.name, "op": str(_SDPA), "reason": reason}
            )
            continue
        scale = options.get("scale")
        if scale is None:
            scale = 1.0 / math.sqrt(int(q.meta["val"].shape[-1]))
        graph = gm.graph
        with graph.inserting_before(node):
            k_t = graph.call_function(aten.transpose.int, (k, -2, -1))
            scores = graph.call_function(aten.matmul.default, (q, k_t))
            scaled = graph.call_function(aten.mul.Tensor, (scores, scale))
            new = [k_t, scores, scaled]
            if mask is not None and mask.meta["val"].dtype == torch.bool:
                excluded = graph.call_function(aten.logical_not.default, (mask,))
                excluded.meta["val"] = mask.meta["val"]  # same shape, bool
                scaled = graph.call_function(
                    aten.masked_fill.Scalar, (scaled, excluded, float("-inf"))
                )
                new += [excluded, scaled]
            elif mask is not None:
                scaled = graph.call_function(aten.add.Tensor, (scaled, mask))
                new.append(scaled)
            attn = graph.call_function(aten._softmax.default, (scaled, -1, False))
            out = graph.call_function(aten.matmul.default, (attn, v))
        for added in (*new, attn, out):
            added.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        matmuls += [scores, out]
    if matmuls:
        gm.recompile()
    found = set(matmuls)
    matmuls += [m for m in _explicit_attention(gm) if m not in found]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(matmuls, key=order.__getitem__), skipped


_SOFTMAX = {aten._softmax.default, aten.softmax.int}
# what may stand between q @ k^T and the softmax (scale, bias, mask, reshapes), and between
# the softmax and attn @ v
_SCORE_OPS = {
    aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.masked_fill.Scalar,
    aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.clone.default,
    aten._unsafe_view.default, aten.contiguous.default,
}  # fmt: skip
_PROBABILITY_OPS = {
    aten.clone.default, aten.dropout.default, aten.view.default, aten.reshape.default,
    aten.contiguous.default, aten.alias.default,
}  # fmt: skip


def _explicit_attention(gm: fx.GraphModule) -> list[fx.Node]:
    """The two products of attention written out in the model itself (timm's Swin, or a
    ViT with ``fused_attn`` off): ``matmul(q, k^T)`` reaching a softmax through scale, bias
    and mask ops, and the ``matmul(softmax, v)`` reading it, both of two data-dependent
    tensors; a softmax without both is left alone."""
    data: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in data for a in node.all_input_nodes):
            data.add(node)

    def product(node: fx.Node) -> bool:
        return (
            node.op == "call_function"
            and node.target == aten.matmul.default
            and all(isinstance(a, fx.Node) and a in data for a in node.args[:2])
        )

    def scores_of(node: Any, depth: int = 0) -> fx.Node | None:
        if not isinstance(node, fx.Node) or node not in data or depth > 8:
            return None
        if product(node):
            return node
        if node.op != "call_function" or node.target not in _SCORE_OPS:
            return None
        for arg in node.args:
            found = scores_of(arg, depth + 1)
            if found is not None:
                return found
        return None

    def values_of(node: fx.Node, depth: int = 0) -> fx.Node | None:
        for user in node.users:
            if product(user) and user.args[0] is node:
                return user
            if depth < 4 and user.op == "call_function" and user.target in _PROBABILITY_OPS:
                found = values_of(user, depth + 1)
                if found is not None:
                    return found
        return None

    matmuls = []
    for softmax in gm.graph.nodes:
        if softmax.op != "call_function" or softmax.target not in _SOFTMAX:
            continue
        scores, out = scores_of(softmax.args[0]), values_of(softmax)
        if scores is not None and out is not None and scores is not out:
            matmuls += [scores, out]
    return list(dict.fromkeys(matmuls))


def _fold_computed_weights(gm: fx.GraphModule, exclude: list[str]) -> list[str]:
    """Give every conv and linear whose weight or bias the graph computes from parameters
    alone (weight standardisation as in NF-ResNets, a q/k/v bias ``cat``-ed from q and v
    biases and zeros as in BEiT and Swin V2) that value as a constant, so that it is quantized
    like a stored one; the computation is left to dead-code removal. Excluded modules keep
    theirs. A value read by several layers becomes one constant, so a shared weight stays
    shared (and is stored once). Returns the weights folded, as ``module.weight`` /
    ``module.bias``."""
    folded = []
    constants: dict[fx.Node, fx.Node] = {}  # computed value -> its constant
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (*CONVS, _LINEAR):
            continue
        module = module_path(node) or node.name
        if any(under(module, p) for p in exclude):
            continue
        for index, what in ((1, "weight"), (2, "bias")):
            arg = node.args[index] if len(node.args) > index else None
            if arg not in constants:
                value = computed_constant(gm, arg)
                if value is None:
                    continue
                constants[arg] = add_parameter(gm, f"{module}_{what}", value, before=node)
            node.replace_input_with(arg, constants[arg])
            folded.append(f"{module}.{what}")
    return folded


def _left_in_float(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why a weighted op other than conv/linear stays float, or None when ``node`` reads no
    constant weight. Ops are matched by name too, so that an overload nobody listed (say a
    new conv variant) is reported rather than silently left in float."""
    constants = [
        a
        for a in torch.utils._pytree.tree_leaves((node.args, node.kwargs))
        if isinstance(a, fx.Node) and attr_tensor(gm, a) is not None
    ]
    if not constants:
        return None
    if node.target in _NOT_QUANTIZED:
        return _NOT_QUANTIZED[node.target]
    name = str(node.target).split(".")[1] if "." in str(node.target) else str(node.target)
    if any(word in name for word in ("conv", "linear", "mm", "matmul", "einsum", "embedding")):
        return f"{name} with a constant weight is not quantized (only conv and linear)"
    return None


# ops whose float result is exact (no rounding): data movement, ReLU-like clamps, max
_NO_ROUNDING = {
    *_SIGN_KEEPING,
    operator.getitem,
    aten.relu.default,
    aten.hardtanh.default,
    aten.clamp.default,
    aten.relu6.default,
    aten.abs.default,
    aten.neg.default,
    aten.cat.default,
    aten.sym_size.int,
    aten.max_pool2d.default,
    aten.max_pool1d.default,
    aten.max_pool3d.default,
    aten.amax.default,
    aten.alias.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
    aten.unflatten.int,
    aten.t.default,
    aten.expand.default,
}
_ROUNDING_POOLS = {aten.mean.dim, aten.sum.dim_IntList, aten._adaptive_avg_pool2d.default} | {
    p for p in POOLS if "avg" in str(p)
}


def _float_islands(gm: fx.GraphModule, layers: set[fx.Node]) -> list[dict[str, Any]]:
    """The float ops left between quantizers, by op: count and the first modules."""
    islands: dict[str, dict[str, Any]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in layers or node.target in (_quantize, _dequantize):
            continue
        if node.target in _NO_ROUNDING and node.target not in _ROUNDING_POOLS:
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and not val.is_floating_point():
            continue  # integer / boolean ops (a mask's arange, ge) round nothing
        name = str(node.target).removeprefix("aten.").removesuffix(".default")
        entry = islands.setdefault(name, {"op": name, "count": 0, "modules": []})
        entry["count"] += 1
        module = module_path(node) or node.name
        if len(entry["modules"]) < 3 and module not in entry["modules"]:
            entry["modules"].append(module)
    return sorted(islands.values(), key=lambda e: -e["count"])


# ---------------------------------------------------------------------------- calibration
def _take_batches(calib: Any, limit: int) -> list[tuple[torch.Tensor, ...]] | None:
    if calib is None:
        return None
    if isinstance(calib, torch.Tensor):
        calib = [calib]
    if not isinstance(calib, Iterable):
        raise PassError(
            f"calib must be an iterable of batches or a tensor, got {type(calib).__name__}",
            hint="e.g. calib=loader (a DataLoader) or calib=[torch.randn(8, 3, 224, 224)]",
        )
    batches = []
    for i, batch in enumerate(calib):
        if i == limit:
            break
        items = (batch,) if isinstance(batch, torch.Tensor) else batch
        if not isinstance(items, (tuple, list)) or not all(
            isinstance(t, torch.Tensor) for t in items[:1]
        ):
            raise PassError(
                f"calibration batch {i} is a {type(batch).__name__}, not a tensor or a tuple "
                "of tensors",
                hint="calib yields the model's inputs (or (inputs, labels) tuples)",
            )
        batches.append(tuple(items))
    if not batches:
        raise PassError("calib holds no batches", hint="pass at least one batch of inputs")
    return batches


# ---------------------------------------------------------------------------- exponents
def _exponent_candidates(absmax: torch.Tensor, high: int, search: str) -> torch.Tensor:
    """[k, C] int32 exponents to try per channel: the smallest one that clips nothing first,
    then (for the searches) the next smaller ones. An all-zero channel gets exponent 0."""
    safe = torch.where(absmax > 0, absmax.double(), torch.ones_like(absmax, dtype=torch.double))
    top = torch.ceil(torch.log2(safe / high)).to(torch.int32)
    # float rounding of log2: make sure absmax / 2**top really fits
    top = torch.where(safe / _pow2(top, torch.double) > high, top + 1, top)
    top = torch.where(absmax > 0, top, torch.zeros_like(top))
    count = 1 if search == "minmax" else _CANDIDATES + 1
    return torch.stack([top - k for k in range(count)])


def _pow2(exp: torch.Tensor | int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    exp = torch.as_tensor(exp, dtype=torch.int32)
    return torch.ldexp(torch.ones_like(exp, dtype=dtype), exp)


def _fake_quant(x: torch.Tensor, exp: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """``x`` through the graph's own quantize/dequantize kernels (one exponent, or one per
    row of ``x``)."""
    return dequantize_pot(quantize_pot(x, exp, 0, bits, signed), exp, 0)


def _nonnegative(node: fx.Node, depth: int = 0) -> bool:
    """True when ``node``'s value is >= 0 by construction (not just on the calibration data).

    Conservative: an op not known to keep the sign makes its output signed. ``add``/``sub``
    read their ``alpha`` (``add(a, b, alpha=-1)`` is ``a - b``), scalars count by their sign.
    """
    if depth > 64 or node.op != "call_function":
        return False
    args, kwargs = node.args, node.kwargs
    target = node.target

    def nonneg(value: Any) -> bool:
        if isinstance(value, fx.Node):
            return _nonnegative(value, depth + 1)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0

    def scalar(value: Any) -> float | None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else None

    if target in _NONNEGATIVE:
        return True
    if target in (aten.hardtanh.default, aten.clamp.default):
        low = args[1] if len(args) > 1 else kwargs.get("min", kwargs.get("min_val"))
        return scalar(low) is not None and scalar(low) >= 0
    if target is operator.getitem or target in _SIGN_KEEPING:
        return nonneg(args[0])
    if target is aten.cat.default:
        return all(nonneg(a) for a in args[0])
    if target in (aten.add.Tensor, aten.add.Scalar):
        alpha = scalar(args[2] if len(args) > 2 else kwargs.get("alpha", 1))
        return alpha is not None and alpha >= 0 and nonneg(args[0]) and nonneg(args[1])
    if target in (aten.sub.Tensor, aten.sub.Scalar):
        # a - alpha * b is >= 0 for sure only when the subtracted constant is <= 0
        alpha = scalar(args[2] if len(args) > 2 else kwargs.get("alpha", 1))
        b = scalar(args[1])
        return alpha is not None and b is not None and alpha * b <= 0 and nonneg(args[0])
    if target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
        # (a product or ratio of two negatives is >= 0 too, but that is not worth tracking)
        return nonneg(args[0]) and nonneg(args[1])
    return False


def _calibrate(
    gm: fx.GraphModule,
    activations: dict[fx.Node, _Activation],
    batches: list[tuple[torch.Tensor, ...]],
    extra: Sequence[fx.Node] = (),
) -> list[list[torch.Tensor]]:
    """Run the float graph on every batch, recording each quantized tensor's range and a
    sample of its values; return the graph's flat outputs per batch (the reference), followed
    by the values of the ``extra`` nodes."""
    per_batch = max(1, _SAMPLE // len(batches))

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            act = activations.get(n)
            if act is not None:
                flat = value.detach().float().reshape(-1)
                act.absmax = max(act.absmax, float(flat.abs().max()) if flat.numel() else 0.0)
                step = max(1, flat.numel() // per_batch)
                act.sample.append(flat[::step].clone())
            return value

    references = []
    for batch in batches:
        recorder = Recorder(gm, garbage_collect_values=not extra)
        outputs = _flat(recorder.run(*batch))
        references.append(outputs + [recorder.env[n].detach().float() for n in extra])
    return references


def _first_samples(
    batches: list[tuple[torch.Tensor, ...]], refs: list[list[torch.Tensor]], samples: int
) -> tuple[list[tuple[torch.Tensor, ...]], list[list[torch.Tensor]]]:
    """The leading batches (the last one cut) holding ``samples`` samples, with their refs."""
    kept_batches, kept_refs, left = [], [], samples
    for batch, ref in zip(batches, refs, strict=True):
        if left <= 0:
            break
        n = min(left, int(batch[0].shape[0]))
        kept_batches.append(tuple(t[:n] for t in batch))
        kept_refs.append([r[:n] if r.dim() and r.shape[0] == batch[0].shape[0] else r for r in ref])
        left -= n
    return kept_batches, kept_refs


def _flat(out: Any) -> list[torch.Tensor]:
    return [t.detach().float() for t in torch.utils._pytree.tree_leaves(out)]


# ---------------------------------------------------------------------------- the rewrite
class _QuantizedGraph:
    """The graph with Q/DQ nodes inserted; exponents live in int32 buffers that the search
    changes in place (weight codes are re-quantized with them)."""

    def __init__(
        self,
        gm: fx.GraphModule,
        layers: list[_Layer],
        activations: dict[fx.Node, _Activation],
        weight_bits: int,
        act_bits: int,
        matmuls: Sequence[fx.Node] = (),
    ) -> None:
        self.gm, self.layers, self.activations = gm, layers, activations
        self.weight_bits, self.act_bits = weight_bits, act_bits
        self.act_buffers: dict[fx.Node, str] = {}
        self.weight_buffers: dict[fx.Node, tuple[str, str]] = {}
        self.bias_buffers: dict[fx.Node, tuple[str, str]] = {}
        graph = gm.graph
        dequantized: dict[fx.Node, fx.Node] = {}
        for source, act in activations.items():
            anchor = source.next
            while anchor.op == "placeholder":  # placeholders stay first
                anchor = anchor.next
            exp = add_buffer(
                gm, f"{source.name}_exp", torch.tensor(act.exp, dtype=torch.int32), before=anchor
            )
            self.act_buffers[source] = str(exp.target)
            with graph.inserting_before(anchor):
                q = graph.call_function(_quantize, (source, exp, 1, act_bits, act.signed))
                dq = graph.call_function(_dequantize, (q, exp, 1))
            for new in (q, dq):
                new.meta["nn_module_stack"] = dict(source.meta.get("nn_module_stack", {}))
            dequantized[source] = dq
        self.matmul_readers: dict[fx.Node, list[fx.Node]] = {}
        for node in matmuls:
            for source in node.args[:2]:
                self.matmul_readers.setdefault(source, []).append(node)
            node.args = (dequantized[node.args[0]], dequantized[node.args[1]], *node.args[2:])
        # a weight read by several layers (a module called twice) is stored and dequantized
        # once: its layers share codes and exponents, and the search moves them together
        self.weight_groups: dict[str, list[_Layer]] = {}
        self.group_of: dict[fx.Node, str] = {}
        shared: dict[str, fx.Node] = {}
        for layer in layers:
            hint = str(layer.node.args[1].target)
            group = self.weight_groups.setdefault(hint, [])
            group.append(layer)
            self.group_of[layer.node] = hint
            if hint in shared:
                layer.weight_exp = group[0].weight_exp
                self.weight_buffers[layer.node] = self.weight_buffers[group[0].node]
                args = list(layer.node.args)
                args[0], args[1] = dequantized[layer.input], shared[hint]
                if layer.bias is not None:
                    args[2] = self._bias_node(layer)
                layer.node.args = tuple(args)
                continue
            codes = add_buffer(gm, f"{hint}_q", self._weight_codes(layer), before=layer.node)
            exp = add_buffer(gm, f"{hint}_exp", layer.weight_exp, before=layer.node)
            self.weight_buffers[layer.node] = (str(codes.target), str(exp.target))
            with graph.inserting_before(layer.node):
                weight = graph.call_function(_dequantize, (codes, exp, 0))
            shared[hint] = weight
            weight.meta["nn_module_stack"] = dict(layer.node.meta.get("nn_module_stack", {}))
            args = list(layer.node.args)
            args[0], args[1] = dequantized[layer.input], weight
            if layer.bias is not None:
                args[2] = self._bias_node(layer)
            layer.node.args = tuple(args)
        gm.recompile()

    def _bias_node(self, layer: _Layer) -> fx.Node:
        """Bias as int32 codes on the accumulator's grid: exponent = input + weight exponent,
        which is what integer inference adds to the int32 accumulator."""
        codes, exp = self._bias_codes(layer)
        hint = str(layer.node.args[2].target)
        codes_node = add_buffer(self.gm, f"{hint}_q", codes, before=layer.node)
        exp_node = add_buffer(self.gm, f"{hint}_exp", exp, before=layer.node)
        self.bias_buffers[layer.node] = (str(codes_node.target), str(exp_node.target))
        with self.gm.graph.inserting_before(layer.node):
            bias = self.gm.graph.call_function(_dequantize, (codes_node, exp_node, 0))
        bias.meta["nn_module_stack"] = dict(layer.node.meta.get("nn_module_stack", {}))
        return bias

    def _bias_codes(self, layer: _Layer) -> tuple[torch.Tensor, torch.Tensor]:
        exp = (layer.weight_exp + self.activations[layer.input].exp).to(torch.int32)
        codes = torch.round(layer.bias.double() / _pow2(exp, torch.float64))
        return codes.clamp(*_INT32).to(torch.int32), exp

    def _refresh_bias(self, layer: _Layer) -> None:
        if layer.bias is not None:
            codes, exp = self._bias_codes(layer)
            codes_name, exp_name = self.bias_buffers[layer.node]
            self._buffer(codes_name).copy_(codes)
            self._buffer(exp_name).copy_(exp)

    def _weight_codes(self, layer: _Layer) -> torch.Tensor:
        return quantize_pot(layer.weight, layer.weight_exp, 0, self.weight_bits, True)

    def _buffer(self, name: str) -> torch.Tensor:
        return self.gm.get_buffer(name)

    def error(
        self, batches: list[tuple[torch.Tensor, ...]], refs: list[list[torch.Tensor]]
    ) -> float:
        """Output error on the calibration data: squared error over squared reference."""
        return _relative_error([_flat(self.gm(*batch)) for batch in batches], refs)

    def coordinate_descent(
        self,
        batches,
        refs,
        sweeps: int,
        bn_targets: dict[fx.Node, Any] | None = None,
        block_ends: dict[fx.Node, fx.Node] | None = None,
        ends: Sequence[fx.Node] = (),
    ) -> tuple[float, float, int]:
        """Move one quantizer's exponent(s) by +-1 at a time while the output error falls;
        return the error before and after, and the number of moves taken.

        A move changes only the nodes from its quantizer on: the values of every node before
        it are kept from the last accepted state, and a trial runs the graph from there.
        Block-wise (``block_ends``), a trial first runs only to the end of the block the move
        feeds and is scored on that block's output; only a move that lowers its block's error
        is run on to the outputs, and it is kept only if it lowers the output error too (a
        block's error alone can fall while the outputs get worse)."""
        outputs = len(refs[0]) - len(ends)
        end_refs = {end: [r[outputs + i] for r in refs] for i, end in enumerate(ends)}
        runner = _ResumableRun(self.gm, batches, [r[:outputs] for r in refs], bn_targets)
        block_ends = block_ends or {}
        moves = 0
        knobs = [("act", a) for a in self.activations] + [
            ("weight", group[0]) for group in self.weight_groups.values()
        ]
        starts = {id(key): runner.first_user(self._buffers_of(kind, key)) for kind, key in knobs}
        # block-wise, a move is scored at the end of the last block holding a layer it feeds
        # (an activation quantized at a block's input belongs to the block that reads it)
        knob_ends = {id(key): self._block_end(kind, key, block_ends, runner) for kind, key in knobs}
        # trials resume at a knob's first user, block-wise ones also right after a block end
        runner.resume_at(
            set(starts.values()) | {runner.position[end] + 1 for end in ends}, also=set(ends)
        )
        start = best = runner.full()
        block_errors: dict[fx.Node, float] = {}  # block end -> its error in the accepted state
        console = Console(stderr=True)
        with Progress(
            TextColumn("PotQuantize joint search"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("quantizers  error {task.fields[error]:.3g}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        ) as progress:
            task = progress.add_task("search", total=sweeps * len(knobs), error=start)
            for _ in range(sweeps):
                improved = False
                for kind, key in knobs:
                    first, end = runner.nodes[starts[id(key)]], knob_ends[id(key)]
                    if end is not None and end not in block_errors:
                        block_errors[end] = runner.window(first, end, end_refs[end])[0]
                    for delta in (1, -1):
                        self._shift(kind, key, delta)
                        if end is not None:  # block-wise: screened on the block first
                            block_error = runner.window(first, end, end_refs[end])[0]
                            if block_error >= block_errors[end]:
                                self._shift(kind, key, -delta)
                                continue
                        err, envs = runner.trial(starts[id(key)])
                        if err < best:
                            improved, moves, best = True, moves + 1, err
                            runner.accept(envs)
                            # the blocks from the move on now see other inputs
                            moved = starts[id(key)]
                            for stale in [e for e in block_errors if runner.position[e] >= moved]:
                                del block_errors[stale]
                            break
                        self._shift(kind, key, -delta)
                    progress.update(task, advance=1, error=best)
                if not improved:
                    break
        return start, best, moves

    def _block_end(
        self, kind: str, key: Any, block_ends: dict[fx.Node, fx.Node], runner: _ResumableRun
    ) -> fx.Node | None:
        """The block end a move of this quantizer is scored at (block-wise search), or None
        when a layer it feeds lies outside every block (the move is scored on the outputs)."""
        if not block_ends:
            return None
        if kind == "act":
            readers = [w.node for w in self.layers if w.input is key]
            readers += self.matmul_readers.get(key, [])
        else:
            readers = [w.node for w in self._group(key)]
        ends = [block_ends.get(node) for node in readers]
        if not ends or None in ends:
            return None
        return max(ends, key=runner.position.__getitem__)

    def _buffers_of(self, kind: str, key: Any) -> set[str]:
        """The buffers a move of this quantizer rewrites."""
        layers = [w for w in self.layers if w.input is key] if kind == "act" else self._group(key)
        names = {self.act_buffers[key]} if kind == "act" else set(self.weight_buffers[key.node])
        for layer in layers:
            names.update(self.bias_buffers.get(layer.node, ()))
        return names

    def _shift(self, kind: str, key: Any, delta: int) -> None:
        if kind == "act":
            self._buffer(self.act_buffers[key]).add_(delta)
            self.activations[key].exp += delta
            for layer in self.layers:
                if layer.input is key:
                    self._refresh_bias(layer)
            return
        group = self._group(key)
        moved = key.weight_exp + delta
        for layer in group:
            layer.weight_exp = moved
        codes, exp = self.weight_buffers[key.node]
        self._buffer(exp).copy_(key.weight_exp)
        self._buffer(codes).copy_(self._weight_codes(key))
        for layer in group:
            self._refresh_bias(layer)

    def _group(self, layer: _Layer) -> list[_Layer]:
        return self.weight_groups[self.group_of[layer.node]]

    def describe(self, layer: _Layer) -> dict[str, Any]:
        act = self.activations[layer.input]
        exps = layer.weight_exp
        return {
            "module": layer.module,
            "op": str(layer.node.target).split(".")[-2],
            "input_exp": act.exp,
            "input": "signed" if act.signed else "unsigned",
            "weight_exp": [int(exps.min()), int(exps.max())],
            "weight_snr_db": round(
                NumericError.between([layer.weight], [self._dequantized_weight(layer)]).snr_db, 2
            ),
            "bias": layer.bias is not None,
            "fan_in": layer.weight[0].numel(),
            # bits of the largest accumulator any input could produce: float32 (24-bit
            # significand) computes the layer exactly whenever its partial sums stay below
            # 2**24 steps, guaranteed for every input only when this is <= 24
            "worst_case_acc_bits": self._worst_case_acc_bits(layer),
        }

    def _worst_case_acc_bits(self, layer: _Layer) -> int:
        low, high = qrange(self.act_bits, self.activations[layer.input].signed)
        codes = self._weight_codes(layer)
        worst = layer.weight[0].numel() * max(-low, high) * int(codes.abs().max())
        if layer.bias is not None:
            worst += int(self._bias_codes(layer)[0].abs().max())
        return max(1, worst).bit_length()

    def _dequantized_weight(self, layer: _Layer) -> torch.Tensor:
        return dequantize_pot(self._weight_codes(layer), layer.weight_exp, 0)


def _relative_error(outputs: list[list[torch.Tensor]], refs: list[list[torch.Tensor]]) -> float:
    num = den = 0.0
    for out, ref in zip(outputs, refs, strict=True):
        for y, r in zip(out, ref, strict=True):
            num += float(((y - r) ** 2).sum())
            den += float((r**2).sum())
    return num / den if den else num


def _block_ends(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """node -> the last tensor node of its block: the module path up to its first numbered
    part (``layer2.1``, ``blocks.3``, ``features.4``). Nodes outside numbered blocks are not
    in the map."""
    block_of: dict[fx.Node, str] = {}
    last: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        parts = (module_path(node) or "").split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is None or node.op != "call_function":
            continue
        block = ".".join(parts[: index + 1])
        block_of[node] = block
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            last[block] = node
    return {node: last[block] for node, block in block_of.items() if block in last}


def _bn_targets(program: Program) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """conv node name -> (beta, |gamma|) of the BatchNorm reading it: after folding, the
    conv's output should have that per-channel mean and standard deviation."""
    gm = program.graph_module
    targets = {}
    for bn in gm.graph.find_nodes(op="call_function", target=_BATCH_NORM):
        conv, gamma_n, beta_n, _mean, var_n = bn.args[:5]
        if not isinstance(conv, fx.Node) or conv.target not in CONVS:
            continue
        var = attr_tensor(gm, var_n)
        gamma = attr_tensor(gm, gamma_n) if gamma_n is not None else None
        beta = attr_tensor(gm, beta_n) if beta_n is not None else None
        if var is None:
            continue
        gamma = torch.ones_like(var) if gamma is None else gamma
        beta = torch.zeros_like(var) if beta is None else beta
        targets[conv.name] = (beta.detach().double(), gamma.detach().double().abs())
    return targets


def _bn_statistics_error(
    envs: list[dict[fx.Node, Any]], targets: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """RAPQ's BatchNorm-statistics objective: per-channel mean and standard deviation of each
    folded conv's output on the search samples against the BatchNorm's beta and |gamma|."""
    num = den = 0.0
    for node, (mean, std) in targets.items():
        values = torch.cat(
            [env[node].detach().double().transpose(0, 1).reshape(len(mean), -1) for env in envs],
            dim=1,
        )
        num += float(((values.mean(1) - mean) ** 2 + (values.std(1) - std) ** 2).sum())
        den += float((mean**2 + std**2).sum())
    return num / den if den else num


class _ResumableRun:
    """Runs the graph on the search batches keeping node values, so that a trial can resume
    from the first node a change affects instead of from the inputs. Buffers are changed in
    place, so kept ``get_attr`` values see the change.

    Two things keep a trial close to the cost of the nodes it recomputes:
    - ``resume_at(points)`` names the positions trials will resume from; only the values
      live across one of them (computed before it, used at or after it) are kept, so a run
      holds a few activations instead of every node's value (allocating fresh memory for all
      of them made a run about twice as slow as the compiled graph's);
    - nodes computed from buffers alone (the weights' and biases' dequantize) are cached and
      recomputed only when one of their buffers changed in place (its version counter moved).
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        batches: list[tuple[torch.Tensor, ...]],
        refs,
        bn_targets: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.gm, self.batches, self.refs = gm, batches, refs
        self.bn_targets = bn_targets or {}
        self.nodes = list(gm.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.envs: list[dict[fx.Node, Any]] = []
        self.stale = 0  # nodes from this position on hold values from before a moved quantizer
        self._constant = {
            n
            for n in self.nodes
            if n.op == "call_function"
            and n.all_input_nodes
            and all(a.op == "get_attr" for a in n.all_input_nodes)
        }
        self._cache: dict[fx.Node, tuple[tuple[tuple[int, int], ...], Any]] = {}
        # a per-tensor quantize read only by its dequantize runs as one fused fake-quant
        # kernel (bit-identical: a power-of-two scale makes x * 2**-e exact, and both round
        # half to even); the quantize node then holds the dequantized value, which the
        # dequantize passes on
        self._fake_quant: dict[fx.Node, tuple[int, int]] = {}
        for n in self.nodes:
            users = list(n.users)
            if (
                n.target is _quantize
                and len(users) == 1
                and users[0].target is _dequantize
                and users[0].args[1] is n.args[1]
                and n.args[1].op == "get_attr"
                and gm.get_buffer(str(n.args[1].target)).dim() == 0
            ):
                self._fake_quant[n] = qrange(n.args[3], n.args[4])
        self._dies_at: dict[fx.Node, list[fx.Node]] = {}  # empty: every value is kept

    def resume_at(self, points: set[int], also: set[fx.Node] = frozenset()) -> None:
        """Keep only what trials resuming at ``points`` need (plus the nodes in ``also``)."""
        last_use = {
            n: max((self.position[u] for u in n.users), default=self.position[n])
            for n in self.nodes
        }
        marks = sorted(points)
        kept = set(also) | set(self.bn_targets) | {n for n in self.nodes if n.op == "get_attr"}
        for n in self.nodes:
            here = self.position[n]
            index = bisect.bisect_right(marks, here)  # the first point after n
            if index < len(marks) and marks[index] <= last_use[n]:
                kept.add(n)
        self._dies_at = {}
        for n in self.nodes:
            if n not in kept and n.op != "output" and n.users:
                self._dies_at.setdefault(self.nodes[last_use[n]], []).append(n)

    def first_user(self, buffers: set[str]) -> int:
        users = [
            self.position[user]
            for node in self.gm.graph.find_nodes(op="get_attr")
            if node.target in buffers
            for user in node.users
        ]
        return min(users, default=0)

    def _execute(
        self, env: dict[fx.Node, Any], batch: tuple[torch.Tensor, ...], start: int, stop: int
    ) -> Any:
        """Run nodes[start:stop] into ``env``; return the output node's value if reached."""
        interpreter = fx.Interpreter(self.gm, garbage_collect_values=False)
        interpreter.env = env
        skipped = sum(n.op == "placeholder" for n in self.nodes[:start])
        interpreter.args_iter = iter(batch[skipped:])
        result = None
        for node in self.nodes[start:stop]:
            if node in self._fake_quant:
                x, exp = env[node.args[0]], env[node.args[1]]
                low, high = self._fake_quant[node]
                env[node] = torch.fake_quantize_per_tensor_affine(x, 2.0 ** int(exp), 0, low, high)
            elif node.target is _dequantize and node.args[0] in self._fake_quant:
                env[node] = env[node.args[0]]
            elif node in self._constant:
                inputs = tuple(env[a] for a in node.all_input_nodes)
                versions = tuple((id(t), t._version) for t in inputs)
                cached = self._cache.get(node)
                if cached is None or cached[0] != versions:
                    cached = versions, interpreter.run_node(node)
                    self._cache[node] = cached
                env[node] = cached[1]
            else:
                env[node] = interpreter.run_node(node)
            if node.op == "output":
                result = env[node]
            for dead in self._dies_at.get(node, ()):
                env.pop(dead, None)
        return result

    def _run(self, start: int) -> tuple[float, list[dict[fx.Node, Any]]]:
        start = start if self.envs else 0
        outputs, envs = [], []
        for i, batch in enumerate(self.batches):
            env = (
                {n: v for n, v in self.envs[i].items() if self.position[n] < start} if start else {}
            )
            outputs.append(_flat(self._execute(env, batch, start, len(self.nodes))))
            envs.append(env)
        if self.bn_targets:
            return _bn_statistics_error(envs, self.bn_targets), envs
        return _relative_error(outputs, self.refs), envs

    def full(self) -> float:
        self.envs = []
        error, self.envs = self._run(0)
        self.stale = len(self.nodes)
        return error

    def trial(self, start: int) -> tuple[float, list[dict[fx.Node, Any]]]:
        return self._run(min(start, self.stale))

    def window(
        self, first: fx.Node, end: fx.Node, refs: list[torch.Tensor]
    ) -> tuple[float, list[dict[fx.Node, Any]]]:
        """Run from ``first`` (or the first stale node before it) to ``end`` only; the error
        of ``end``'s value against ``refs``. Nodes after ``end`` keep stale values."""
        start = min(self.position[first], self.stale)
        stop = self.position[end] + 1
        outputs, envs = [], []
        for i, batch in enumerate(self.batches):
            env = dict(self.envs[i])
            self._execute(env, batch, start, stop)
            outputs.append([env[end].detach().float()])
            envs.append(env)
        n = [len(o[0]) for o in outputs]
        refs = [[r[:k]] for r, k in zip(refs, n, strict=True)]
        return _relative_error(outputs, refs), envs

    def accept(self, envs: list[dict[fx.Node, Any]], stale_from: int | None = None) -> None:
        """Keep a trial's values; nodes from ``stale_from`` on were not recomputed."""
        self.envs = envs
        self.stale = len(self.nodes) if stale_from is None else stale_from
