"""Small models the CLI tests load as `cli_models:FACTORY` (this folder is put on sys.path)."""

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def tiny():
    torch.manual_seed(0)
    return TinyNet(), (torch.randn(1, 3, 16, 16),)


def tiny_module_only():
    torch.manual_seed(0)
    return TinyNet()


def not_a_model():
    return "hello"


def deit_tiny():
    """timm's DeiT-Tiny at 32x32 (4 patches + CLS): 12 identical blocks, small to capture."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    return model, (torch.randn(1, 3, 32, 32),)


def mobilenet_v2():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2().eval(), (torch.randn(1, 3, 32, 32),)


def resnet18():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18().eval(), (torch.randn(1, 3, 32, 32),)


def other():
    """A small net unrelated to TinyNet (no module names in common)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 4, 3))
    model.add_module("act", nn.ReLU())
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("classifier", nn.Linear(4, 2))
    return model, (torch.randn(1, 3, 16, 16),)


class WideNet(nn.Module):
    """Three 3x3 convs at 32x32 whose time is mostly in the convolutions (a latency budget
    on it is reachable on any runtime)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((3, 32), (32, 64), (64, 64)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def wide():
    torch.manual_seed(0)
    return WideNet().eval(), (torch.randn(1, 3, 32, 32),)
