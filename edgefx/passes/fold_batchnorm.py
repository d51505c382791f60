"""FoldBatchNorm: fold an inference-mode BatchNorm into the convolution that feeds it.

    y = gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta
      = conv(x, W * s) + (b - mean) * s + beta,        s = gamma / sqrt(var + eps)

Exact up to float rounding. Note for pass ordering: BN-guided channel pruning reads the BN
scaling factors, so it must run before this pass.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from edgefx.passes.base import Pass
from edgefx.passes.rewrite import add_parameter, attr_tensor, module_path, remove_dead_code
from edgefx.program import Program

aten = torch.ops.aten
_BATCH_NORM = aten._native_batch_norm_legit_no_training.default
# BatchNorms that normalise with the batch's own statistics: nothing constant to fold
_BATCH_STATS_NORMS = {aten._native_batch_norm_legit.default, aten._native_batch_norm_legit.no_stats}
# every one takes (input, weight, bias, ...)
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}


class FoldBatchNorm(Pass):
    """Fold every BatchNorm whose input is a (non-transposed) convolution used only by it."""

    name = "FoldBatchNorm"
    exact = True
    tolerance = 1e-4  # float32 re-association of scale into the weights

    def run(self, program: Program) -> tuple[Program, dict[str, Any]]:
        gm = program.copy_graph()
        folded: list[dict[str, str]] = []
        skipped: list[dict[str, str]] = []
        for bn in list(gm.graph.find_nodes(op="call_function", target=_BATCH_NORM)):
            reason = self._fold(gm, bn)
            entry = {"bn": module_path(bn) or bn.name}
            if reason is None:
                folded.append(entry | {"conv": module_path(bn.args[0]) or bn.args[0].name})
                self._drop(gm, bn)
            else:
                skipped.append(entry | {"reason": reason})
        for bn in gm.graph.nodes:
            if bn.op == "call_function" and bn.target in _BATCH_STATS_NORMS:
                skipped.append(
                    {
                        "bn": module_path(bn) or bn.name,
                        "reason": "uses batch statistics (track_running_stats=False)",
                    }
                )
        remove_dead_code(gm)
        report = {"folded": len(folded), "pairs": folded, "skipped": skipped}
        return program.with_graph(gm, repr(self)), report

    @staticmethod
    def _fold(gm: fx.GraphModule, bn: fx.Node) -> str | None:
        """Rewrite the conv feeding ``bn``; return why not if it cannot be folded."""
        conv, gamma_n, beta_n, mean_n, var_n, _momentum, eps = bn.args
        if not isinstance(conv, fx.Node) or conv.target not in _CONVS:
            return f"input is {getattr(conv, 'target', conv)}, not a convolution"
        if len(conv.users) != 1:
            return "the convolution output has other users"
        if conv.target == aten.convolution.default and conv.args[6]:
            return "transposed convolution"
        weight = attr_tensor(gm, conv.args[1])
        bias_node = conv.args[2] if len(conv.args) > 2 else None
        bias = attr_tensor(gm, bias_node)
        mean, var = attr_tensor(gm, mean_n), attr_tensor(gm, var_n)
        if (
            weight is None
            or mean is None
            or var is None
            or (bias_node is not None and bias is None)
        ):
            return "weights or statistics are not constants"
        gamma = attr_tensor(gm, gamma_n) if gamma_n is not None else torch.ones_like(var)
        beta = attr_tensor(gm, beta_n) if beta_n is not None else torch.zeros_like(var)
        if gamma is None or beta is None:
            return "BatchNorm affine parameters are not constants"
        with torch.no_grad():
            scale = gamma.double() / torch.sqrt(var.double() + eps)
            new_weight = (weight.double() * scale.reshape(-1, *[1] * (weight.dim() - 1))).to(
                weight.dtype
            )
            old_bias = bias.double() if bias is not None else torch.zeros_like(scale)
            new_bias = ((old_bias - mean.double()) * scale + beta.double()).to(weight.dtype)
        hint = str(conv.args[1].target)
        w_node = add_parameter(gm, f"{hint}_bnfold", new_weight, before=conv)
        b_node = add_parameter(gm, f"{hint}_bnfold_bias", new_bias, before=conv)
        args = list(conv.args)
        if len(args) < 3:
            args.extend([None] * (3 - len(args)))
        args[1], args[2] = w_node, b_node
        conv.args = tuple(args)
        return None

    @staticmethod
    def _drop(gm: fx.GraphModule, bn: fx.Node) -> None:
        """Route the BN's output to the conv; dead-code removal then drops the BN."""
        for user in list(bn.users):
            if user.target is operator.getitem and user.args[1] == 0:
                user.replace_all_uses_with(bn.args[0])
