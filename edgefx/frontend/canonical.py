"""Canonical forms the captured graph is brought into, so passes and backends see one shape
of each construct.

- Attention is 4-D: ``scaled_dot_product_attention`` on ``(batch, heads, tokens, dim)``.
  PyTorch accepts any number of leading dims (timm's Twins uses ``(B, windows, heads, N, D)``)
  but torch.onnx lowers only 4-D attention and TokenGate's attention analysis expects 4-D,
  so leading dims are folded into the batch around the op. The rewrite is exact: attention
  is computed independently for every leading index.
"""

from __future__ import annotations

import torch
from torch import fx

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_RESHAPE = torch.ops.aten.reshape.default
_EXPAND = torch.ops.aten.expand.default
_SYM_SIZE = torch.ops.aten.sym_size.int


def _dims(graph: fx.Graph, node: fx.Node, dims: range) -> list[int | fx.Node]:
    """``node``'s sizes at ``dims``: ints where static, ``sym_size`` nodes where symbolic."""
    shape = node.meta["val"].shape
    return [
        int(shape[i]) if isinstance(shape[i], int) else graph.call_function(_SYM_SIZE, (node, i))
        for i in dims
    ]


def flatten_attention(gm: fx.GraphModule) -> int:
    """Rewrite every attention over more than 4 dims into reshape -> 4-D attention -> reshape
    (in place). Returns the number of attention ops rewritten; the caller re-exports the graph
    to refresh the shapes of the new nodes."""
    graph = gm.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA:
            continue
        query, key, value = node.args[:3]
        rank = query.meta["val"].dim()
        if rank <= 4:
            continue
        args = list(node.args)
        kwargs = dict(node.kwargs)
        mask_in_args = len(args) > 3
        mask = args[3] if mask_in_args else kwargs.get("attn_mask")
        existing = set(graph.nodes)
        with graph.inserting_before(node):
            lead = _dims(graph, query, range(rank - 3))
            flat = [
                graph.call_function(_RESHAPE, (t, [-1, *_dims(graph, t, range(rank - 3, rank))]))
                for t in (query, key, value)
            ]
            if isinstance(mask, fx.Node):
                # the mask broadcasts against (*lead, heads, q_tokens, k_tokens): make it full
                # size before folding the leading dims
                scores = [*_dims(graph, query, range(rank - 1)), *_dims(graph, key, [rank - 2])]
                full = graph.call_function(_EXPAND, (mask, scores))
                flat_mask = graph.call_function(_RESHAPE, (full, [-1, *scores[rank - 3 :]]))
                if mask_in_args:
                    args[3] = flat_mask
                else:
                    kwargs["attn_mask"] = flat_mask
            attention = graph.call_function(_SDPA, (*flat, *args[3:]), kwargs)
            out_dims = [
                *_dims(graph, query, range(rank - 3, rank - 1)),
                *_dims(graph, value, [rank - 1]),
            ]
            out = graph.call_function(_RESHAPE, (attention, [*lead, *out_dims]))
        for new in (n for n in graph.nodes if n not in existing):
            new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        rewritten += 1
    if rewritten:
        graph.lint()
        gm.recompile()
    return rewritten
