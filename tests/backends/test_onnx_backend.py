"""The ONNX backend: ORT agrees with the Program, "batch" is the dynamic dim, node names map
back to module paths, opsets, checker, save/load and refusals."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

import edgefx
from edgefx import ArtifactError, BackendError
from edgefx.backends import artifact_class, get_backend
from edgefx.backends.onnx import DEFAULT_OPSET, MODEL_FILE, NODE_MAP_FILE, OnnxArtifact
from edgefx.passes import FoldBatchNorm

REL_TOL = 1e-4


def dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def assert_ort_matches(compiled: edgefx.Compiled, program: edgefx.Program, *inputs) -> None:
    got = compiled.artifact.run(inputs)
    want = program.run_flat(inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        err = float((g.double() - w.double()).abs().max() / w.double().abs().max())
        assert err <= REL_TOL, err


@pytest.fixture(scope="module")
def opset28(small_net, x1) -> edgefx.Compiled:
    return edgefx.compile(
        small_net, (x1,), passes=[FoldBatchNorm()], backend="onnx", backend_options={"opset": 28}
    )


@pytest.fixture(scope="module")
def static_onnx(helpers, x1) -> tuple:
    model = helpers.make_small_net(9)
    return model, edgefx.compile(model, (x1,), backend="onnx", dynamic_batch=False)


# ----------------------------------------------------------------------------- numerics
def test_ort_equals_program(small_onnx, x1, x4):
    assert isinstance(small_onnx.artifact, OnnxArtifact)
    assert_ort_matches(small_onnx, small_onnx.program, x1)
    assert_ort_matches(small_onnx, small_onnx.program, x4)


def test_ort_equals_program_on_resnet18(resnet18, resnet18_onnx):
    _, x, _ = resnet18
    assert_ort_matches(resnet18_onnx, resnet18_onnx.program, x)
    x3 = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(30))
    assert_ort_matches(resnet18_onnx, resnet18_onnx.program, x3)


def test_artifact_outputs_are_torch_tensors(small_onnx, x4):
    (out,) = small_onnx.artifact.run([x4])
    assert isinstance(out, torch.Tensor) and out.shape == (4, 4) and out.dtype == torch.float32


# ----------------------------------------------------------------------------- the model
def test_dynamic_dim_is_named_batch(small_onnx, resnet18_onnx):
    for compiled, out_dims in ((small_onnx, ["batch", 4]), (resnet18_onnx, ["batch", 1000])):
        graph = compiled.artifact.model.graph
        assert [dims(i) for i in graph.input] == [["batch", 3, *compiled.input_specs[0].shape[2:]]]
        assert [dims(o) for o in graph.output] == [out_dims]


def test_static_batch_has_no_dynamic_dim(static_onnx, x1, x4):
    _, compiled = static_onnx
    graph = compiled.artifact.model.graph
    assert dims(graph.input[0]) == [1, 3, 8, 8]
    assert dims(graph.output[0]) == [1, 4]
    assert_ort_matches(compiled, compiled.program, x1)
    with pytest.raises(edgefx.InputError):
        compiled(x4)


def test_checker_passes(small_onnx, resnet18_onnx, opset28):
    for compiled in (small_onnx, resnet18_onnx, opset28):
        onnx.checker.check_model(compiled.artifact.model, full_check=True)


def test_default_opset_is_21(small_onnx):
    assert DEFAULT_OPSET == 21
    assert default_opset(small_onnx.artifact.model) == 21
    assert small_onnx.artifact.describe()["opset"] == 21
    assert small_onnx.report.backend_info["opset"] == 21


def test_opset_28_through_the_converter(opset28, x1, x4):
    assert default_opset(opset28.artifact.model) == 28
    assert opset28.artifact.describe() == {
        "opset": 28,
        "onnx_nodes": len(opset28.artifact.model.graph.node),
        "fuse_qdq": False,
    }
    assert_ort_matches(opset28, opset28.program, x1)
    assert_ort_matches(opset28, opset28.program, x4)
    assert dims(opset28.artifact.model.graph.input[0])[0] == "batch"


def test_folded_model_has_no_batchnorm(small_onnx, resnet18_onnx):
    for compiled in (small_onnx, resnet18_onnx):
        assert "BatchNormalization" not in {n.op_type for n in compiled.artifact.model.graph.node}


# ----------------------------------------------------------------------------- node names
def test_node_names_map_back_to_module_paths(resnet18, resnet18_onnx):
    model, _, _ = resnet18
    modules = {name for name, _ in model.named_modules()}
    nodes = resnet18_onnx.artifact.model.graph.node
    names = [n.name for n in nodes]
    assert len(set(names)) == len(names)
    assert resnet18_onnx.artifact.node_map.keys() == set(names)
    for node in nodes:
        entry = resnet18_onnx.artifact.node_map[node.name]
        assert entry["op_type"] == node.op_type
        if entry.get("module"):
            module, _, fx_node = node.name.rpartition("/")
            assert module == entry["module"] and fx_node.startswith(entry["fx_node"])
            assert module in modules, node.name
    convs = {n.name.rpartition("/")[0] for n in nodes if n.op_type == "Conv"}
    assert {"conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.downsample.0"} <= convs
    assert any(n.name.startswith("fc/") and n.op_type == "Gemm" for n in nodes)


def test_node_names_name_program_nodes(resnet18_onnx):
    program_nodes = {n.name for n in resnet18_onnx.program.graph_module.graph.nodes}
    for name, entry in resnet18_onnx.artifact.node_map.items():
        if entry.get("fx_node"):
            assert entry["fx_node"] in program_nodes, name


# ----------------------------------------------------------------------------- save / load
def test_save_and_load_the_artifact(small_onnx, tmp_path, x4):
    entry = small_onnx.artifact.save(tmp_path)
    assert entry["artifact"] == MODEL_FILE and entry["node_map"] == NODE_MAP_FILE
    assert entry["opset"] == 21
    onnx.checker.check_model(str(tmp_path / MODEL_FILE))
    assert json.loads((tmp_path / NODE_MAP_FILE).read_text()) == small_onnx.artifact.node_map
    loaded = artifact_class("onnx").load(tmp_path, entry)
    (got,) = loaded.run([x4])
    (want,) = small_onnx.artifact.run([x4])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert loaded.node_map == small_onnx.artifact.node_map


def test_load_a_missing_model_raises_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="cannot load ONNX model"):
        OnnxArtifact.load(tmp_path, {"artifact": MODEL_FILE})


def test_load_a_corrupt_model_raises_artifact_error(tmp_path):
    (tmp_path / MODEL_FILE).write_bytes(b"\x00garbage" * 20)
    with pytest.raises(ArtifactError) as info:
        OnnxArtifact.load(tmp_path, {"artifact": MODEL_FILE})
    assert len(str(info.value).splitlines()) <= 4


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("opset", [17, 99, "21", 21.0, None], ids=repr)
def test_bad_opset_is_refused(opset):
    with pytest.raises(BackendError) as info:
        get_backend("onnx", opset=opset)
    assert "opset" in info.value.message and "18" in info.value.message


def test_bad_opset_through_compile_is_refused_before_capture(small_net, helpers, x1):
    snapshot = helpers.ModelSnapshot(small_net)
    with pytest.raises(BackendError, match="opset"):
        edgefx.compile(small_net, (x1,), backend="onnx", backend_options={"opset": 5})
    snapshot.assert_unchanged()


def test_onnx_backend_refuses_device_targets_and_unknown_options():
    with pytest.raises(BackendError, match="rpi4") as info:
        get_backend("onnx", "rpi4")
    assert "tvm" in info.value.hint
    with pytest.raises(BackendError, match="bad option"):
        get_backend("onnx", providers=["CUDAExecutionProvider"])


class QrHead(torch.nn.Module):
    """A QR decomposition: torch.onnx has no lowering for ``aten.linalg_qr``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.qr(x)[0]


def test_export_failure_names_root_cause_node_and_op():
    with pytest.raises(BackendError) as info:
        edgefx.compile(QrHead(), (torch.randn(1, 4, 4),), progress=False)
    error = info.value
    assert "No ONNX function found" in error.message and "\x1b[" not in str(error)
    assert error.op == "aten.linalg_qr.default"
    assert error.node and "linalg_qr" in error.node
    assert len(str(error).splitlines()) <= 5
