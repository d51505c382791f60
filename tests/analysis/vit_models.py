"""Small ViTs for the TokenGate / ViT-analysis tests (also loaded by the CLI as
`vit_models:FACTORY`; this folder is put on sys.path there). Random weights, seeded; every
classifier head gets non-zero weights (torchvision initialises its head to zero, which would
make every output 0 and every comparison vacuous)."""

from __future__ import annotations

import torch
from torch import nn


def _nonzero_head(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("head", "heads")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.eval()


def timm_vit(name: str = "deit_small_patch16_224", seed: int = 0, **kwargs) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    kwargs.setdefault("img_size", 32)
    return _nonzero_head(timm.create_model(name, pretrained=False, **kwargs), seed)


def unfused(model: nn.Module) -> nn.Module:
    """timm attention with ``fused_attn`` off: explicit softmax(q k^T) @ v."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def torchvision_vit(seed: int = 0, **kwargs) -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(seed)
    config = dict(
        image_size=32, patch_size=8, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128
    )
    config.update(kwargs)
    return _nonzero_head(VisionTransformer(**config), seed)


def images(batch: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tiny_deit():
    """For the CLI: a 4-block DeiT-Tiny at 32x32."""
    return timm_vit("deit_tiny_patch16_224", depth=4), (images(1),)


class Logits(nn.Module):
    """A Hugging Face image classifier seen as ``pixels -> logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def hf_vit(seed: int = 0, attn_implementation: str = "sdpa", layers: int = 4) -> nn.Module:
    """A small Hugging Face ``ViTForImageClassification`` (``layers`` blocks) returning its
    logits."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=10,
        attn_implementation=attn_implementation,
    )
    return Logits(ViTForImageClassification(config)).eval()
