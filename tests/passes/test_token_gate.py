"""TokenGate: top-k and threshold token gates in ViTs (exactness, semantics, export, errors)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import edgefx
from edgefx.analysis.cost import graph_cost
from edgefx.analysis.vit import UnsupportedModelError
from edgefx.errors import PassError
from edgefx.frontend import capture
from edgefx.passes import TokenGate
from edgefx.passes.token_gate import default_gates

MODELS = Path(__file__).resolve().parent.parent / "analysis"
sys.path.insert(0, str(MODELS))
from vit_models import images, timm_vit, torchvision_vit, unfused  # noqa: E402


@pytest.fixture(scope="module")
def deit64():
    """DeiT-S, 4 blocks, 64x64: 16 patch tokens + CLS; gates at blocks 0, 1, 2."""
    model = timm_vit("deit_small_patch16_224", depth=4, img_size=64)
    return model, capture(model, images(1, 64))


@pytest.fixture(scope="module")
def gated_half(deit64):
    return TokenGate(keep=0.5)(deit64[1])


def _reference_topk(model, x: torch.Tensor, gates: list[int], counts: list[int]) -> torch.Tensor:
    """The gating written out in eager PyTorch on timm's modules, independently of the graph
    rewrite: CLS attention row, head-norm weights, top-k, kept in original order (torch.sort)."""
    prefix = model.num_prefix_tokens
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for i, blk in enumerate(model.blocks):
            attn = blk.attn
            y = blk.norm1(h)
            b, n, c = y.shape
            qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            out = F.scaled_dot_product_attention(q, k, v)
            h = h + blk.ls1(attn.proj(out.transpose(1, 2).reshape(b, n, c)))
            if i in gates:
                h = _reference_gate(h, q, k, out, attn.scale, prefix, counts[gates.index(i)])
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        return model.forward_head(model.norm(h))


def _reference_gate(h, q, k, out, scale, prefix, keep):
    row = torch.softmax(q[:, :, :1] @ k.transpose(-2, -1) * scale, -1)[:, :, 0]
    norms = out.flatten(2).norm(dim=-1)
    weights = norms / norms.sum(-1, keepdim=True)
    scores = (row * weights[..., None]).sum(1)[:, prefix:]
    idx = scores.topk(keep, dim=1).indices.sort(dim=1).values
    kept = h[:, prefix:].gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
    return torch.cat([h[:, :prefix], kept], 1)


def _reference_torchvision(model, x, gates, counts):
    """The same gating on torchvision's VisionTransformer (nn.MultiheadAttention) in eager."""
    with torch.no_grad():
        h = model._process_input(x)
        h = torch.cat([model.class_token.expand(x.shape[0], -1, -1), h], 1)
        h = h + model.encoder.pos_embedding
        for i, layer in enumerate(model.encoder.layers):
            y = layer.ln_1(h)
            mha = layer.self_attention
            b, t, c = y.shape
            heads = mha.num_heads
            qkv = F.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
            q, k, v = (z.reshape(b, t, heads, c // heads).transpose(1, 2) for z in qkv)
            out = F.scaled_dot_product_attention(q, k, v)
            h = h + mha.out_proj(out.transpose(1, 2).reshape(b, t, c))
            if i in gates:
                scale = (c // heads) ** -0.5
                h = _reference_gate(h, q, k, out, scale, 1, counts[gates.index(i)])
            h = h + layer.mlp(layer.ln_2(h))
        return model.heads(model.encoder.ln(h)[:, 0])


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: timm_vit("deit_small_patch16_224", depth=4), id="deit_small-4blocks"),
        pytest.param(lambda: timm_vit("vit_base_patch16_224", depth=2), id="vit_base-2blocks"),
        pytest.param(
            lambda: unfused(timm_vit("vit_base_patch16_224", depth=2)),
            id="unfused",
            marks=pytest.mark.slow,
        ),
        pytest.param(lambda: torchvision_vit(), id="torchvision-vit"),
    ],
)
def test_keep_all_is_identical_to_the_ungated_model(make):
    program = capture(make(), images(1))
    result = TokenGate(keep=1.0)(program)
    assert result.changed and "topk_gate" not in result.program.graph_module.code
    assert any(
        n.target is torch.ops.aten.topk.default for n in result.program.graph_module.graph.nodes
    )
    x = images(3)
    assert torch.equal(result.program(x), program(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deit_small_patch16_224", "vit_base_patch16_224", "vit_b_16"])
def test_keep_all_is_identical_at_224(name):
    if name == "vit_b_16":
        import torchvision
        from vit_models import _nonzero_head

        model = _nonzero_head(torchvision.models.vit_b_16(), 0)
    else:
        model = timm_vit(name, img_size=224)
    program = capture(model, images(1, 224))
    result = TokenGate(keep=1.0)(program)
    assert result.report["gate_blocks"] == [3, 6, 9]
    x = images(2, 224)
    assert torch.equal(result.program(x), program(x))


# ----------------------------------------------------------------------------- top-k
def test_default_gates_follow_as_vit():
    assert default_gates(12) == [3, 6, 9]
    assert default_gates(24) == [7, 13, 19]
    assert default_gates(4) == [0, 1, 2]
    assert default_gates(1) == [0]


def test_topk_matches_an_eager_reference(deit64, gated_half):
    model, _ = deit64
    report = gated_half.report
    assert report["gate_blocks"] == [0, 1, 2]
    assert report["patch_tokens_kept"] == [8, 4, 2]
    assert report["tokens_after_gates"] == [9, 5, 3]
    x = images(3, 64)
    expected = _reference_topk(model, x, [0, 1, 2], [8, 4, 2])
    torch.testing.assert_close(gated_half.program(x), expected, atol=1e-5, rtol=1e-5)
    # and it really dropped tokens: the ungated model gives something else
    assert not torch.allclose(deit64[1](x), expected, atol=1e-3)
    assert report["macs_after"] < 0.5 * report["macs_before"]
    assert (
        report["macs_after"]
        == graph_cost(gated_half.program.graph_module, gated_half.program.example_inputs).total_macs
    )


def test_topk_keeps_sdpa_fused_and_has_no_host_sync(gated_half):
    graph = gated_half.program.graph_module.graph
    ops = {n.target for n in graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.scaled_dot_product_attention.default in ops
    assert torch.ops.aten._local_scalar_dense.default not in ops  # .item()
    assert torch.ops.aten.argsort.default not in ops and torch.ops.aten.sort.default not in ops
    assert torch.ops.aten.scatter_reduce.two not in ops


def test_unfused_attention_gates_like_fused(gated_half):
    """Explicit softmax attention (scores read off its probabilities, masks added to its
    logits) gives what the fused SDPA path (scores recomputed from q_cls and K) gives."""
    program = capture(
        unfused(timm_vit("deit_small_patch16_224", depth=4, img_size=64)), images(1, 64)
    )
    result = TokenGate(keep=0.5)(program)
    assert result.report["attention"] == ["softmax"]
    x = images(3, 64)
    torch.testing.assert_close(result.program(x), gated_half.program(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_unfused_attention_thresholds_like_fused(deit64):
    program = capture(
        unfused(timm_vit("deit_small_patch16_224", depth=4, img_size=64)), images(1, 64)
    )
    x = images(3, 64)
    threshold = TokenGate(mode="threshold", threshold=[0.06, 0.1, 0.15])
    unfused_out = threshold(program).program(x)
    fused_out = threshold(deit64[1]).program(x)
    torch.testing.assert_close(unfused_out, fused_out, atol=1e-5, rtol=1e-5)


def test_schedule_and_fused_token(deit64):
    program = deit64[1]
    result = TokenGate(keep=[0.75, 0.5, 0.25], fuse=True)(program)
    assert result.report["patch_tokens_kept"] == [12, 8, 4]
    assert result.report["tokens_after_gates"] == [1 + 12, 1 + 8, 1 + 4]  # + fused token below
    tokens = [
        n.meta["val"].shape[1]
        for n in result.program.graph_module.graph.nodes
        if n.target is torch.ops.aten.cat.default
        and n.meta.get("val") is not None
        and n.meta["val"].dim() == 3
    ]
    assert tokens[-3:] == [14, 10, 6]  # prefix + kept + one EViT fused token per gate


def test_topk_compiles_to_onnx_and_matches(deit64):
    compiled = edgefx.compile(
        deit64[1], passes=[TokenGate(keep=0.5, fuse=True)], backend="onnx", progress=False
    )
    x = images(4, 64)
    program = compiled.report.passes[0].program
    torch.testing.assert_close(compiled(x), program(x), atol=1e-4, rtol=1e-4)


def test_torchvision_topk_matches_an_eager_reference():
    model = torchvision_vit()
    program = capture(model, images(1))
    result = TokenGate(keep=0.5)(program)
    assert result.report["patch_tokens_kept"] == [8, 4, 2]
    x = images(3)
    expected = _reference_torchvision(model, x, [0, 1, 2], [8, 4, 2])
    torch.testing.assert_close(result.program(x), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(program(x), expected, atol=1e-3)


def test_hugging_face_vit():
    """transformers' ViT (SDPA) passes a mask that hides nothing: read as no mask, dropped
    after the first gate (it is sized for all the tokens)."""
    pytest.importorskip("transformers")
    from vit_models import hf_vit

    program = capture(hf_vit(), images(1))
    x = images(3)
    assert torch.equal(TokenGate(keep=1.0)(program).program(x), program(x))
    result = TokenGate(keep=0.5)(program)
    assert result.report["prefix_sources"] == ["model.vit.embeddings.cls_token"]
    assert result.report["patch_tokens_kept"] == [8, 4, 2]
    assert not torch.allclose(result.program(x), program(x), atol=1e-3)


@pytest.mark.slow
def test_torchvision_topk_compiles_to_onnx():
    program = capture(torchvision_vit(), images(1))
    compiled = edgefx.compile(program, passes=[TokenGate(keep=0.5)], backend="onnx", progress=False)
    report = compiled.report.passes[0].report
    assert report["patch_tokens_kept"] == [8, 4, 2] and report["gate_blocks"] == [0, 1, 2]
    x = images(3)
    out = compiled(x)
    torch.testing.assert_close(out, compiled.report.passes[0].program(x), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, program(x), atol=1e-3)


def test_macs_budget_is_met_and_reported(deit64):
    result = TokenGate(macs=0.65)(deit64[1])
    report = result.report
    measured = graph_cost(result.program.graph_module, result.program.example_inputs)
    assert report["macs_after"] == measured.total_macs
    assert report["macs_requested"] == 0.65
    assert 0.55 < report["macs_ratio"] <= 0.65
    assert report["macs_ratio"] == measured.total_macs / report["macs_before"]
    # one more token at the first gate would break the budget: the rate found is the largest
    assert 0 < report["keep_rate"] < 1


# ----------------------------------------------------------------------------- threshold
def test_threshold_mode_is_batch_independent(deit64):
    from edgefx.passes.token_gate import threshold_kept

    program = deit64[1]
    gate = TokenGate(mode="threshold", threshold=0.06)
    result = gate(program)
    kept = result.report["tokens_kept"]
    assert len(kept) == 3 and kept[0]["max"] <= 17
    x = images(5, 64, seed=3)
    batched = result.program(x)
    alone = torch.cat([result.program(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    # which tokens live is decided per image, identically alone and in a batch
    from edgefx.analysis.vit import analysis_batch, find_blocks
    from edgefx.passes.token_gate import _build_threshold

    vit = find_blocks(
        program.graph_module, program.example_inputs, analysis_batch(program.example_inputs, True)
    )
    gm = _build_threshold(program, vit, [0, 1, 2], [0.06] * 3, 2)
    in_batch = threshold_kept(gm, [x])
    one_by_one = threshold_kept(gm, [x[i : i + 1] for i in range(5)])
    for a, b in zip(in_batch, one_by_one, strict=True):
        assert torch.equal(a, b)
    assert len({int(c) for c in in_batch[2]}) > 1  # the counts really vary per image


def test_threshold_minus_inf_keeps_everything(deit64):
    program = deit64[1]
    result = TokenGate(mode="threshold", threshold=-math.inf)(program)
    x = images(3, 64)
    # the masked attention runs a different SDPA kernel: equal up to float rounding
    torch.testing.assert_close(result.program(x), program(x), atol=1e-5, rtol=1e-5)
    assert all(k["min"] == 17 for k in result.report["tokens_kept"])


@pytest.mark.slow
def test_threshold_compiles_to_onnx(deit64):
    compiled = edgefx.compile(
        deit64[1],
        passes=[TokenGate(mode="threshold", threshold=0.06)],
        backend="onnx",
        progress=False,
    )
    x = images(4, 64, seed=3)
    torch.testing.assert_close(
        compiled(x), compiled.report.passes[0].program(x), atol=1e-4, rtol=1e-4
    )


def test_threshold_tokens_are_dropped_with_a_data_dependent_count(tiny_vit):
    """compact=True (the default) removes tokens dead in the whole batch: outputs as the masked
    graph's (per image, whatever the batch), fewer MACs, and the ONNX export takes the token
    count from the data (ONNX TopK with a tensor k) and runs in onnxruntime."""
    from edgefx.passes.token_gate import _build_threshold, _thresholds_for_rate

    _, program = tiny_vit
    vit = _structure(program)
    x = images(6, 32, seed=7)
    probe = _build_threshold(program, vit, [0, 1], [-math.inf] * 2)
    thresholds = _thresholds_for_rate(probe, [x], 0.5, [0.0, 0.0])
    masked = TokenGate(mode="threshold", threshold=thresholds, gates=[0, 1], compact=False)
    dropped = TokenGate(mode="threshold", threshold=thresholds, gates=[0, 1])
    masked_result, dropped_result = masked(program), dropped(program)
    reference = masked_result.program(x)
    torch.testing.assert_close(dropped_result.program(x), reference, atol=1e-5, rtol=1e-5)
    alone = torch.cat([dropped_result.program(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(alone, reference, atol=1e-5, rtol=1e-5)
    assert dropped_result.report["macs_after"] < masked_result.report["macs_after"]
    compiled = edgefx.compile(program, passes=[dropped], backend="onnx", progress=False)
    for batch in (x[:1], x):
        want = masked_result.program(batch)
        torch.testing.assert_close(torch.as_tensor(compiled(batch)), want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- threshold budgets
@pytest.fixture(scope="module")
def tiny_vit():
    """A 3-block timm ViT on 32x32 images with 16 patch tokens: cheap enough to train."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=4
    ).eval()
    return model, capture(model, images(2, 32))


def _structure(program):
    from edgefx.analysis.vit import analysis_batch, find_blocks

    batch = analysis_batch(program.example_inputs, program.dynamic_batch)
    return find_blocks(program.graph_module, program.example_inputs, batch)


def test_gate_cost_is_the_measured_macs_of_gated_graphs(deit64):
    from edgefx.analysis.vit import concrete_values, node_by_name, token_axes
    from edgefx.passes.token_gate import _build_topk, gate_cost

    program = deit64[1]
    vit = _structure(program)
    cost = gate_cost(program, vit, [0, 1, 2])
    assert cost.dense == graph_cost(program.graph_module, program.example_inputs).total_macs
    values = concrete_values(program.graph_module, program.example_inputs, 2)
    first = node_by_name(program.graph_module)[vit.blocks[0].attention_residual]
    tags = {n.name: t for n, t in token_axes(program.graph_module, first, values, 17).items()}
    for counts in ([15, 11, 3], [7, 7, 6], [16, 2, 1]):
        gm = _build_topk(program, vit, [0, 1, 2], counts, False, tags)
        measured = graph_cost(gm, program.example_inputs).total_macs
        tokens = torch.tensor([[1.0 + c for c in counts]], dtype=torch.float64)
        assert float(cost.macs(tokens)) == pytest.approx(measured, abs=2)


def test_threshold_budget_is_met_on_calibration_data(tiny_vit):
    _, program = tiny_vit
    calib = [images(16, 32, seed=5)]
    result = TokenGate(mode="threshold", macs=0.6, calib=calib, gates=[0, 1])(program)
    report = result.report
    assert 0.5 < report["macs_ratio"] <= 0.6
    assert report["macs_effective"] <= 0.6 * report["macs_before"]
    # the example inputs' cost: the tokens dead in both example images are gone
    assert report["macs_after"] < report["macs_before"]
    kept = report["tokens_kept"]
    assert kept[0]["min"] < kept[0]["max"] or kept[1]["min"] < kept[1]["max"]  # per image
    # the effective MACs are the cost of the tokens each calibration image keeps
    from edgefx.passes.token_gate import _build_threshold, gate_cost, threshold_kept

    vit = _structure(program)
    gm = _build_threshold(program, vit, [0, 1], report["thresholds"])
    tokens = torch.stack(threshold_kept(gm, calib), dim=1).double()
    cost = gate_cost(program, vit, [0, 1])
    assert float(cost.macs(tokens).mean()) / cost.dense == pytest.approx(report["macs_ratio"])


def test_soft_gates_keep_exactly_the_hard_gates_tokens(tiny_vit):
    from edgefx.passes.token_gate import (
        _build_threshold,
        _thresholds_for_rate,
        soft_gated,
        threshold_kept,
    )

    _, program = tiny_vit
    vit = _structure(program)
    x = images(6, 32, seed=7)
    hard = _build_threshold(program, vit, [0, 1], [-math.inf] * 2)
    thresholds = _thresholds_for_rate(hard, [x], 0.6, [0.0, 0.0])  # keep 60% at each gate
    module, gates = soft_gated(program, vit, [0, 1], thresholds)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), hard(x), atol=0, rtol=0)
    hard_counts = threshold_kept(hard, [x])
    for gate, hard_count in zip(gates, hard_counts, strict=True):
        assert torch.equal(gate.count.long(), hard_count)
    assert any(len({int(c) for c in counts}) > 1 for counts in hard_counts)  # per image
    # the straight-through gradient reaches the thresholds and the weights
    module.train()
    out = module(x)
    (out.sum() + sum(g.count.sum() for g in gates)).backward()
    assert all(g.threshold.grad is not None and g.threshold.grad != 0 for g in gates)


def test_budget_aware_training_trains_thresholds_and_meets_the_budget(tiny_vit):
    _, program = tiny_vit
    torch.manual_seed(1)
    x = images(32, 32, seed=11)
    y = torch.randint(0, 4, (32,))
    data = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    gate = TokenGate(
        mode="threshold", macs=0.6, calib=[x], gates=[0, 1], train=data, epochs=2, lr=1e-3
    )
    result = gate(program)
    report = result.report
    training = report["training"]
    assert training["epochs"] == 2 and len(training["epoch_train_loss"]) == 2
    assert report["trained_thresholds"] != report["calibrated_thresholds"]
    assert report["macs_ratio"] <= 0.6
    # the budget is used, not undershot: the thresholds are shifted either way to meet it
    assert 0.57 <= report["macs_effective_ratio"] <= 0.6
    # the weights trained too, and the hard gates run as a Program (batch-independent)
    assert not torch.equal(
        result.program.graph_module.state_dict()["blocks.0.mlp.fc1.weight"],
        program.graph_module.state_dict()["blocks.0.mlp.fc1.weight"],
    )
    out = result.program(x[:5])
    alone = torch.cat([result.program(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)


def test_distillation_keeps_the_gated_model_near_the_dense_one(tiny_vit):
    """Trained on random labels, the gated model drifts from the dense one's predictions;
    with a distillation weight it stays much nearer (KL from the dense model's softmax)."""
    _, program = tiny_vit
    x = images(32, 32, seed=12)
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(3))
    data = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    held_out = images(16, 32, seed=13)
    dense = torch.log_softmax(program(held_out), -1)

    def drift(distill: float) -> tuple[float, dict]:
        torch.manual_seed(1)
        result = TokenGate(
            mode="threshold", macs=0.6, calib=[x], gates=[0, 1], train=data, epochs=3,
            lr=3e-3, distill=distill,
        )(program)  # fmt: skip
        gated = torch.log_softmax(result.program(held_out), -1)
        kl = F.kl_div(gated, dense, reduction="batchmean", log_target=True)
        return float(kl), result.report

    plain, _ = drift(0.0)
    distilled, report = drift(10.0)
    assert report["training"]["distill"] == 10.0 and report["macs_ratio"] <= 0.6
    assert distilled < 0.5 * plain, (distilled, plain)


def test_average_last_averages_the_thresholds_too(tiny_vit, monkeypatch):
    """The trained thresholds are the mean of their values after each step of the last epoch
    (the training trajectory is the same as without averaging, which gives the last step)."""
    from edgefx.passes import token_gate

    _, program = tiny_vit
    x = images(32, 32, seed=14)
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(4))
    data = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    seen: list[float] = []  # gate 0's threshold at each training forward pass
    forward = token_gate._SoftThresholdGate.forward

    def recording(self, *args):
        if self.training and self is soft_gates[0]:
            seen.append(self.value())
        return forward(self, *args)

    soft_gates: list = []
    make = token_gate._SoftThresholdGate.__init__

    def registering(self, *args, **kwargs):
        make(self, *args, **kwargs)
        soft_gates.append(self)

    monkeypatch.setattr(token_gate._SoftThresholdGate, "forward", recording)
    monkeypatch.setattr(token_gate._SoftThresholdGate, "__init__", registering)

    def train(average_last: int) -> dict:
        seen.clear()
        soft_gates.clear()
        torch.manual_seed(1)
        return TokenGate(
            mode="threshold", macs=0.6, calib=[x], gates=[0, 1], train=data, epochs=3,
            lr=3e-3, threshold_lr=0.5, average_last=average_last,
        )(program).report  # fmt: skip

    plain = train(0)
    last = plain["trained_thresholds"][0]
    averaged = train(1)
    assert averaged["training"]["averaged_steps"] == 4 and plain["training"]["averaged_steps"] == 0
    assert len(seen) == 12  # 3 epochs of 4 batches: the start, then after steps 0..10
    expected = sum([*seen[9:], last]) / 4
    assert averaged["trained_thresholds"][0] == pytest.approx(expected, rel=1e-5)
    assert averaged["trained_thresholds"][0] != pytest.approx(last, rel=1e-3)
    assert averaged["macs_ratio"] <= 0.6


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(keep=0), r"keep must be a fraction in \(0, 1\]"),
        (dict(keep=1.5), r"keep must be a fraction in \(0, 1\]"),
        (dict(keep=True), r"keep must be a fraction"),
        (dict(keep=[0.7, 0.8, 0.5]), "increases the tokens at gate 1"),
        (dict(keep=[0.7, 0.0]), r"keep fractions must be in \(0, 1\]"),
        (dict(keep=0.5, macs=0.5), "keep= or macs=, not both"),
        (dict(macs=0), r"macs must be a fraction"),
        (dict(mode="dynamic"), "mode must be"),
        (dict(gates=[6, 3]), "strictly increasing"),
        (dict(gates=[3, 6], keep=[0.5]), "1 entries for 2 gates"),
        (dict(mode="threshold"), "needs threshold="),
        (dict(mode="threshold", threshold=0.1, macs=0.65), "not both"),
        (dict(macs=0.65, train=[]), "needs mode='threshold' and macs="),
        (dict(mode="threshold", threshold=0.1, train=[]), "needs mode='threshold' and macs="),
        (dict(mode="threshold", macs=0.6, train=[(1, 2)], threshold_lr=0), "threshold_lr must"),
        (dict(mode="threshold", macs=0.6, train=[(1, 2)], epochs=0), "epochs must"),
        (dict(mode="threshold", macs=0.6, train=[(1, 2)], distill=-1), "distill must be"),
        (
            dict(mode="threshold", macs=0.6, train=[(1, 2)], epochs=2, average_last=3),
            "average_last must",
        ),
        (dict(mode="threshold", macs=0.6, train=torch.zeros(2)), "data must be a DataLoader"),
        (dict(mode="threshold", threshold=0.1, fuse=True), "fuse=True is for mode='topk'"),
    ],
)
def test_bad_arguments_are_refused_eagerly(kwargs, match):
    with pytest.raises(PassError, match=match):
        TokenGate(**kwargs)


def test_gate_out_of_range(deit64):
    with pytest.raises(PassError, match=r"gate block\(s\) \[4\] out of range: the model has 4"):
        TokenGate(gates=[1, 4])(deit64[1])
    with pytest.raises(PassError, match="3 entries for 1 gates"):
        TokenGate(gates=[1], keep=[0.5, 0.4, 0.3])(deit64[1])


def test_model_without_attention_is_refused(helpers):
    program = capture(helpers.make_small_net(), torch.randn(1, 3, 8, 8))
    with pytest.raises(UnsupportedModelError, match="no attention"):
        TokenGate()(program)


@pytest.mark.slow
def test_cli_gate(capsys, monkeypatch):
    from edgefx.tools.cli import main

    monkeypatch.syspath_prepend(str(MODELS))
    assert (
        main(["compile", "vit_models:tiny_deit", "-p", "gate:keep=0.5", "--backend", "torch"]) == 0
    )
    assert "TokenGate" in capsys.readouterr().out
