"""MACs, parameters and activation bytes of every node of a captured graph.

Read-only: ``graph_cost`` never touches the GraphModule, its graph or any ``node.meta``.
Concrete shapes come from running the graph on fake copies of the example inputs (shapes
only, no arithmetic), so even a ViT-B/16 takes well under a second.

MAC rules (multiply-accumulates; a FLOP counter would report twice these numbers):

- convolution (any dims, groups, depthwise): ``out_numel * C_in/groups * prod(kernel)``;
  transposed: ``in_numel * C_out/groups * prod(kernel)``
- linear: ``out_numel * in_features``
- mm / addmm / bmm / baddbmm / matmul (broadcasting) / mv / addmv / dot: ``out_numel * K``
- scaled_dot_product_attention: ``B*H * (L*S*E + L*S*Ev)``, with B*H the broadcast batch of
  the output (so grouped-query attention counts the query heads)
- einsum: the MACs of the mm/bmm calls torch evaluates it with (counted by
  ``torch.utils.flop_counter`` on the fake operands)
- edgefx's integer ``conv_int`` / ``linear_int`` / ``matmul_int`` (QDQToShift): as the float
  convolution / linear / matmul they replace (integer multiply-accumulates are MACs too)
- every other op, including ops edgefx does not know: 0. Bias adds, normalisation,
  activations and pooling are not MACs.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.utils import _pytree as pytree

import edgefx.ops  # noqa: F401  (registers edgefx's quantized and integer ops, read below)
from edgefx.analysis.graph import module_path
from edgefx.errors import EdgefxError

aten = torch.ops.aten


@dataclass(frozen=True)
class NodeCost:
    """Cost of one ``call_function`` node for the example inputs."""

    node: str
    op: str
    module: str
    output_shape: tuple[int, ...] | None
    macs: int
    params: int
    output_bytes: int


@dataclass(frozen=True)
class CostReport:
    """Per-node costs in graph order, and totals.

    ``total_params`` counts every parameter read by the graph once, however many nodes
    share it; quantized weights (integer codes read by ``edgefx::dequantize_pot``, or by
    ``edgefx::conv_int`` / ``linear_int`` in an integer graph) count as parameters.
    ``total_activation_bytes`` sums ``output_bytes`` of every node except ``operator.getitem``,
    whose value is a piece of its producer's output (already counted);
    views count as if materialised.
    """

    nodes: tuple[NodeCost, ...]
    total_macs: int
    total_params: int
    total_activation_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (shapes as lists)."""
        nodes = []
        for cost in self.nodes:
            row = asdict(cost)
            row["output_shape"] = None if cost.output_shape is None else list(cost.output_shape)
            nodes.append(row)
        return {
            "total_macs": self.total_macs,
            "total_params": self.total_params,
            "total_activation_bytes": self.total_activation_bytes,
            "nodes": nodes,
        }


# ---------------------------------------------------------------------------------------
# MAC rules. A rule gets the node's concrete args, kwargs and output and returns its MACs.

MacRule = Callable[[tuple[Any, ...], dict[str, Any], Any], int]


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs[name]


def _first_tensor(value: Any) -> torch.Tensor | None:
    return next((t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)), None)


def _conv_macs(transposed_index: int | None, transposed: bool = False) -> MacRule:
    """Convolution. The weight is (C_out, C_in/groups, *k), or (C_in, C_out/groups, *k) when
    transposed, so groups need no special case. ``transposed_index``: where aten.convolution
    keeps its ``transposed`` flag (None: fixed by the op)."""

    def rule(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
        x, weight = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
        is_transposed = transposed
        if transposed_index is not None:
            is_transposed = bool(_arg(args, kwargs, transposed_index, "transposed"))
        per_element = weight.shape[1] * math.prod(weight.shape[2:])
        return (x.numel() if is_transposed else _first_tensor(out).numel()) * per_element

    return rule


def _linear_macs(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    return out.numel() * _arg(args, kwargs, 0, "input").shape[-1]


def _matmul_macs(lhs_index: int) -> MacRule:
    """Any matrix product: every output element is a K-long dot product, K = lhs.shape[-1]
    (broadcast batch dims are already in the output)."""

    def rule(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
        return out.numel() * args[lhs_index].shape[-1]

    return rule


def _sdpa_macs(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # Also fits the backend-specific variants: their first three args are q, k, v and their
    # first output is the attention output (..., L, Ev).
    query, key, value = args[:3]
    attn = _first_tensor(out)
    batch_heads = math.prod(attn.shape[:-2])  # broadcast batch and query heads (GQA)
    q_len, kv_len = query.shape[-2], key.shape[-2]
    return batch_heads * q_len * kv_len * (query.shape[-1] + value.shape[-1])


def _einsum_macs(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # How torch contracts an einsum depends on the equation and contraction path; count the
    # mm/bmm it really issues rather than re-deriving that here.
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        aten.einsum.default(*args, **kwargs)
    return counter.get_total_flops() // 2


_MAC_RULES: dict[Any, MacRule] = {
    aten.conv1d: _conv_macs(None),
    aten.conv2d: _conv_macs(None),
    aten.conv3d: _conv_macs(None),
    aten.conv_transpose1d: _conv_macs(None, transposed=True),
    aten.conv_transpose2d: _conv_macs(None, transposed=True),
    aten.conv_transpose3d: _conv_macs(None, transposed=True),
    aten.convolution: _conv_macs(6),
    aten._convolution: _conv_macs(6),
    aten.linear: _linear_macs,
    aten.mm: _matmul_macs(0),
    aten.bmm: _matmul_macs(0),
    aten.matmul: _matmul_macs(0),
    aten.mv: _matmul_macs(0),
    aten.dot: _matmul_macs(0),
    aten.addmm: _matmul_macs(1),
    aten.baddbmm: _matmul_macs(1),
    aten.addmv: _matmul_macs(1),
    aten.einsum: _einsum_macs,
    aten.scaled_dot_product_attention: _sdpa_macs,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_macs,
    aten._scaled_dot_product_flash_attention: _sdpa_macs,
    aten._scaled_dot_product_efficient_attention: _sdpa_macs,
    aten._scaled_dot_product_cudnn_attention: _sdpa_macs,
    torch.ops.edgefx.conv_int: _conv_macs(None),
    torch.ops.edgefx.linear_int: _linear_macs,
    torch.ops.edgefx.matmul_int: _matmul_macs(0),
}
"""Keyed by OpOverloadPacket, so every overload (e.g. ``conv2d.padding``) shares a rule."""

# ops reading integer-code buffers that are a model's weights: op -> argument positions
_CODE_READERS: dict[Any, tuple[int, ...]] = {
    torch.ops.edgefx.dequantize_pot.default: (0,),
    torch.ops.edgefx.conv_int.default: (1, 2),
    torch.ops.edgefx.linear_int.default: (1, 2),
}


# ---------------------------------------------------------------------------------------


class _ValueRecorder(Interpreter):
    """Runs the graph and keeps every node's value, outside ``node.meta``."""

    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # our error names the node; no generated-code dump
        self.values: dict[Node, Any] = {}

    def run_node(self, n: Node) -> Any:
        try:
            value = super().run_node(n)
        except Exception as exc:
            raise EdgefxError(
                "cost analysis could not compute this node's output shape",
                node=n.name,
                module=module_path(n),
                op=_op_name(n),
                hint=f"{type(exc).__name__}: {exc}".splitlines()[0],
            ) from exc
        self.values[n] = value
        return value


def _op_name(node: Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        packet = target.overloadpacket
        name = packet.__name__
        return name if target.namespace == "aten" else f"{target.namespace}.{name}"
    return getattr(target, "__name__", str(target))


def _tensor_bytes(value: Any) -> int:
    return sum(
        t.numel() * t.element_size()
        for t in pytree.tree_leaves(value)
        if isinstance(t, torch.Tensor)
    )


def graph_cost(gm: GraphModule, example_inputs: Sequence[torch.Tensor]) -> CostReport:
    """MACs, parameters and output bytes of every ``call_function`` node of ``gm`` for
    ``example_inputs`` (flat, one per placeholder), in graph order, plus totals. Shapes are
    propagated with fake tensors; a graph whose shapes depend on the values (a token count
    read off the data) is run on the example inputs, and its costs are theirs."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [
        fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs
    ]
    recorder = _ValueRecorder(gm)
    parameters: dict[str, torch.Tensor] = dict(gm.named_parameters(remove_duplicate=False))
    # quantized weights are integer-code buffers that edgefx::dequantize_pot reads, or, in
    # an integer graph (QDQToShift), the weight and bias codes conv_int / linear_int read
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    for target, positions in _CODE_READERS.items():
        for node in gm.graph.find_nodes(op="call_function", target=target):
            for codes in (node.args[i] for i in positions if i < len(node.args)):
                if isinstance(codes, Node) and codes.op == "get_attr" and str(
                    codes.target
                ) in buffers:
                    parameters[str(codes.target)] = buffers[str(codes.target)]

    def parameter_of(node: Node) -> torch.Tensor | None:
        return parameters.get(str(node.target)) if node.op == "get_attr" else None

    costs: list[NodeCost] = []
    graph_params: dict[int, int] = {}  # id -> numel: every parameter the graph reads, once
    activation_bytes = 0
    with torch.no_grad():  # shapes only: no autograd graph either
        try:
            with fake_mode:
                recorder.run(*fake_inputs)
        except EdgefxError as exc:
            if not isinstance(exc.__cause__, DataDependentOutputException):
                raise
            # shapes that depend on the data (TokenGate's per-batch token count): run the
            # example inputs for real; the costs are those of this batch
            recorder = _ValueRecorder(gm)
            recorder.run(*example_inputs)
        for node in gm.graph.nodes:
            param = parameter_of(node)
            if param is not None and node.users:
                graph_params[id(param)] = param.numel()
            if node.op != "call_function":
                continue
            out = recorder.values[node]
            read = {
                id(p): p.numel() for p in map(parameter_of, node.all_input_nodes) if p is not None
            }
            cost = NodeCost(
                node=node.name,
                op=_op_name(node),
                module=module_path(node),
                output_shape=_shape(out),
                macs=_macs(node, recorder.values),
                params=sum(read.values()),
                output_bytes=_tensor_bytes(out),
            )
            costs.append(cost)
            if node.target is not operator.getitem:
                activation_bytes += cost.output_bytes

    return CostReport(
        nodes=tuple(costs),
        total_macs=sum(cost.macs for cost in costs),
        total_params=sum(graph_params.values()),
        total_activation_bytes=activation_bytes,
    )


def _macs(node: Node, values: dict[Node, Any]) -> int:
    rule = _MAC_RULES.get(getattr(node.target, "overloadpacket", None))
    if rule is None:
        return 0
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
    return int(rule(args, kwargs, values[node]))


def _shape(value: Any) -> tuple[int, ...] | None:
    first = _first_tensor(value)
    return None if first is None else tuple(int(d) for d in first.shape)


def human(number: float) -> str:
    """Three significant digits and a unit: 1_814_073_344 -> '1.81 G', 11_689_512 -> '11.7 M'."""
    for unit, divisor in (("", 1), ("K", 1e3), ("M", 1e6), ("G", 1e9)):
        text = f"{number / divisor:.3g}"
        if abs(float(text)) < 1000:  # after rounding: 999_999 is '1 M', not '1e+03 K'
            return f"{text} {unit}".rstrip()
    return f"{number / 1e12:.3g} T"
