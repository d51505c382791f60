"""QDQToShift test helpers (shared by the pass, real-data and aarch64 tests): a small CNN with
every integer construct, quantize + rewrite, the Program returning integer codes, the integer
part of a graph with float islands cut out, and running any of them on onnxruntime / TVM."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import edgefx
import edgefx.ops
from edgefx.frontend import capture
from edgefx.passes import FoldBatchNorm, PassManager, PotQuantize, QDQToShift

TO_CODES = torch.ops.edgefx.float_to_codes.default
TO_FLOAT = torch.ops.edgefx.codes_to_float.default


class Tiny(nn.Module):
    """conv -> ReLU -> max pool, a residual add, a concat, ReLU6, a global average, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1, groups=4), nn.ReLU6())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = torch.relu(x + self.a(x))
        x = torch.cat([x, self.b(x)], dim=1)
        x = self.c(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def quantized(model: nn.Module, size: int, bits: tuple[int, int], seed: int = 0,
              **shift_options):  # fmt: skip
    """(QDQ Program, QDQToShift Program, the pass's report): FoldBatchNorm + PotQuantize
    (minmax, calibrated on random data) at ``bits`` = (weight, activation) bits."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(2, 3, size, size, generator=gen)
    calib = [torch.randn(8, 3, size, size, generator=gen)]
    program = capture(model, (example,))
    passes = [FoldBatchNorm(), PotQuantize(calib, weight_bits=bits[0], act_bits=bits[1],
                                           search="minmax")]  # fmt: skip
    qdq, _ = PassManager(passes, progress=False).run(program)
    shift, results = PassManager([QDQToShift(**shift_options)], progress=False).run(qdq)
    return qdq, shift, results[0].report


def fresh(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(42))


def integer_outputs(program: edgefx.Program) -> edgefx.Program:
    """The Program returning the int32 codes its float outputs are dequantized from."""
    gm = program.copy_graph()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(a.args[0] if a.target is TO_FLOAT else a for a in out.args[0]),)
    gm.recompile()
    return program.with_graph(gm).refreshed()


def integer_regions(program: edgefx.Program, x: torch.Tensor) -> tuple[edgefx.Program, list]:
    """The integer part of ``program`` alone, and its inputs for the model input ``x``.

    Every ``float_to_codes`` (where a float value becomes codes: the model input, the end of
    a float island) becomes an input of the new Program, fed with the codes the reference
    computes for ``x``; every value a ``codes_to_float`` reads (the start of a float island,
    the model output) becomes an output. The float islands drop out, so what is left is
    integer arithmetic only, which every backend must compute exactly."""
    gm = program.copy_graph()
    graph = gm.graph
    entries = [n for n in graph.nodes if n.target is TO_CODES]
    names = [n.name for n in entries]

    recorded: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names:
                recorded[n.name] = out
            return out

    with torch.no_grad():
        Recorder(program.graph_module).run(x)
    first = next(n for n in graph.nodes if n.op != "placeholder")
    source: dict[str, str] = {}  # placeholder -> the float_to_codes it stands for
    for entry in entries:
        with graph.inserting_before(first):
            placeholder = graph.placeholder(f"{entry.name}_codes")
        source[placeholder.name] = entry.name
        placeholder.meta["val"] = entry.meta["val"]
        entry.replace_all_uses_with(placeholder)
        if entry.args[0].op == "placeholder":
            # the model input's shape (a dynamic batch size read off it) is the codes' shape
            entry.args[0].replace_all_uses_with(placeholder)
        graph.erase_node(entry)
    # codes dequantized straight from an input (quantize -> dequantize, no integer op
    # between) are no integer arithmetic: not outputs
    exits = list(dict.fromkeys(
        n.args[0] for n in graph.nodes if n.target is TO_FLOAT and n.args[0].op != "placeholder"
    ))  # fmt: skip
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = (tuple(exits),)
    graph.eliminate_dead_code()
    for node in list(graph.find_nodes(op="placeholder")):
        if not node.users:
            graph.erase_node(node)
    graph.set_codegen(torch.fx.graph.CodeGen())  # plain positional inputs, a tuple out
    gm.recompile()
    inputs = [recorded[source[n.name]] for n in graph.find_nodes(op="placeholder")]
    cut = edgefx.Program(gm, inputs, out_spec=pytree.tree_structure(tuple(exits)),
                         dynamic_batch=False, name=f"{program.name}_integer")  # fmt: skip
    return cut.refreshed(), inputs


def onnx_outputs(program: edgefx.Program, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    compiled = edgefx.compile(program, backend="onnx", backend_options={"opset": 28},
                              progress=False)  # fmt: skip
    return compiled.artifact.run(inputs)


def tvm_outputs(program: edgefx.Program, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    """Through TVM Relax on this machine (x86 llvm, no schedules)."""
    tvm = pytest.importorskip("tvm")
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    mod = from_exported_program(program.export(), keep_params_as_input=False,
                                custom_convert_map=edgefx.ops.tvm_converters())  # fmt: skip
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(t.numpy()) for t in inputs))
    return [t.numpy() for t in out] if hasattr(out, "__len__") else [out.numpy()]


def assert_equal_integers(want: list[torch.Tensor], got: list, where: str) -> None:
    """Every element, and the dtype."""
    assert len(want) == len(got), where
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        g = np.asarray(g)
        assert not w.dtype.is_floating_point, f"{where}: output {i} is {w.dtype}"
        assert g.dtype == w.numpy().dtype, f"{where}: output {i} is {g.dtype}, not {w.dtype}"
        np.testing.assert_array_equal(g, w.numpy(), err_msg=f"{where}: output {i}")


_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def real_data_benchmark():
    """benchmarks/real_data.py as a module (its models, data and QDQToShift rows), loaded by
    path as tests/test_zoo.py loads benchmarks/zoo.py; it imports its neighbour common.py."""
    name = "edgefx_benchmarks_real_data"
    if name not in sys.modules:
        if str(_BENCHMARKS) not in sys.path:
            sys.path.append(str(_BENCHMARKS))
        spec = importlib.util.spec_from_file_location(name, _BENCHMARKS / "real_data.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
