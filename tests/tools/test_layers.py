"""Layers: one row per source module, totals equal to the cost analysis, in every format."""

import json

import pytest

from edgefx.tools.cli import main
from edgefx.tools.layers import TOP, onnx_graph, program_graph
from edgefx.tools.target import Target


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(params=["resnet18", "mobilenet_v2", "deit_tiny"])
def program(request):
    value = request.getfixturevalue(request.param)
    return value if not isinstance(value, tuple) else value[2]


def test_layers_fold_ops_and_keep_the_cost_analysis_totals(program):
    cost = program.cost()
    graph = program_graph(program, cost)
    assert graph.total_macs == cost.total_macs and graph.total_params == cost.total_params
    assert sum(layer.macs for layer in graph.layers.values()) == cost.total_macs
    # no parameter is shared between modules in these models: layer params add up too
    assert sum(layer.params for layer in graph.layers.values()) == cost.total_params
    # every node is in exactly one layer; plumbing is folded in but never shown as an op
    nodes = [a for layer in graph.layers.values() for a in layer.atoms]
    assert sorted(nodes) == sorted(c.node for c in cost.nodes)
    ops = {op for layer in graph.layers.values() for op in layer.ops}
    assert not ops & {"getitem", "sym_size"}
    assert len(graph.layers) < len(cost.nodes)


def test_resnet18_layer_rows(resnet18):
    graph = program_graph(resnet18[2])
    conv = graph.layers["layer1.0.conv1"]
    assert (conv.kind, conv.ops, conv.output_shape) == ("Conv2d", ["conv2d"], (1, 64, 8, 8))
    assert conv.macs == 64 * 8 * 8 * 64 * 9 and conv.params == 64 * 64 * 9
    assert conv.weight_dtype == "float32" and conv.channels == 64
    bn = graph.layers["layer1.0.bn1"]
    assert bn.ops == ["batch_norm"] and bn.params == 2 * 64  # getitem folded in, hidden
    assert graph.layers["layer1.0.relu"].calls == 2  # shared relu: one row, two boxes
    assert graph.layers["layer1.0"].ops == ["add"]  # the block's own residual add
    assert graph.layers[TOP].ops == ["reshape"]  # torch.flatten in ResNet.forward


def test_deit_attention_is_one_row_with_its_ops(deit_tiny):
    graph = program_graph(deit_tiny)
    attn = graph.layers["blocks.0.attn"]
    assert attn.kind == "Attention" and "sdpa" in attn.ops
    assert attn.output_shape == (1, 5, 192) and attn.tokens == 5 and attn.channels == 192
    assert graph.layers["blocks.0.attn.qkv"].macs == 5 * 192 * 3 * 192


@pytest.mark.parametrize(
    "model",
    [
        "resnet18",
        pytest.param("mobilenet_v2", marks=pytest.mark.slow),
        pytest.param("deit_tiny", marks=pytest.mark.slow),
    ],
)
def test_inspect_json_totals_equal_the_cost_analysis(capsys, model, request):
    static = [] if model == "resnet18" else ["--static-batch"]  # as the fixtures capture
    code, out, _ = run(capsys, "inspect", f"cli_models:{model}", *static, "--json")
    assert code == 0
    data = json.loads(out)
    # the session fixture captured the same architecture at the same input size
    fixture = request.getfixturevalue(model)
    cost = (fixture[2] if isinstance(fixture, tuple) else fixture).cost()
    assert data["total_macs"] == cost.total_macs and data["total_params"] == cost.total_params
    assert sum(row["macs"] for row in data["layers"]) == cost.total_macs
    assert sum(row["params"] for row in data["layers"]) == cost.total_params
    nodes = [n for row in data["layers"] for n in row["nodes"]]
    assert len(nodes) == len(set(nodes)) == len(cost.nodes)  # each node in one layer


def test_inspect_shows_layers_by_default_nodes_on_request(capsys):
    code, out, _ = run(capsys, "inspect", "cli_models:tiny", "--top", "2")
    assert code == 0 and "one row per source module" in out
    # --top N: the N costliest layers, the rest counted
    assert out.index("features.3") < out.index("features.0") and "head" not in out
    assert "6 more layers" in out
    code, out, _ = run(capsys, "inspect", "cli_models:tiny", "--nodes")
    assert code == 0 and "Cost per node" in out and "getitem" in out


def test_onnx_layers_match_the_program_they_were_lowered_from(resnet18_onnx, resnet18_folded):
    program, _ = resnet18_folded
    from_program = program_graph(program)
    from_onnx = onnx_graph(resnet18_onnx.artifact.model, resnet18_onnx.artifact.node_map)
    assert from_onnx.total_macs == from_program.total_macs
    assert from_onnx.total_params == from_program.total_params
    for name in ("conv1", "layer2.0.downsample.0", "layer4.1.conv2", "fc"):
        a, b = from_program.layers[name], from_onnx.layers[name]
        assert (a.macs, a.params, a.output_shape) == (b.macs, b.params, b.output_shape), name


def test_inspect_onnx_file_and_compiled_folder(capsys, tmp_path, resnet18_onnx):
    folder = resnet18_onnx.save(tmp_path / "out")
    code, out, _ = run(capsys, "inspect", str(folder / "model.onnx"), "--json")
    assert code == 0
    onnx_rows = json.loads(out)
    assert onnx_rows["source"] == "onnx"
    assert onnx_rows["total_macs"] == resnet18_onnx.report.final.macs
    code, out, _ = run(capsys, "inspect", str(folder), "--top", "3")
    assert code == 0 and "Layers of" in out and "layer" in out
    target = Target("t", onnx_path=folder / "model.onnx")
    assert target.graph().source == "onnx"


def test_a_compiled_folder_of_another_backend_is_inspected_through_its_program(capsys, tmp_path):
    """A backend whose artifact edgefx cannot read here (a TVM library) still has the
    program.pt2 that Compiled.save writes beside it; inspect reads that."""
    from cli_models import tiny

    from edgefx.frontend import capture

    folder = tmp_path / "tvm_out"
    folder.mkdir()
    program = capture(*tiny())
    program.save(folder / "program.pt2")
    manifest = {"backend": "tvm", "artifact": "model.so", "program": "program.pt2"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code, out, _ = run(capsys, "inspect", str(folder), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["source"] == "program" and data["total_macs"] == program.cost().total_macs
    (folder / "program.pt2").unlink()
    code, _, err = run(capsys, "inspect", str(folder))
    assert code == 2 and "no program.pt2 or ONNX model" in err


def test_onnx_from_elsewhere_one_row_per_node_with_hand_computed_macs():
    import numpy as np
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.zeros(108).tolist())
    fc = helper.make_tensor("fc", TensorProto.FLOAT, [144, 10], np.zeros(1440).tolist())
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 144])
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["y"], name="Conv_0"),
            helper.make_node("Relu", ["y"], ["r"], name="Relu_1"),
            helper.make_node("Reshape", ["r", "shape"], ["f"], name="Reshape_2"),
            helper.make_node("MatMul", ["f", "fc"], ["z"], name="MatMul_3"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [weight, fc, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    layers = onnx_graph(model).layers
    assert list(layers) == ["Conv_0", "Relu_1", "Reshape_2", "MatMul_3"]
    assert layers["Conv_0"].macs == 4 * 6 * 6 * (3 * 3 * 3)  # batch set to 1
    assert layers["MatMul_3"].macs == 10 * 144
    assert layers["Conv_0"].params == 108 and layers["MatMul_3"].params == 1440
    assert layers["Reshape_2"].params == 0  # a shape is not a parameter
