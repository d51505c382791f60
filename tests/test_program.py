"""Program: running, specs, input checks, save/load, refresh, with_graph."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import edgefx
from edgefx import ArtifactError, InputError, Program, TensorSpec
from edgefx.frontend import capture
from edgefx.passes.rewrite import module_path
from edgefx.program import BATCH, check_inputs


def op_sources(program: Program) -> list[tuple[str, str]]:
    """(op, source module path) of every call_function node, in graph order."""
    return [
        (str(n.target), module_path(n))
        for n in program.graph_module.graph.nodes
        if n.op == "call_function"
    ]


class Heads(nn.Module):
    """Nested outputs: a dict holding a tensor and a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.cls = nn.Linear(4, 3)
        self.box = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor):
        f = self.body(x).mean((2, 3))
        return {"cls": self.cls(f), "aux": (self.box(f), f)}


@pytest.fixture(scope="module")
def heads(helpers):
    torch.manual_seed(0)
    model = helpers.randomize_batchnorm(Heads(), 7).eval()
    x = torch.randn(1, 3, 6, 6)
    return model, x, capture(model, (x,))


# ----------------------------------------------------------------------------- running
def test_module_runs_like_the_model(small_program, small_net, helpers, x4):
    module = small_program.module()
    assert isinstance(module, torch.nn.Module)
    with torch.no_grad():
        out = module(x4)
    torch.testing.assert_close(out, helpers.eager(small_net, x4), rtol=1e-5, atol=1e-6)


def test_call_checks_inputs(small_program, x1):
    with pytest.raises(InputError, match="dtype"):
        small_program(x1.double())
    with pytest.raises(InputError, match="expected 1 input"):
        small_program(x1, x1)


def test_run_flat_defaults_to_the_example_inputs(small_program, x1):
    (flat,) = small_program.run_flat()
    torch.testing.assert_close(flat, small_program(x1), rtol=0, atol=0)


def test_nested_outputs_unflatten(heads, helpers):
    model, x, program = heads
    flat = program.run_flat([x])
    assert len(flat) == 3 == len(program.output_specs)
    out = program.unflatten_outputs(flat)
    ref = helpers.eager(model, x)
    assert pytree.tree_structure(out) == pytree.tree_structure(ref)
    torch.testing.assert_close(out["aux"][1], ref["aux"][1], rtol=1e-5, atol=1e-6)


def test_cost_counts_macs_and_params(small_program, helpers):
    cost = small_program.cost()
    assert cost.total_macs == helpers.SMALL_MACS
    assert cost.total_params == helpers.SMALL_PARAMS


def test_readable_shows_ops_and_shapes(small_program):
    text = small_program.readable()
    assert "def forward" in text
    assert "aten.conv2d" in text and "_native_batch_norm_legit_no_training" in text
    assert "f32[" in text


def test_repr_shows_specs_and_history(small_folded):
    program, _ = small_folded
    text = repr(program)
    assert "x: float32[batch, 3, 8, 8]" in text and "float32[batch, 4]" in text
    assert "FoldBatchNorm" in text and "DeadCodeElimination" in text


def test_metadata_describes_the_program(small_folded):
    program, _ = small_folded
    meta = program.metadata()
    assert meta["dynamic_batch"] is True and meta["example_batch"] == 1
    assert meta["inputs"] == [{"name": "x", "shape": [BATCH, 3, 8, 8], "dtype": "torch.float32"}]
    assert meta["history"] == list(program.history) and len(meta["history"]) == 2
    json.dumps(meta)


# ----------------------------------------------------------------------------- values
def test_with_graph_builds_a_new_program(small_program):
    gm = small_program.copy_graph()
    assert gm is not small_program.graph_module
    new = small_program.with_graph(gm, "Tag()")
    assert new is not small_program and new.graph_module is gm
    assert new.history == (*small_program.history, "Tag()")
    assert small_program.history == ()
    assert new.input_specs == small_program.input_specs
    assert new.output_specs == small_program.output_specs


def test_copy_graph_is_independent(small_program, x1):
    before = small_program(x1).clone()
    gm = small_program.copy_graph()
    with torch.no_grad():
        for p in gm.parameters():
            p.mul_(0)
    for node in list(gm.graph.nodes):
        if node.target == torch.ops.aten.relu.default:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    torch.testing.assert_close(small_program(x1), before, rtol=0, atol=0)
    assert "relu" in small_program.graph_module.code


def test_refreshed_keeps_outputs_specs_history_and_meta(small_folded, x4):
    program, _ = small_folded
    fresh = program.refreshed()
    assert fresh is not program
    torch.testing.assert_close(fresh(x4), program(x4), rtol=0, atol=0)
    assert fresh.input_specs == program.input_specs
    assert fresh.output_specs == program.output_specs
    assert fresh.history == program.history
    assert op_sources(fresh) == op_sources(program)
    assert any(path == "conv1" for _, path in op_sources(fresh))
    for node in fresh.graph_module.graph.nodes:
        if node.op in ("placeholder", "call_function"):
            assert "val" in node.meta, node.name


def test_refreshed_keeps_nested_outputs(heads):
    _, x, program = heads
    fresh = program.refreshed()
    assert fresh.out_spec == program.out_spec
    out = fresh(torch.cat([x, x, x]))
    assert list(out) == ["cls", "aux"] and out["aux"][0].shape == (3, 2)



class MaskedAttention(nn.Module):
    """BEiT-style attention: SDPA with a bias mask, then ``transpose(1, 2).reshape``.

    Eager CPU SDPA returns a different layout at batch 1 than its meta kernel does while
    tracing, so the ``reshape`` is captured as an ``aten.view`` that is invalid on the other
    layout: the captured graph then fails to run and to re-export unless views become
    reshapes (timm beit/maxvit failed this way)."""

    def __init__(self, dim: int = 768, heads: int = 12, tokens: int = 197) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias.unsqueeze(0))
        return y.transpose(1, 2).reshape(b, n, c)


def test_captured_views_survive_other_layouts():
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    x = torch.randn(1, 197, 768)
    program = capture(model, (x,))
    targets = {n.target for n in program.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.view.default not in targets
    fresh = program.refreshed()
    x3 = torch.randn(3, 197, 768)
    with torch.no_grad():
        expected = model(x3)
    torch.testing.assert_close(program(x3), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fresh(x3), expected, rtol=1e-5, atol=1e-5)
    fresh.export()


def test_attention_layouts_lower_to_onnx():
    """torch.onnx re-decides reshape-as-view on its own trace's layouts (BEiT, MaxViT failed
    with "Cannot view a tensor ..."); the ONNX backend feeds reshapes contiguous tensors."""
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    compiled = edgefx.compile(model, (torch.randn(1, 197, 768),), backend="onnx")
    x3 = torch.randn(3, 197, 768)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x3), model(x3), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip(small_folded, tmp_path, x1, x4):
    program, _ = small_folded
    path = program.save(tmp_path / "p.pt2")
    assert path == tmp_path / "p.pt2" and path.is_file()
    loaded = Program.load(path)
    for x in (x1, x4):
        torch.testing.assert_close(loaded(x), program(x), rtol=0, atol=0)
    assert loaded.input_specs == program.input_specs
    assert loaded.output_specs == program.output_specs
    assert loaded.history == program.history
    assert loaded.name == program.name == "SmallNet"
    assert loaded.dynamic_batch
    assert [t.shape for t in loaded.example_inputs] == [x1.shape]
    assert op_sources(loaded) == op_sources(program)
    assert {path for _, path in op_sources(loaded)} >= {"conv1", "conv2", "fc"}


def test_save_load_keeps_nested_outputs(heads, tmp_path):
    _, _, program = heads
    loaded = Program.load(program.save(tmp_path / "sub" / "heads.pt2"))
    assert loaded.out_spec == program.out_spec
    assert [s.shape for s in loaded.output_specs] == [s.shape for s in program.output_specs]
    for got, want in zip(loaded.run_flat(), program.run_flat(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert op_sources(loaded) == op_sources(program)
    assert any(path.startswith("body.") for _, path in op_sources(loaded))


def test_save_load_static_program(helpers, tmp_path, x1):
    model = helpers.make_small_net(2)
    program = capture(model, (x1,), dynamic_batch=False)
    loaded = Program.load(program.save(tmp_path / "static.pt2"))
    assert not loaded.dynamic_batch
    assert loaded.input_specs[0].shape == (1, 3, 8, 8)
    torch.testing.assert_close(loaded(x1), program(x1), rtol=0, atol=0)


def test_load_a_plain_torch_export_file(helpers, tmp_path):
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU()).eval()
    x = torch.randn(2, 5)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("n")},))
    torch.export.save(ep, tmp_path / "plain.pt2")
    loaded = Program.load(tmp_path / "plain.pt2")
    assert loaded.dynamic_batch and loaded.input_specs[0].shape == (BATCH, 5)
    assert loaded.name == "plain" and loaded.history == ()
    y = torch.randn(7, 5)
    torch.testing.assert_close(loaded(y), helpers.eager(model, y))


def _garbage(path):
    path.write_bytes(b"not a pt2 file" * 10)


def _empty_zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hi")


@pytest.mark.parametrize("corrupt", [_garbage, _empty_zip], ids=["garbage", "zip-without-program"])
def test_load_a_corrupt_file_raises_artifact_error(tmp_path, corrupt):
    path = tmp_path / "bad.pt2"
    corrupt(path)
    with pytest.raises(ArtifactError) as info:
        Program.load(path)
    assert str(path) in info.value.message
    assert info.value.hint
    assert len(str(info.value).splitlines()) <= 6


def test_load_a_truncated_file_raises_artifact_error(small_program, tmp_path):
    data = small_program.save(tmp_path / "p.pt2").read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="cannot load"):
        Program.load(tmp_path / "cut.pt2")


@pytest.mark.parametrize("name", ["missing.pt2", "."], ids=["missing", "directory"])
def test_load_a_missing_file_raises_artifact_error(tmp_path, name):
    with pytest.raises(ArtifactError) as info:
        Program.load(tmp_path / name)
    assert "no such program file" in info.value.message
    assert "Program.save" in info.value.hint


def test_load_refuses_another_format_version(small_program, tmp_path):
    meta = small_program.metadata() | {"format": 99}
    torch.export.save(
        small_program.export(), tmp_path / "v99.pt2", extra_files={"edgefx.json": json.dumps(meta)}
    )
    with pytest.raises(ArtifactError, match="format 99"):
        Program.load(tmp_path / "v99.pt2")


# ----------------------------------------------------------------------------- specs
def test_tensor_spec_round_trips_through_dict():
    spec = TensorSpec("x", (BATCH, 3, 224, 224), torch.float16)
    data = spec.to_dict()
    assert data == {"name": "x", "shape": ["batch", 3, 224, 224], "dtype": "torch.float16"}
    assert TensorSpec.from_dict(json.loads(json.dumps(data))) == spec
    assert spec.describe() == "x: float16[batch, 3, 224, 224]"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (torch.randn(2, 3, 4), None),
        (torch.randn(1, 3, 4), None),
        (torch.randn(2, 3, 4).numpy(), "torch.Tensor"),
        ([1.0, 2.0], "torch.Tensor"),
        (torch.randn(2, 3, 4, dtype=torch.float64), "dtype"),
        (torch.randn(3, 4), "rank 3"),
        (torch.randn(2, 5, 4), "size 3 at dim 1"),
        (torch.randn(0, 3, 4), "at least 1"),
    ],
    ids=["ok", "batch-1", "numpy", "list", "dtype", "rank", "static-dim", "empty-batch"],
)
def test_tensor_spec_mismatch(value, reason):
    spec = TensorSpec("x", (BATCH, 3, 4), torch.float32)
    got = spec.mismatch(value)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def test_check_inputs_counts_and_batches():
    specs = [TensorSpec("a", (BATCH, 2), torch.float32), TensorSpec("b", (BATCH,), torch.float32)]
    check_inputs(specs, [torch.randn(3, 2), torch.randn(3)])
    with pytest.raises(InputError, match="expected 2 input"):
        check_inputs(specs, [torch.randn(3, 2)])
    with pytest.raises(InputError, match=r"disagree on the batch size: \[2, 3\]"):
        check_inputs(specs, [torch.randn(3, 2), torch.randn(2)])
    with pytest.raises(InputError, match="input 'b'"):
        check_inputs(specs, [torch.randn(3, 2), torch.randn(3).int()])
