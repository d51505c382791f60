"""edgefx diff: across a real ChannelPrune, PotQuantize and TokenGate, and a Program vs its
ONNX."""

import json

import pytest
import torch

from edgefx.errors import EdgefxError
from edgefx.tools.diff import DiffError, diff_graphs, diff_targets
from edgefx.tools.layers import module_of, onnx_graph, program_graph
from edgefx.tools.quant import quant_layers
from edgefx.tools.target import Target


def test_diff_across_channel_prune(resnet18_pruned):
    before, after = resnet18_pruned
    diff = diff_targets(Target("before", program=before), Target("after", program=after))
    # the totals are the two cost analyses'
    assert diff.a.total_macs == before.cost().total_macs
    assert diff.b.total_macs == after.cost().total_macs
    assert diff.macs_delta == after.cost().total_macs - before.cost().total_macs < 0
    assert not diff.of("added") and not diff.of("removed")
    conv = next(c for c in diff.changes if c.module == "layer1.0.conv1")
    gm = after.graph_module
    kept = gm.get_parameter("layer1.0.conv1.weight").shape[0]
    assert conv.status == "changed" and conv.changed["channels"] == (64, kept) and kept < 64
    assert conv.macs_delta == conv.b.macs - conv.a.macs < 0
    # per-layer deltas add up to the total
    assert sum(c.macs_delta for c in diff.changes) == diff.macs_delta
    assert sum(c.params_delta for c in diff.changes) == diff.params_delta
    kept_share = diff.channels_kept()
    assert kept_share["layer1.0.conv1"] == kept / 64 and kept_share["fc"] == 1.0


def test_diff_across_pot_quantize_reports_bits_dtype_and_weight_sqnr(mobilenet_v2_quantized):
    float_program, quantized = mobilenet_v2_quantized
    diff = diff_targets(Target("f", program=float_program), Target("q", program=quantized))
    conv = next(c for c in diff.changes if c.module == "features.1.conv.0.0")
    assert conv.changed["weight_dtype"] == ("float32", "int8")
    assert conv.changed["weight_bits"] == (None, 4)
    assert diff.macs_delta == 0 and not diff.of("added") and not diff.of("removed")

    # the SQNR is computed from the float and the dequantized weights; check one by hand
    def conv_of(program):
        return next(
            n
            for n in program.graph_module.graph.nodes
            if n.target is torch.ops.aten.conv2d.default and module_of(n) == "features.1.conv.0.0"
        )

    gm = float_program.graph_module
    w = gm.get_parameter(str(conv_of(float_program).args[1].target)).detach().double()
    rows = {q.module: q for q in quant_layers(quantized)}
    assert rows["features.1.conv.0.0"].weight_bits == 4
    qgm = quantized.graph_module
    qconv = conv_of(quantized)
    dq = qconv.args[1]
    codes = qgm.get_buffer(str(dq.args[0].target)).double()
    exps = qgm.get_buffer(str(dq.args[1].target)).double()
    deq = codes * (2.0**exps).reshape(-1, 1, 1, 1)
    expected = 10 * torch.log10((w**2).sum() / ((deq - w) ** 2).sum())
    assert conv.weight_sqnr_db == pytest.approx(float(expected), rel=1e-9)
    assert 5 < conv.weight_sqnr_db < 40  # 4-bit weights: a real, finite error


def test_diff_across_token_gate_reports_tokens_kept(deit_tiny_gated):
    from edgefx.tools.commands import _tokens_kept

    before, after = deit_tiny_gated
    diff = diff_targets(Target("dense", program=before), Target("gated", program=after))
    assert diff.macs_delta == after.cost().total_macs - before.cost().total_macs < 0
    assert diff.params_delta == 0 and not diff.of("added") and not diff.of("removed")
    by_module = {c.module: c for c in diff.changes}
    # 5 tokens (CLS + 4 patches) until block 3's gate, 3 after it, 2 after block 6's
    assert by_module["blocks.2.mlp.fc1"].status == "same"
    assert by_module["blocks.4.mlp.fc1"].changed["tokens"] == (5, 3)
    assert by_module["blocks.7.mlp.fc1"].changed["tokens"] == (5, 2)
    fc1 = by_module["blocks.7.mlp.fc1"]
    assert fc1.macs_delta == fc1.b.macs - fc1.a.macs == -(5 - 2) * 192 * 768
    kept = _tokens_kept(diff)  # what `edgefx diff --color tokens` colours by
    assert kept["blocks.4.attn.qkv"] == 3 / 5 and kept["blocks.11.mlp.fc2"] == 2 / 5
    assert kept["blocks.0.attn.qkv"] == 1.0


def test_inspect_blocks_shows_the_gates(capsys, tmp_path, deit_tiny_gated):
    from edgefx.tools.cli import main

    before, after = deit_tiny_gated
    before.save(tmp_path / "dense.pt2")
    after.save(tmp_path / "gated.pt2")
    assert main(["inspect", str(tmp_path / "dense.pt2"), "--blocks", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "Transformer blocks" in out and "blocks.11.attn" in out and "3 x 64" in out
    assert "Tokens through" not in out  # no gates: nothing more to show
    # a gated model: TokenGate's analysis no longer reads the gated blocks; the token table
    # shows where the gates are and what each keeps
    assert main(["inspect", str(tmp_path / "gated.pt2"), "--blocks", "--top", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ blocks.")}
    assert "top-k: keeps 3 of 5" in rows["blocks.3"] and "top-k: keeps 2 of 3" in rows["blocks.6"]
    assert "top-k" in rows["blocks.9"]  # keeps all of its 2 tokens, but is a gate
    gates = [block for block, line in rows.items() if "top-k" in line]
    assert gates == ["blocks.3", "blocks.6", "blocks.9"]
    assert "applied: TokenGate(keep=0.5" in out
    # threshold gates are told apart from top-k ones (whether they mask or drop tokens)
    from edgefx.passes import PassManager, TokenGate
    from edgefx.tools.layers import block_tokens, program_graph

    thresholded, _ = PassManager([TokenGate(mode="threshold", threshold=0.2)]).run(before)
    gated = [(row.block, row.gate) for row in block_tokens(program_graph(thresholded)) if row.gate]
    assert gated == [(f"blocks.{i}", "threshold") for i in (3, 6, 9)]


def test_diff_program_against_its_onnx(resnet18_onnx, resnet18_folded):
    program, _ = resnet18_folded
    diff = diff_graphs(
        program_graph(program),
        onnx_graph(resnet18_onnx.artifact.model, resnet18_onnx.artifact.node_map),
    )
    assert diff.macs_delta == 0 and diff.params_delta == 0
    weighted = [c for c in diff.changes if c.a and c.a.params]
    assert weighted and all(c.status == "same" for c in weighted)


def test_cli_diff_of_saved_programs_json_and_table(capsys, tmp_path):
    from cli_models import tiny

    from edgefx.frontend import capture
    from edgefx.passes import ChannelPrune, PassManager
    from edgefx.tools.cli import main

    before = capture(*tiny())
    after, _ = PassManager([ChannelPrune(macs=0.6)]).run(before)
    before.save(tmp_path / "a.pt2")
    after.save(tmp_path / "b.pt2")
    assert main(["diff", str(tmp_path / "a.pt2"), str(tmp_path / "b.pt2"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["macs_delta"] == after.cost().total_macs - before.cost().total_macs < 0
    assert data["counts"]["changed"] > 0
    assert main(["diff", str(tmp_path / "a.pt2"), str(tmp_path / "b.pt2")]) == 0
    out = capsys.readouterr().out
    assert "features.0" in out and "channels 8 ->" in out and "total" in out


def test_unrelated_models_are_refused(resnet18, mobilenet_v2):
    with pytest.raises(DiffError, match="look like different models") as info:
        diff_graphs(program_graph(resnet18[2]), program_graph(mobilenet_v2[2]))
    assert isinstance(info.value, EdgefxError) and "hint" in str(info.value)
