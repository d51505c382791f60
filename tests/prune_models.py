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
