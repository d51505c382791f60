"""Finding the transformer blocks of a Vision Transformer in a captured aten graph.

Read-only: nothing here mutates a GraphModule, its graph or ``node.meta``.

A block is recognised by its graph structure, not by class names: an attention core (a fused
``scaled_dot_product_attention`` or an explicit ``softmax(q @ k^T)`` followed by ``@ v``)
whose output reaches a residual ``add`` with the stream it was computed from through a
``layer_norm`` (pre-norm), followed by a second residual ``add`` whose branch starts with a
``layer_norm`` of the first one (the MLP). ``nn_module_stack`` metadata only names what was
found. This covers timm ViT / DeiT / DeiT3 (fused or not, LayerScale), torchvision
``VisionTransformer`` (``nn.MultiheadAttention``) and Hugging Face-style pre-norm ViTs.

Prefix tokens (CLS, distillation, registers) are the constant tokens concatenated in front of
the patch tokens before the first block. Without any, scores use the mean attention over all
queries instead of the CLS row (``uses_cls`` is False and the report says so).

:func:`token_axes` follows the token axis of the residual stream through the rest of the graph
(reshapes that merge it with the batch, permutes, matmuls that contract it): TokenGate uses it
to resize every op that spells out the token count.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node

from edgefx.analysis.graph import module_path
from edgefx.errors import PassError

aten = torch.ops.aten

_SDPA = {
    aten.scaled_dot_product_attention.default,
}
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_MATMUL = {aten.matmul.default, aten.bmm.default}
_ADD = {aten.add.Tensor}
_LAYER_NORM = {aten.layer_norm.default, aten.native_layer_norm.default}
_RESHAPE = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
# single-tensor ops that keep a value what it is for the purpose of walking back to a source
_PASS_THROUGH = {
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.mul.Scalar,
    aten.div.Scalar,
    aten.clone.default,
    aten.contiguous.default,
    aten.dropout.default,
    aten.alias.default,
    aten._to_copy.default,
    aten.add.Tensor,
}


class UnsupportedModelError(PassError):
    """The graph is not a ViT edgefx can read (no attention blocks, windowed attention...)."""


@dataclass(frozen=True)
class AttentionBlock:
    """One pre-norm transformer block. Node fields are node names in the analysed graph."""

    index: int
    module: str  # e.g. "blocks.3" (the module holding the residual adds)
    attention_module: str  # e.g. "blocks.3.attn"
    kind: str  # "sdpa" (fused) or "softmax" (explicit softmax(q k^T) @ v)
    stream_in: str  # residual stream entering the block, (batch, tokens, dim)
    attention_residual: str  # stream after the attention's residual add
    stream_out: str  # stream after the MLP's residual add
    query: str  # (batch, heads, tokens, head_dim)
    key: str
    value: str
    attention: str  # the SDPA node, or the softmax node (its probabilities)
    head_output: str  # per-head attention output, (batch, heads, tokens, head_dim)
    see_all_mask: str | None  # a mask the attention takes that hides nothing (HF ViT), if any
    scale: float  # the logits' scale (q k^T * scale)
    heads: int
    head_dim: int
    tokens: int
    embed_dim: int
    token_axis: int = 1  # of the residual stream

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ViTStructure:
    """What :func:`find_blocks` found."""

    blocks: tuple[AttentionBlock, ...]
    tokens: int  # tokens entering the first block
    prefix_tokens: int  # constant tokens in front of the patches (CLS, distillation, registers)
    prefix_sources: tuple[str, ...]  # the constants concatenated in front, in order
    uses_cls: bool  # scores from the CLS row; False: mean attention over the queries
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def patch_tokens(self) -> int:
        return self.tokens - self.prefix_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "prefix_tokens": self.prefix_tokens,
            "prefix_sources": list(self.prefix_sources),
            "uses_cls": self.uses_cls,
            "notes": list(self.notes),
            "blocks": [b.to_dict() for b in self.blocks],
        }


# ----------------------------------------------------------------------------- shapes
class _ShapeRecorder(Interpreter):
    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False
        self.values: dict[Node, Any] = {}

    def run_node(self, n: Node) -> Any:
        value = super().run_node(n)
        self.values[n] = value
        return value


def concrete_values(
    gm: GraphModule, example_inputs: Sequence[torch.Tensor], batch: int | None = None
) -> dict[Node, Any]:
    """Every node's value on fake copies of ``example_inputs`` (shapes only, no arithmetic),
    at batch size ``batch`` if given (the graph's batch must then be dynamic)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [fake_mode.from_tensor(x) for x in example_inputs]
    if batch is not None:
        fake = [x.expand(batch, *x.shape[1:]) for x in fake]
    recorder = _ShapeRecorder(gm)
    with fake_mode, torch.no_grad():
        recorder.run(*fake)
    return recorder.values


def _shape(values: dict[Node, Any], node: object) -> tuple[int, ...] | None:
    value = values.get(node) if isinstance(node, Node) else None
    if isinstance(value, torch.Tensor):
        return tuple(int(d) for d in value.shape)
    return None


# ----------------------------------------------------------------------------- blocks
def _ancestors(node: Node) -> set[Node]:
    seen: set[Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _descendants(node: Node, limit: int = 400) -> list[Node]:
    """Nodes reachable from ``node`` in graph order (a bounded breadth-first walk)."""
    seen: dict[Node, None] = {}
    frontier = [node]
    while frontier and len(seen) < limit:
        nxt = []
        for n in frontier:
            for u in n.users:
                if u not in seen:
                    seen[u] = None
                    nxt.append(u)
        frontier = nxt
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _through_tensor_ops(node: Node) -> list[Node]:
    """``node`` and the nodes above it along tensor inputs (for finding a layer norm)."""
    return [node, *_ancestors(node)]


def _block_module(*paths: str) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    common = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common)


def _softmax_attention(
    softmax: Node, values: dict[Node, Any]
) -> tuple[Node, Node, Node, Node, float] | str:
    """(query, key, value, head_output, scale) of an explicit attention, or why it is not one."""
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    shape = _shape(values, softmax)
    if shape is None or len(shape) != 4 or dim not in (-1, 3):
        return "softmax is not over the last axis of a 4-D (batch, heads, q, k) tensor"
    # walk back from the logits to q @ k^T, through scaling and bias adds
    logits = softmax.args[0]
    scale = 1.0
    while isinstance(logits, Node) and logits.target not in _MATMUL:
        if logits.target in (aten.mul.Tensor, aten.div.Tensor) and not isinstance(
            logits.args[1], Node
        ):
            factor = float(logits.args[1])
            scale *= factor if logits.target is aten.mul.Tensor else 1.0 / factor
            logits = logits.args[0]
        elif logits.target in _ADD or logits.target in _PASS_THROUGH:
            logits = logits.args[0]
        else:
            return f"softmax logits come from {logits.target}, not q @ k^T"
    if not isinstance(logits, Node):
        return "softmax logits are not a matrix product"
    query, key_t = logits.args[:2]
    # timm scales q before the product: q * scale
    while (
        isinstance(query, Node)
        and query.target in (aten.mul.Tensor, aten.div.Tensor)
        and not isinstance(query.args[1], Node)
    ):
        factor = float(query.args[1])
        scale *= factor if query.target is aten.mul.Tensor else 1.0 / factor
        query = query.args[0]
    if not (isinstance(key_t, Node) and key_t.target is aten.transpose.int):
        return "the key is not transposed into the logits (q @ k.transpose(-2, -1))"
    key = key_t.args[0]
    users = [u for u in softmax.users]
    while len(users) == 1 and users[0].target in _PASS_THROUGH:
        users = list(users[0].users)
    products = [u for u in users if u.target in _MATMUL]
    if len(products) != 1:
        return "the attention probabilities do not feed exactly one product with the values"
    head_output = products[0]
    value = head_output.args[1]
    return query, key, value, head_output, scale


def _residual_add(core: Node, values: dict[Node, Any]) -> tuple[Node, Node] | None:
    """The first add after ``core`` combining its result with a stream not computed from it:
    (add, stream)."""
    for node in _descendants(core):
        if node.target not in _ADD or len(node.all_input_nodes) != 2:
            continue
        a, b = node.args[:2]
        if not (isinstance(a, Node) and isinstance(b, Node)):
            continue
        core_side = {a: core in _ancestors(a) or a is core, b: core in _ancestors(b) or b is core}
        if core_side[a] == core_side[b]:
            continue
        stream = b if core_side[a] else a
        shape = _shape(values, node)
        if shape is not None and len(shape) == 3 and _shape(values, stream) == shape:
            return node, stream
    return None


def _pre_norm_of(branch_start: Node, stream: Node) -> bool:
    """Whether a layer norm of ``stream`` is an ancestor of ``branch_start``."""
    return any(
        n.target in _LAYER_NORM and n.args[0] is stream for n in _through_tensor_ops(branch_start)
    )


def _read_block(
    index: int, core: Node, values: dict[Node, Any], see_all: frozenset[str] = frozenset()
) -> AttentionBlock | str:
    if core.target in _SDPA:
        query, key, value = core.args[:3]
        head_output = core
        scale_arg = core.kwargs.get("scale", core.args[6] if len(core.args) > 6 else None)
        mask = core.kwargs.get("attn_mask", core.args[3] if len(core.args) > 3 else None)
        if mask is not None and not (isinstance(mask, Node) and mask.name in see_all):
            return (
                "the attention takes a mask or bias that hides something (e.g. relative "
                "positions or padding)"
            )
        kind = "sdpa"
    else:
        mask = None
        found = _softmax_attention(core, values)
        if isinstance(found, str):
            return found
        query, key, value, head_output, scale_arg = found
        kind = "softmax"
    q_shape = _shape(values, query)
    k_shape = _shape(values, key)
    if q_shape is None or len(q_shape) != 4 or k_shape is None or len(k_shape) != 4:
        return "attention is not on 4-D (batch, heads, tokens, dim) tensors"
    _, heads, tokens, head_dim = q_shape
    if k_shape[2] != tokens:
        return f"queries ({tokens}) and keys ({k_shape[2]}) differ in number (cross-attention)"
    scale = float(scale_arg) if scale_arg is not None else 1.0 / math.sqrt(head_dim)
    found_add = _residual_add(head_output, values)
    if found_add is None:
        return "no residual add after the attention"
    attn_add, stream_in = found_add
    stream_shape = _shape(values, stream_in)
    if stream_shape is None or stream_shape[1] != tokens:
        return (
            f"the residual stream {stream_shape} does not hold the attention's {tokens} tokens on "
            "axis 1 (windowed or pooled attention)"
        )
    if not _pre_norm_of(query, stream_in):
        return "the attention's input is not a layer norm of the residual stream (not pre-norm)"
    mlp_add = None
    for user in attn_add.users:
        if user.target in _ADD and len(user.all_input_nodes) == 2:
            other = next(a for a in user.args[:2] if a is not attn_add)
            if isinstance(other, Node) and _pre_norm_of(other, attn_add):
                mlp_add = user
    if mlp_add is None:
        return "no pre-norm MLP residual add after the attention residual"
    module = _block_module(module_path(attn_add), module_path(mlp_add)) or module_path(attn_add)
    return AttentionBlock(
        index=index,
        module=module,
        attention_module=module_path(core),
        kind=kind,
        stream_in=stream_in.name,
        attention_residual=attn_add.name,
        stream_out=mlp_add.name,
        query=query.name,
        key=key.name,
        value=value.name,
        attention=core.name,
        head_output=head_output.name,
        see_all_mask=mask.name if core.target in _SDPA and mask is not None else None,
        scale=scale,
        heads=heads,
        head_dim=head_dim,
        tokens=tokens,
        embed_dim=stream_shape[2],
    )


def _reads_input(node: Node, values: dict[Node, Any]) -> bool:
    """Whether a graph input's values (not just its batch size) flow into ``node``."""
    seen: set[Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n.op == "placeholder":
            return True
        for a in n.all_input_nodes:
            if a not in seen and isinstance(values.get(a), torch.Tensor):
                seen.add(a)
                stack.append(a)
    return False


def _prefix_tokens(stream: Node, values: dict[Node, Any]) -> tuple[int, tuple[str, ...], str]:
    """Constant tokens concatenated in front of the patches before ``stream``: (count,
    sources, note)."""
    node: Node | None = stream
    seen = 0
    while isinstance(node, Node) and seen < 50:
        seen += 1
        if node.target is aten.cat.default:
            dim = node.args[1] if len(node.args) > 1 else 0
            parts = node.args[0]
            shape = _shape(values, node)
            if shape is None or dim not in (1, -2):
                break
            data = [p for p in parts if _reads_input(p, values)]
            if len(data) != 1:
                break
            position = parts.index(data[0])
            front = parts[:position]
            if position != len(parts) - 1:
                return 0, (), "tokens are appended after the patches: treated as patch tokens"
            count = sum(_shape(values, p)[1] for p in front)
            sources = []
            for p in front:
                consts = [a for a in [p, *_ancestors(p)] if a.op == "get_attr"]
                sources.append(str(consts[0].target) if consts else p.name)
            return count, tuple(sources), ""
        inputs = [a for a in node.all_input_nodes if _shape(values, a) == _shape(values, stream)]
        node = inputs[0] if inputs else None
    return 0, (), "no constant tokens in front of the patches: scores use the mean attention"


def analysis_batch(example_inputs: Sequence[torch.Tensor], dynamic_batch: bool) -> int | None:
    """The batch size the analyses run at: 2 when the batch is dynamic, so that a reshape
    merging the tokens with the batch (torchvision's (tokens * batch, dim)) is told apart
    from one that does not (at batch 1 both look alike)."""
    return 2 if dynamic_batch and example_inputs and example_inputs[0].shape[0] == 1 else None


def find_blocks(
    gm: GraphModule,
    example_inputs: Sequence[torch.Tensor],
    batch: int | None = None,
    *,
    values: dict[Node, Any] | None = None,
) -> ViTStructure:
    """The pre-norm transformer blocks of ``gm`` in order, with the prefix tokens.

    ``values``: :func:`concrete_values` of ``gm`` at ``batch`` if the caller has them.
    Raises UnsupportedModelError naming the first attention that is not part of a readable
    block, or saying there is no attention at all."""
    if values is None:
        values = concrete_values(gm, example_inputs, batch)
    cores = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and (n.target in _SDPA or n.target in _SOFTMAX)
    ]
    if not cores:
        raise UnsupportedModelError(
            "the model has no attention (no scaled_dot_product_attention or softmax)",
            hint="TokenGate works on Vision Transformers (timm ViT/DeiT, torchvision vit_*)",
        )
    see_all = _see_all_masks(gm, cores, example_inputs)
    blocks: list[AttentionBlock] = []
    for core in cores:
        found = _read_block(len(blocks), core, values, see_all)
        if isinstance(found, str):
            raise UnsupportedModelError(
                f"cannot read the attention block around this node: {found}",
                node=core.name,
                module=module_path(core),
                op=str(core.target),
                hint="TokenGate needs pre-norm blocks x + attn(norm(x)), x + mlp(norm(x)) over "
                "one token sequence (timm ViT/DeiT, torchvision vit_*)",
            )
        if blocks and blocks[-1].stream_out != found.stream_in:
            raise UnsupportedModelError(
                "the blocks are not one chain: block input is not the previous block's output",
                node=found.stream_in,
                module=found.module,
                hint="TokenGate gates a single sequence of blocks",
            )
        blocks.append(found)
    first = _node(gm, blocks[0].stream_in)
    prefix, sources, note = _prefix_tokens(first, values)
    notes = (note,) if note else ()
    return ViTStructure(
        blocks=tuple(blocks),
        tokens=blocks[0].tokens,
        prefix_tokens=prefix,
        prefix_sources=sources,
        uses_cls=prefix > 0,
        notes=notes,
    )


def _see_all_masks(
    gm: GraphModule, cores: list[Node], example_inputs: Sequence[torch.Tensor]
) -> frozenset[str]:
    """Names of the attention masks that hide nothing: built from sizes only (not from the
    input's values) and all True / all 0 (Hugging Face's ViT passes such a mask)."""
    masks = []
    for core in cores:
        if core.target in _SDPA:
            mask = core.kwargs.get("attn_mask", core.args[3] if len(core.args) > 3 else None)
            if isinstance(mask, Node):
                masks.append(mask)
    if not masks:
        return frozenset()
    wanted = set(masks)

    class _Masks(Interpreter):
        found: dict[str, torch.Tensor] = {}

        def run_node(self, n: Node) -> Any:
            value = super().run_node(n)
            if n in wanted:
                self.found[n.name] = value
            return value

    recorder = _Masks(gm)
    recorder.found = {}
    with torch.no_grad():
        recorder.run(*example_inputs)
    see_all = set()
    for mask in masks:
        value = recorder.found.get(mask.name)
        if value is None or _reads_input_values(mask):
            continue
        hides = ~value if value.dtype == torch.bool else value != 0
        if not bool(hides.any()):
            see_all.add(mask.name)
    return frozenset(see_all)


def _reads_input_values(node: Node) -> bool:
    """Whether an input's values (not only its sizes, via sym_size) reach ``node``."""
    seen: set[Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n.op == "placeholder":
            return True
        if n.target is aten.sym_size.int:
            continue
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return False


def _node(gm: GraphModule, name: str) -> Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)


def node_by_name(gm: GraphModule) -> dict[str, Node]:
    return {n.name: n for n in gm.graph.nodes}


# ----------------------------------------------------------------------------- token axes
@dataclass(frozen=True)
class TokenAxis:
    """Where the token sequence sits in a node's output: dim ``axis`` has size
    ``count * inner``, the tokens being its outer factor (``inner`` > 1 after a reshape merged
    the tokens with the dims behind them, e.g. torchvision's (tokens * batch, dim))."""

    axis: int
    count: int
    inner: int = 1


def _aligned(axis: int, rank_from: int, rank_to: int) -> int:
    return axis + rank_to - rank_from


def token_axes(
    gm: GraphModule, start: Node, values: dict[Node, Any], tokens: int, axis: int = 1
) -> dict[Node, list[TokenAxis]]:
    """Follow the token axis from ``start`` (its dim ``axis`` holds ``tokens`` tokens) to
    every node computed from it. Nodes whose output no longer has a token axis (the CLS
    select, a mean over tokens, attention @ values) map to an empty list.

    Raises UnsupportedModelError at the first op that moves the tokens in a way it cannot
    follow (e.g. a reshape folding them into the batch's inner factor)."""
    tags: dict[Node, list[TokenAxis]] = {start: [TokenAxis(axis, tokens)]}
    order = list(gm.graph.nodes)
    begin = order.index(start)
    for node in order[begin + 1 :]:
        if node.op != "call_function":
            continue
        tagged_inputs = [a for a in node.all_input_nodes if tags.get(a)]
        if not tagged_inputs:
            if any(a in tags for a in node.all_input_nodes):
                tags[node] = []
            continue
        tags[node] = _propagate(node, tags, values)
    return tags


def _refuse(node: Node, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"cannot follow the token axis through this op: {why}",
        node=node.name,
        module=module_path(node),
        op=str(node.target),
        hint="TokenGate must resize every op after a gate; place the gates earlier or report "
        "the model",
    )


def _propagate(node: Node, tags: dict[Node, list[TokenAxis]], values: dict[Node, Any]):
    target = node.target
    out_shape = _shape(values, node)
    args = node.args
    if target is operator.getitem:
        source = args[0]
        src_tags = tags[source]
        if source.target is aten.unbind.int:
            dim = source.args[1] if len(source.args) > 1 else 0
            rank = len(_shape(values, source.args[0]))
            dim %= rank
            parent = tags.get(source.args[0], [])
            return [TokenAxis(t.axis - (t.axis > dim), t.count, t.inner) for t in parent]
        if source.target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
            return list(src_tags)
        raise _refuse(node, "getitem of an unknown multi-output op")
    first = args[0] if args else None
    in_tags = tags.get(first, []) if isinstance(first, Node) else []
    in_shape = _shape(values, first)
    if target is aten.unbind.int:
        dim = (args[1] if len(args) > 1 else 0) % len(in_shape)
        if any(t.axis == dim for t in in_tags):
            raise _refuse(node, "unbind over the tokens")
        return list(in_tags)  # read by the getitems
    if target in _RESHAPE:
        return [_through_reshape(node, t, in_shape, out_shape) for t in in_tags]
    if target is aten.permute.default:
        perm = [d % len(in_shape) for d in args[1]]
        return [TokenAxis(perm.index(t.axis), t.count, t.inner) for t in in_tags]
    if target is aten.transpose.int:
        d0, d1 = (d % len(in_shape) for d in args[1:3])
        swap = {d0: d1, d1: d0}
        return [TokenAxis(swap.get(t.axis, t.axis), t.count, t.inner) for t in in_tags]
    if target is aten.unsqueeze.default:
        dim = args[1] % (len(in_shape) + 1)
        return [TokenAxis(t.axis + (t.axis >= dim), t.count, t.inner) for t in in_tags]
    if target in (aten.squeeze.dim, aten.squeeze.dims):
        dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        gone = {d % len(in_shape) for d in dims if in_shape[d % len(in_shape)] == 1}
        return [_shifted(t, sum(d < t.axis for d in gone)) for t in in_tags]
    if target is aten.select.int:
        dim, index = args[1] % len(in_shape), args[2]
        out = []
        for t in in_tags:
            if t.axis == dim:
                continue  # a single token picked (the CLS token): checked by the gate placement
            out.append(TokenAxis(t.axis - (t.axis > dim), t.count, t.inner))
        del index
        return out
    if target is aten.slice.Tensor:
        dim = (args[1] if len(args) > 1 else 0) % len(in_shape)
        out = []
        for t in in_tags:
            if t.axis != dim or out_shape[dim] == in_shape[dim]:
                out.append(t)
            else:
                start = args[2] if len(args) > 2 else 0
                if start in (None, 0):
                    continue  # the leading (prefix) tokens only
                out.append(TokenAxis(t.axis, out_shape[dim] // t.inner, t.inner))
        return out
    if target in (aten.linear.default,):
        if any(t.axis == len(in_shape) - 1 for t in in_tags):
            raise _refuse(node, "a linear layer over the tokens")
        return list(in_tags)
    if target in _MATMUL or target in _SDPA:
        return _through_matmul(node, tags, values)
    if target in (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.norm.ScalarOpt_dim):
        dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        dims = {d % len(in_shape) for d in dims}
        keepdim = (args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)) or False
        out = []
        for t in in_tags:
            if t.axis in dims:
                continue
            out.append(t if keepdim else _shifted(t, sum(d < t.axis for d in dims)))
        return out
    if target is aten.cat.default:
        dim = (args[1] if len(args) > 1 else 0) % len(out_shape)
        parts = args[0]
        part_tags = [tags.get(p, []) for p in parts]
        on_dim = [t for ts in part_tags for t in ts if t.axis == dim]
        if on_dim:
            if len(on_dim) != 1:
                raise _refuse(node, "two token sequences concatenated")
            t = on_dim[0]
            return [TokenAxis(dim, out_shape[dim] // t.inner, t.inner)]
        return list(part_tags[[bool(ts) for ts in part_tags].index(True)])
    if target is aten.expand.default:
        return [_aligned_tag(t, len(in_shape), len(out_shape)) for t in in_tags]
    # elementwise / broadcasting ops: the tokens stay where they are (aligned from the right)
    if out_shape is not None:
        result: dict[int, TokenAxis] = {}
        for a in node.all_input_nodes:
            a_shape = _shape(values, a)
            for t in tags.get(a, []):
                aligned = _aligned_tag(t, len(a_shape), len(out_shape))
                result[aligned.axis] = aligned
        for a in node.all_input_nodes:
            if tags.get(a) or a in tags:
                continue
            a_shape = _shape(values, a)
            if a_shape is None:
                continue
            for axis in result:
                j = axis - (len(out_shape) - len(a_shape))
                if j >= 0 and a_shape[j] != 1:
                    raise _refuse(
                        node,
                        f"combines the tokens with {a.name}, a tensor of {a_shape[j]} tokens not "
                        "computed from them (e.g. a position bias)",
                    )
        if result and all(out_shape[t.axis] == t.count * t.inner for t in result.values()):
            return list(result.values())
    raise _refuse(node, "an op TokenGate does not know reads the tokens")


def _shifted(t: TokenAxis, removed_before: int) -> TokenAxis:
    return TokenAxis(t.axis - removed_before, t.count, t.inner)


def _aligned_tag(t: TokenAxis, rank_from: int, rank_to: int) -> TokenAxis:
    return TokenAxis(_aligned(t.axis, rank_from, rank_to), t.count, t.inner)


def _through_reshape(node: Node, t: TokenAxis, in_shape, out_shape) -> TokenAxis:
    """Token axis after a reshape: the tokens are the outer factor of dim ``t.axis``; find the
    output dim starting at the same flat position whose size is a multiple of the tokens."""
    before = math.prod(in_shape[: t.axis])
    for j in range(len(out_shape)):
        if math.prod(out_shape[:j]) == before and out_shape[j] % t.count == 0:
            return TokenAxis(j, t.count, out_shape[j] // t.count)
    raise _refuse(node, f"a reshape {list(in_shape)} -> {list(out_shape)} splits the tokens")


def _through_matmul(node: Node, tags: dict[Node, list[TokenAxis]], values: dict[Node, Any]):
    out_shape = _shape(values, node)
    rank = len(out_shape)
    out: dict[int, TokenAxis] = {}
    if node.target in _SDPA:
        q = node.args[0]
        q_shape = _shape(values, q)
        for t in tags.get(q, []):
            out[_aligned(t.axis, len(q_shape), rank)] = _aligned_tag(t, len(q_shape), rank)
        return list(out.values())
    lhs, rhs = node.args[:2]
    ls, rs = _shape(values, lhs), _shape(values, rhs)
    for t in tags.get(lhs, []):
        if t.axis == len(ls) - 1:
            continue  # contracted
        out[_aligned(t.axis, len(ls), rank)] = _aligned_tag(t, len(ls), rank)
    for t in tags.get(rhs, []):
        if t.axis == len(rs) - 2:
            continue  # contracted
        out[_aligned(t.axis, len(rs), rank)] = _aligned_tag(t, len(rs), rank)
    return list(out.values())
