"""MetaSchedule tuning, one task at a time, with a fallback for the tasks that fail.

Relax's ``static_shape_tuning`` pipeline tunes every task in one ``tune_tasks`` call, so one
task that MetaSchedule cannot handle stops the whole tuning (PLATFORM.md: resnet18 stopped at
its first real task with ``parallel_for_dynamic error ... old_rv != nullptr``). Here every
task is tuned on its own: a failure is recorded (task name and first line of the error) and
that task keeps TVM's default schedule. The work dir is MetaSchedule's JSON database: tasks
that already hold enough records there are not tuned again, so a second build with the same
work dir only applies the database.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefx.errors import BackendError, first_line


@dataclass
class TuningReport:
    trials: int
    trials_per_task: int
    work_dir: str
    tuned: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    tuning_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tune_trials": self.trials,
            "trials_per_task": self.trials_per_task,
            "work_dir": self.work_dir,
            "tasks_tuned": len(self.tuned),
            "tasks_reused": len(self.reused),
            "tasks_failed": self.failed,
            "tuning_s": round(self.tuning_s, 2),
        }


def tuning_target(target: Any) -> Any:
    """``target`` with ``num-cores`` set (MetaSchedule needs it for its CPU rules)."""
    import tvm

    config = dict(target.export())
    if config.get("kind") == "llvm" and not config.get("num-cores"):
        config["num-cores"] = os.cpu_count() or 1
    return tvm.target.Target(config)


def _fast_stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack()`` without reading source lines (``code_context`` is None)."""
    frame, frames = sys._getframe(1), []
    while frame is not None:
        code = frame.f_code
        frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name,
                                        None, None))  # fmt: skip
        frame = frame.f_back
    return frames


def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (MetaSchedule's TuneContext does, on first use).

    It parses some 400 TVMScript functions, and TVMScript's ``prim_func`` calls
    ``inspect.stack()`` for each, which reads the source of every frame on the stack: minutes
    of CPU on a loaded 2-core machine. Those functions are all defined inside plain functions,
    where TVMScript only uses the frames themselves (closure variables), so a stack without
    source lines gives the same result."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original, inspect.stack = inspect.stack, _fast_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original


def _records(database: Any, task: Any) -> int:
    mod = task.dispatched[0]
    if not database.has_workload(mod):
        return 0
    return len(database.get_top_k(database.commit_workload(mod), 1 << 30))


def tune(
    mod: Any,
    target: Any,
    trials: int,
    work_dir: Path,
    *,
    progress: bool = True,
    runner: Any = None,
    builder: Any = None,
    timeout_s: float = 300,
) -> tuple[Any, TuningReport]:
    """Tune the tasks of ``mod`` (a Relax module with static shapes), apply the database;
    -> (module ready for ``tvm.compile``, report)."""
    import tvm
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    start = time.perf_counter()
    import_tensor_intrinsics()
    # MetaSchedule's 30 s build/run limits count the start of each worker process (a TVM
    # import), which a loaded 2-core machine exceeds: every candidate then "fails to build".
    # Its build workers import the tensor intrinsics too: the quick import there as well.
    builder = builder or ms.builder.LocalBuilder(
        timeout_sec=timeout_s, initializer=import_tensor_intrinsics
    )
    runner = runner or ms.runner.LocalRunner(timeout_sec=timeout_s)
    work_dir.mkdir(parents=True, exist_ok=True)
    with target:
        mod = tvm.transform.Sequential(
            [
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                relax.get_pipeline("zero"),
            ]
        )(mod)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    if not tasks:
        raise BackendError("MetaSchedule found nothing to tune in this model")
    per_task = max(1, math.ceil(trials / len(tasks)))
    report = TuningReport(trials, per_task, str(work_dir))
    database = ms.database.JSONDatabase(work_dir=str(work_dir))
    columns = (TextColumn("tuning {task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} tasks"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, disable=not progress, transient=True) as bar:
        job = bar.add_task("", total=len(tasks))
        for task in tasks:
            bar.update(job, description=task.task_name[:48])
            if _records(database, task) >= per_task:
                report.reused.append(task.task_name)
                bar.advance(job)
                continue
            try:
                # a smaller population than the default 512: a few trials per task need
                # far fewer candidates, and each costs a schedule replay on 2 cores
                strategy = ms.search_strategy.EvolutionarySearch(
                    population_size=max(64, 4 * per_task), init_min_unmeasured=16,
                    genetic_num_iters=2,
                )  # fmt: skip
                contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                    [task], work_dir=str(work_dir), strategy=strategy,
                    num_threads=target.attrs.get("num-cores", 1),
                )  # fmt: skip
                ms.tune_tasks(
                    tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                    max_trials_global=per_task, max_trials_per_task=per_task,
                    num_trials_per_iter=min(64, per_task), database=database,
                    runner=runner, builder=builder,
                )  # fmt: skip
                report.tuned.append(task.task_name)
            except Exception as exc:  # the task keeps TVM's default schedule
                report.failed[task.task_name] = first_line(exc)[:300]
            bar.advance(job)
    with target, tvm.transform.PassContext(opt_level=3):
        mod = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)
    report.tuning_s = time.perf_counter() - start
    return mod, report
