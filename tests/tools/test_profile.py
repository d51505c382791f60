"""edgefx profile (onnxruntime's profiler, and TVM's VM instrument, mapped back to FX nodes
and modules) and the Google Model Explorer node-data export."""

import json

import onnx
import pytest

import edgefx
from edgefx.tools.cli import main
from edgefx.tools.layers import onnx_graph
from edgefx.tools.model_explorer import macs_per_node, node_data
from edgefx.tools.profile import latency_data, profile_onnx, profile_tvm
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
    assert data["nodes"] and {"kernel", "fx_node", "module", "ms", "mapped_by"} <= set(
        data["nodes"][0]
    )
    html = tmp_path / "p.html"
    latency = tmp_path / "latency.json"
    code = main([*argv, "--top", "5", "--html", str(html), "--model-explorer", str(latency)])
    assert code == 0
    out = capsys.readouterr().out
    assert "Profile of" in out and "kernels total" in out and "more" in out
    assert "measured latency" in html.read_text()
    explorer = json.loads(latency.read_text())
    model = onnx.load(resnet18_folder / "model.onnx")
    names = {n.name for n in model.graph.node}  # Model Explorer's node ids
    assert explorer["results"] and set(explorer["results"]) <= names
    assert explorer["name"] == "edgefx latency (ms)"
    assert explorer["gradient"][0]["stop"] == 0 and explorer["gradient"][-1]["stop"] == 1


def test_model_explorer_macs_export(tmp_path, resnet18_folder, resnet18_onnx):
    model = onnx.load(resnet18_folder / "model.onnx")
    node_map = json.loads((resnet18_folder / "onnx_nodes.json").read_text())
    values = macs_per_node(model, node_map)
    data = node_data(model, values, name="edgefx MACs")
    # one entry per node with MACs, keyed by its name; they sum to the model's MACs
    assert sum(v["value"] for v in data["results"].values()) == resnet18_onnx.report.final.macs
    conv = "layer1.0.conv1/conv2d_1"
    assert data["results"][conv]["value"] == onnx_graph(model, node_map).atoms[conv].macs
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


# ----------------------------------------------------------------------------------- TVM
@pytest.fixture(scope="module")
def small_tvm_folder(tmp_path_factory, small_program):
    """SmallNet for this host's CPU: BatchNorm left in (TVM lowers it to kernels of its own),
    dynamic batch (the kernels then take the batch as an argument)."""
    pytest.importorskip("tvm")
    compiled = edgefx.compile(small_program, backend="tvm")
    return compiled.save(tmp_path_factory.mktemp("tvm") / "small")


def fused_tvm_folder(program, folder):
    """``program`` built as a tuned build is (Relax's ``zero`` pipeline: legalize, fuse ops
    into kernels such as fused_conv2d_add_relu), without the tuning, and saved."""
    import tvm
    from tvm import relax

    from edgefx.backends.tvm import TvmArtifact
    from edgefx.backends.tvm.importer import to_relax
    from edgefx.backends.tvm.targets import resolve_target

    target = resolve_target(None)
    with target.tvm_target:
        mod = relax.get_pipeline("zero")(to_relax(program))
    artifact = TvmArtifact(target.to_dict(), executable=tvm.compile(mod, target=target.tvm_target))
    compiled = edgefx.Compiled(
        artifact,
        input_specs=program.input_specs,
        output_specs=program.output_specs,
        out_spec=program.out_spec,
        report={},
        program=program,
    )
    return compiled.save(folder)


def test_tvm_profile_charges_each_kernel_call_to_the_node_it_computed(small_tvm_folder):
    target = load_target(str(small_tvm_folder))
    report = profile_tvm(target, runs=3, warmup=1, batch=2)
    graph = target.graph()
    assert report.runtime == "TVM Relax VM" and report.inputs == {"x": [2, 3, 8, 8]}
    assert report.run_ms > 0 and report.kernel_ms > 0 and all(n.ms >= 0 for n in report.nodes)
    assert [n.call for n in sorted(report.nodes, key=lambda n: n.call)] == list(
        range(len(report.nodes))
    )
    # the mapping agrees with what the kernels are: TVM's conv kernels computed the two convs
    # in order, its batch_norm kernels the BatchNorms, and linear's pieces (TVM splits it into
    # transpose, matmul and add) were all charged to fc
    by_call = sorted(report.nodes, key=lambda n: n.call)
    conv_kernels = [n for n in by_call if n.kernel.startswith("conv2d")]
    assert [n.module for n in conv_kernels] == ["conv1", "conv2"]
    assert all(graph.atoms[n.fx_node].op == "conv2d" for n in conv_kernels)
    assert [n.module for n in by_call if n.kernel.startswith("batch_norm")] == ["bn1", "bn2"]
    assert {n.module for n in by_call if n.kernel.startswith(("matmul", "transpose"))} == {"fc"}
    assert any(n.mapped_by.startswith("consumer") for n in by_call if n.module == "fc")
    # what is left unmapped is TVM's own work (the shape function of the dynamic batch)
    unmapped = [n.kernel for n in by_call if not n.fx_node]
    assert len(unmapped) <= 1 and not any("conv" in k or "matmul" in k for k in unmapped)
    assert report.unmapped_ms == pytest.approx(sum(n.ms for n in by_call if not n.fx_node))
    assert "TVM kernels carry op names" in report.notes[0]
    # the same module table and overlay as the ONNX profile
    assert set(report.by_module()) >= {"conv1", "conv2", "bn1", "bn2", "fc"}
    overlay = latency_data(target, report)
    assert set(overlay) <= set(graph.atoms)
    assert sum(overlay.values()) == pytest.approx(sum(report.by_fx_node().values()))
    svg = svg_of(graph, metric="latency", data=overlay)
    assert "measured latency (ms)" in svg and "latency: " in svg


def test_tvm_profile_of_fused_kernels_charges_the_node_they_start_from(
    tmp_path, small_program, small_folded
):
    """A fused kernel computes a region of nodes; it is charged to the costliest (the conv
    of conv -> ReLU) or, with no MACs in it, to the first (the BatchNorm of BatchNorm ->
    ReLU), as onnxruntime's fused kernels are."""
    pytest.importorskip("tvm")
    for program, name in ((small_program, "bn"), (small_folded[0], "folded")):
        target = load_target(str(fused_tvm_folder(program, tmp_path / name)))
        report = profile_tvm(target, runs=2, warmup=0)
        fused = {n.kernel: n for n in report.nodes if n.kernel.startswith("fused_")}
        assert fused  # the zero pipeline fused ops into kernels
        if name == "bn":  # conv (+ bias) | BatchNorm + ReLU
            bn_relu = sorted((n for n in report.nodes if "batch_norm_relu" in n.kernel),
                             key=lambda n: n.call)  # fmt: skip
            assert [n.module for n in bn_relu] == ["bn1", "bn2"]
            assert all(n.mapped_by == "output, 3 nodes" for n in bn_relu)  # bn, getitem, relu
        else:  # conv + bias + ReLU as one kernel
            conv_relu = [n for k, n in fused.items() if "conv2d" in k and k.endswith("relu")]
            assert sorted(n.module for n in conv_relu) == ["conv1", "conv2"]
            assert all(n.mapped_by == "output, 2 nodes" for n in conv_relu)
        assert report.unmapped_ms <= 0.5 * report.kernel_ms


def test_cli_profile_of_a_tvm_folder(capsys, tmp_path, small_tvm_folder):
    argv = ["profile", str(small_tvm_folder), "--runs", "2", "--warmup", "0"]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["runtime"] == "TVM Relax VM" and data["notes"]
    times = list(data["modules"].values())
    assert times == sorted(times, reverse=True)  # sorted by time
    assert {"kernel", "call", "fx_node", "module", "mapped_by", "ms"} <= set(data["nodes"][0])
    html = tmp_path / "p.html"
    assert main([*argv, "--nodes", "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "TVM kernel call" in out and "mapped by" in out and "kernels total" in out
    assert "measured latency" in html.read_text()
    # Model Explorer overlays an ONNX graph: a TVM folder has none, and says so
    assert main([*argv, "--model-explorer", str(tmp_path / "m.json")]) == 2
    assert "has none" in capsys.readouterr().err
    # inspect reads the folder through the program.pt2 beside the library
    assert main(["inspect", str(small_tvm_folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    program = load_target(str(small_tvm_folder)).program
    assert data["source"] == "program" and data["total_macs"] == program.cost().total_macs


def test_tvm_folders_that_cannot_be_profiled_say_why(capsys, tmp_path, small_tvm_folder):
    import shutil

    broken = shutil.copytree(small_tvm_folder, tmp_path / "broken")
    (broken / "model.so").write_bytes(b"not a shared library" * 10)
    assert main(["profile", str(broken), "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert "ArtifactError" in err and "cannot load the TVM library" in err
    # a library for another CPU: not run here, with what to do instead
    board = shutil.copytree(small_tvm_folder, tmp_path / "board")
    manifest = json.loads((board / "manifest.json").read_text())
    manifest["target"].update(name="rpi4", arch="aarch64")
    (board / "manifest.json").write_text(json.dumps(manifest))
    assert main(["profile", str(board), "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot be profiled here" in err and "aarch64" in err


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v2", "deit_tiny"])
def test_tvm_profile_of_real_models(capsys, tmp_path, model):
    """Compile for TVM (BatchNorm folded, static batch, 32x32), profile the folder: nearly
    every kernel call is charged to a node, the conv kernels to convs."""
    pytest.importorskip("tvm")
    out = str(tmp_path / "o")
    argv = ["compile", f"cli_models:{model}", "--static-batch", "-p", "fold-bn", "--backend", "tvm"]
    assert main([*argv, "-o", out]) == 0
    capsys.readouterr()
    target = load_target(out)
    report = profile_tvm(target, runs=2, warmup=0)
    graph = target.graph()
    mapped = [n for n in report.nodes if n.fx_node]
    assert len(mapped) >= 0.95 * len(report.nodes)
    assert report.unmapped_ms < 0.05 * report.kernel_ms
    convs = [n for n in report.nodes if n.kernel.startswith("conv2d")]
    assert convs and all(graph.atoms[n.fx_node].op == "conv2d" for n in convs)
    costly = [m for m, layer in graph.layers.items() if layer.macs]
    measured = report.by_module()
    assert sum(1 for m in costly if measured.get(m, 0) > 0) >= 0.95 * len(costly)
