"""Program -> Relax IRModule with TVM's ExportedProgram importer, after a preflight that names
every op the importer cannot convert (all at once, instead of TVM's first assertion)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from edgefx.errors import BackendError, first_line
from edgefx.ops import tvm_converters
from edgefx.program import Program, quiet_torch_logs


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def importer_ops() -> set[str]:
    """The op names (``OpOverload.__name__``) TVM's importer converts, plus edgefx's own."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return {k for k in ExportedProgramImporter().convert_map if isinstance(k, str)} | set(
        tvm_converters()
    )


def unconvertible(ep: torch.export.ExportedProgram) -> dict[str, list[torch.fx.Node]]:
    """op name -> the nodes calling it, for every call TVM's importer has no converter for."""
    known = importer_ops()
    missing: dict[str, list[torch.fx.Node]] = defaultdict(list)
    for node in ep.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            if name not in known:
                missing[name].append(node)
    return dict(missing)


def preflight(ep: torch.export.ExportedProgram, program_name: str) -> None:
    """BackendError listing every unconvertible op with the nodes and modules using it."""
    missing = unconvertible(ep)
    if not missing:
        return
    lines = []
    for name, nodes in sorted(missing.items()):
        where = ", ".join(
            f"{n.name}" + (f" ({_module_path(n)})" if _module_path(n) else "") for n in nodes[:4]
        )
        more = f" and {len(nodes) - 4} more" if len(nodes) > 4 else ""
        lines.append(f"    {name}: {where}{more}")
    first = next(iter(sorted(missing.items())))[1][0]
    raise BackendError(
        f"TVM's importer cannot convert {len(missing)} op(s) of {program_name}:\n"
        + "\n".join(lines),
        node=first.name,
        module=_module_path(first) or None,
        op=", ".join(sorted(missing)),
        hint="an edgefx op needs TVM_CONVERTERS in its edgefx/ops file; for an aten op, "
        "rewrite it with a pass or use backend='onnx'",
    )


def to_relax(program: Program) -> Any:
    """The Program as a Relax IRModule (weights bound as constants; batch symbolic if dynamic)."""
    from tvm.relax.frontend.torch import from_exported_program

    try:
        with quiet_torch_logs():
            # the importer's own decomposition, done here so that the preflight sees its ops
            ep = program.export().run_decompositions()
    except Exception as exc:
        raise BackendError(
            f"torch.export could not re-trace {program.name} for TVM: {first_line(exc)}"
        ) from exc
    preflight(ep, program.name)
    try:
        return from_exported_program(
            ep,
            keep_params_as_input=False,
            custom_convert_map=tvm_converters(),
            run_ep_decomposition=False,
        )
    except Exception as exc:
        raise BackendError(
            f"TVM's importer failed on {program.name}: {first_line(exc)}",
            hint="the preflight found a converter for every op, so one of them refused its "
            "arguments; run with --debug for TVM's trace",
        ) from exc
