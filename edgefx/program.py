"""Program: the one IR every pass and backend works on.

A Program wraps a ``torch.fx.GraphModule`` captured by ``torch.export`` (functional aten ops,
parameters and buffers as ``get_attr`` nodes, ``nn_module_stack`` metadata naming the source
module of each node) together with the example inputs, the input/output specs and the list of
passes applied so far. Programs are treated as values: passes build new ones.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from edgefx.errors import ArtifactError, CaptureError, InputError, first_line

if TYPE_CHECKING:
    from edgefx.analysis.cost import CostReport
    from edgefx.training import TrainableProgram

BATCH = "batch"
"""The name edgefx gives the dynamic batch dimension in specs, ONNX models and manifests."""

_FORMAT_VERSION = 1
_META_FILE = "edgefx.json"


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one graph input or output; dynamic dims are strings."""

    name: str
    shape: tuple[int | str, ...]
    dtype: torch.dtype

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.name}: {str(self.dtype).removeprefix('torch.')}[{dims}]"

    def mismatch(self, tensor: object) -> str | None:
        """Why ``tensor`` cannot be fed to this input, or None if it can."""
        if not isinstance(tensor, torch.Tensor):
            return f"expected a torch.Tensor, got {type(tensor).__name__}"
        if tensor.dtype != self.dtype:
            return f"expected dtype {self.dtype}, got {tensor.dtype}"
        if tensor.dim() != len(self.shape):
            want = list(self.shape)
            return f"expected rank {len(want)} {want}, got shape {list(tensor.shape)}"
        for axis, (want, got) in enumerate(zip(self.shape, tensor.shape, strict=True)):
            if isinstance(want, int) and want != got:
                return f"expected size {want} at dim {axis}, got shape {list(tensor.shape)}"
            if isinstance(want, str) and got < 1:
                return f"dim {axis} ({want}) must be at least 1, got shape {list(tensor.shape)}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": str(self.dtype)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        dtype = getattr(torch, data["dtype"].removeprefix("torch."))
        return cls(data["name"], tuple(data["shape"]), dtype)


@contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """Silence torch's export/dynamo warnings that print whole graphs on stderr."""
    names = (
        "torch.fx.experimental.symbolic_shapes",
        "torch._dynamo",
        "torch.export",
        "torch._export",
        "torch._subclasses.fake_tensor",
        "torch.onnx",
        "onnxscript",
    )
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)  # their errors resurface as our exceptions
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def trace_inputs(example_inputs: Sequence[torch.Tensor], dynamic_batch: bool) -> tuple:
    """Inputs to trace with: torch.export specialises a batch of 1, so trace with 2."""
    if dynamic_batch and example_inputs and example_inputs[0].shape[0] == 1:
        return tuple(torch.cat([x, x]) for x in example_inputs)
    return tuple(example_inputs)


def dynamic_shapes_for(example_inputs: Sequence[torch.Tensor], dynamic_batch: bool):
    if not dynamic_batch:
        return None
    batch = torch.export.Dim(BATCH, min=1)
    return tuple({0: batch} for _ in example_inputs)


def _batch_symbol(gm: torch.fx.GraphModule) -> object | None:
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], torch.SymInt):
            return val.shape[0].node.expr
    return None


def _spec_dims(val: torch.Tensor, batch_symbol: object | None) -> tuple[int | str, ...]:
    dims: list[int | str] = []
    for d in val.shape:
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            text = str(expr.subs(batch_symbol, BATCH)) if batch_symbol is not None else str(expr)
            dims.append(text)
        else:
            dims.append(int(d))
    return tuple(dims)


def specs_from_graph(
    gm: torch.fx.GraphModule,
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Input and output specs read off the placeholders' and outputs' symbolic ``meta['val']``."""
    batch_symbol = _batch_symbol(gm)
    inputs = tuple(
        TensorSpec(n.name, _spec_dims(n.meta["val"], batch_symbol), n.meta["val"].dtype)
        for n in gm.graph.find_nodes(op="placeholder")
    )
    (output_node,) = gm.graph.find_nodes(op="output")
    leaves = pytree.tree_leaves(output_node.args[0])
    outputs = []
    for i, leaf in enumerate(leaves):
        val = leaf.meta.get("val") if isinstance(leaf, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor):
            raise CaptureError(
                f"output {i} of the graph is not a tensor ({type(val).__name__})",
                node=getattr(leaf, "name", None),
                hint="edgefx compiles models whose outputs are tensors (possibly in tuples/dicts)",
            )
        outputs.append(TensorSpec(f"output_{i}", _spec_dims(val, batch_symbol), val.dtype))
    return inputs, tuple(outputs)


def _tidy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """What every graph taken out of an ExportedProgram goes through (in place): views become
    reshapes, and dead nodes (e.g. the unused statistics outputs of a BatchNorm that a
    re-export lists) are dropped."""
    _views_as_reshapes(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _views_as_reshapes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Turn every ``aten.view`` into ``aten.reshape`` (in place; returns ``gm``).

    A captured ``view`` is only valid for the strides eager PyTorch produced at capture time.
    Kernels do not promise strides: e.g. eager CPU ``scaled_dot_product_attention`` with a mask
    returns a layout whose ``transpose(1, 2)`` is contiguous while its meta kernel does not, so
    re-exporting BEiT's ``x.transpose(1, 2).reshape(B, N, C)`` (captured as ``view``) fails.
    ``reshape`` is a view whenever the strides allow one and a copy otherwise, so the graph
    computes the same values on any layout; lowering to ONNX/TVM ignores strides anyway.
    """
    view = torch.ops.aten.view.default
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is view:
            node.target = torch.ops.aten.reshape.default
            changed = True
    if changed:
        gm.recompile()
    return gm


class Program:
    """A captured model: graph + example inputs + specs + the history of passes applied."""

    def __init__(
        self,
        graph_module: torch.fx.GraphModule,
        example_inputs: Sequence[torch.Tensor],
        *,
        out_spec: pytree.TreeSpec,
        dynamic_batch: bool,
        history: Sequence[str] = (),
        name: str = "model",
        specs: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] | None = None,
    ) -> None:
        self.graph_module = graph_module
        self.example_inputs = tuple(example_inputs)
        self.out_spec = out_spec
        self.dynamic_batch = dynamic_batch
        self.history = tuple(history)
        self.name = name
        self.input_specs, self.output_specs = specs or specs_from_graph(graph_module)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_exported(
        cls,
        ep: torch.export.ExportedProgram,
        example_inputs: Sequence[torch.Tensor],
        *,
        dynamic_batch: bool,
        history: Sequence[str] = (),
        name: str = "model",
    ) -> Program:
        """Build a Program from an ExportedProgram (functionalised, params unlifted)."""
        with quiet_torch_logs():
            ep = ep.run_decompositions({})
            gm = _tidy(ep.module(check_guards=False))
        return cls(
            gm,
            example_inputs,
            out_spec=ep.call_spec.out_spec,
            dynamic_batch=dynamic_batch,
            history=history,
            name=name,
        )

    def with_graph(self, graph_module: torch.fx.GraphModule, applied: str | None = None) -> Program:
        """A new Program holding ``graph_module``, with ``applied`` (a pass) appended to the
        history if given. The specs are carried over; :meth:`refreshed` recomputes them."""
        return Program(
            graph_module,
            self.example_inputs,
            out_spec=self.out_spec,
            dynamic_batch=self.dynamic_batch,
            history=self.history if applied is None else (*self.history, applied),
            name=self.name,
            specs=(self.input_specs, self.output_specs),
        )

    def copy_graph(self) -> torch.fx.GraphModule:
        """A deep copy of the graph module, for a pass to rewrite."""
        return copy.deepcopy(self.graph_module)

    # ----------------------------------------------------------------- running
    def module(self) -> torch.nn.Module:
        """The runnable graph module (takes the model's inputs, returns its outputs)."""
        return self.graph_module

    def __call__(self, *inputs: torch.Tensor) -> Any:
        self.check_inputs(inputs)
        with torch.no_grad():
            return self.graph_module(*inputs)

    def run_flat(self, inputs: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run on ``inputs`` (default: the example inputs); outputs flattened to a list."""
        out = self(*(self.example_inputs if inputs is None else inputs))
        return pytree.tree_leaves(out)

    def unflatten_outputs(self, flat: Sequence[torch.Tensor]) -> Any:
        return pytree.tree_unflatten(list(flat), self.out_spec)

    def check_inputs(self, inputs: Sequence[object]) -> None:
        """Raise InputError unless ``inputs`` match the input specs."""
        check_inputs(self.input_specs, inputs)

    # ----------------------------------------------------------------- training
    def trainable(self, *, weight_bits: int | None = None) -> TrainableProgram:
        """The graph as an ``nn.Module`` that trains: BatchNorm on batch statistics (updating
        its running statistics) under ``.train()``, straight-through rounding for quantized
        tensors, every float parameter a leaf with gradients. A deep copy; see
        :mod:`edgefx.training`."""
        from edgefx.training import trainable

        return trainable(self, weight_bits=weight_bits)

    def with_weights(self, module: torch.nn.Module, applied: str | None = None) -> Program:
        """A new Program: this graph with the values trained in ``module`` (made by
        :meth:`trainable`); ``applied`` is appended to the history if given."""
        from edgefx.training import with_weights

        return with_weights(self, module, applied)

    # ----------------------------------------------------------------- analysis
    def cost(self) -> CostReport:
        """MACs, params and activation bytes per node for the example inputs."""
        from edgefx.analysis.cost import graph_cost

        return graph_cost(self.graph_module, self.example_inputs)

    def readable(self) -> str:
        """The graph as Python code, with shapes and source lines."""
        return self.graph_module.print_readable(print_output=False, include_stride=False)

    # ----------------------------------------------------------------- export / refresh
    def export(self) -> torch.export.ExportedProgram:
        """Re-export the graph with torch.export (dynamic batch kept)."""
        args = trace_inputs(self.example_inputs, self.dynamic_batch)
        with quiet_torch_logs():
            return torch.export.export(
                self.graph_module,
                args,
                dynamic_shapes=dynamic_shapes_for(args, self.dynamic_batch),
                strict=False,
            )

    def refreshed(self) -> Program:
        """Re-export the graph: checks it is still exportable and recomputes every node's
        symbolic shape (``meta['val']``); ``nn_module_stack`` metadata survives."""
        ep = self.export()
        with quiet_torch_logs():
            gm = _tidy(ep.module(check_guards=False))
        return Program(
            gm,
            self.example_inputs,
            out_spec=self.out_spec,
            dynamic_batch=self.dynamic_batch,
            history=self.history,
            name=self.name,
        )

    # ----------------------------------------------------------------- save / load
    def metadata(self) -> dict[str, Any]:
        return {
            "format": _FORMAT_VERSION,
            "name": self.name,
            "dynamic_batch": self.dynamic_batch,
            "example_batch": int(self.example_inputs[0].shape[0]) if self.example_inputs else 0,
            "history": list(self.history),
            "inputs": [s.to_dict() for s in self.input_specs],
            "outputs": [s.to_dict() for s in self.output_specs],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the Program to one ``.pt2`` file (torch.export format + edgefx metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ep = self.export()
        torch.export.save(ep, path, extra_files={_META_FILE: json.dumps(self.metadata())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Program:
        """Load a Program saved by :meth:`save`, or any ``torch.export.save`` file."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(
                f"no such program file: {path}",
                hint="pass the .pt2 file written by Program.save or torch.export.save",
            )
        extra = {_META_FILE: ""}
        try:
            with quiet_torch_logs():
                ep = torch.export.load(path, extra_files=extra)
        except Exception as exc:  # torch raises many kinds here; report one line
            raise ArtifactError(
                f"cannot load {path}: {first_line(exc)}",
                hint="the file must be written by torch.export.save",
            ) from exc
        meta = json.loads(extra[_META_FILE]) if extra[_META_FILE] else {}
        if meta and meta.get("format") != _FORMAT_VERSION:
            raise ArtifactError(
                f"{path} has edgefx format {meta.get('format')}, "
                f"this edgefx reads format {_FORMAT_VERSION}"
            )
        args, _ = ep.example_inputs or ((), {})
        if not args:
            raise ArtifactError(
                f"{path} holds no example inputs",
                hint="save it with torch.export.save from torch >= 2.6",
            )
        batch = meta.get("example_batch", args[0].shape[0])
        example = tuple(a[:batch] for a in args)
        dynamic = meta.get("dynamic_batch", _batch_symbol(ep.graph_module) is not None)
        return cls.from_exported(
            ep,
            example,
            dynamic_batch=dynamic,
            history=meta.get("history", ()),
            name=meta.get("name", path.stem),
        )

    def __repr__(self) -> str:
        ins = ", ".join(s.describe() for s in self.input_specs)
        outs = ", ".join(s.describe() for s in self.output_specs)
        n_nodes = sum(1 for n in self.graph_module.graph.nodes if n.op == "call_function")
        history = list(self.history)
        return f"Program({self.name}: ({ins}) -> ({outs}), {n_nodes} ops, history={history})"


def check_inputs(specs: Sequence[TensorSpec], inputs: Sequence[object]) -> None:
    """Raise InputError unless ``inputs`` match ``specs`` (count, type, rank, dims, dtype)."""
    expected = ", ".join(s.describe() for s in specs)
    if len(inputs) != len(specs):
        raise InputError(
            f"expected {len(specs)} input(s), got {len(inputs)}", hint=f"call with ({expected})"
        )
    batches = set()
    for spec, tensor in zip(specs, inputs, strict=True):
        reason = spec.mismatch(tensor)
        if reason:
            raise InputError(f"input '{spec.name}': {reason}", hint=f"the model takes ({expected})")
        if spec.shape and spec.shape[0] == BATCH:
            batches.add(tensor.shape[0])
    if len(batches) > 1:
        raise InputError(
            f"inputs disagree on the batch size: {sorted(batches)}",
            hint="every input shares one dynamic batch dimension",
        )
