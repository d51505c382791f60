"""TVM RPC boards on loopback for the tests: a tracker, and `python -m tvm.exec.rpc_server`
registered with it as on a board (here, or on the emulated aarch64 Python), logging to a file:
the server logs `load_module` for every library it loads."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def registered(tracker_port: int) -> set[str]:
    """The keys of the servers registered with the tracker on ``tracker_port``."""
    from tvm import rpc

    summary = rpc.connect_tracker("127.0.0.1", tracker_port).summary()
    return {info["key"].removeprefix("server:") for info in summary["server_info"]}


def host_server_command(tracker: str, key: str) -> tuple[list[str], dict[str, str]]:
    port = free_port()
    return [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
            "--port", str(port), "--port-end", str(port + 1),
            "--tracker", tracker, "--key", key], dict(os.environ)  # fmt: skip


@contextlib.contextmanager
def board(
    command: tuple[Sequence[str], dict[str, str]], tracker_port: int, key: str, log: Path,
    wait_s: float = 300,
) -> Iterator[Path]:  # fmt: skip
    """Run the server ``command`` until it has registered ``key``; yield its log; stop it."""
    cmd, env = command
    with open(log, "w") as stream:
        server = subprocess.Popen(
            list(cmd), env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + wait_s
        while key not in registered(tracker_port):
            assert server.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, f"the RPC server did not register in {wait_s} s"
            time.sleep(0.5)
        yield log
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the worker it started
        server.wait(30)


def loads(log: Path) -> int:
    """How many libraries the server has loaded so far."""
    return log.read_text().count("load_module")


def timed_records(work_dir: Path) -> list:
    """The MetaSchedule records in ``work_dir`` that hold a real measurement."""
    from tvm.s_tir import meta_schedule as ms

    records = ms.database.JSONDatabase(work_dir=str(work_dir)).get_all_tuning_records()
    return [r for r in records if r.run_secs and all(0 < float(t) < 1 for t in r.run_secs)]


class TinyConv(torch.nn.Module):
    """One MetaSchedule task: conv + bias + ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))
