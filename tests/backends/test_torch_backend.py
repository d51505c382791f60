"""The torch backend: runs the Program eagerly; save/load round trip; registry errors."""

from __future__ import annotations

import json

import pytest
import torch

import edgefx
from edgefx import ArtifactError, BackendError
from edgefx.backends import BACKENDS, artifact_class, get_backend
from edgefx.backends.torch import PROGRAM_FILE, TorchArtifact, TorchBackend


@pytest.fixture(scope="module")
def torch_artifact(small_folded):
    program, _ = small_folded
    return get_backend("torch").build(program)


def test_registry_lists_the_backends():
    assert {"torch", "onnx"} <= set(BACKENDS)
    assert artifact_class("torch") is TorchArtifact
    assert isinstance(get_backend("torch"), TorchBackend)
    assert isinstance(get_backend("torch", "cpu"), TorchBackend)


def test_artifact_runs_the_program(torch_artifact, small_folded, x1, x4):
    program, _ = small_folded
    assert torch_artifact.backend == "torch"
    for x in (x1, x4):
        (out,) = torch_artifact.run([x])
        torch.testing.assert_close(out, program(x), rtol=0, atol=0)
        assert not out.requires_grad


def test_save_load_round_trip(torch_artifact, small_folded, tmp_path, x4):
    program, _ = small_folded
    entry = torch_artifact.save(tmp_path)
    assert entry == {"artifact": PROGRAM_FILE}
    assert (tmp_path / PROGRAM_FILE).is_file()
    loaded = TorchArtifact.load(tmp_path, json.loads(json.dumps(entry)))
    (out,) = loaded.run([x4])
    torch.testing.assert_close(out, program(x4), rtol=0, atol=0)
    assert loaded.program.history == program.history


def test_load_without_the_program_file(tmp_path):
    with pytest.raises(ArtifactError, match="no such program file"):
        TorchArtifact.load(tmp_path, {"artifact": PROGRAM_FILE})


def test_compile_save_load_with_the_torch_backend(small_net, helpers, tmp_path, x1, x4):
    compiled = edgefx.compile(small_net, (x1,), backend="torch")
    assert compiled.backend == "torch"
    assert compiled.report.backend_check.max_abs == 0.0
    compiled.save(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["backend"] == "torch"
    assert manifest["artifact"] == manifest["program"] == PROGRAM_FILE
    loaded = edgefx.load(tmp_path / "out")
    assert loaded.backend == "torch"
    for x in (x1, x4):
        torch.testing.assert_close(loaded(x), helpers.eager(small_net, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["tensorrt", "ONNX", "", None, 3], ids=repr)
def test_unknown_backend_lists_the_choices(name):
    with pytest.raises(BackendError) as info:
        get_backend(name)
    assert "unknown backend" in info.value.message
    assert "torch" in info.value.hint and "onnx" in info.value.hint


def test_torch_backend_refuses_targets_and_options():
    with pytest.raises(BackendError, match="rpi4") as info:
        get_backend("torch", "rpi4")
    assert "tvm" in info.value.hint
    with pytest.raises(BackendError, match="takes no options"):
        get_backend("torch", threads=4)
