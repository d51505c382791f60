"""aarch64 libraries run on an emulated board (qemu-user + an arm64 Python with TVM's runtime,
prepared once and cached by edgefx.backends.tvm.emulation) and match the Program: float models
to 1e-4, QDQToShift integer programs element for element."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import tvm_boards
from prune_models import randomize
from shift_models import (
    Tiny,
    assert_equal_integers,
    fresh,
    integer_outputs,
    integer_regions,
    quantized,
    real_data_benchmark,
)

import edgefx
from edgefx.backends.tvm import emulation, runners
from edgefx.frontend import capture
from edgefx.passes import PotQuantize
from edgefx.tools import cli

pytest.importorskip("tvm")
pytestmark = pytest.mark.arm

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def emulator():
    """The cached arm64 Python; prepared here when missing (apt-get + pip download: needs root,
    as in CI, or a cache prepared by `python -m edgefx.backends.tvm.emulation prepare`)."""
    if not emulation.is_ready() and os.geteuid() != 0:
        pytest.skip(
            "the aarch64 emulator is not prepared and preparing it needs root (apt-get): "
            "run `sudo python -m edgefx.backends.tvm.emulation prepare` once"
        )
    return emulation.prepare()


def rel_err(actual: np.ndarray, reference: torch.Tensor) -> float:
    reference = reference.double().numpy()
    return float(np.abs(actual.astype(np.float64) - reference).max() / np.abs(reference).max())


def test_rpi4_library_runs_under_emulation_and_matches(emulator, small_net, x1, x4, tmp_path):
    compiled = edgefx.compile(small_net, (x1,), backend="tvm", target="rpi4")
    folder = compiled.save(tmp_path / "rpi4")
    (got,) = runners.run_emulated(folder, [x4.numpy()])  # batch 4: dynamic on the board too
    assert rel_err(got, compiled.program(x4)) <= REL_TOL


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rpi5", "aarch64"])
def test_resnet18_for_arm_boards_matches_under_emulation(emulator, resnet18_folded, target,
                                                         tmp_path):  # fmt: skip
    folded, _ = resnet18_folded
    compiled = edgefx.compile(folded, backend="tvm", target=target)
    folder = compiled.save(tmp_path / target)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    (got,) = runners.run_emulated(folder, [x.numpy()])
    assert rel_err(got, folded(x)) <= REL_TOL
    assert cli.main(["run", str(folder), "--emulate"]) == 0


def _float_model(name: str) -> tuple[edgefx.Program, torch.Tensor]:
    """(Program, a batch-2 input) of the issue's float models, random weights."""
    import torchvision

    from edgefx.frontend.zoo import resolve_model
    from edgefx.passes import ChannelPrune, FoldBatchNorm, PassManager

    torch.manual_seed(0)
    if name == "pruned_resnet50":
        model, size = torchvision.models.resnet50().eval(), 64
        passes = [ChannelPrune(macs=0.5), FoldBatchNorm()]
    else:
        size = 224 if name == "deit_small" else 64
        zoo_name = "timm:deit_small_patch16_224" if name == "deit_small" else name
        model = resolve_model(zoo_name, (1, 3, size, size)).model
        passes = [FoldBatchNorm()]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(11))
    program, _ = PassManager(passes).run(capture(model, (x,)))
    return program, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(12))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "deit_small", "pruned_resnet50"])
def test_float_models_for_rpi4_match_under_emulation(emulator, name, tmp_path):
    program, x = _float_model(name)
    compiled = edgefx.compile(program, backend="tvm", target="rpi4", progress=False)
    (got,) = runners.run_emulated(compiled.save(tmp_path / name), [x.numpy()])
    assert rel_err(got, program(x)) <= REL_TOL


@pytest.mark.slow
def test_pot_quantized_resnet18_gives_the_onnx_backends_numbers_on_aarch64(
    emulator, resnet18_folded, tmp_path
):
    """Integer codes times powers of two sum exactly in float32: the aarch64 library gives the
    ONNX backend's numbers bit for bit, as the x86 one does."""
    folded, _ = resnet18_folded
    gen = torch.Generator().manual_seed(3)
    calib = [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(2)]
    quantized = PotQuantize(calib, search="mse", weight_bits=4)(folded).program
    on_onnx = edgefx.compile(quantized, backend="onnx", progress=False)
    on_rpi4 = edgefx.compile(quantized, backend="tvm", target="rpi4", progress=False)
    x = torch.randn(3, 3, 32, 32, generator=gen)
    (got,) = runners.run_emulated(on_rpi4.save(tmp_path / "pot"), [x.numpy()])
    want = on_onnx(x).numpy()
    assert np.unique(want).size > 10  # real logits, not a constant
    assert got.dtype == want.dtype and np.array_equal(got, want)


@pytest.mark.slow
def test_tuning_for_rpi4_times_the_candidates_on_the_emulated_board(emulator, tmp_path):
    """TVM's RPC server on the emulated arm64 Python, registered with a tracker here, as a Pi
    would be: MetaSchedule's aarch64 candidates (cross-linked here) are timed there."""
    from tvm.rpc.tracker import Tracker

    port, key = tvm_boards.free_port(), "emulated-rpi4"
    tracker = Tracker("127.0.0.1", port=port, port_end=port + 1, silent=True)
    address = f"127.0.0.1:{tracker.port}"
    command = emulation.rpc_server_command(address, key, port=tvm_boards.free_port())
    torch.manual_seed(0)
    model, x = tvm_boards.TinyConv().eval(), torch.randn(1, 3, 8, 8)
    rpc = {"tracker": address, "key": key, "timeout_s": 300}  # emulated: slow sessions
    options = {"tune_trials": 4, "work_dir": tmp_path / "db", "progress": False, "rpc": rpc}
    try:
        with tvm_boards.board(command, tracker.port, key, tmp_path / "server.log") as log:
            tuned = edgefx.compile(model, (x,), backend="tvm", target="rpi4",
                                   dynamic_batch=False, backend_options=options)  # fmt: skip
            timed = tvm_boards.timed_records(tmp_path / "db")
            assert 1 <= len(timed) <= tvm_boards.loads(log), log.read_text()[-2000:]
    finally:
        tracker.terminate()
    tuning = tuned.artifact.build_info["tuning"]
    assert tuning["tasks_tuned"] == 1 and not tuning["tasks_failed"]
    assert key in tuning["measured_on"]
    (got,) = runners.run_emulated(tuned.save(tmp_path / "tuned"), [x.numpy()])
    assert rel_err(got, tuned.program(x)) <= REL_TOL


def _assert_integer_codes_on_aarch64(shift: edgefx.Program, x: torch.Tensor, target: str,
                                     folder) -> None:  # fmt: skip
    """The shift Program's integer outputs (the int32 codes before the final dequantize),
    built for ``target`` and run on the emulated board, equal the integer reference's."""
    ints = integer_outputs(shift)
    compiled = edgefx.compile(ints, backend="tvm", target=target, progress=False)
    got = runners.run_emulated(compiled.save(folder), [x.numpy()])
    assert_equal_integers(ints.run_flat([x]), got, f"aarch64 ({target})")


def test_shift_program_is_bit_exact_on_aarch64(emulator, tmp_path):
    """conv_int with per-channel shifts, max pooling on codes, an aligned residual add, a
    concat, ReLU6 folded into the clamp, a sum as the average, linear_int: W8A8, rpi4."""
    _, shift, report = quantized(randomize(Tiny(), 1), 8, (8, 8))
    assert report["islands"] == [] and report["rounding"].startswith("half to even")
    _assert_integer_codes_on_aarch64(shift, fresh(8, 3), "rpi4", tmp_path / "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("bits", [(8, 8), (4, 4)], ids=["W8A8", "W4A4"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_real_data_cnns_shift_programs_are_bit_exact_on_aarch64(emulator, name, bits,
                                                                tmp_path):  # fmt: skip
    """The CNNs of benchmarks/real_data.py (10 classes, 3x32x32 input), random weights."""
    real_data = real_data_benchmark()
    model = randomize(real_data.make_model(name), 0)
    _, shift, report = quantized(model, real_data.SIZE, bits)
    assert report["islands"] == [] and report["integer_layers"] == len(report["layers"])
    x = fresh(real_data.SIZE, 2)
    _assert_integer_codes_on_aarch64(shift, x, "aarch64", tmp_path / name)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [(8, 8), (4, 4)], ids=["W8A8", "W4A4"])
def test_real_data_vit_integer_regions_are_bit_exact_on_aarch64(emulator, bits, tmp_path):
    """The ViT of benchmarks/real_data.py: its float islands (GELU, softmax, LayerNorm, the
    residual stream) are each backend's own float arithmetic, so, as on x86, the integer
    regions (every conv/linear/matmul from the codes entering it to the codes or dequantized
    accumulators leaving it) are what must be equal, element for element."""
    real_data = real_data_benchmark()
    model = real_data.make_model("vit").eval()
    _, shift, report = quantized(model, real_data.SIZE, bits)
    assert report["integer_layers"] == len(report["layers"])
    cut, inputs = integer_regions(shift, fresh(real_data.SIZE, 2))
    compiled = edgefx.compile(cut, backend="tvm", target="aarch64", progress=False)
    got = runners.run_emulated(compiled.save(tmp_path / "vit"), [t.numpy() for t in inputs])
    assert_equal_integers(cut.run_flat(inputs), got, "aarch64")


@pytest.mark.slow
def test_half_up_shift_program_is_bit_exact_on_aarch64(emulator, tmp_path):
    _, shift, report = quantized(randomize(Tiny(), 1), 8, (4, 4), rounding="half_up")
    assert report["rounding"].startswith("half up")
    _assert_integer_codes_on_aarch64(shift, fresh(8, 3), "rpi5", tmp_path / "tiny")
