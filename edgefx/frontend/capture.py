"""Capture an ``nn.Module`` into a Program with torch.export (non-strict, eval mode, on a copy)."""

from __future__ import annotations

import copy
import os

import torch
from torch.utils import _pytree as pytree

from edgefx.analysis.numerics import NumericError
from edgefx.errors import CaptureError, InputError
from edgefx.frontend.canonical import flatten_attention
from edgefx.program import Program, dynamic_shapes_for, quiet_torch_logs, trace_inputs

_TORCH_DIR = os.path.dirname(torch.__file__)
_EDGEFX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REASON_LINES = 4


def normalize_inputs(example_inputs: object, *, dynamic_batch: bool) -> tuple[torch.Tensor, ...]:
    """Check example inputs: one tensor or a tuple/list of tensors sharing a leading batch dim."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise InputError(
            f"example_inputs must be a tensor or a non-empty tuple of tensors, "
            f"got {type(example_inputs).__name__}",
            hint="e.g. example_inputs=(torch.randn(1, 3, 224, 224),)",
        )
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise InputError(
                f"example input {i} is a {type(x).__name__}, not a torch.Tensor",
                hint="pass tensors only; bake other arguments into the model",
            )
        if x.is_sparse or x.device.type != "cpu":
            raise InputError(
                f"example input {i} is a {x.device.type} {'sparse ' if x.is_sparse else ''}tensor",
                hint="pass dense CPU tensors; edgefx captures on the CPU",
            )
        if dynamic_batch and x.dim() == 0:
            raise InputError(
                f"example input {i} is a scalar, it has no batch dimension",
                hint="give it a leading batch dim, or pass dynamic_batch=False",
            )
    if dynamic_batch and len({x.shape[0] for x in example_inputs}) > 1:
        raise InputError(
            f"example inputs disagree on the batch size: "
            f"{[tuple(x.shape) for x in example_inputs]}",
            hint="dim 0 of every input is the shared batch; or pass dynamic_batch=False",
        )
    return tuple(x.detach() for x in example_inputs)


def _user_frame(exc: BaseException, model: torch.nn.Module) -> tuple[str | None, str | None]:
    """The deepest frame outside torch/edgefx: (``file:line``, module path) of what failed."""
    module_names = {id(m): name or "<root>" for name, m in model.named_modules()}
    where = module = None
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith((_TORCH_DIR, _EDGEFX_DIR)) and not filename.startswith("<"):
            where = f"{filename}:{tb.tb_lineno} in {tb.tb_frame.f_code.co_name}"
            owner = tb.tb_frame.f_locals.get("self")
            if id(owner) in module_names:
                module = f"{module_names[id(owner)]} ({type(owner).__name__})"
        tb = tb.tb_next
    return where, module


def _reason(exc: BaseException) -> str:
    """The first few meaningful lines of torch's message."""
    lines = []
    for line in str(exc).splitlines():
        line = line.strip()
        if not line or line.startswith(
            (
                "For more information",
                "For extended logs",
                "If you suspect",
                "For C++ stack trace",
                "For more debugging",
            )
        ):
            continue
        lines.append(line)
        if len(lines) == _REASON_LINES:
            break
    return "\n    ".join(lines) or type(exc).__name__


_STATIC_BATCH_HINT = (
    "the model fixes the batch size somewhere (e.g. a reshape with a literal batch); "
    "pass dynamic_batch=False (CLI: --static-batch)"
)


def _exports_statically(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether the model exports with a fixed batch: tells a batch problem from the rest."""
    try:
        with quiet_torch_logs(), torch.no_grad():
            torch.export.export(model, inputs, strict=False)
    except Exception:
        return False
    return True


def _hint(exc: BaseException, static_works: bool) -> str:
    text = str(exc)
    if "data-dependent" in text or "GuardOnDataDependent" in type(exc).__name__:
        return (
            "the model branches on tensor values (e.g. `if x.sum() > 0`); rewrite it with "
            "torch.where / torch.cond, or move the decision out of forward()"
        )
    if static_works or "specialized" in text or "Constraints violated" in text:
        return _STATIC_BATCH_HINT
    return "see torch.export's docs on non-strict export; edgefx needs a graph torch.export accepts"


def capture(
    model: torch.nn.Module,
    example_inputs: object,
    *,
    dynamic_batch: bool = True,
    name: str | None = None,
    check_tolerance: float = 1e-4,
) -> Program:
    """Capture ``model`` into a Program.

    The model is deep-copied and put in eval mode before export, so the caller's object is
    never touched. With ``dynamic_batch`` (default) dim 0 of every input is symbolic. The
    captured graph is run on the example inputs and compared with the eager model: more than
    ``check_tolerance`` of the output scale apart is a CaptureError.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(
            f"expected a torch.nn.Module, got {type(model).__name__}",
            hint="pass the model object, e.g. torchvision.models.resnet18()",
        )
    inputs = normalize_inputs(example_inputs, dynamic_batch=dynamic_batch)
    try:
        work = copy.deepcopy(model).eval()
    except Exception as exc:
        raise CaptureError(
            f"cannot copy the model: {_reason(exc)}",
            module=type(model).__name__,
            hint="edgefx never mutates your model, so it must be deep-copyable",
        ) from exc
    args = trace_inputs(inputs, dynamic_batch)
    try:
        with quiet_torch_logs(), torch.no_grad():
            ep = torch.export.export(
                work, args, dynamic_shapes=dynamic_shapes_for(args, dynamic_batch), strict=False
            )
    except Exception as exc:
        where, module = _user_frame(exc, work)
        message = f"torch.export could not capture {type(model).__name__}:\n    {_reason(exc)}"
        if where:
            message += f"\n  at: {where}"
        # with a dynamic batch, a failure that a fixed batch avoids is the batch's fault
        static_works = dynamic_batch and _exports_statically(work, inputs)
        error = CaptureError(message, module=module, hint=_hint(exc, static_works))
        error.torch_error = exc  # kept for debugging; not chained, so the trace stays short
        raise error from None
    try:
        program = Program.from_exported(
            ep, inputs, dynamic_batch=dynamic_batch, name=name or type(model).__name__
        )
    except CaptureError:
        raise
    except Exception as exc:
        raise CaptureError(
            f"exported graph of {type(model).__name__} could not be functionalised: {_reason(exc)}",
            hint="please report this model to edgefx",
        ) from exc
    if flatten_attention(program.graph_module):
        program = _refreshed(program)
    _check_against_eager(work, program, check_tolerance)
    return program


def _refreshed(program: Program) -> Program:
    try:
        return program.refreshed()
    except Exception as exc:
        raise CaptureError(
            f"the canonicalised graph of {program.name} could not be re-exported: "
            f"{_reason(exc)}",
            hint="please report this model to edgefx",
        ) from exc


def _check_against_eager(model: torch.nn.Module, program: Program, tolerance: float) -> None:
    """The captured graph must compute what the model computes on the example inputs."""
    with torch.no_grad():
        eager = pytree.tree_leaves(model(*program.example_inputs))
    try:
        actual = program.run_flat()
    except Exception as exc:
        raise CaptureError(
            f"the captured graph of {program.name} fails on the example inputs: {_reason(exc)}",
            hint="please report this model to edgefx",
        ) from exc
    error = NumericError.between(
        eager,
        actual,
        error=CaptureError,
        reference_name="the eager model's output",
        actual_name=f"the captured graph of {program.name}",
    )
    if not error.relative <= tolerance:
        raise CaptureError(
            f"the captured graph of {program.name} disagrees with the eager model on the example "
            f"inputs: max abs {error.max_abs:.3g} ({error.relative:.3g} of the output scale)",
            hint="the model may be non-deterministic in eval mode or depend on global state",
        )
