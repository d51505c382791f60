"""edgefx.analysis.vit: finding transformer blocks, their attention and the prefix tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgefx.analysis.vit import UnsupportedModelError, analysis_batch, find_blocks
from edgefx.frontend import capture

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _models_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def _read(model: nn.Module, size: int = 32):
    from vit_models import images

    program = capture(model, images(1, size))
    code = program.graph_module.code
    vit = find_blocks(
        program.graph_module,
        program.example_inputs,
        analysis_batch(program.example_inputs, program.dynamic_batch),
    )
    assert program.graph_module.code == code  # analyses never mutate
    return vit


def test_timm_deit_fused_attention():
    from vit_models import timm_vit

    vit = _read(timm_vit("deit_small_patch16_224", depth=3))
    assert [b.module for b in vit.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    block = vit.blocks[0]
    assert block.attention_module == "blocks.0.attn" and block.kind == "sdpa"
    assert (block.heads, block.head_dim, block.tokens, block.embed_dim) == (6, 64, 5, 384)
    assert block.scale == pytest.approx(64**-0.5)
    assert (vit.prefix_tokens, vit.prefix_sources, vit.uses_cls) == (1, ("cls_token",), True)


def test_timm_unfused_attention_reads_the_softmax():
    from vit_models import timm_vit, unfused

    vit = _read(unfused(timm_vit("vit_tiny_patch16_224", depth=2)))
    assert [b.kind for b in vit.blocks] == ["softmax", "softmax"]
    assert (vit.blocks[1].heads, vit.blocks[1].head_dim) == (3, 64)
    assert vit.blocks[0].scale == pytest.approx(64**-0.5)  # timm scales q before q @ k^T


def test_torchvision_multihead_attention():
    from vit_models import torchvision_vit

    vit = _read(torchvision_vit())
    assert [b.module for b in vit.blocks] == [f"encoder.layers.encoder_layer_{i}" for i in range(4)]
    assert vit.blocks[0].attention_module.endswith("self_attention")
    assert (vit.blocks[0].heads, vit.blocks[0].head_dim, vit.tokens) == (4, 16, 17)
    assert (vit.prefix_tokens, vit.prefix_sources) == (1, ("class_token",))


@pytest.mark.parametrize(
    ("kwargs", "prefix", "sources"),
    [
        (dict(name="deit_tiny_distilled_patch16_224"), 2, ("cls_token", "dist_token")),
        (dict(name="vit_tiny_patch16_224", reg_tokens=4), 5, ("cls_token", "reg_token")),
        (dict(name="deit3_small_patch16_224"), 1, ("cls_token",)),  # LayerScale
    ],
)
def test_prefix_tokens(kwargs, prefix, sources):
    from vit_models import timm_vit

    vit = _read(timm_vit(depth=2, **kwargs))
    assert (vit.prefix_tokens, vit.prefix_sources, vit.uses_cls) == (prefix, sources, True)
    assert vit.patch_tokens == 4


def test_without_cls_token_uses_mean_attention():
    from vit_models import timm_vit

    vit = _read(timm_vit("vit_tiny_patch16_224", depth=2, class_token=False, global_pool="avg"))
    assert (vit.prefix_tokens, vit.uses_cls) == (0, False)
    assert "mean attention" in vit.notes[0]


def test_model_without_attention_is_refused(helpers):
    program = capture(helpers.make_small_net(), torch.randn(1, 3, 8, 8))
    with pytest.raises(UnsupportedModelError, match="no attention"):
        find_blocks(program.graph_module, program.example_inputs)


def test_post_norm_transformer_is_refused_with_the_reason():
    class PostNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 32, 8, 8)
            layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=False)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, x):
            return self.encoder(self.patch(x).flatten(2).transpose(1, 2)).mean(1)

    program = capture(PostNorm(), torch.randn(1, 3, 32, 32))
    with pytest.raises(UnsupportedModelError, match="not pre-norm") as info:
        find_blocks(program.graph_module, program.example_inputs)
    assert info.value.module == "encoder.layers.0.self_attn"


def test_cli_inspect_blocks(capsys):
    from edgefx.tools.cli import main

    assert main(["inspect", "vit_models:tiny_deit", "--blocks", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "Transformer blocks" in out and "blocks.3.attn" in out and "fused SDPA" in out
    assert "1 prefix token(s) (cls_token), 4 patch tokens" in out
