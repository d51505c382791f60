"""aarch64 libraries run on an emulated board (qemu-user + an arm64 Python with TVM's runtime,
prepared once and cached by edgefx.backends.tvm.emulation) and match the Program."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import edgefx
from edgefx.backends.tvm import emulation, runners
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
