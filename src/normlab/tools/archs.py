"""Built-in architectures for the tools and the CLI (no torchvision needed).

``resnet18`` has torchvision's ResNet-18 layout and state-dict keys exactly (``conv1``,
``bn1``, ``layer1.0.conv1``, ..., ``layer2.0.downsample.0/1``, ``fc``), so a torchvision
``resnet18`` checkpoint loads into it; ``base_width`` shrinks it for tests and quick
experiments (``resnet18_tiny`` is width 8, 10 classes). :func:`build_architecture`
resolves a name to one of these, or -- when torchvision is installed -- to
``torchvision.models.get_model(name)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet18_tiny", "ARCHITECTURES", "architecture_names",
           "build_architecture"]

NormLayer = Callable[[int], nn.Module]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN plus the shortcut (Conv1x1-BN when the shape changes), then ReLU."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = norm_layer(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = norm_layer(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            norm_layer(cout))
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-style ResNet with BasicBlocks: input (N, in_channels, H, W) -> logits
    (N, num_classes). ``small_input`` replaces the 7x7/stride-2 stem and max-pool by a
    3x3/stride-1 conv (for 32x32 images)."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 1000,
                 base_width: int = 64, in_channels: int = 3, norm_layer: NormLayer | None = None,
                 small_input: bool = False) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        w = base_width
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, w, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, w, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = norm_layer(w)
        self.relu = nn.ReLU(inplace=True)
        cin = w
        for i, blocks in enumerate(layers):
            cout = w * 2 ** i
            stage = [BasicBlock(cin, cout, 1 if i == 0 else 2, norm_layer)]
            stage += [BasicBlock(cout, cout, 1, norm_layer) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            cin = cout
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, base_width: int = 64, in_channels: int = 3,
             norm_layer: NormLayer | None = None, small_input: bool = False) -> ResNet:
    """ResNet-18 with torchvision's module names (its state dicts load into this)."""
    return ResNet((2, 2, 2, 2), num_classes, base_width, in_channels, norm_layer, small_input)


def resnet18_tiny(num_classes: int = 10, norm_layer: NormLayer | None = None) -> ResNet:
    """ResNet-18 at width 8 for 32x32 inputs (about 0.18M parameters): tests, demos."""
    return ResNet((2, 2, 2, 2), num_classes, 8, 3, norm_layer, small_input=True)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet18_tiny": resnet18_tiny,
}


def architecture_names() -> list[str]:
    """The built-in names (torchvision's are accepted too when it is installed)."""
    return list(ARCHITECTURES)


def build_architecture(name: str, **kwargs: Any) -> nn.Module:
    """A freshly initialized model by name: a built-in, else torchvision's (if installed)."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name](**kwargs)
    try:
        import torchvision  # noqa: F401  (optional; its CPU/CUDA builds are large)
        from torchvision.models import get_model
    except ImportError:
        raise ValueError(f"unknown architecture {name!r}; built-in: {', '.join(ARCHITECTURES)} "
                         "(torchvision architectures need torchvision installed)") from None
    try:
        return get_model(name, **kwargs)
    except ValueError as error:
        raise ValueError(f"unknown architecture {name!r}: {error}") from None
