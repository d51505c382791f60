"""The Model Explorer node-data export, checked against Google Model Explorer's own code:
its GraphNodeData classes accept our file, its ONNX adapter (model-explorer-onnx) names the
nodes as our keys do, and (slow) its web app, served by its own server in headless chromium,
colours the ONNX graph with our data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from edgefx.tools.cli import main
from edgefx.tools.model_explorer import macs_per_node
from edgefx.tools.profile import onnx_node_times, profile_onnx
from edgefx.tools.target import load_target

node_data_builder = pytest.importorskip("model_explorer.node_data_builder")
onnx_adapter = pytest.importorskip("model_explorer_onnx.main")


@pytest.fixture(scope="module")
def resnet18_folder(tmp_path_factory, resnet18_onnx):
    return resnet18_onnx.save(tmp_path_factory.mktemp("me") / "out")


def adapter_graph(path: Path):
    """The main graph Model Explorer's ONNX adapter builds from ``path``."""
    graphs = onnx_adapter.ONNXAdapter().convert(str(path), {})["graphs"]
    return graphs[0]


def as_graph_node_data(data: dict):
    """``data`` read into Model Explorer's GraphNodeData (unknown keys or wrong types
    refused), and written back as its builder writes it."""
    import dacite

    parsed = dacite.from_dict(node_data_builder.GraphNodeData, data, dacite.Config(strict=True))
    return parsed, json.loads(parsed.to_json_string())


def test_macs_node_data_is_model_explorers_and_keyed_by_its_node_ids(tmp_path, resnet18_folder):
    path = tmp_path / "macs.json"
    model_path = resnet18_folder / "model.onnx"
    assert main(["inspect", str(model_path), "--model-explorer", str(path)]) == 0
    data = json.loads(path.read_text())
    parsed, written = as_graph_node_data(data)
    assert all(written[key] == value for key, value in data.items())
    assert isinstance(parsed.results["layer1.0.conv1/conv2d_1"], node_data_builder.NodeDataResult)
    graph = adapter_graph(model_path)
    ids = {node.id: node for node in graph.nodes}
    # every node with MACs, keyed by the id Model Explorer gives it
    model = onnx.load(model_path)
    node_map = json.loads((resnet18_folder / "onnx_nodes.json").read_text())
    assert set(data["results"]) == set(macs_per_node(model, node_map)) and data["results"]
    assert set(data["results"]) <= set(ids)
    # Model Explorer reads a key as an output's tensor_name where a node declares one, else
    # as a node id; its ONNX adapter declares none, so the keys must be node ids
    declared = {
        attr.key for node in graph.nodes for meta in node.outputsMetadata for attr in meta.attrs
    }
    assert "tensor_name" not in declared
    # the ONNX backend's "<module>/" prefix is the adapter's namespace: nodes group by module
    assert ids["layer1.0.conv1/conv2d_1"].namespace.endswith("/layer1.0.conv1")


def test_latency_node_data_keeps_every_mapped_kernel(resnet18_folder):
    """onnxruntime names some kernels after nodes it rebuilt (``conv2d_1_nchwc``), which are
    not in the model file Model Explorer draws: their time goes to the node they came from."""
    target = load_target(str(resnet18_folder))
    report = profile_onnx(target, runs=2, warmup=1)
    times = onnx_node_times(report, target)
    assert set(times) <= {node.id for node in adapter_graph(target.onnx_path).nodes}
    mapped = sum(n.ms for n in report.nodes if n.fx_node)
    assert sum(times.values()) == pytest.approx(mapped)
    convs = [n.name for n in target.onnx_model.graph.node if n.op_type == "Conv"]
    assert all(times.get(name, 0) > 0 for name in convs)


@pytest.mark.slow
def test_model_explorer_web_app_colours_our_onnx_graph(tmp_path, resnet18_folder):
    """Model Explorer's own server and web app (offline, headless chromium): it loads the
    ONNX file with our MACs as node data, shows their sum, and colours the nodes."""
    from browser import chrome
    from selenium.webdriver.common.by import By

    portpicker = pytest.importorskip("portpicker")
    data_path = tmp_path / "macs.json"
    model_path = resnet18_folder / "model.onnx"
    assert main(["inspect", str(model_path), "--model-explorer", str(data_path)]) == 0
    total = sum(v["value"] for v in json.loads(data_path.read_text())["results"].values())
    port = portpicker.pick_unused_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "model_explorer", str(model_path),
         "--extensions=model_explorer_onnx", f"--node_data_paths={data_path}",
         "--no_open_in_browser", "--skip_health_check", f"--port={port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = None
        deadline = time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                pytest.fail(f"Model Explorer's server exited with {server.returncode}")
            if line.startswith(f"http://localhost:{port}/"):
                url = line.strip()
        assert url, "Model Explorer's server printed no address"
        with chrome(window="1400,1000") as browser:
            browser.get(url)
            body = ""
            while "edgefx MACs" not in body and time.monotonic() < deadline:
                time.sleep(1)
                body = browser.find_element(By.TAG_NAME, "body").text
            assert "model.onnx" in body and "edgefx MACs" in body
            shown = re.search(r"\bSum\s+([0-9.e+]+)", body)
            assert shown and float(shown.group(1)) == pytest.approx(total)
            browser.find_element(By.CSS_SELECTOR, ".mat-icon-container.expand-all").click()
            browser.find_element(By.CSS_SELECTOR, ".mat-icon-container.zoom-fit").click()
            time.sleep(3)
            png = Path(os.environ.get("EDGEFX_SCREENSHOT_DIR", tmp_path)) / "model_explorer.png"
            assert browser.save_screenshot(str(png)) and png.stat().st_size > 10_000
    finally:
        server.terminate()
        server.wait(timeout=30)
