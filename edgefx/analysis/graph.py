"""Small read-only facts about FX nodes, shared by analyses, passes and tools."""

from __future__ import annotations

import torch
from torch.fx import Node

aten = torch.ops.aten

POOLS = frozenset(
    {
        aten.max_pool1d.default,
        aten.max_pool2d.default,
        aten.max_pool3d.default,
        aten.avg_pool1d.default,
        aten.avg_pool2d.default,
        aten.avg_pool3d.default,
        aten.adaptive_avg_pool1d.default,
        aten.adaptive_avg_pool2d.default,
        aten.adaptive_avg_pool3d.default,
    }
)
"""Pooling ops: per channel, so they keep each channel's axis (and a value's sign)."""

CONVS = frozenset(
    {
        aten.conv1d.default,
        aten.conv2d.default,
        aten.conv3d.default,
        # padding="same" / "valid" (a string) is captured as the .padding overload
        aten.conv1d.padding,
        aten.conv2d.padding,
        aten.conv3d.padding,
    }
)
"""Convolutions taking (input, weight, bias, stride, padding, dilation, groups);
``aten.convolution`` (transposed, output padding) is not among them."""

ACTIVATIONS = frozenset(
    {
        aten.relu.default,
        aten.relu_.default,
        aten.relu6.default,
        aten.hardtanh.default,
        aten.hardtanh_.default,
        aten.silu.default,
        aten.silu_.default,
        aten.gelu.default,
        aten.sigmoid.default,
        aten.tanh.default,
        aten.hardswish.default,
        aten.hardswish_.default,
        aten.hardsigmoid.default,
        aten.elu.default,
        aten.leaky_relu.default,
        aten.mish.default,
    }
)
"""Pointwise activations: each output element depends on its input element alone."""

COPIES = frozenset(
    {aten.clone.default, aten.alias.default, aten.detach.default, aten.dropout.default}
)
"""Ops that pass their input on unchanged in an inference graph."""


def module_path(node: Node) -> str:
    """The innermost source module of ``node`` from ``nn_module_stack`` ("" for top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    key, entry = next(reversed(stack.items()))  # innermost module: (path, class)
    if key.startswith("_empty_nn_module_stack"):  # sym_size and friends
        return ""
    return str(entry[0])
