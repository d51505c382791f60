"""MetaSchedule tuning, one task at a time, with a fallback for the tasks that fail.

Relax's ``static_shape_tuning`` pipeline tunes every task in one ``tune_tasks`` call, so one
task that MetaSchedule cannot handle stops the whole tuning (PLATFORM.md once saw resnet18 stop
at its first real task with ``parallel_for_dynamic error ... old_rv != nullptr``, a trace
replay in the evolutionary search; it did not recur with apache-tvm 0.27.0.post1 and
apache-tvm-ffi 0.1.14.post1, for resnet18 and mobilenet_v2 here or in ``static_shape_tuning``).
Here every task is tuned on its own: a failure is recorded (task name and first line of the
error) and that task keeps TVM's default schedule. What did stop ``static_shape_tuning`` here
is its builder: MetaSchedule's 30 s build limit, which a fresh build worker exceeds on a loaded
2-core machine (it imports ``tvm.s_tir.tensor_intrin`` the slow way), so every candidate
"fails to build" and nothing is measured; the builder below has a longer limit and a quick
import. The work dir is MetaSchedule's JSON database: tasks that already hold a record per
trial there, or were given as many trials before (``edgefx_tuned.json`` in the work dir: a
small search space yields fewer valid records than trials), are not tuned again, so a second
build with the same work dir only applies the database.

Candidates are measured here (MetaSchedule's LocalRunner) or, for a board, on the board: an
``RpcDevice`` names a TVM RPC tracker and the key its board registered under; MetaSchedule's
RPCRunner then uploads every candidate there and times it with the board's own clock. The
candidates are linked into shared libraries here (with the cross compiler for an ARM board), so
the board needs only the TVM runtime, as for the deploy folder's run.py.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefx.errors import BackendError, first_line

RPC_OPTIONS = ("tracker", "key", "timeout_s")


@dataclass(frozen=True)
class RpcDevice:
    """A board reached through a TVM RPC tracker: ``tracker`` (host:port) and the ``key`` the
    board's RPC server registered under (``python -m tvm.exec.rpc_server --tracker H:P --key
    K``); ``timeout_s`` bounds one session (upload, load, timing one candidate)."""

    host: str
    port: int
    key: str
    timeout_s: float = 60.0

    @property
    def tracker(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_option(cls, value: Any) -> RpcDevice:
        """The backend option ``rpc={"tracker": "host:port", "key": K[, "timeout_s": S]}``."""
        example = "rpc={'tracker': '192.168.1.7:9190', 'key': 'rpi4'}"
        if not isinstance(value, dict):
            raise BackendError(
                f"the rpc option is a dict, got {type(value).__name__}", hint=example
            )
        unknown = sorted(set(value) - set(RPC_OPTIONS))
        if unknown:
            raise BackendError(
                f"unknown rpc option(s) {', '.join(map(repr, unknown))}; known: "
                f"{', '.join(RPC_OPTIONS)}",
                hint=example,
            )
        tracker, key = value.get("tracker"), value.get("key")
        host, sep, port = str(tracker or "").rpartition(":")
        if not isinstance(tracker, str) or not sep or not host or not port.isdigit():
            raise BackendError(
                f"rpc 'tracker' takes host:port of a TVM RPC tracker, got {tracker!r}",
                hint=example,
            )
        if not isinstance(key, str) or not key:
            raise BackendError(
                f"rpc 'key' names the device kind its RPC server registered, got {key!r}",
                hint=example,
            )
        timeout = value.get("timeout_s", cls.timeout_s)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise BackendError(f"rpc 'timeout_s' is a number of seconds > 0, got {timeout!r}")
        return cls(host, int(port), key, float(timeout))

    def check_registered(self) -> None:
        """BackendError unless the tracker answers and holds a server under ``key``."""
        from tvm import rpc

        hint = (
            f"on the board: python -m tvm.exec.rpc_server --tracker {self.tracker} "
            f"--key {self.key}; a tracker: python -m tvm.exec.rpc_tracker --port {self.port}"
        )
        # TVM's tracker client retries a refused connection for a minute: try once first
        try:
            socket.create_connection(
                (self.host, self.port), timeout=min(self.timeout_s, 10)
            ).close()
        except OSError as exc:
            raise BackendError(
                f"cannot reach the TVM RPC tracker {self.tracker}: {exc}", hint=hint
            ) from None
        summary: dict[str, Any] = {}
        failure: list[str] = []

        def query() -> None:
            try:
                summary.update(rpc.connect_tracker(self.host, self.port).summary())
            except Exception as exc:
                failure.append(first_line(exc))

        thread = threading.Thread(target=query, daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if not summary:
            why = failure[0] if failure else f"no answer in {self.timeout_s:g} s"
            raise BackendError(f"the TVM RPC tracker {self.tracker} failed: {why}", hint=hint)
        keys = sorted(
            info["key"].removeprefix("server:")
            for info in summary.get("server_info", [])
            if str(info.get("key", "")).startswith("server:")
        )
        if self.key not in keys:
            raise BackendError(
                f"no RPC server is registered under the key {self.key!r} with the tracker "
                f"{self.tracker} (registered: {', '.join(keys) or 'none'})",
                hint=hint,
            )

    def runner(self, evaluator: Any = None) -> Any:
        """MetaSchedule's RPCRunner measuring on this device."""
        from tvm.s_tir import meta_schedule as ms

        config = ms.runner.RPCConfig(
            tracker_host=self.host, tracker_port=self.port, tracker_key=self.key,
            session_timeout_sec=math.ceil(self.timeout_s),
        )  # fmt: skip
        return ms.runner.RPCRunner(config, evaluator_config=evaluator)


def export_shared_library(mod: Any, cross_compiler: str | None = None) -> str:
    """MetaSchedule ``f_export`` for RPC: the candidate as a shared library, linked here (with
    ``cross_compiler`` for another CPU). MetaSchedule's default exports a tar of object files
    that the board's RPC server links itself, which needs a C++ toolchain on the board."""
    path = os.path.join(tempfile.mkdtemp(prefix="edgefx-ms-"), "candidate.so")
    if cross_compiler is None:
        mod.export_library(path)
    else:
        from tvm.support import cc

        mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
    return path


@dataclass
class TuningReport:
    trials: int
    trials_per_task: int
    work_dir: str
    measured_on: str = "this machine"
    tuned: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    tuning_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tune_trials": self.trials,
            "trials_per_task": self.trials_per_task,
            "work_dir": self.work_dir,
            "measured_on": self.measured_on,
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


TUNED_FILE = "edgefx_tuned.json"  # in the work dir: trials each task was already given


def _task_key(task: Any) -> str:
    import tvm

    return f"{task.task_name}:{tvm.ir.structural_hash(task.dispatched[0])}"


def _tuned_before(work_dir: Path) -> dict[str, int]:
    path = work_dir / TUNED_FILE
    try:
        return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _is_tuned(database: Any, task: Any, tuned: dict[str, int], per_task: int) -> bool:
    """Enough tuning already in the database: as many records as trials, or a task that
    was given that many trials before (a small search space yields fewer distinct, valid
    candidates than trials, so counting records alone would tune it again every build)."""
    records = _records(database, task)
    return records >= per_task or (records > 0 and tuned.get(_task_key(task), 0) >= per_task)


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
    rpc: RpcDevice | None = None,
    cross_compiler: str | None = None,
) -> tuple[Any, TuningReport]:
    """Tune the tasks of ``mod`` (a Relax module with static shapes), apply the database;
    -> (module ready for ``tvm.compile``, report). With ``rpc``, candidates are linked here
    (``cross_compiler`` for another CPU) and timed on that device."""
    import tvm
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    start = time.perf_counter()
    if rpc is not None:
        rpc.check_registered()  # before minutes of task extraction and building
    import_tensor_intrinsics()
    # MetaSchedule's 30 s build/run limits count the start of each worker process (a TVM
    # import), which a loaded 2-core machine exceeds: every candidate then "fails to build".
    # Its build workers import the tensor intrinsics too: the quick import there as well.
    export = None
    if rpc is not None:
        export = functools.partial(export_shared_library, cross_compiler=cross_compiler)
    builder = builder or ms.builder.LocalBuilder(
        timeout_sec=timeout_s, initializer=import_tensor_intrinsics, f_export=export
    )
    if runner is None:
        runner = rpc.runner() if rpc else ms.runner.LocalRunner(timeout_sec=timeout_s)
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
    if rpc is not None:
        report.measured_on = f"RPC tracker {rpc.tracker}, key {rpc.key!r}"
    database = ms.database.JSONDatabase(work_dir=str(work_dir))
    tuned_before = _tuned_before(work_dir)
    columns = (TextColumn("tuning {task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} tasks"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, disable=not progress, transient=True) as bar:
        job = bar.add_task("", total=len(tasks))
        for task in tasks:
            bar.update(job, description=task.task_name[:48])
            if _is_tuned(database, task, tuned_before, per_task):
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
                tuned_before[_task_key(task)] = per_task
                (work_dir / TUNED_FILE).write_text(json.dumps(tuned_before, indent=1))
            except Exception as exc:  # the task keeps TVM's default schedule
                report.failed[task.task_name] = first_line(exc)[:300]
            bar.advance(job)
    with target, tvm.transform.PassContext(opt_level=3):
        mod = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)
    report.tuning_s = time.perf_counter() - start
    return mod, report
