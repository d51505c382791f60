"""compile(): capture -> PassManager -> backend -> Compiled; and load() for saved artifacts."""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils import _pytree as pytree

from edgefx.analysis.cost import human
from edgefx.backends import Artifact, artifact_class, get_backend
from edgefx.errors import ArtifactError, BackendError, EdgefxError, InputError, first_line
from edgefx.frontend import capture
from edgefx.passes.base import (
    DumpHook,
    Figures,
    NumericError,
    PassManager,
    PassResult,
    check_passes,
)
from edgefx.program import Program, TensorSpec, check_inputs

MANIFEST = "manifest.json"
PROGRAM_FILE = "program.pt2"
DEFAULT_TOLERANCE = 1e-4
# A quantized Program (one holding edgefx::quantize_pot nodes, or QDQToShift's integer form of
# one: float_to_codes / requant_shift) is checked in quantization steps: a float op between a
# dequantize and the next quantize that the backend computes a hair differently (onnxruntime
# fuses a BatchNorm into the dequantized conv weights, its SiLU kernel can round differently;
# TVM's LayerNorm and softmax sum in another order, its erf differs by an ulp) can flip a
# rounding step, and that flip propagates. The outputs are measured in steps of a signed
# QUANTIZED_CHECK_BITS-bit grid over the Program's output range; the backend passes when at
# most QUANTIZED_MAX_SHARE of the output elements are more than one step off and the two agree
# to QUANTIZED_MIN_SNR_DB or better. A lowering error (a wrong exponent, rounding mode or
# channel order) moves most elements by many steps.
QUANTIZED_CHECK_BITS = 8
QUANTIZED_MAX_SHARE = 0.01
QUANTIZED_MIN_SNR_DB = 30.0
# That output check cannot tell one early flip, spread chaotically through the later
# quantizers (swin_t, torchvision vit_b_16: one LayerNorm output on an exact rounding tie that
# onnxruntime misses by an ulp), from a wrong lowering. Where the backend can expose its
# intermediate values (ONNX: see Artifact.run_observing) compile() therefore checks a
# quantized Program quantizer by quantizer, with teacher forcing: the Program runs with an
# fx.Interpreter that at every quantizer (quantize_pot, float_to_codes, requant_shift)
# compares its own codes with the backend's and then continues with the backend's codes, so
# that every stretch of graph between quantizers is checked on the same input codes. The
# backend passes when, at every quantizer,
#   - codes differ by at most one step, on at most QUANTIZED_FORCED_MAX_SHARE of its elements
#     (one flipped code is always allowed, so that a small tensor may meet one tie);
#   - every one-step flip is a near tie: the Program's value before rounding lies within
#     QUANTIZED_TIE_WINDOW steps of the rounding boundary between the two codes (a last-bit
#     difference in the float op feeding the quantizer; a wrong scale moves values anywhere);
#   - a quantizer reading integer codes (requant_shift) flips nothing: integer arithmetic on
#     the same codes has no last bit to differ in;
# and the outputs, given the forced codes, agree to compile()'s float tolerance. Outputs that
# agree to that tolerance outright still pass; otherwise this check decides, and the output
# check above is the fallback for backends without intermediates (TVM today).
QUANTIZED_FORCED_MAX_SHARE = 0.001
QUANTIZED_TIE_WINDOW = 2.0**-8


@dataclass
class CompileReport:
    """What compile() did: capture, every pass with its figures, and the backend check."""

    model: str
    backend: str
    capture_s: float
    captured: Figures
    passes: list[PassResult] = field(default_factory=list)
    build_s: float = 0.0
    backend_check: NumericError | None = None
    # why the numeric check did not run (a library for another CPU or an absent GPU)
    backend_check_skipped: str | None = None
    backend_info: dict[str, Any] = field(default_factory=dict)
    # on a quantized Program: the backend check in quantization steps (see QUANTIZED_*)
    quantized_check: dict[str, float] | None = None
    # on a quantized Program, where the backend exposes intermediates: the check quantizer by
    # quantizer under teacher forcing (see QUANTIZED_FORCED_MAX_SHARE); None where it did not run
    forced_check: dict[str, Any] | None = None

    @property
    def final(self) -> Figures:
        return self.passes[-1].after if self.passes else self.captured

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "backend": self.backend,
            "capture_s": round(self.capture_s, 4),
            "captured": vars(self.captured),
            "passes": [r.to_dict() for r in self.passes],
            "build_s": round(self.build_s, 4),
            "backend_check": self.backend_check.to_dict() if self.backend_check else None,
            "backend_check_skipped": self.backend_check_skipped,
            "backend_info": self.backend_info,
            "quantized_check": None
            if self.quantized_check is None
            else {k: v if math.isfinite(v) else str(v) for k, v in self.quantized_check.items()},
            "forced_check": None
            if self.forced_check is None
            else {
                k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in self.forced_check.items()
            },
        }

    def table(self) -> Table:
        table = Table(title=f"edgefx compile: {self.model} -> {self.backend}")
        for column in ("step", "MACs", "params", "ops", "max abs err", "SNR dB", "time s", "notes"):
            table.add_column(column, justify="left" if column in ("step", "notes") else "right")
        c = self.captured
        table.add_row(
            "capture",
            human(c.macs),
            human(c.params),
            str(c.nodes),
            "",
            "",
            f"{self.capture_s:.2f}",
            "",
        )
        for r in self.passes:
            a = r.after
            note = ("exact " if r.exact else "") + ("" if r.changed else "(no change) ")
            note += _summary(r.report)
            table.add_row(
                r.name,
                human(a.macs),
                human(a.params),
                str(a.nodes),
                f"{r.error.max_abs:.2g}",
                f"{r.error.snr_db:.1f}",
                f"{r.wall_s:.2f}",
                note.strip(),
            )
        if self.backend_check is not None:
            info = ", ".join(f"{k}={v}" for k, v in self.backend_info.items())
            if self.quantized_check is not None:
                q = self.quantized_check
                info += f", >1 step off={q['beyond_one_step']:.2g}, max steps={q['max_steps']:.2g}"
            if self.forced_check is not None:
                f = self.forced_check
                info += (
                    f", teacher-forced: {f['with_flips']}/{f['quantizers']} quantizers flip, "
                    f"worst share={f['worst_share']:.2g}, max code diff={f['max_code_diff']}"
                )
            table.add_row(
                f"backend {self.backend}",
                "",
                "",
                "",
                f"{self.backend_check.max_abs:.2g}",
                f"{self.backend_check.snr_db:.1f}",
                f"{self.build_s:.2f}",
                info,
            )
        elif self.backend_check_skipped:
            table.add_row(
                f"backend {self.backend}", "", "", "", "", "", f"{self.build_s:.2f}",
                f"not checked: {self.backend_check_skipped}",
            )  # fmt: skip
        return table

    def __rich__(self) -> Table:
        return self.table()

    def __str__(self) -> str:
        console = Console(record=True, width=140, file=_NullFile())
        console.print(self.table())
        return console.export_text()


class _NullFile:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def _summary(report: dict[str, Any]) -> str:
    """The scalar entries of a pass report, e.g. 'folded=20 removed_nodes=3'."""
    parts = [f"{k}={v}" for k, v in report.items() if isinstance(v, (int, float, str))]
    lists = [f"{k}={len(v)}" for k, v in report.items() if isinstance(v, list)]
    return " ".join(parts + lists)


class Compiled:
    """A compiled model: call it with tensors, read ``.report``, ``.save(dir)`` to deploy."""

    def __init__(
        self,
        artifact: Artifact,
        *,
        input_specs: Sequence[TensorSpec],
        output_specs: Sequence[TensorSpec],
        out_spec: pytree.TreeSpec,
        report: CompileReport | dict[str, Any],
        program: Program | None = None,
    ) -> None:
        self.artifact = artifact
        self.input_specs = tuple(input_specs)
        self.output_specs = tuple(output_specs)
        self.out_spec = out_spec
        self.report = report
        self.program = program

    @property
    def backend(self) -> str:
        return self.artifact.backend

    def __call__(self, *inputs: torch.Tensor) -> Any:
        check_inputs(self.input_specs, inputs)
        flat = self.artifact.run(inputs)
        return pytree.tree_unflatten(flat, self.out_spec)

    def save(self, directory: str | Path, *, include_program: bool = True) -> Path:
        """Write the deployable artifact and ``manifest.json`` (plus ``program.pt2`` for
        inspection, unless ``include_program=False``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        artifact_entry = self.artifact.save(directory)
        program_file = None
        if (
            include_program
            and self.program is not None
            and artifact_entry["artifact"] != PROGRAM_FILE
        ):
            self.program.save(directory / PROGRAM_FILE)
            program_file = PROGRAM_FILE
        report = self.report.to_dict() if isinstance(self.report, CompileReport) else self.report
        manifest = {
            "edgefx_manifest": 1,
            "backend": self.backend,
            **artifact_entry,
            "program": program_file
            or (PROGRAM_FILE if artifact_entry["artifact"] == PROGRAM_FILE else None),
            "inputs": [s.to_dict() for s in self.input_specs],
            "outputs": [s.to_dict() for s in self.output_specs],
            "out_spec": pytree.treespec_dumps(self.out_spec),
            "history": list(self.program.history) if self.program is not None else [],
            "report": report,
            "versions": _versions(),
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return directory

    def __repr__(self) -> str:
        ins = ", ".join(s.describe() for s in self.input_specs)
        return f"Compiled({self.backend}: ({ins}))"


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    from edgefx import __version__

    return {
        "edgefx": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


@contextlib.contextmanager
def _status(message: str, enabled: bool) -> Iterator[None]:
    """A spinner on stderr for the long steps (export, lowering) when shown on a terminal."""
    if not enabled:
        yield
        return
    with Console(stderr=True).status(message):
        yield


def compile(
    model: torch.nn.Module | Program,
    example_inputs: object = None,
    passes: Sequence[Any] = (),
    backend: str = "onnx",
    *,
    target: str | None = None,
    dynamic_batch: bool = True,
    dump_dir: str | Path | None = None,
    dump_hook: DumpHook | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    progress: bool | None = None,
    backend_options: dict[str, Any] | None = None,
) -> Compiled:
    """Capture ``model``, run ``passes``, lower to ``backend`` and check the result.

    ``model`` is an ``nn.Module`` (captured on a copy; never mutated) or an already captured
    Program. The lowered model is run on the example inputs and compared with the Program:
    an error above ``tolerance`` (relative to the output scale) raises BackendError.
    ``dump_dir``: write the readable graph and report of every stage there, then call
    ``dump_hook(dump_dir, captured, pass_results)``; ``edgefx.compile`` makes that draw each
    stage's picture and an index.html (edgefx.tools.dump).
    """
    pass_list = check_passes(passes)
    backend_impl = get_backend(backend, target, **(backend_options or {}))
    show = Console(stderr=True).is_terminal if progress is None else progress
    start = time.perf_counter()
    if isinstance(model, Program):
        if example_inputs is not None:
            raise InputError("a Program carries its own example inputs; do not pass example_inputs")
        program = model
    else:
        if example_inputs is None:
            raise InputError(
                "example_inputs is required to capture a model",
                hint="e.g. edgefx.compile(model, (torch.randn(1, 3, 224, 224),))",
            )
        with _status(f"capturing {type(model).__name__} with torch.export", show):
            program = capture(model, example_inputs, dynamic_batch=dynamic_batch)
    report = CompileReport(
        model=program.name,
        backend=backend,
        capture_s=time.perf_counter() - start,
        captured=Figures.of(program),
    )

    manager = PassManager(pass_list, dump_dir=dump_dir, dump_hook=dump_hook, progress=show)
    program, report.passes = manager.run(program)

    start = time.perf_counter()
    with _status(f"lowering to {backend}", show):
        artifact = backend_impl.build(program)
    report.build_s = time.perf_counter() - start
    report.backend_info = artifact.describe()
    report.backend_check_skipped = getattr(artifact, "cannot_run_here", None)
    if report.backend_check_skipped:
        return _compiled(artifact, program, report)
    reference = program.run_flat()
    try:
        lowered = artifact.run(program.example_inputs)
    except EdgefxError:
        raise
    except Exception as exc:
        raise BackendError(
            f"the {backend} artifact failed on the example inputs: {first_line(exc)}"
        ) from exc
    report.backend_check = NumericError.between(
        reference,
        lowered,
        error=BackendError,
        reference_name="the Program",
        actual_name=f"the {backend} artifact",
    )
    exact_enough = report.backend_check.relative <= tolerance
    if _is_quantized(program):
        report.quantized_check = quantized_agreement(reference, lowered)
        try:
            report.forced_check = teacher_forced_agreement(program, artifact, lowered, tolerance)
        except EdgefxError:
            raise
        except Exception as exc:  # the instrumented run failed: fall back to the output check
            report.backend_info["teacher_forcing_failed"] = first_line(exc)
        forced = report.forced_check
        if exact_enough:
            pass
        elif forced is not None and forced["passed"]:
            exact_enough = True
        elif forced is not None:
            raise BackendError(
                f"the {backend} artifact disagrees with the quantized Program on the example "
                f"inputs, quantizer by quantizer (teacher forcing): {forced['failure']}",
                hint="more than last-bit flips in float islands: a lowering is wrong; "
                "`edgefx compile --dump-dir` shows the lowered graph",
            )
        elif _steps_agree(report.quantized_check):
            exact_enough = True
        else:
            q = report.quantized_check
            raise BackendError(
                f"the {backend} artifact disagrees with the quantized Program on the example "
                f"inputs: {q['beyond_one_step']:.3g} of the output elements are more than one "
                f"step off (at most {QUANTIZED_MAX_SHARE:g}), max {q['max_steps']:.3g} steps, "
                f"SNR {q['snr_db']:.3g} dB (at least {QUANTIZED_MIN_SNR_DB:g}); steps of a "
                f"{QUANTIZED_CHECK_BITS}-bit grid over the output range",
                hint="more than rounding flips in float islands: a lowering is wrong; "
                "`edgefx compile --dump-dir` shows the lowered graph",
            )
    if not exact_enough:
        raise BackendError(
            f"the {backend} artifact disagrees with the Program on the example inputs: max abs "
            f"{report.backend_check.max_abs:.3g} ({report.backend_check.relative:.3g} of the "
            f"output scale, tolerance {tolerance:g})",
            hint="a lowering is wrong; `edgefx compile --dump-dir` shows the lowered graph",
        )
    return _compiled(artifact, program, report)


def _compiled(artifact: Artifact, program: Program, report: CompileReport) -> Compiled:
    return Compiled(
        artifact,
        input_specs=program.input_specs,
        output_specs=program.output_specs,
        out_spec=program.out_spec,
        report=report,
        program=program,
    )


def _quantizer_targets() -> tuple[Any, ...]:
    ops = torch.ops.edgefx
    return (ops.quantize_pot.default, ops.float_to_codes.default, ops.requant_shift.default)


def _is_quantized(program: Program) -> bool:
    """A Program with quantization steps in it: PotQuantize's fake-quant graph
    (``quantize_pot``) or its integer rewrite by QDQToShift, where every quantize became a
    ``float_to_codes`` (from a float value) or a ``requant_shift`` (from integer codes). Both
    carry float islands whose last-bit differences between backends can flip a step."""
    graph = program.graph_module.graph
    return any(
        graph.find_nodes(op="call_function", target=target) for target in _quantizer_targets()
    )


def quantized_agreement(
    reference: Sequence[torch.Tensor], lowered: Sequence[torch.Tensor]
) -> dict[str, float]:
    """How far ``lowered`` is from ``reference`` in quantization steps: the step is that of a
    signed ``QUANTIZED_CHECK_BITS``-bit power-of-two grid covering the reference's range.
    Returns the step, the shares of output elements exactly equal / at most one step off /
    more than one step off, the largest difference in steps and the SNR between the two."""
    scale = max((float(r.detach().abs().max()) for r in reference if r.numel()), default=0.0)
    high = (1 << (QUANTIZED_CHECK_BITS - 1)) - 1
    step = 2.0 ** math.ceil(math.log2(scale / high)) if scale > 0 else 1.0
    total = equal = within = 0
    max_steps = 0.0
    for ref, out in zip(reference, lowered, strict=True):
        steps = (ref.detach().double() - out.detach().double()).abs() / step
        steps = torch.nan_to_num(steps, nan=math.inf)
        total += steps.numel()
        equal += int((steps == 0).sum())
        within += int((steps <= 1).sum())
        if steps.numel():
            max_steps = max(max_steps, float(steps.max()))
    total = max(total, 1)
    snr = NumericError.between(reference, lowered, error=BackendError).snr_db
    return {
        "step": step,
        "equal": equal / total,
        "within_one_step": within / total,
        "beyond_one_step": 1 - within / total,
        "max_steps": max_steps,
        "snr_db": snr,
    }


def teacher_forced_agreement(
    program: Program,
    artifact: Artifact,
    lowered: Sequence[torch.Tensor],
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any] | None:
    """Check ``artifact`` against the quantized ``program`` quantizer by quantizer, with
    teacher forcing (the criterion is documented at QUANTIZED_FORCED_MAX_SHARE); ``lowered``
    are the artifact's own outputs on the example inputs. None where the artifact cannot
    expose its intermediate values. A quantizer the artifact has no single value for (one
    constant-folded away, say) is not forced: the Program keeps its own codes there, and a
    difference shows at the next quantizer observed. Returns the figures: quantizers and
    those observed, those with flips, the worst share of flipped codes, the largest code
    difference, the largest distance of a flip from its tie (in steps), the outputs'
    relative error given the forced codes, ``passed``, ``failure`` (why not, or None) and
    ``flips`` (one entry per quantizer that flipped a code)."""
    nodes = [
        n for n in program.graph_module.graph.nodes
        if n.op == "call_function" and n.target in _quantizer_targets()
    ]  # fmt: skip
    observed = artifact.run_observing(program.example_inputs, [n.name for n in nodes])
    if observed is None:
        return None
    outputs, codes = observed
    entries: list[dict[str, Any]] = []
    failures: list[str] = []

    class Forced(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if n.name not in codes:
                return out
            theirs = codes[n.name]
            if theirs.shape != out.shape:
                failures.append(
                    f"quantizer {n.name} has shape {tuple(theirs.shape)} in the artifact, "
                    f"{tuple(out.shape)} in the Program"
                )
                return out
            entry = _compare_codes(n, self.fetch_args_kwargs_from_env(n)[0], out, theirs)
            entries.append(entry)
            return theirs.to(out.dtype)

    with torch.no_grad():
        forced = pytree.tree_leaves(Forced(program.graph_module).run(*program.example_inputs))
    given = NumericError.between(
        forced, outputs, error=BackendError, reference_name="the teacher-forced Program",
        actual_name="the artifact",
    )  # fmt: skip
    same = len(outputs) == len(lowered) and all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(outputs, lowered, strict=True)
    )
    flipped = [e for e in entries if e["flips"]]
    worst = max(flipped, key=lambda e: e["share"], default=None)
    max_diff = max((e["max_code_diff"] for e in entries), default=0)
    for e in flipped:
        if e["max_code_diff"] > 1:
            failures.append(f"quantizer {e['node']}: codes up to {e['max_code_diff']} steps apart")
        elif e["flips"] > 1 and e["share"] > QUANTIZED_FORCED_MAX_SHARE:
            failures.append(
                f"quantizer {e['node']}: {e['share']:.3g} of its codes one step off "
                f"(at most {QUANTIZED_FORCED_MAX_SHARE:g})"
            )
        elif e["unexplained"]:
            failures.append(
                f"quantizer {e['node']}: {e['unexplained']} codes one step off where the "
                f"Program's value is not within {QUANTIZED_TIE_WINDOW:g} steps of a tie"
                + (" (it reads integer codes: nothing may flip)" if e["integer_input"] else "")
            )
    if given.relative > tolerance:
        failures.append(
            f"given the artifact's codes the outputs still differ by {given.relative:.3g} of "
            f"the output scale (tolerance {tolerance:g})"
        )
    if not same:
        failures.append("the run exposing intermediates gave other outputs than the artifact")
    return {
        "quantizers": len(nodes),
        "observed": len(entries),
        "with_flips": len(flipped),
        "flipped": sum(e["flips"] for e in entries),
        "worst_share": worst["share"] if worst else 0.0,
        "worst_quantizer": worst["node"] if worst else None,
        "max_code_diff": max_diff,
        "max_tie_distance": max((e["max_tie_distance"] for e in flipped), default=0.0),
        "output_relative": given.relative,
        "passed": not failures,
        "failure": "; ".join(failures[:3]) or None,
        "flips": flipped,
    }


def _compare_codes(
    node: torch.fx.Node, args: tuple[Any, ...], ours: torch.Tensor, theirs: torch.Tensor
) -> dict[str, Any]:
    """One quantizer's codes, the Program's (``ours``) against the artifact's: how many
    differ, by how much, and how far each one-step flip lies from its rounding tie."""
    diff = (ours.to(torch.int64) - theirs.to(torch.int64)).abs()
    flips = diff > 0
    count = int(flips.sum())
    integer_input = node.target == torch.ops.edgefx.requant_shift.default
    distance = torch.zeros(0, dtype=torch.float64)
    if count and not integer_input:
        x, exponent, axis = args[0], args[1], args[2]
        scale = torch.ldexp(torch.ones_like(exponent, dtype=torch.float64), exponent.long())
        if exponent.dim() == 1:
            shape = [1] * x.dim()
            shape[axis] = -1
            scale = scale.reshape(shape)
        value = x.double() / scale  # before rounding; exact (a power-of-two scale)
        boundary = (ours.double() + theirs.double()) / 2
        distance = (value - boundary).abs()[flips & (diff == 1)]
    near = int((distance <= QUANTIZED_TIE_WINDOW).sum())
    one_step = int((diff == 1).sum())
    return {
        "node": node.name,
        "integer_input": integer_input,
        "elements": diff.numel(),
        "flips": count,
        "share": count / max(diff.numel(), 1),
        "max_code_diff": int(diff.max()) if diff.numel() else 0,
        "max_tie_distance": float(distance.max()) if distance.numel() else 0.0,
        "unexplained": one_step - near,
    }


def _steps_agree(check: dict[str, float]) -> bool:
    return (
        check["beyond_one_step"] <= QUANTIZED_MAX_SHARE and check["snr_db"] >= QUANTIZED_MIN_SNR_DB
    )


def load(directory: str | Path) -> Compiled:
    """Load a folder written by ``Compiled.save``."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"no {MANIFEST} in {directory}",
            hint="pass the folder written by Compiled.save / `edgefx compile -o`",
        )
    try:
        manifest = json.loads(path.read_text())
        backend = manifest["backend"]
        inputs = [TensorSpec.from_dict(s) for s in manifest["inputs"]]
        outputs = [TensorSpec.from_dict(s) for s in manifest["outputs"]]
        out_spec = pytree.treespec_loads(manifest["out_spec"])
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{path} is not an edgefx manifest: {exc!r}") from exc
    try:
        loader = artifact_class(backend)
    except BackendError as exc:
        raise ArtifactError(f"{path} names a backend this edgefx lacks: {exc.message}") from None
    artifact = loader.load(directory, manifest)
    program = getattr(artifact, "program", None)
    if program is None and manifest.get("program"):
        program = Program.load(directory / manifest["program"])
    return Compiled(
        artifact,
        input_specs=inputs,
        output_specs=outputs,
        out_spec=out_spec,
        report=manifest.get("report", {}),
        program=program,
    )
