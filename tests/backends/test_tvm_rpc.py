"""`edgefx run DIR --rpc host:port`: a deploy folder's library uploaded to TVM's own RPC server
(started on loopback only), directly and through TVM's RPC tracker, runs and gives the same
outputs as running it here. Tuning over RPC: MetaSchedule's candidates are timed on a board
registered with a tracker (here a `python -m tvm.exec.rpc_server` on loopback)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm_boards

import edgefx
from edgefx import BackendError
from edgefx.backends.tvm import runners
from edgefx.passes import FoldBatchNorm
from edgefx.tools import cli

pytest.importorskip("tvm")
from tvm.rpc.server import Server
from tvm.rpc.tracker import Tracker

_free_port = tvm_boards.free_port


@pytest.fixture(scope="module")
def host_folder(small_net, x1, tmp_path_factory):
    compiled = edgefx.compile(small_net, (x1,), passes=[FoldBatchNorm()], backend="tvm")
    return compiled.save(tmp_path_factory.mktemp("rpc") / "deploy")


@pytest.fixture(scope="module")
def loopback():
    """On 127.0.0.1: a TVM RPC server, and a tracker with a server registered under 'x86'."""
    port = _free_port()
    tracker = Tracker("127.0.0.1", port=port, port_end=port + 1, silent=True)
    port = _free_port()
    tracked = Server(
        "127.0.0.1", port=port, port_end=port + 1,
        tracker_addr=("127.0.0.1", tracker.port), key="x86", silent=True,
    )  # fmt: skip
    port = _free_port()
    server = Server("127.0.0.1", port=port, port_end=port + 1, silent=True)
    yield tracker, server
    for process in (server, tracked, tracker):
        process.terminate()


def test_rpc_round_trip_matches_a_local_run(host_folder, loopback, tmp_path):
    tracker, server = loopback
    inputs = runners.inputs_for(host_folder, batch=3)
    here = runners.run_local(host_folder, inputs)
    direct = runners.run_rpc(host_folder, inputs, f"127.0.0.1:{server.port}")
    assert np.array_equal(direct[0], here[0])
    # through the tracker, as a board farm is used (the server may need a moment to register)
    via_tracker = runners.run_rpc(host_folder, inputs, f"127.0.0.1:{tracker.port}", key="x86")
    assert np.array_equal(via_tracker[0], here[0])


def test_cli_run_over_rpc(host_folder, loopback, tmp_path, capsys):
    _, server = loopback
    np.save(tmp_path / "x.npy", runners.inputs_for(host_folder, batch=2)[0])
    args = ["run", str(host_folder), "--rpc", f"127.0.0.1:{server.port}",
            "--inputs", str(tmp_path / "x.npy"), "--out", str(tmp_path / "y.npz")]  # fmt: skip
    assert cli.main(args) == 0
    with np.load(tmp_path / "y.npz") as saved:
        local = runners.run_local(host_folder, [np.load(tmp_path / "x.npy")])
        assert np.array_equal(saved["arr_0"], local[0])
    assert "float32[2, 4]" in capsys.readouterr().out


def test_unreachable_rpc_server_is_a_clear_error(host_folder):
    with pytest.raises(BackendError, match="cannot reach the TVM RPC server") as info:
        runners.run_rpc(host_folder, runners.inputs_for(host_folder), f"127.0.0.1:{_free_port()}")
    assert "rpc_server" in info.value.hint
    with pytest.raises(BackendError, match="host:port"):
        runners.run_rpc(host_folder, runners.inputs_for(host_folder), "nowhere")


# ----------------------------------------------------------------------------- tuning over RPC
BOARD_KEY = "x86-board"


@pytest.fixture(scope="module")
def board(loopback, tmp_path_factory):
    """`python -m tvm.exec.rpc_server --tracker ... --key x86-board`, as on a board."""
    tracker, _ = loopback
    log = tmp_path_factory.mktemp("board") / "rpc_server.log"
    command = tvm_boards.host_server_command(f"127.0.0.1:{tracker.port}", BOARD_KEY)
    with tvm_boards.board(command, tracker.port, BOARD_KEY, log) as log:
        yield log


@pytest.mark.slow
def test_tuning_times_every_candidate_on_the_board(loopback, board, tmp_path):
    tracker, _ = loopback
    torch.manual_seed(0)
    model, x = tvm_boards.TinyConv().eval(), torch.randn(1, 3, 8, 8)
    rpc = {"tracker": f"127.0.0.1:{tracker.port}", "key": BOARD_KEY}
    options = {"tune_trials": 4, "work_dir": tmp_path / "db", "progress": False, "rpc": rpc}
    loads_before = tvm_boards.loads(board)
    tuned = edgefx.compile(model, (x,), backend="tvm", dynamic_batch=False,
                           backend_options=options)  # fmt: skip
    tuning = tuned.artifact.build_info["tuning"]
    assert tuning["measured_on"] == f"RPC tracker 127.0.0.1:{tracker.port}, key {BOARD_KEY!r}"
    assert tuning["tasks_tuned"] == 1 and not tuning["tasks_failed"]  # conv + bias + relu
    # every candidate MetaSchedule timed was loaded by the board's server
    timed = tvm_boards.timed_records(tmp_path / "db")
    assert 1 <= len(timed) <= tvm_boards.loads(board) - loads_before, board.read_text()[-2000:]
    # the tuned library computes what the untuned one does
    untuned = edgefx.compile(model, (x,), backend="tvm", dynamic_batch=False)
    assert tuned.report.backend_check.relative <= 1e-4
    assert torch.allclose(tuned(x), untuned(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("rpc", "message"),
    [
        ("127.0.0.1:9190", "the rpc option is a dict"),
        ({"tracker": "127.0.0.1", "key": "rpi4"}, "'tracker' takes host:port"),
        ({"tracker": "127.0.0.1:9190"}, "'key' names the device kind"),
        ({"tracker": "127.0.0.1:9190", "key": "rpi4", "port": 1}, "unknown rpc option.*'port'"),
        ({"tracker": "127.0.0.1:9190", "key": "rpi4", "timeout_s": 0}, "'timeout_s'"),
    ],
)
def test_bad_rpc_options_are_refused(small_program, rpc, message):
    with pytest.raises(BackendError, match=message):
        edgefx.compile(small_program, backend="tvm", dynamic_batch=False,
                       backend_options={"tune_trials": 4, "rpc": rpc})  # fmt: skip


def test_rpc_without_tuning_is_refused(small_program):
    rpc = {"tracker": "127.0.0.1:9190", "key": "rpi4"}
    with pytest.raises(BackendError, match="needs tune_trials") as info:
        edgefx.compile(small_program, backend="tvm", backend_options={"rpc": rpc})
    assert "edgefx run DIR --rpc" in info.value.hint


def test_tuning_over_rpc_needs_a_tracker_and_a_registered_board(small_net, x1, loopback, tmp_path):
    tracker, _ = loopback
    options = {"tune_trials": 4, "work_dir": tmp_path, "progress": False}
    compile_with = lambda rpc: edgefx.compile(  # noqa: E731
        small_net, (x1,), backend="tvm", dynamic_batch=False,
        backend_options={**options, "rpc": rpc},
    )  # fmt: skip
    with pytest.raises(BackendError, match="cannot reach the TVM RPC tracker") as info:
        compile_with({"tracker": f"127.0.0.1:{_free_port()}", "key": "rpi4"})
    assert "tvm.exec.rpc_server --tracker" in info.value.hint
    with pytest.raises(BackendError, match="no RPC server is registered under the key 'rpi4'"):
        compile_with({"tracker": f"127.0.0.1:{tracker.port}", "key": "rpi4"})
    assert not list(tmp_path.iterdir())  # refused before any tuning


def test_cli_tunes_through_the_tracker_it_is_given(small_net, x1, loopback, tmp_path, capsys):
    from edgefx.frontend import capture

    tracker, _ = loopback
    path = capture(small_net, (x1,), dynamic_batch=False).save(tmp_path / "small.pt2")
    args = ["compile", str(path), "--backend", "tvm", "--static-batch", "--tune-trials", "4",
            "--tune-rpc", f"127.0.0.1:{tracker.port}", "--tune-rpc-key", "nobody",
            "--tune-dir", str(tmp_path / "db"), "-o", str(tmp_path / "out")]  # fmt: skip
    assert cli.main(args) != 0
    assert "no RPC server is registered under the key 'nobody'" in capsys.readouterr().err
