"""`edgefx run DIR --rpc host:port`: a deploy folder's library uploaded to TVM's own RPC server
(started on loopback only), directly and through TVM's RPC tracker, runs and gives the same
outputs as running it here."""

from __future__ import annotations

import socket

import numpy as np
import pytest

import edgefx
from edgefx import BackendError
from edgefx.backends.tvm import runners
from edgefx.passes import FoldBatchNorm
from edgefx.tools import cli

pytest.importorskip("tvm")
from tvm.rpc.server import Server
from tvm.rpc.tracker import Tracker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
