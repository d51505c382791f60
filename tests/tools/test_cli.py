"""The `edgefx` command line, run in-process through its `main()`."""

import json
from pathlib import Path

import pytest
import torch

import edgefx
from edgefx.passes import PASSES
from edgefx.tools.cli import main

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _models_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_compile_saves_a_loadable_artifact(capsys, tmp_path):
    code, out, _ = run(
        capsys,
        "compile",
        "cli_models:tiny",
        "-p",
        "fold-bn",
        "-p",
        "dce",
        "--backend",
        "onnx",
        "-o",
        str(tmp_path / "out"),
    )
    assert code == 0
    assert (
        "FoldBatchNorm" in out and "backend onnx" in out and "x: float32[batch, 3, 16, 16]" in out
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["backend"] == "onnx"
    assert [p["pass"] for p in manifest["report"]["passes"]] == [
        "FoldBatchNorm",
        "DeadCodeElimination",
    ]
    assert manifest["report"]["passes"][0]["report"]["folded"] == 2

    from cli_models import tiny

    model, _ = tiny()
    compiled = edgefx.load(tmp_path / "out")
    x4 = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(compiled(x4), model.eval()(x4), atol=1e-4, rtol=1e-4)


def test_compile_with_power_of_two_quantization(capsys, tmp_path):
    code, out, _ = run(
        capsys,
        "compile",
        "cli_models:tiny",
        "-p",
        "fold-bn",
        "-p",
        "pot:search='mse',act_bits=6",
        "-o",
        str(tmp_path / "q"),
    )
    assert code == 0 and "PotQuantize" in out
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    pot = manifest["report"]["passes"][1]
    assert pot["report"]["calibration"] == "example inputs" and pot["report"]["act_bits"] == 6
    assert manifest["report"]["backend_check"]["max_abs"] == 0.0
    compiled = edgefx.load(tmp_path / "q")
    x4 = torch.randn(4, 3, 16, 16)
    program = edgefx.Program.load(tmp_path / "q" / "program.pt2")
    assert torch.equal(compiled(x4), program(x4))


def test_compile_input_shape_and_static_batch(capsys, tmp_path):
    code, out, _ = run(
        capsys,
        "compile",
        "cli_models:tiny_module_only",
        "--input-shape",
        "2,3,8,8",
        "--static-batch",
        "--backend",
        "torch",
    )
    assert code == 0
    assert "x: float32[2, 3, 8, 8]" in out


def test_compile_dump_dir_has_graph_picture_and_program_after_each_pass(capsys, tmp_path):
    code, out, _ = run(
        capsys,
        "compile",
        "cli_models:tiny",
        "-p",
        "fold-bn",
        "--backend",
        "torch",
        "--dump-dir",
        str(tmp_path / "dump"),
    )
    assert code == 0 and "index.html" in out
    dump = tmp_path / "dump"
    names = sorted(p.name for p in dump.iterdir())
    assert names == [
        "00-captured.pt2",
        "00-captured.py",
        "00-captured.svg",
        "01-FoldBatchNorm.json",
        "01-FoldBatchNorm.pt2",
        "01-FoldBatchNorm.py",
        "01-FoldBatchNorm.svg",
        "index.html",
    ]
    assert "batch_norm" in (dump / "00-captured.py").read_text()
    assert "batch_norm" not in (dump / "01-FoldBatchNorm.py").read_text()
    assert "features.1" in (dump / "00-captured.svg").read_text()
    assert "features.1" not in (dump / "01-FoldBatchNorm.svg").read_text()  # BN folded away
    index = (dump / "index.html").read_text()
    # the walk-through: both stages, and the fold's diff (the BatchNorm layers removed)
    assert "00-captured" in index and "01-FoldBatchNorm" in index
    assert index.count("<svg") == 2 and "removed" in index and "features.4" in index
    # the dumped Programs diff on the command line
    code, out, _ = run(
        capsys, "diff", str(dump / "00-captured.pt2"), str(dump / "01-FoldBatchNorm.pt2")
    )
    assert code == 0 and "2 removed" in out


def test_inspect_prints_layer_table(capsys):
    code, out, _ = run(capsys, "inspect", "cli_models:tiny", "--sort", "macs")
    assert code == 0
    assert "features.3" in out and "conv2d" in out and "head" in out and "total" in out
    # the largest conv comes first when sorted by MACs
    assert out.index("features.3") < out.index("features.0")


def test_inspect_quant_of_a_compiled_folder(capsys, tmp_path):
    code, _, _ = run(
        capsys,
        "compile",
        "cli_models:tiny",
        "-p",
        "fold-bn",
        "-p",
        "pot:search='mse',weight_bits=4,act_bits=6",
        "-o",
        str(tmp_path / "q"),
    )
    assert code == 0
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    reported = {
        layer["module"]: layer for layer in manifest["report"]["passes"][1]["report"]["layers"]
    }
    code, out, _ = run(capsys, "inspect", str(tmp_path / "q"), "--quant", "--json")
    assert code == 0
    rows = {row["module"]: row for row in json.loads(out)["quant"]}
    assert set(rows) == set(reported) == {"features.0", "features.3", "head"}
    for module, row in rows.items():
        # read off the graph's quantize/dequantize nodes, as the pass reported them
        assert row["weight_bits"] == 4 and row["weight_code_bits"] <= 4
        assert row["input_bits"] == 6
        assert row["input_exp"] == reported[module]["input_exp"]
        assert list(row["weight_exp"]) == reported[module]["weight_exp"]
        assert row["input_signed"] == (reported[module]["input"] == "signed")
        assert row["weight_sqnr_db"] == reported[module]["weight_snr_db"]
    code, out, _ = run(capsys, "inspect", str(tmp_path / "q"), "--quant")
    assert code == 0 and "Quantized layers" in out and "uint6" in out and "(report)" in out


def test_inspect_channels_shows_what_can_be_pruned(capsys):
    code, out, _ = run(capsys, "inspect", "cli_models:tiny", "--channels")
    assert code == 0
    assert "Channel classes" in out
    assert "features.0" in out and "features.3" in out
    assert "model output" in out and "model input" in out  # the fixed ones say why
    assert "24 removable" in out  # 8 + 16 channels: one group each


def test_compile_prunes_with_options(capsys, tmp_path):
    """ChannelPrune's options on the command line: a list with commas inside its brackets,
    ``round-to`` for ``round_to``, a bare word for a string."""
    spec = "prune:macs=0.6,round-to=1,importance=l1,exclude=['features.0', 'features.3']"
    report, before = compile_pruned(capsys, tmp_path, spec)
    assert report["importance"] == "l1" and report["round_to"] == 1
    assert report["ranked_by"] == {"l1": 160}  # every conv's channels, magnitude-ranked
    assert report["not_ranked"]["excluded"] == 96  # features.0 and features.3: 32 + 64
    assert [row["modules"][:2] for row in report["layers"]] == [["features.7", "features.6"]]
    assert report["estimated_macs"] <= 0.6 * before["macs"]


def test_compile_prunes_to_a_latency_budget(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFX_CACHE", str(tmp_path / "cache"))
    report, _ = compile_pruned(capsys, tmp_path, "prune:latency=0.6,backend=torch,threads=1")
    assert report["latency_backend"] == "torch" and report["round_to"] == 8
    assert report["predicted_latency_ratio"] <= 0.6 and report["groups_removed"] > 0
    assert (tmp_path / "cache" / "latency").is_dir()


def compile_pruned(capsys, tmp_path, spec: str) -> tuple[dict, dict]:
    """``edgefx compile cli_models:wide -p SPEC -o DIR``: the pass's report and the figures
    before it, from the saved manifest."""
    out = tmp_path / "out"
    code, _, _ = run(capsys, "compile", "cli_models:wide", "-p", spec, "-o", str(out))
    assert code == 0
    (prune,) = json.loads((out / "manifest.json").read_text())["report"]["passes"]
    return prune["report"], prune["before"]


def test_inspect_and_compile_a_saved_program(capsys, tmp_path):
    from cli_models import tiny

    model, inputs = tiny()
    edgefx.frontend.capture(model, inputs).save(tmp_path / "tiny.pt2")
    code, out, _ = run(capsys, "inspect", str(tmp_path / "tiny.pt2"))
    assert code == 0 and "features.0" in out
    code, out, _ = run(capsys, "compile", str(tmp_path / "tiny.pt2"), "--backend", "onnx")
    assert code == 0 and "backend onnx" in out


PASS_OPTION_ERRORS = [
    ("prune:macs=0.5,colour=1", "unknown option 'colour' for pass prune"),
    ("fold-bn:x=1", "fold-bn takes"),
    ("pot:calib=3", "calib"),
    ("prune:macs=0.5,importance=l3", "unknown importance 'l3'"),
    ("prune:macs=0.5,round-to=0", "round_to must be an integer >= 1"),
    ("prune:latency=1.5", "latency must be a fraction"),
    ("prune:latency=0.5,backend=cuda", "no per-layer latency table for backend 'cuda'"),
]


@pytest.mark.parametrize(
    ("argv", "error", "words"),
    [
        (["compile", "resnt18"], "ModelNotFoundError", "did you mean resnet18"),
        (["compile", "cli_models:missing"], "ModelNotFoundError", "cannot import"),
        (["compile", "cli_models:not_a_model"], "ModelNotFoundError", "not an nn.Module"),
        (["compile", "nowhere.pt2"], "ModelNotFoundError", "no such file"),
        (
            ["compile", "cli_models:tiny", "-p", "nope"],
            "PassError",
            "available: " + ", ".join(sorted(PASSES)),
        ),
        *(
            (["compile", "cli_models:tiny", "-p", spec], "PassError", words)
            for spec, words in PASS_OPTION_ERRORS
        ),
        (["compile", "cli_models:tiny", "--backend", "tpu"], "BackendError", "choose one of"),
        (["compile", "cli_models:tiny", "--opset", "7"], "BackendError", "opset"),
        (["inspect", "cli_models:tiny", "--input-shape", "1,3,16"], "CaptureError", "torch.export"),
        (["inspect", "nowhere.onnx"], "ArtifactError", "no such ONNX file"),
        (["inspect", "nowhere.pt2"], "ModelNotFoundError", "no such file"),
        (["diff", "nowhere.pt2", "cli_models:tiny"], "ModelNotFoundError", "no such file"),
        (["profile", "nowhere.onnx"], "ArtifactError", "no such ONNX file"),
        (
            ["inspect", "cli_models:tiny", "--svg", "x.svg", "--color", "flops"],
            "RenderError",
            "unknown metric 'flops'",
        ),
        (
            ["inspect", "cli_models:tiny", "--svg", "x.svg", "--color", "latency"],
            "RenderError",
            "edgefx profile",
        ),
        (["profile", "cli_models:tiny"], "ProfileError", "no ONNX model to profile"),
        (
            ["diff", "cli_models:tiny", "cli_models:mobilenet_v2"],
            "DiffError",
            "look like different models",
        ),
    ],
)
def test_errors_are_one_clean_message(capsys, argv, error, words):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert error in err and words in err
    assert "Traceback" not in err and len(err.splitlines()) <= 12


def test_unreadable_onnx_is_one_clean_message(capsys, tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    for argv in (["inspect", str(bad)], ["profile", str(bad)], ["diff", str(bad), str(bad)]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "ArtifactError" in err and "cannot read ONNX model" in err
        assert "Traceback" not in err and len(err.splitlines()) <= 12


def test_bad_shape_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "cli_models:tiny", "--input-shape", "1,x,3"])
    assert exit_info.value.code == 2
    assert "not a shape" in capsys.readouterr().err


def test_passes_and_models_listings(capsys):
    code, out, _ = run(capsys, "passes")
    assert code == 0 and "fold-bn" in out and "FoldBatchNorm" in out
    prune_row = out[out.index("ChannelPrune") :]  # its options, wrapped over a few lines
    for option in ("latency", "round_to", "importance", "exclude"):
        assert option in prune_row
    code, out, _ = run(capsys, "models", "resnet1")
    assert code == 0 and "resnet18" in out.split() and "timm:resnet18" in out.split()
