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


def module_path(node: Node) -> str:
    """The innermost source module of ``node`` from ``nn_module_stack`` ("" for top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    key, entry = next(reversed(stack.items()))  # innermost module: (path, class)
    if key.startswith("_empty_nn_module_stack"):  # sym_size and friends
        return ""
    return str(entry[0])
