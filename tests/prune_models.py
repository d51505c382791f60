"""Small models with every channel coupling ChannelPrune must respect (shared by the
depgraph and ChannelPrune tests)."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class Couplings(nn.Module):
    """Residual add, concat, depthwise conv, grouped conv, split, squeeze-excite gate and a
    flatten into a linear head, in one 16x16 network."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.res = conv_bn(16, 16)  # added to the stem's output
        self.branch_a = conv_bn(16, 8, 1)
        self.branch_b = conv_bn(16, 8)  # cat(a, b) -> 16
        self.dw = conv_bn(16, 16, groups=16)  # depthwise
        self.grouped = conv_bn(16, 24, groups=4)  # 4 in / 6 out per group
        self.se_reduce = nn.Conv2d(24, 6, 1)
        self.se_expand = nn.Conv2d(6, 24, 1)
        self.after_split = conv_bn(12, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(2 * 8 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.res(x))
        x = torch.cat([torch.relu(self.branch_a(x)), torch.relu(self.branch_b(x))], dim=1)
        x = torch.relu(self.dw(x))
        x = torch.relu(self.grouped(x))
        gate = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(x.mean((2, 3), True)))))
        x = x * gate
        left, right = torch.split(x, 12, dim=1)
        y = torch.cat([torch.relu(self.after_split(left)), torch.relu(self.after_split(right))], 1)
        return self.head(torch.flatten(self.pool(y), 1))


class ChannelShuffle(nn.Module):
    """A reshape that interleaves channels (ShuffleNet): the analysis must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn(3, 8, 1)
        self.out = conv_bn(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        b, c, h, w = x.shape
        x = x.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.out(x)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm gammas in [0.5, 1.5), betas and statistics random; conv weights as built."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(c, generator=gen) * 0.3)
                module.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                module.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model.eval()


def deit_small(depth: int = 2, image: int = 32) -> nn.Module:
    """timm deit_small (6 heads of 64, MLP 1536) with ``depth`` blocks at ``image`` pixels."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "deit_small_patch16_224", img_size=image, depth=depth, pretrained=False
    ).eval()


def vit_b_16(depth: int = 2, image: int = 32) -> nn.Module:
    """torchvision vit_b_16 (12 heads of 64, MLP 3072; nn.MultiheadAttention) with its first
    ``depth`` encoder layers at ``image`` pixels; the zero-initialised head drawn at random."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=image)
    model.encoder.layers = model.encoder.layers[:depth]
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model.eval()


def silence_heads_and_mlp(model: nn.Module, heads: dict[int, list[int]], hidden: list[int]) -> None:
    """Zero the q, k and v projections (weights and biases) of the given heads of each block
    (block index -> heads) and the given MLP hidden channels of every block's first layer:
    those heads then output exact zeros (uniform attention over zero values) and those
    hidden channels gelu(0) = 0, so removing them changes nothing."""
    if hasattr(model, "blocks"):  # timm
        blocks = [(b.attn.qkv, b.attn.num_heads, b.mlp.fc1) for b in model.blocks]
    else:  # torchvision
        blocks = [
            (
                _InProj(layer.self_attention),
                layer.self_attention.num_heads,
                layer.mlp[0],
            )
            for layer in model.encoder.layers
        ]
    with torch.no_grad():
        for index, (qkv, num_heads, fc1) in enumerate(blocks):
            width = qkv.weight.shape[0] // 3
            head_dim = width // num_heads
            for h in heads.get(index, []):
                for part in range(3):
                    rows = slice(part * width + h * head_dim, part * width + (h + 1) * head_dim)
                    qkv.weight[rows] = 0.0
                    qkv.bias[rows] = 0.0
            fc1.weight[hidden] = 0.0
            fc1.bias[hidden] = 0.0


class _InProj:
    """nn.MultiheadAttention's packed q/k/v projection seen as a layer with weight and bias."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        self.weight = attention.in_proj_weight
        self.bias = attention.in_proj_bias


class ChannelsLastBlock(nn.Module):
    """A LayerNorm over channels (channels-last, as ConvNeXt) and an expand with the channel
    count written out: the slimming must rewrite both sizes."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width
        self.stem = conv_bn(3, width)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.out = nn.Conv2d(width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        b, _, h, w = x.shape
        x = x * x.mean((2, 3), keepdim=True).expand(b, self.width, h, w)
        y = self.fc(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.out(torch.relu(y) + x)

    def sliced(self, keep: list[int]) -> ChannelsLastBlock:
        """The same block with only channels ``keep``, weights cut by hand."""
        small = ChannelsLastBlock(len(keep)).eval()
        index = torch.tensor(keep)
        with torch.no_grad():
            small.stem[0].weight.copy_(self.stem[0].weight[index])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(small.stem[1], name).copy_(getattr(self.stem[1], name)[index])
            small.norm.weight.copy_(self.norm.weight[index])
            small.norm.bias.copy_(self.norm.bias[index])
            small.fc.weight.copy_(self.fc.weight[index][:, index])
            small.fc.bias.copy_(self.fc.bias[index])
            small.out.weight.copy_(self.out.weight[:, index])
            small.out.bias.copy_(self.out.bias)
        return small


class Attention(nn.Module):
    """timm-style self-attention on 1x1 patches: one q/k/v projection, reshape to
    (3, heads, head dim), scaled_dot_product_attention, merge the heads, output projection."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, width, 1)  # 1x1 patches
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.embed(image).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.head(x + self.proj(y.transpose(1, 2).reshape(b, n, c)))
