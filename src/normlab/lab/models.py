"""Models built by norm name: every normalization slot is ``normlab.nn.build_norm(name, C, d)``.

The convolutions and the classifier are initialized from the torch seed *before* any
norm is built (norm layers take no random numbers: weight 1, bias 0), so for one seed
every norm starts from the same convolution weights -- the comparison differs only in
the normalization.

* ``cnn1d`` (MNIST-1D, input (N, C, L)): 3 x [conv k3 -> norm -> ReLU], strides 1, 2, 2,
  then flatten -> linear.
* ``cnn2d`` (small images such as 8x8 digits): the same with 2-D convolutions.
* ``resnet`` (CIFAR-style, ResNet-20 with ``depth=3``): conv stem, three stages of
  ``depth`` basic blocks (widths w, 2w, 4w, stride 2 between stages), global average
  pooling, linear.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import build_norm

__all__ = ["build_model", "default_arch"]


def _norm(name: str, channels: int, spatial_dims: int, groups: int) -> nn.Module:
    kwargs = {"num_groups": groups} if name in ("gn", "groupnorm") else {}
    return build_norm(name, channels, spatial_dims, **kwargs)


def _conv(spatial_dims: int):
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


class PlainCNN(nn.Module):
    """Three conv -> norm -> ReLU blocks and a linear classifier on the flattened features.

    Input (N, C_in, *spatial) -> logits (N, num_classes).
    """

    def __init__(self, norm: str, in_channels: int, num_classes: int, spatial_shape: tuple[int, ...],
                 width: int, groups: int) -> None:
        super().__init__()
        d = len(spatial_shape)
        conv = _conv(d)
        chans = [in_channels, width, width, width]
        strides = [1, 2, 2]
        convs = [conv(chans[i], chans[i + 1], 3, stride=strides[i], padding=1, bias=False) for i in range(3)]
        self.convs = nn.ModuleList(convs)  # created (and seeded) before any norm
        size = list(spatial_shape)
        for s in strides:
            size = [(n + 2 - 3) // s + 1 for n in size]
        flat = width * int(torch.tensor(size).prod())
        self.head = nn.Linear(flat, num_classes)
        self.norms = nn.ModuleList(_norm(norm, width, d, groups) for _ in range(3))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = self.act(norm(conv(x)))
        return self.head(x.flatten(1))


class _Block(nn.Module):
    def __init__(self, conv, cin: int, cout: int, stride: int, norm, d: int) -> None:
        super().__init__()
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.conv2 = conv(cout, cout, 3, padding=1, bias=False)
        self.short = conv(cin, cout, 1, stride=stride, bias=False) if (stride != 1 or cin != cout) else None
        self.norm1, self.norm2 = norm(cout), norm(cout)
        self.norm_s = norm(cout) if self.short is not None else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        skip = x if self.short is None else self.norm_s(self.short(x))
        return self.act(out + skip)


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, sec. 4.2): 6*depth+2 layers; depth=3 is ResNet-20."""

    def __init__(self, norm: str, in_channels: int, num_classes: int, spatial_dims: int, width: int,
                 depth: int, groups: int) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        def make_norm(c: int) -> nn.Module:
            return _norm(norm, c, spatial_dims, groups)
        self.stem = conv(in_channels, width, 3, padding=1, bias=False)
        self.stem_norm = make_norm(width)
        blocks, cin = [], width
        for stage, mult in enumerate((1, 2, 4)):
            for i in range(depth):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(_Block(conv, cin, width * mult, stride, make_norm, spatial_dims))
                cin = width * mult
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.stem_norm(self.stem(x))))
        return self.head(x.flatten(2).mean(-1))


def default_arch(dataset: str, spatial_dims: int) -> str:
    """cnn1d for 1-D signals, cnn2d for the tiny digits, resnet for other images."""
    if spatial_dims == 1:
        return "cnn1d"
    return "cnn2d" if dataset == "digits" else "resnet"


def build_model(arch: str, norm: str, in_channels: int, num_classes: int,
                spatial_shape: tuple[int, ...], *, width: int = 32, depth: int = 1,
                groups: int = 8) -> nn.Module:
    """A model of architecture ``arch`` with norm ``norm`` in every normalization slot.

    Initialization is the same for every norm: PyTorch's default (Kaiming-uniform) for
    convolutions and the classifier, weight 1 / bias 0 for the norms.
    """
    if arch in ("cnn1d", "cnn2d"):
        want = 1 if arch == "cnn1d" else 2
        if len(spatial_shape) != want:
            raise ValueError(f"model {arch}: expected {want}-D inputs, got spatial shape {spatial_shape}")
        return PlainCNN(norm, in_channels, num_classes, spatial_shape, width, groups)
    if arch == "resnet":
        return ResNet(norm, in_channels, num_classes, len(spatial_shape), width, depth, groups)
    raise ValueError(f"unknown model {arch!r}; expected auto, cnn1d, cnn2d or resnet")
