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
    "computed_constant",
    "module_path",
    "remove_dead_code",
    "under",
    "unmerge_heads",
]


def attr_tensor(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The constant tensor behind a ``get_attr`` node, or None if ``node`` is not one."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value if isinstance(value, torch.Tensor) else None


def computed_constant(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The value of ``node`` when the graph computes it from constants alone (``get_attr``
    tensors and literals, through deterministic ops: say a weight standardised from its
    parameter, or a bias ``cat``-ed from two parameters and zeros), else None. A ``get_attr``
    node itself gives None (``attr_tensor`` reads those)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    values: dict[fx.Node, object] = {}
    order: list[fx.Node] = []
    stack, seen = [node], {node}
    while stack:  # every ancestor must be a constant or a deterministic op on constants
        n = stack.pop()
        if n.op == "get_attr":
            values[n] = attr_tensor(gm, n)
            if values[n] is None:
                return None
            continue
        target = n.target
        if n.op != "call_function" or (
            isinstance(target, torch._ops.OpOverload)
            and torch.Tag.nondeterministic_seeded in target.tags
        ):
            return None
        order.append(n)
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    with torch.no_grad():
        for n in sorted(order, key=position.__getitem__):
            args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), values.__getitem__)
            values[n] = n.target(*args, **kwargs)
    value = values[node]
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


_RESHAPES = (torch.ops.aten.reshape.default, torch.ops.aten.view.default)


def _sizes(args: list[object]) -> list[object]:
    """A shape argument's sizes as values (symbolic ones from their nodes' ``meta['val']``)."""
    return [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]


def unmerge_heads(gm: fx.GraphModule) -> int:
    """Rewrite ``reshape (tokens, batch, heads * dim) -> (tokens, batch * heads, dim)``,
    ``transpose(0, 1)``, ``reshape -> (batch, heads, tokens, dim)`` (nn.MultiheadAttention,
    so torchvision's ViT) into ``reshape -> (tokens, batch, heads, dim)``,
    ``permute(1, 2, 0, 3)``: the same tensor, but the heads never share a dim with the
    batch, so a channel analysis can follow them at any batch size. In place; returns the
    number of rewrites. New nodes get ``meta['val']`` from the old ones' fake tensors."""
    count = 0
    for last in list(gm.graph.nodes):
        if last.op != "call_function" or last.target not in _RESHAPES:
            continue
        swap = last.args[0]
        if not (
            isinstance(swap, fx.Node)
            and swap.target is torch.ops.aten.transpose.int
            and sorted(d % 3 for d in swap.args[1:3]) == [0, 1]
            and len(swap.users) == 1
        ):
            continue
        merge = swap.args[0]
        if not (isinstance(merge, fx.Node) and merge.target in _RESHAPES and len(merge.users) == 1):
            continue
        x = merge.args[0]
        x_val, merged, out = x.meta.get("val"), merge.meta.get("val"), last.meta.get("val")
        if x_val is None or merged is None or out is None:
            continue
        if not (x_val.dim() == 3 and merged.dim() == 3 and out.dim() == 4):
            continue
        tokens, batch, width = x_val.shape
        heads, dim = out.shape[1], merged.shape[2]
        same = (
            str(out.shape[0]) == str(batch)
            and str(out.shape[2]) == str(tokens)
            and str(merged.shape[0]) == str(tokens)
            and str(out.shape[3]) == str(dim)
            and isinstance(heads, int)
            and isinstance(dim, int)
            and width == heads * dim
        )
        if not same:
            continue
        batch_arg = last.args[1][0]
        tokens_arg = merge.args[1][0]
        shape = [tokens_arg, batch_arg, heads, dim]
        if sum(1 for a in shape if a == -1) > 1:
            continue
        with gm.graph.inserting_before(last):
            split = gm.graph.call_function(merge.target, (x, shape))
            moved = gm.graph.call_function(torch.ops.aten.permute.default, (split, [1, 2, 0, 3]))
        split.meta = {**merge.meta, "val": x_val.reshape(_sizes(shape))}
        moved.meta = {**last.meta, "val": split.meta["val"].permute(1, 2, 0, 3)}
        last.replace_all_uses_with(moved)
        for node in (last, swap, merge):
            gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
