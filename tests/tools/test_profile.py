"""edgefx profile (onnxruntime's profiler mapped back to FX nodes and modules) and the
Google Model Explorer node-data export."""

import json

import onnx
import pytest

from edgefx.tools.cli import main
from edgefx.tools.layers import onnx_graph
from edgefx.tools.model_explorer import macs_per_node, node_data
from edgefx.tools.profile import latency_data, profile_onnx
from edgefx.tools.render import svg_of
from edgefx.tools.target import load_target


@pytest.fixture(scope="module")
def resnet18_folder(tmp_path_factory, resnet18_onnx):
    return resnet18_onnx.save(tmp_path_factory.mktemp("r18") / "out")


def test_profile_maps_kernel_times_to_fx_nodes_and_modules(resnet18_folder):
    target = load_target(str(resnet18_folder))
    report = profile_onnx(target, runs=3, warmup=1)
    by_module = report.by_module()
    # every conv of resnet18 is measured and charged to its source module
    convs = [m for m in target.graph().layers if m.endswith(("conv1", "conv2", "downsample.0"))]
    assert convs and all(by_module.get(m, 0) > 0 for m in convs)
    fx_nodes = set(target.graph().atoms)
    # names of the Program's own nodes (a reloaded program.pt2 may rename a view or two)
    assert len(set(report.by_fx_node()) - fx_nodes) <= 2
    overlay = latency_data(target, report)
    assert set(overlay) <= fx_nodes
    assert sum(overlay.values()) == pytest.approx(sum(report.by_fx_node().values()))
    # most kernel time has an origin (onnxruntime's own layout reorders have none)
    assert report.unmapped_ms < 0.5 * report.kernel_ms
    assert report.run_ms > 0 and report.kernel_ms > 0
    svg = svg_of(target.graph(), metric="latency", data=overlay)
    assert "measured latency (ms)" in svg and "latency: " in svg


def test_cli_profile_table_json_picture_and_model_explorer(capsys, tmp_path, resnet18_folder):
    argv = ["profile", str(resnet18_folder), "--runs", "2", "--warmup", "1"]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    times = list(data["modules"].values())
    assert times == sorted(times, reverse=True)  # sorted by time
    assert data["nodes"] and {"onnx_node", "fx_node", "module", "ms"} <= set(data["nodes"][0])
    html = tmp_path / "p.html"
    latency = tmp_path / "latency.json"
    code = main([*argv, "--top", "5", "--html", str(html), "--model-explorer", str(latency)])
    assert code == 0
    out = capsys.readouterr().out
    assert "Profile of" in out and "kernels total" in out and "more" in out
    assert "measured latency" in html.read_text()
    explorer = json.loads(latency.read_text())
    model = onnx.load(resnet18_folder / "model.onnx")
    outputs = {n.output[0] for n in model.graph.node}
    assert explorer["results"] and set(explorer["results"]) <= outputs
    assert explorer["gradient"][0]["stop"] == 0 and explorer["gradient"][-1]["stop"] == 1


def test_model_explorer_macs_export(tmp_path, resnet18_folder, resnet18_onnx):
    model = onnx.load(resnet18_folder / "model.onnx")
    node_map = json.loads((resnet18_folder / "onnx_nodes.json").read_text())
    values = macs_per_node(model, node_map)
    data = node_data(model, values)
    # one entry per node with MACs, keyed by its output tensor; they sum to the model's MACs
    assert sum(v["value"] for v in data["results"].values()) == resnet18_onnx.report.final.macs
    conv = next(n for n in model.graph.node if n.name == "layer1.0.conv1/conv2d_1")
    assert (
        data["results"][conv.output[0]]["value"]
        == onnx_graph(model, node_map).atoms[conv.name].macs
    )
    out = tmp_path / "m.json"
    assert main(["inspect", str(resnet18_folder / "model.onnx"), "--model-explorer", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mobilenet_v2", "deit_tiny"])
def test_profile_and_cross_format_diff_of_more_models(capsys, tmp_path, model):
    """Compile (BatchNorm folded, as deployed), then profile the folder and diff its Program
    against its ONNX model."""
    out = str(tmp_path / "o")
    code = main(["compile", f"cli_models:{model}", "--static-batch", "-p", "fold-bn", "-o", out])
    assert code == 0
    capsys.readouterr()
    target = load_target(str(tmp_path / "o"))
    report = profile_onnx(target, runs=5, warmup=2)
    assert report.unmapped_ms < 0.5 * report.kernel_ms
    linear_or_conv = [m for m, layer in target.graph().layers.items() if layer.macs]
    measured = report.by_module()
    assert sum(1 for m in linear_or_conv if measured.get(m, 0) > 0) >= 0.8 * len(linear_or_conv)
    assert main(["diff", str(tmp_path / "o"), str(tmp_path / "o" / "model.onnx"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["macs_delta"] == 0 and data["counts"]["added"] == 0
