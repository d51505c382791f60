"""ChannelPrune on the transformer families beyond timm ViT: Hugging Face ViT, DeiT, Swin and
ConvNeXt, torchvision ViT captured with a dynamic batch, Swin (timm and torchvision). For each:
heads and MLP hidden channels whose weights were zeroed are removed without changing the outputs,
and a MACs budget is met with the pruned model lowered to ONNX (run at another batch size).
Where a part cannot be pruned (Swin V2's cosine attention heads) the report says so."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from prune_models import silence_heads_and_mlp
from torch import nn

import edgefx
from edgefx.frontend import capture
from edgefx.passes import ChannelPrune

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "analysis"))
from vit_models import Logits, hf_vit, torchvision_vit

GEN = torch.Generator().manual_seed(11)


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    actual, reference = actual.double(), reference.double()
    return float((actual - reference).abs().max() / reference.abs().max())


def zero_rows(layer: nn.Linear, rows: list[int]) -> None:
    """Output channels ``rows`` of ``layer`` become exact zeros (weights and bias)."""
    with torch.no_grad():
        layer.weight[rows] = 0.0
        if layer.bias is not None:
            layer.bias[rows] = 0.0


def head_rows(head: int, head_dim: int, offset: int = 0) -> list[int]:
    return list(range(offset + head * head_dim, offset + (head + 1) * head_dim))


def zero_heads_of_qkv(qkv: nn.Linear, num_heads: int, heads: list[int]) -> None:
    """A joint q/k/v projection (rows: q, then k, then v): the given heads of all three
    become zeros, so those heads attend uniformly over zero values and output zeros."""
    width = qkv.weight.shape[0] // 3
    for part in range(3):
        for h in heads:
            zero_rows(qkv, head_rows(h, width // num_heads, part * width))


# ------------------------------------------------------------------------------- models
def hf_convnext() -> nn.Module:
    """A two-stage Hugging Face ConvNextForImageClassification (16 and 32 channels), random
    init from its config, layer scale drawn at random (its 1e-6 init would hide the blocks)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(
        num_channels=3,
        patch_size=4,
        hidden_sizes=[16, 32],
        depths=[2, 2],
        num_stages=2,
        num_labels=10,
        image_size=32,
    )
    model = transformers.ConvNextForImageClassification(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layer_scale_parameter"):
                param.copy_(torch.rand(param.shape, generator=GEN) + 0.5)
    return Logits(model).eval()


def hf_classifier(family: str, **config) -> nn.Module:
    """Hugging Face ``{family}ForImageClassification`` from ``{family}Config(**config)``,
    random init, returning its logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    built = getattr(transformers, f"{family}Config")(num_labels=10, **config)
    return Logits(getattr(transformers, f"{family}ForImageClassification")(built)).eval()


def hf_deit() -> nn.Module:
    """A two-block Hugging Face DeiT (class and distillation tokens, the logits from the class
    token), 4 heads of 16."""
    return hf_classifier(
        "DeiT",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
    )


def hf_swin() -> nn.Module:
    """A Hugging Face Swin, small: 32x32 input, 2 stages of 2 blocks with 4x4 windows (the
    second block of each stage shifted), 2 and 4 heads of 16."""
    return hf_classifier(
        "Swin",
        image_size=32,
        patch_size=4,
        embed_dim=32,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
    )


def timm_convnext() -> nn.Module:
    """timm ConvNeXt-atto's architecture (1x1-conv MLP, layer scale applied as
    ``x.mul(gamma.reshape(1, -1, 1, 1))``), small: one block per stage, 16, 16, 32 and 32
    channels, layer scale drawn at random."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "convnext_atto",
        pretrained=False,
        depths=(1, 1, 1, 1),
        dims=(16, 16, 32, 32),
        num_classes=10,
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.copy_(torch.rand(param.shape, generator=GEN) + 0.5)
    return model.eval()


def timm_swin() -> nn.Module:
    """timm Swin-T's architecture, small: 56x56 input, 2 stages of 2 blocks (stage 0's second
    block uses shifted windows and their attention mask), 2 and 4 heads of 16."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=56,
        embed_dim=32,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=7,
        num_classes=10,
    ).eval()


def torchvision_swin(v2: bool = False) -> nn.Module:
    """torchvision's Swin (swin_t's architecture; V2 with ``v2``), small: 32x32 input, 2
    stages of 2 blocks with 4x4 windows (the second block of each stage shifted), 2 and 4
    heads."""
    pytest.importorskip("torchvision")
    from torchvision.models import swin_transformer as swin

    torch.manual_seed(0)
    kwargs = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2}
    return swin.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=32,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=[4, 4],
        num_classes=10,
        **(kwargs if v2 else {}),
    ).eval()


# ------------------------------------------------------------ zeroing heads and MLP channels
def silence_hf_blocks(
    blocks: list[tuple[nn.Module, int]], heads: dict[int, list[int]], hidden: list[int]
) -> int:
    """Hugging Face blocks as (layer, number of heads): the given heads' q, k and v rows (each
    its own projection) and the given MLP hidden channels become zeros."""
    for index, (layer, num_heads) in enumerate(blocks):
        attention = layer.attention
        head_dim = attention.q_proj.weight.shape[0] // num_heads
        for h in heads.get(index, []):
            for proj in (attention.q_proj, attention.k_proj, attention.v_proj):
                zero_rows(proj, head_rows(h, head_dim))
        zero_rows(layer.mlp.fc1, hidden)
    return sum(map(len, heads.values())) + len(hidden) * len(blocks)


def silence_hf_vit(model: nn.Module, heads: dict[int, list[int]], hidden: list[int]) -> int:
    backbone = model.model.vit if hasattr(model.model, "vit") else model.model.deit
    num_heads = model.model.config.num_attention_heads
    return silence_hf_blocks([(layer, num_heads) for layer in backbone.layers], heads, hidden)


def silence_hf_swin(model: nn.Module, heads: dict[int, list[int]], hidden: list[int]) -> int:
    stages = model.model.swin.encoder.layers
    num_heads = model.model.config.num_heads
    blocks = [(block, num_heads[i]) for i, stage in enumerate(stages) for block in stage.blocks]
    return silence_hf_blocks(blocks, heads, hidden)


def silence_hf_convnext(model: nn.Module, hidden: list[int]) -> int:
    layers = [layer for stage in model.model.convnext.encoder.stages for layer in stage.layers]
    for layer in layers:
        zero_rows(layer.pwconv1, hidden)
    return len(hidden) * len(layers)


def silence_timm_convnext(model: nn.Module, hidden: list[int]) -> int:
    blocks = [block for stage in model.stages for block in stage.blocks]
    for block in blocks:
        zero_rows(block.mlp.fc1, hidden)
    return len(hidden) * len(blocks)


def silence_timm_swin(model: nn.Module, heads: dict[int, list[int]], hidden: list[int]) -> int:
    blocks = [block for stage in model.layers for block in stage.blocks]
    for index, block in enumerate(blocks):
        zero_heads_of_qkv(block.attn.qkv, block.attn.num_heads, heads.get(index, []))
        zero_rows(block.mlp.fc1, hidden)
    return sum(map(len, heads.values())) + len(hidden) * len(blocks)


def silence_torchvision_swin(
    model: nn.Module, heads: dict[int, list[int]], hidden: list[int]
) -> int:
    blocks = [block for stage in model.features[1::2] for block in stage]
    for index, block in enumerate(blocks):
        zero_heads_of_qkv(block.attn.qkv, block.attn.num_heads, heads.get(index, []))
        zero_rows(block.mlp[0], hidden)
    return sum(map(len, heads.values())) + len(hidden) * len(blocks)


def silence_torchvision_vit(model: nn.Module, heads: dict[int, list[int]], hidden: list[int]):
    silence_heads_and_mlp(model, heads, hidden)
    return sum(map(len, heads.values())) + len(hidden) * len(model.encoder.layers)


# name -> (build, silence (model) -> groups silenced, input size, a weight cut by whole heads)
HEADS = {0: [1], 1: [0, 3]}
FAMILIES: dict[str, tuple[Callable, Callable, int, str | None]] = {
    "hf_vit": (
        lambda: (pytest.importorskip("transformers"), hf_vit(layers=2))[1],
        lambda m: silence_hf_vit(m, {0: [1], 1: [0, 2]}, [5, 40, 77]),
        32,
        "model.vit.layers.1.attention.q_proj.weight",
    ),
    "hf_deit": (
        hf_deit,
        lambda m: silence_hf_vit(m, {0: [1], 1: [0, 2]}, [5, 40, 77]),
        32,
        "model.deit.layers.1.attention.q_proj.weight",
    ),
    "hf_swin": (
        hf_swin,
        lambda m: silence_hf_swin(m, {1: [0], 2: [1, 2]}, [5, 40, 77]),
        32,
        "model.swin.encoder.layers.1.blocks.0.attention.q_proj.weight",
    ),
    "hf_convnext": (hf_convnext, lambda m: silence_hf_convnext(m, [3, 17, 50]), 32, None),
    "timm_convnext": (timm_convnext, lambda m: silence_timm_convnext(m, [3, 17, 50]), 32, None),
    "torchvision_vit": (
        lambda: torchvision_vit(num_layers=2, num_classes=10),
        lambda m: silence_torchvision_vit(m, {0: [1], 1: [0, 3]}, [5, 40, 77]),
        32,
        "encoder.layers.encoder_layer_1.self_attention.in_proj_weight",
    ),
    "timm_swin": (
        timm_swin,
        lambda m: silence_timm_swin(m, {0: [1], 1: [0], 3: [2, 3]}, [5, 40, 77]),
        56,
        "layers.1.blocks.1.attn.qkv.weight",
    ),
    "torchvision_swin": (
        torchvision_swin,
        lambda m: silence_torchvision_swin(m, {1: [0], 2: [1, 2]}, [5, 40, 77]),
        32,
        "features.3.0.attn.qkv.weight",
    ),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_zeroed_heads_and_mlp_channels_are_removed_exactly_at_any_batch(name):
    build, silence, size, cut_by_heads = FAMILIES[name]
    model = build()
    silenced = silence(model)
    before = {k: v.shape for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, size, size, generator=GEN)
    program = capture(model, (x,))  # dynamic batch
    pruned, report = ChannelPrune(threshold=1e-6, min_keep=0).run(program)
    assert report["groups_removed"] == silenced
    assert report["estimated_macs"] < program.cost().total_macs
    params = dict(pruned.graph_module.named_parameters())
    if cut_by_heads is not None:  # the heads left are whole: rows a multiple of the head dim
        assert params[cut_by_heads].shape[0] < before[cut_by_heads][0]
    for batch in (1, 3, 5):
        inputs = torch.randn(batch, 3, size, size, generator=GEN)
        with torch.no_grad():
            assert rel_err(pruned(inputs), model(inputs)) <= 1e-5
    assert {k: v.shape for k, v in model.state_dict().items()} == before  # model untouched


@pytest.mark.parametrize(
    "name",
    [
        # the Swin ONNX exports take ~40 s each on 2 cores
        pytest.param(name, marks=pytest.mark.slow) if "swin" in name else name
        for name in sorted(FAMILIES)
    ],
)
def test_a_macs_budget_is_met_and_the_pruned_model_runs_in_onnx_runtime(name):
    build, _, size, _ = FAMILIES[name]
    model = build()
    x = torch.randn(2, 3, size, size, generator=GEN)
    compiled = edgefx.compile(model, (x,), passes=[ChannelPrune(macs=0.5)], progress=False)
    (prune,) = compiled.report.passes
    assert prune.after.macs <= 0.5 * prune.before.macs
    assert prune.report["estimated_macs"] == prune.after.macs
    assert set(prune.report["ranked_by"]) == {"l2"}  # no BatchNorm in these families
    # nothing but the model's own inputs and outputs is kept whole
    kept = {row["reason"] for row in prune.report["kept_whole"]}
    assert kept == {"model input", "model output"}, prune.report["kept_whole"]
    # channels left are multiples of 8 where a whole layer width is cut (round_to=8)
    widths = [row["kept"] for row in prune.report["layers"] if row["channels"] % 8 == 0]
    assert widths and all(w % 8 == 0 for w in widths)
    x3 = torch.randn(3, 3, size, size, generator=GEN)
    expected = compiled.program(x3)
    assert expected.shape == (3, 10)
    assert rel_err(compiled(x3), expected) <= 1e-4


def test_swin_v2_heads_that_cannot_be_pruned_are_reported_with_the_reason():
    """Swin V2's cosine attention normalises q and k per head and scales each head by a
    learned factor, which the analysis does not follow: its heads stay, the MLP and stream
    channels go, and the report lists the heads' layers as kept whole with the reason."""
    model = torchvision_swin(v2=True)
    x = torch.randn(2, 3, 32, 32, generator=GEN)
    result = ChannelPrune(macs=0.7)(capture(model, (x,)))
    assert result.after.macs <= 0.7 * result.before.macs
    kept = result.report["kept_whole"]
    attention = [row for row in kept if any(m.endswith(".attn") for m in row["modules"])]
    assert attention, kept
    assert all(row["reason"] for row in attention)
    assert any("attention heads" in row["reason"] for row in attention)
    qkv = dict(result.program.graph_module.named_parameters())["features.1.0.attn.qkv.weight"]
    assert qkv.shape[0] == 3 * 32  # every head of every block is still there
    assert result.report["not_ranked"]  # the counts by reason, as for every model


@pytest.mark.parametrize("name", ["hf_deit", "hf_swin"])
def test_hugging_face_deit_and_swin_keep_whole_heads_and_one_residual_width(name):
    """A MACs budget on Hugging Face DeiT / Swin with some heads silenced (so heads go too):
    in every block q, k and v keep the same whole heads (rows a multiple of the head dim,
    the output projection's columns and Swin's per-head relative position bias alike), the
    MLP's two layers agree, and every layer on a stage's residual stream (LayerNorms,
    output projections, fc2, the patch merging into it) keeps one width."""
    build, silence, size, _ = FAMILIES[name]
    model = build()
    silence(model)
    program = capture(model, (torch.randn(2, 3, size, size, generator=GEN),))
    result = ChannelPrune(macs=0.5)(program)
    assert result.after.macs <= 0.5 * result.before.macs
    before = dict(program.graph_module.named_parameters())
    params = {k: tuple(v.shape) for k, v in result.program.graph_module.named_parameters()}
    prefix = "model.deit.layers." if name == "hf_deit" else "model.swin.encoder.layers."
    blocks = sorted({k[: k.index(".attention.")] for k in params if ".attention.q_proj." in k})
    head_dim = 16
    heads_cut = 0
    for block in blocks:
        rows = {params[f"{block}.attention.{p}_proj.weight"][0] for p in "qkv"}
        (width,) = rows  # q, k, v alike
        assert width % head_dim == 0 and params[f"{block}.attention.o_proj.weight"][1] == width
        table = f"{block}.attention.relative_position_bias.relative_position_bias_table"
        if table in params:
            assert params[table][1] == width // head_dim
        heads_cut += before[f"{block}.attention.q_proj.weight"].shape[0] != width
        assert params[f"{block}.mlp.fc1.weight"][0] == params[f"{block}.mlp.fc2.weight"][1]
    assert heads_cut  # the silenced heads went
    stages = [[b for b in blocks if b.startswith(prefix)]]
    if name == "hf_swin":
        stages = [[b for b in blocks if b.startswith(f"{prefix}{i}.")] for i in (0, 1)]
    for stage in stages:
        stream = {params[f"{b}.{n}.weight"][0] for b in stage for n in NORMS}
        stream |= {params[f"{b}.attention.o_proj.weight"][0] for b in stage}
        stream |= {params[f"{b}.mlp.fc2.weight"][0] for b in stage}
        stream |= {params[f"{b}.attention.q_proj.weight"][1] for b in stage}
        assert len(stream) == 1, (stage, stream)
    if name == "hf_swin":  # the patch merging feeds stage 1's stream
        merged = params[f"{prefix}0.downsample.reduction.weight"][0]
        assert merged == params[f"{prefix}1.blocks.0.layernorm_before.weight"][0]
        assert (
            params[f"{prefix}0.downsample.reduction.weight"][1]
            == 4 * (params[f"{prefix}0.blocks.0.layernorm_before.weight"][0])
        )


NORMS = ("layernorm_before", "layernorm_after")
