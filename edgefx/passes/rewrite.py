"""Small graph-surgery helpers shared by passes (not passes themselves)."""

from __future__ import annotations

import re

import torch
from torch import fx

from edgefx.analysis.graph import module_path
from edgefx.errors import PassError

__all__ = [
    "add_buffer",
    "add_parameter",
    "attr_tensor",
    "check_module_paths",
    "module_path",
    "remove_dead_code",
    "under",
]


def attr_tensor(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The constant tensor behind a ``get_attr`` node, or None if ``node`` is not one."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value if isinstance(value, torch.Tensor) else None


def check_module_paths(name: str, value: object, *, example: str) -> None:
    """Raise PassError unless ``value`` is a list/tuple of module path strings."""
    if (
        isinstance(value, str)
        or not isinstance(value, (list, tuple))
        or not all(isinstance(e, str) for e in value)
    ):
        raise PassError(
            f"{name} must be a list of module paths, got {value!r}", hint=f"e.g. {name}={example}"
        )


def under(module: str, prefix: str) -> bool:
    """True when ``module`` is the module path ``prefix`` or inside it."""
    return module == prefix or module.startswith(prefix + ".")


def _free_name(gm: fx.GraphModule, hint: str) -> str:
    base = re.sub(r"\W", "_", hint)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def add_parameter(
    gm: fx.GraphModule, hint: str, value: torch.Tensor, *, before: fx.Node
) -> fx.Node:
    """Register ``value`` as a new top-level parameter and return a get_attr node for it."""
    name = _free_name(gm, hint)
    gm.register_parameter(name, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
    return _get_attr(gm, name, value, before)


def add_buffer(gm: fx.GraphModule, hint: str, value: torch.Tensor, *, before: fx.Node) -> fx.Node:
    """Register ``value`` (e.g. integer codes) as a new top-level buffer; return its get_attr."""
    name = _free_name(gm, hint)
    gm.register_buffer(name, value.detach().clone())
    return _get_attr(gm, name, value, before)


def _get_attr(gm: fx.GraphModule, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = value.detach().clone()
    return node


def remove_dead_code(gm: fx.GraphModule) -> tuple[int, list[str]]:
    """Erase dead nodes, then delete parameters/buffers no get_attr reads any more.

    Returns (nodes removed, attribute names deleted)."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    used = {str(n.target) for n in gm.graph.find_nodes(op="get_attr")}
    removed = []
    for name, _ in [
        *gm.named_parameters(remove_duplicate=False),
        *gm.named_buffers(remove_duplicate=False),
    ]:
        if name in used:
            continue
        owner_path, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if hasattr(owner, leaf):
            delattr(owner, leaf)
            removed.append(name)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return before - len(gm.graph.nodes), removed
