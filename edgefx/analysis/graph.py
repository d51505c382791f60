"""Small read-only facts about FX nodes, shared by analyses, passes and tools."""

from __future__ import annotations

from torch.fx import Node


def module_path(node: Node) -> str:
    """The innermost source module of ``node`` from ``nn_module_stack`` ("" for top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    key, entry = next(reversed(stack.items()))  # innermost module: (path, class)
    if key.startswith("_empty_nn_module_stack"):  # sym_size and friends
        return ""
    return str(entry[0])
