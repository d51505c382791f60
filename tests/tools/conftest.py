"""Programs the inspection tests share: DeiT-Tiny, and real ChannelPrune / PotQuantize /
TokenGate results on resnet18 / mobilenet_v2 / DeiT-Tiny (from the session fixtures in
tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from edgefx.frontend import capture
from edgefx.passes import ChannelPrune, PassManager, PotQuantize, TokenGate

sys.path.insert(0, str(Path(__file__).parent))  # cli_models, as the CLI tests load it


@pytest.fixture(scope="session")
def deit_tiny():
    pytest.importorskip("timm")
    from cli_models import deit_tiny as make

    model, inputs = make()
    return capture(model, inputs, dynamic_batch=False, name="deit_tiny")


@pytest.fixture(scope="session")
def resnet18_pruned(resnet18):
    """(before, after) of a real ChannelPrune to half the MACs on resnet18."""
    _, _, program = resnet18
    pruned, _ = PassManager([ChannelPrune(macs=0.5)]).run(program)
    return program, pruned


@pytest.fixture(scope="session")
def mobilenet_v2_quantized(mobilenet_v2_folded):
    """(float, quantized) of a real 4-bit PotQuantize on BN-folded mobilenet_v2."""
    folded, _ = mobilenet_v2_folded
    gen = torch.Generator().manual_seed(7)
    calib = [torch.randn(1, 3, 32, 32, generator=gen) for _ in range(2)]  # static batch 1
    quantized, _ = PassManager([PotQuantize(calib, weight_bits=4, search="minmax")]).run(folded)
    return folded, quantized


@pytest.fixture(scope="session")
def deit_tiny_gated(deit_tiny):
    """(before, after) of a real top-k TokenGate (keep half the patch tokens at blocks 3, 6
    and 9, the default gates of 12 blocks) on DeiT-Tiny: 4 patch tokens + CLS."""
    gated, _ = PassManager([TokenGate(keep=0.5)]).run(deit_tiny)
    return deit_tiny, gated
