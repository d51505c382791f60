"""Pass, PassResult and PassManager: how every graph rewrite is run, measured and checked."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from edgefx.analysis.numerics import NumericError
from edgefx.errors import EdgefxError, PassError, first_line
from edgefx.program import Program


@dataclass(frozen=True)
class Figures:
    """Size of a Program for its example inputs."""

    macs: int
    params: int
    nodes: int

    @classmethod
    def of(cls, program: Program) -> Figures:
        cost = program.cost()
        return cls(cost.total_macs, cost.total_params, len(cost.nodes))


@dataclass
class PassResult:
    """What one pass did: the new Program and the figures measured before and after."""

    name: str
    program: Program
    changed: bool
    before: Figures
    after: Figures
    error: NumericError  # of the new Program against the old, on the example inputs
    wall_s: float
    report: dict[str, Any] = field(default_factory=dict)
    exact: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "changed": self.changed,
            "exact": self.exact,
            "before": dataclasses.asdict(self.before),
            "after": dataclasses.asdict(self.after),
            "error": self.error.to_dict(),
            "wall_s": round(self.wall_s, 4),
            "report": self.report,
        }


class Pass(abc.ABC):
    """A graph rewrite: Program in, PassResult out. The input Program is never modified.

    Subclasses set ``name``, validate their configuration in ``__init__`` (raising PassError),
    and implement :meth:`run`. A pass whose rewrite must not change the outputs sets
    ``exact = True``; the PassManager then checks it within ``tolerance`` (relative to the
    output scale).
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    tolerance: ClassVar[float] = 1e-5

    @abc.abstractmethod
    def run(self, program: Program) -> tuple[Program, dict[str, Any]]:
        """Return the rewritten Program (built from ``program.copy_graph()``) and a report."""

    def __call__(self, program: Program) -> PassResult:
        if not isinstance(program, Program):
            raise PassError(
                f"{self.name} expects a Program, got {type(program).__name__}",
                hint="capture the model first: edgefx.frontend.capture(model, inputs)",
            )
        before = Figures.of(program)
        reference = program.run_flat()
        start = time.perf_counter()
        try:
            new, report = self.run(program)
        except EdgefxError:
            raise
        except Exception as exc:
            raise PassError(
                f"{self.name} failed: {type(exc).__name__}: {exc}",
                hint="this is a bug in the pass; the input Program is unchanged",
            ) from exc
        wall = time.perf_counter() - start
        try:
            new.graph_module.graph.lint()
        except Exception as exc:
            raise PassError(f"{self.name} produced an invalid graph: {first_line(exc)}") from exc
        try:
            after, outputs = Figures.of(new), new.run_flat()
        except Exception as exc:
            raise PassError(
                f"{self.name} produced a graph that does not run: {first_line(exc)}",
                hint="this is a bug in the pass; the input Program is unchanged",
            ) from exc
        return PassResult(
            name=self.name,
            program=new,
            changed=not _same_graph(program.graph_module, new.graph_module),
            before=before,
            after=after,
            error=NumericError.between(
                reference,
                outputs,
                error=PassError,
                reference_name=f"the Program before {self.name}",
                actual_name=f"the Program {self.name} produced",
            ),
            wall_s=wall,
            report=report,
            exact=self.exact,
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _same_graph(a: torch.fx.GraphModule, b: torch.fx.GraphModule) -> bool:
    if a.code != b.code:
        return False
    state_a, state_b = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    return state_a.keys() == state_b.keys() and all(
        state_a[k].shape == state_b[k].shape and torch.equal(state_a[k], state_b[k])
        for k in state_a
    )


def check_passes(passes: object) -> list[Pass]:
    """Validate a user's ``passes`` argument eagerly: a sequence of Pass instances."""
    if isinstance(passes, Pass):
        return [passes]
    if passes is None:
        return []
    if not isinstance(passes, (list, tuple)):
        raise PassError(
            f"passes must be a list of Pass objects, got {type(passes).__name__}",
            hint="e.g. passes=[FoldBatchNorm()]",
        )
    for i, p in enumerate(passes):
        if isinstance(p, type) and issubclass(p, Pass):
            raise PassError(
                f"passes[{i}] is the class {p.__name__}, not an instance",
                hint=f"write {p.__name__}() with its arguments",
            )
        if not isinstance(p, Pass):
            raise PassError(
                f"passes[{i}] is a {type(p).__name__} ({p!r:.60}), not an edgefx Pass",
                hint="passes come from edgefx.passes, e.g. FoldBatchNorm()",
            )
    return list(passes)


def stage_stem(index: int, name: str) -> str:
    """The file stem of stage ``index`` (0: the captured Program) in a dump folder."""
    return f"{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"


# What a PassManager with a dump_dir calls after its passes ran (or one failed), besides
# writing each stage's readable graph and report: hook(dump_dir, the Program it started
# from, the PassResults so far). edgefx.compile plugs in the pictures and index.html of
# edgefx.tools.dump this way, since nothing below tools/ may import tools/.
DumpHook = Callable[[Path, Program, list["PassResult"]], object]


class PassManager:
    """Run passes in order; after each, lint the graph, re-export it (which re-propagates every
    shape and proves the graph still exports), and hold exact passes to their promise."""

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        dump_dir: str | Path | None = None,
        dump_hook: DumpHook | None = None,
        progress: bool | None = None,
        console: Console | None = None,
    ) -> None:
        self.passes = check_passes(passes)
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.dump_hook = dump_hook
        self.console = console or Console(stderr=True)
        self.progress = self.console.is_terminal if progress is None else progress

    def run(self, program: Program) -> tuple[Program, list[PassResult]]:
        results: list[PassResult] = []
        self._dump(0, "captured", program, None)
        try:
            final = self._run_passes(program, results)
        except BaseException:
            # the stages before a failing pass show why it failed: draw them too, but let
            # nothing the hook raises hide the pass's error
            with contextlib.suppress(Exception):
                self._call_dump_hook(program, results)
            raise
        self._call_dump_hook(program, results)
        return final, results

    def _run_passes(self, program: Program, results: list[PassResult]) -> Program:
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.progress,
            transient=True,
        ) as bar:
            for index, pass_ in enumerate(self.passes, start=1):
                task = bar.add_task(f"[{index}/{len(self.passes)}] {pass_.name}", total=None)
                result = self._run_one(pass_, program)
                bar.remove_task(task)
                results.append(result)
                program = result.program
                self._dump(index, pass_.name, program, result)
        return program

    def _call_dump_hook(self, captured: Program, results: list[PassResult]) -> None:
        if self.dump_dir is not None and self.dump_hook is not None:
            self.dump_hook(self.dump_dir, captured, list(results))

    def _run_one(self, pass_: Pass, program: Program) -> PassResult:
        result = pass_(program)
        if result.changed:
            try:
                refreshed = result.program.refreshed()
            except EdgefxError:
                raise
            except Exception as exc:
                raise PassError(
                    f"{pass_.name} produced a graph torch.export cannot re-trace: "
                    f"{first_line(exc)}",
                    hint="the pass must keep the graph exportable",
                ) from exc
            result = dataclasses.replace(result, program=refreshed)
        if pass_.exact and not result.error.relative <= pass_.tolerance:
            raise PassError(
                f"{pass_.name} declares itself exact but changed the outputs: max abs "
                f"{result.error.max_abs:.3g}, {result.error.relative:.3g} of the output scale "
                f"(tolerance {pass_.tolerance:g})",
                hint="this is a bug in the pass; the input Program is unchanged",
            )
        return result

    def _dump(self, index: int, name: str, program: Program, result: PassResult | None) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        stem = stage_stem(index, name)
        (self.dump_dir / f"{stem}.py").write_text(program.readable())
        if result is not None:
            (self.dump_dir / f"{stem}.json").write_text(json.dumps(result.to_dict(), indent=2))
