"""edgefx.compile / edgefx.load: the public flow, its report, the saved folder and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import edgefx
from edgefx import ArtifactError, BackendError, InputError, PassError
from edgefx.backends.onnx import OnnxArtifact
from edgefx.backends.torch import TorchArtifact
from edgefx.compiler import CompileReport
from edgefx.passes import DeadCodeElimination, FoldBatchNorm, PassResult

REL_TOL = 1e-4


def assert_close_rel(actual, expected, tol=REL_TOL):
    assert pytree.tree_structure(actual) == pytree.tree_structure(expected)
    for a, e in zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected), strict=True):
        assert a.shape == e.shape
        err = float((a.double() - e.double()).abs().max() / e.double().abs().max())
        assert err <= tol, err


class TwoHeads(nn.Module):
    """Two inputs; a dict output holding a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.side = nn.Linear(5, 4)
        self.cls = nn.Linear(4, 3)

    def forward(self, image: torch.Tensor, extra: torch.Tensor):
        f = torch.relu(self.bn(self.conv(image))).mean((2, 3)) + self.side(extra)
        return {"logits": self.cls(f), "aux": (f, f.sum(1))}


@pytest.fixture(scope="module")
def two_heads(helpers):
    torch.manual_seed(0)
    model = helpers.randomize_batchnorm(TwoHeads(), 12).eval()
    inputs = (torch.randn(1, 3, 6, 6), torch.randn(1, 5))
    compiled = edgefx.compile(model, inputs, passes=[FoldBatchNorm()], backend="onnx")
    return model, inputs, compiled


@pytest.fixture(scope="module")
def saved(small_onnx, tmp_path_factory):
    directory = tmp_path_factory.mktemp("compiled") / "out"
    assert small_onnx.save(directory) == directory
    return directory


# ----------------------------------------------------------------------------- compile
def test_compiled_runs_like_the_model(small_onnx, small_net, helpers, x1, x4):
    assert small_onnx.backend == "onnx" and isinstance(small_onnx.artifact, OnnxArtifact)
    for x in (x1, x4):
        out = small_onnx(x)
        assert isinstance(out, torch.Tensor) and out.shape == (x.shape[0], 4)
        assert_close_rel(out, helpers.eager(small_net, x))


def test_compiled_specs(small_onnx):
    assert [s.shape for s in small_onnx.input_specs] == [("batch", 3, 8, 8)]
    assert [s.shape for s in small_onnx.output_specs] == [("batch", 4)]
    assert "batch" in repr(small_onnx) and "onnx" in repr(small_onnx)


def test_report_has_every_pass_with_figures(small_onnx, helpers):
    report = small_onnx.report
    assert isinstance(report, CompileReport)
    assert report.model == "SmallNet" and report.backend == "onnx"
    assert report.captured.macs == helpers.SMALL_MACS
    assert report.captured.params == helpers.SMALL_PARAMS
    assert [r.name for r in report.passes] == ["FoldBatchNorm", "DeadCodeElimination"]
    assert all(isinstance(r, PassResult) for r in report.passes)
    fold = report.passes[0]
    assert fold.before == report.captured
    assert fold.after.params < fold.before.params and fold.report["folded"] == 2
    assert report.final == report.passes[-1].after
    assert report.backend_check.relative <= REL_TOL
    assert report.backend_info == {
        "opset": 21,
        "onnx_nodes": len(small_onnx.artifact.model.graph.node),
        "fuse_qdq": False,
    }
    assert report.capture_s > 0 and report.build_s > 0
    assert small_onnx.program.history == ("FoldBatchNorm()", "DeadCodeElimination()")


def test_report_renders_a_table(small_onnx):
    text = str(small_onnx.report)
    lines = text.splitlines()
    assert len(lines) >= 6
    header = next(line for line in lines if "step" in line)
    for column in ("MACs", "params", "ops", "max abs err", "SNR dB", "time s"):
        assert column in header
    rows = {
        name: next(line for line in lines if name in line)
        for name in ("capture", "FoldBatchNorm", "DeadCodeElimination", "backend onnx")
    }
    assert "folded=2" in rows["FoldBatchNorm"] and "exact" in rows["FoldBatchNorm"]
    assert "no change" in rows["DeadCodeElimination"]
    assert "opset=21" in rows["backend onnx"]


def test_report_to_dict_is_json(small_onnx):
    data = json.loads(json.dumps(small_onnx.report.to_dict()))
    assert [p["pass"] for p in data["passes"]] == ["FoldBatchNorm", "DeadCodeElimination"]
    assert data["backend_check"]["relative"] <= REL_TOL


def test_compile_a_captured_program(small_program, x4):
    compiled = edgefx.compile(small_program, backend="torch")
    assert compiled.program is small_program
    torch.testing.assert_close(compiled(x4), small_program(x4), rtol=0, atol=0)
    with pytest.raises(InputError, match="example inputs"):
        edgefx.compile(small_program, (x4,), backend="torch")


def test_compile_requires_example_inputs(small_net):
    with pytest.raises(InputError, match="example_inputs is required"):
        edgefx.compile(small_net, backend="torch")


def test_compile_leaves_a_training_model_alone(helpers, x1, x4):
    model = helpers.make_small_net(8, train=True)
    snapshot = helpers.ModelSnapshot(model)
    compiled = edgefx.compile(model, (x1,), passes=[FoldBatchNorm()], backend="torch")
    snapshot.assert_unchanged()
    assert model.training
    assert_close_rel(compiled(x4), helpers.eager(model, x4))


def test_compile_with_a_static_batch(helpers, x1, x4):
    model = helpers.make_small_net(10)
    compiled = edgefx.compile(model, (x1,), backend="torch", dynamic_batch=False)
    assert compiled.input_specs[0].shape == (1, 3, 8, 8)
    with pytest.raises(InputError, match="dim 0"):
        compiled(x4)


def test_compile_writes_the_dump_dir_with_pictures_and_index(small_net, tmp_path, x1):
    """From Python, as from the CLI: each stage's readable graph, report, picture and
    Program, and an index.html walking through the stages with the diff of each pass."""
    pytest.importorskip("graphviz")
    dump = tmp_path / "dump"
    edgefx.compile(small_net, (x1,), passes=[FoldBatchNorm()], backend="torch", dump_dir=dump)
    names = sorted(p.name for p in dump.iterdir())
    assert names == [
        "00-captured.pt2", "00-captured.py", "00-captured.svg",
        "01-FoldBatchNorm.json", "01-FoldBatchNorm.pt2", "01-FoldBatchNorm.py",
        "01-FoldBatchNorm.svg", "index.html",
    ]  # fmt: skip
    assert "bn1" in (dump / "00-captured.svg").read_text()
    assert "bn1" not in (dump / "01-FoldBatchNorm.svg").read_text()  # folded into conv1
    index = (dump / "index.html").read_text()
    assert index.count("<svg") == 2 and "removed" in index and "bn2" in index
    assert edgefx.Program.load(dump / "01-FoldBatchNorm.pt2").name == "SmallNet"


def test_the_dump_hook_is_the_compilers_only_link_to_the_pictures(small_program, tmp_path):
    """compiler.compile itself writes the readable stages and calls the hook it is given
    (edgefx.compile gives it tools.dump's drawing); the stages before a failing pass are
    still handed to the hook."""
    from edgefx import compiler

    calls = []

    def hook(dump_dir, captured, results):
        calls.append((dump_dir, captured, [r.name for r in results]))

    dump = tmp_path / "plain"
    compiler.compile(small_program, passes=[FoldBatchNorm()], backend="torch", dump_dir=dump)
    assert sorted(p.name for p in dump.iterdir()) == [
        "00-captured.py", "01-FoldBatchNorm.json", "01-FoldBatchNorm.py",
    ]  # fmt: skip
    compiler.compile(
        small_program, passes=[FoldBatchNorm()], backend="torch", dump_dir=dump, dump_hook=hook
    )
    assert calls == [(dump, small_program, ["FoldBatchNorm"])]

    class Broken(FoldBatchNorm):
        name = "Broken"

        def run(self, program):
            raise PassError("broken on purpose")

    with pytest.raises(PassError, match="broken on purpose"):
        compiler.compile(
            small_program, passes=[FoldBatchNorm(), Broken()], backend="torch",
            dump_dir=tmp_path / "failed", dump_hook=hook,
        )  # fmt: skip
    assert calls[-1][2] == ["FoldBatchNorm"]


def test_nothing_below_tools_imports_tools():
    """The layering rule of DESIGN.md, read from the sources: only edgefx/__init__.py (the
    public entry point, which plugs the dump pictures in) and tools/ itself import tools."""
    import ast
    from pathlib import Path

    root = Path(edgefx.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.is_relative_to(root / "tools") or path == root / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "edgefx.tools" or n.startswith("edgefx.tools.") for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []


# ----------------------------------------------------------------------------- nested I/O
def test_multiple_inputs_and_nested_outputs(two_heads, helpers):
    model, _, compiled = two_heads
    assert [s.shape for s in compiled.input_specs] == [("batch", 3, 6, 6), ("batch", 5)]
    for batch in (1, 3):
        args = (torch.randn(batch, 3, 6, 6), torch.randn(batch, 5))
        out = compiled(*args)
        assert list(out) == ["logits", "aux"] and isinstance(out["aux"], tuple)
        assert out["aux"][1].shape == (batch,)
        assert_close_rel(out, helpers.eager(model, *args))


def test_nested_outputs_survive_save_and_load(two_heads, helpers, tmp_path):
    model, _, compiled = two_heads
    loaded = edgefx.load(compiled.save(tmp_path / "heads"))
    args = (torch.randn(4, 3, 6, 6), torch.randn(4, 5))
    out = loaded(*args)
    assert list(out) == ["logits", "aux"] and isinstance(out["aux"], tuple)
    assert_close_rel(out, helpers.eager(model, *args))
    assert loaded.input_specs == compiled.input_specs


# ----------------------------------------------------------------------------- save / load
def test_save_writes_model_and_manifest(saved, small_onnx):
    assert {p.name for p in saved.iterdir()} >= {"model.onnx", "manifest.json", "program.pt2"}
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["backend"] == "onnx" and manifest["artifact"] == "model.onnx"
    assert manifest["opset"] == 21
    assert manifest["inputs"] == [
        {"name": "x", "shape": ["batch", 3, 8, 8], "dtype": "torch.float32"}
    ]
    assert manifest["outputs"] == [
        {"name": "output_0", "shape": ["batch", 4], "dtype": "torch.float32"}
    ]
    passes = manifest["report"]["passes"]
    assert [p["pass"] for p in passes] == ["FoldBatchNorm", "DeadCodeElimination"]
    for entry in passes:
        assert set(entry["before"]) == set(entry["after"]) == {"macs", "params", "nodes"}
        assert {"max_abs", "snr_db"} <= set(entry["error"])
        assert entry["wall_s"] >= 0
    assert passes[0]["report"]["folded"] == 2
    assert manifest["history"] == list(small_onnx.program.history)
    assert {"edgefx", "torch", "onnx", "onnxruntime", "python"} <= set(manifest["versions"])
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["edgefx"] == edgefx.__version__


def test_load_reproduces_outputs(saved, small_onnx, small_net, helpers, x1, x4):
    loaded = edgefx.load(saved)
    assert loaded.backend == "onnx"
    assert loaded.input_specs == small_onnx.input_specs
    assert loaded.output_specs == small_onnx.output_specs
    for x in (x1, x4):
        torch.testing.assert_close(loaded(x), small_onnx(x), rtol=0, atol=0)
        assert_close_rel(loaded(x), helpers.eager(small_net, x))
    assert loaded.program is not None
    assert loaded.program.history == small_onnx.program.history
    assert loaded.report["passes"][0]["pass"] == "FoldBatchNorm"


def test_load_checks_its_inputs(saved, x1):
    loaded = edgefx.load(saved)
    with pytest.raises(InputError, match="dtype"):
        loaded(x1.double())


def test_save_without_the_program(small_onnx, tmp_path):
    small_onnx.save(tmp_path, include_program=False)
    assert not (tmp_path / "program.pt2").exists()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["program"] is None
    assert edgefx.load(tmp_path).program is None


def test_load_a_folder_without_manifest(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(ArtifactError) as info:
        edgefx.load(tmp_path)
    assert "manifest.json" in info.value.message
    assert "Compiled.save" in info.value.hint


def test_load_a_missing_folder(tmp_path):
    with pytest.raises(ArtifactError, match=r"manifest\.json"):
        edgefx.load(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "text", ["{not json", "[]", '{"backend": "onnx"}'], ids=["bad-json", "list", "missing-keys"]
)
def test_load_a_corrupt_manifest(tmp_path, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ArtifactError, match="not an edgefx manifest"):
        edgefx.load(tmp_path)


def test_load_without_the_onnx_model(saved, tmp_path):
    (tmp_path / "manifest.json").write_text((saved / "manifest.json").read_text())
    with pytest.raises(ArtifactError, match=r"model\.onnx"):
        edgefx.load(tmp_path)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("backend", ["tensorrt", "Onnx", None], ids=repr)
def test_unknown_backend_lists_the_choices(small_net, helpers, x1, backend):
    snapshot = helpers.ModelSnapshot(small_net)
    with pytest.raises(BackendError) as info:
        edgefx.compile(small_net, (x1,), backend=backend)
    assert "onnx" in info.value.hint and "torch" in info.value.hint
    assert len(str(info.value).splitlines()) <= 3
    snapshot.assert_unchanged()


def plain_function(program):
    return program


@pytest.mark.parametrize(
    ("passes", "words"),
    [
        ("fold-bn", ["str"]),
        ([FoldBatchNorm], ["class FoldBatchNorm", "instance"]),
        ([plain_function], ["function"]),
        ([FoldBatchNorm(), "dce"], ["passes[1]", "str"]),
        ([DeadCodeElimination(), None], ["passes[1]", "NoneType"]),
    ],
    ids=["string", "class", "function", "string-in-list", "none-in-list"],
)
def test_non_passes_are_refused(small_net, helpers, x1, passes, words):
    snapshot = helpers.ModelSnapshot(small_net)
    with pytest.raises(PassError) as info:
        edgefx.compile(small_net, (x1,), passes=passes, backend="torch")
    for word in words:
        assert word in str(info.value)
    assert info.value.hint
    snapshot.assert_unchanged()


def test_bad_example_inputs_through_compile(small_net, helpers):
    snapshot = helpers.ModelSnapshot(small_net)
    with pytest.raises(InputError, match="str"):
        edgefx.compile(small_net, "image.png", backend="torch")
    snapshot.assert_unchanged()


@pytest.mark.parametrize(
    ("make_args", "words"),
    [
        (lambda x: (torch.randn(1, 3, 9, 8),), ["size 8 at dim 2"]),
        (lambda x: (x.double(),), ["dtype"]),
        (lambda x: (x[0],), ["rank 4"]),
        (lambda x: (x[None],), ["rank 4"]),
        (lambda x: (x, x), ["expected 1 input", "got 2"]),
        (lambda x: (), ["expected 1 input", "got 0"]),
        (lambda x: (x.numpy(),), ["torch.Tensor", "ndarray"]),
        (lambda x: (x.tolist(),), ["torch.Tensor", "list"]),
    ],
    ids=["shape", "dtype", "rank-3", "rank-5", "two-args", "no-args", "numpy", "list"],
)
def test_calling_with_wrong_inputs_raises_input_error(
    small_onnx, small_net, helpers, x1, make_args, words
):
    snapshot = helpers.ModelSnapshot(small_net)
    with pytest.raises(InputError) as info:
        small_onnx(*make_args(x1))
    for word in words:
        assert word in str(info.value)
    assert "x: float32[batch, 3, 8, 8]" in info.value.hint
    assert len(str(info.value).splitlines()) <= 3
    snapshot.assert_unchanged()


def test_numpy_input_is_refused_before_reaching_ort(small_onnx, x1, monkeypatch):
    def never(*_args, **_kwargs):
        raise AssertionError("the artifact must not run")

    monkeypatch.setattr(small_onnx.artifact, "run", never)
    with pytest.raises(InputError):
        small_onnx(np.zeros((1, 3, 8, 8), dtype=np.float32))


# ----------------------------------------------------------------------------- backend check
def test_backend_disagreement_raises_backend_error(small_net, helpers, x1, monkeypatch):
    original = OnnxArtifact.run

    def off_by_a_bit(self, inputs):
        return [y + 0.01 * y.abs().max() for y in original(self, inputs)]

    monkeypatch.setattr(OnnxArtifact, "run", off_by_a_bit)
    snapshot = helpers.ModelSnapshot(small_net)
    with pytest.raises(BackendError) as info:
        edgefx.compile(small_net, (x1,), backend="onnx")
    assert "disagrees" in info.value.message and "tolerance" in info.value.message
    assert info.value.hint
    snapshot.assert_unchanged()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_onnx_artifact_with_non_finite_outputs_is_refused(small_net, x1, monkeypatch, bad):
    original = OnnxArtifact.run

    def poisoned(self, inputs):
        outputs = original(self, inputs)
        outputs[0][0, 0] = bad
        return outputs

    monkeypatch.setattr(OnnxArtifact, "run", poisoned)
    with pytest.raises(BackendError, match="the onnx artifact is not finite where the Program"):
        edgefx.compile(small_net, (x1,), backend="onnx")


def test_tolerance_is_the_limit(small_net, x1, monkeypatch):
    """Off by 1e-6 of the output scale: fine at the default tolerance, refused at 0.0."""
    original = TorchArtifact.run

    def tiny_error(self, inputs):
        return [y + 1e-6 * y.abs().max() for y in original(self, inputs)]

    monkeypatch.setattr(TorchArtifact, "run", tiny_error)
    compiled = edgefx.compile(small_net, (x1,), backend="torch")
    assert 0 < compiled.report.backend_check.relative <= REL_TOL
    with pytest.raises(BackendError, match="tolerance 0"):
        edgefx.compile(small_net, (x1,), backend="torch", tolerance=0.0)


def test_an_artifact_that_crashes_raises_backend_error(small_net, x1, monkeypatch):
    def crash(self, inputs):
        raise RuntimeError("device lost\nsecond line")

    monkeypatch.setattr(TorchArtifact, "run", crash)
    with pytest.raises(BackendError, match="failed on the example inputs") as info:
        edgefx.compile(small_net, (x1,), backend="torch")
    assert "device lost" in str(info.value) and "second line" not in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_an_artifact_with_the_wrong_output_count_raises_backend_error(small_net, x1, monkeypatch):
    original = TorchArtifact.run
    monkeypatch.setattr(TorchArtifact, "run", lambda self, xs: original(self, xs) * 2)
    with pytest.raises(BackendError, match="output count"):
        edgefx.compile(small_net, (x1,), backend="torch")
