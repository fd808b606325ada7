r"""LayerNorm over the channels of a feature map (as in ConvNeXt).

For an input (N, C, H, W), one mean and variance per (n, h, w) over C, and a
per-channel affine:

.. math:: y_{n,:,h,w} = \frac{x_{n,:,h,w} - \mathrm{E}_C[x]}{\sqrt{\mathrm{Var}_C[x] + \epsilon}}
          \gamma + \beta

This equals ``nn.LayerNorm(C)`` applied to ``x.permute(0, 2, 3, 1)`` and permuted
back, but it never permutes: the statistic's axis is just the channel dim of the
NormSpec (reduce_dims=(1,)), which the shared core reduces in place for contiguous
and channels_last tensors alike; the output keeps the input's memory format.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.autograd import NormFunction, normalize, register_function
from ..core.checks import check_eps, check_floating, check_param
from ..core.spec import NormSpec

__all__ = ["LayerNorm2d", "layer_norm_2d", "layer_norm_2d_spec"]


class LayerNorm2dFunction(NormFunction):
    pass


register_function("layer_norm_2d", LayerNorm2dFunction)


def layer_norm_2d_spec(shape: tuple[int, ...]) -> NormSpec:
    """One statistic per (n, *spatial) over C of (N, C, *spatial); affine per channel."""
    shape = tuple(shape)
    return NormSpec("layer_norm_2d", shape, shape, (1,), (1,))


def _layer_norm_2d(input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                   name: str) -> Tensor:
    check_floating(input, name)
    if input.dim() < 2:
        raise ValueError(f"{name}: expected input (N, C, *spatial), got shape {tuple(input.shape)}")
    channels = input.shape[1]
    check_param(weight, (channels,), "weight", name)
    check_param(bias, (channels,), "bias", name)
    check_eps(eps, name)
    return normalize(input, weight, bias, layer_norm_2d_spec(input.shape), eps)[0]


def layer_norm_2d(input: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                  eps: float = 1e-5) -> Tensor:
    """Functional LayerNorm over dim 1 (channels) of ``input`` (N, C, *spatial)."""
    return _layer_norm_2d(input, weight, bias, eps, "layer_norm_2d")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of (N, C, H, W) (see :mod:`normlab.nn.layernorm2d`).

    Args:
        num_channels: C.
        eps: added to the variance. Default 1e-5 (nn.LayerNorm's; ConvNeXt uses 1e-6).
        elementwise_affine: per-channel ``weight`` (init 1) and ``bias`` (init 0). Default True.
        bias: with ``elementwise_affine``, learn ``bias``. Default True.

    State dict keys are ``nn.LayerNorm(C)``'s (``weight``, ``bias`` of shape (C,)).

    Example::

        >>> ln = nl.LayerNorm2d(96)
        >>> y = ln(torch.randn(2, 96, 56, 56).to(memory_format=torch.channels_last))
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels <= 0:
            raise ValueError(f"LayerNorm2d: expected num_channels to be a positive int, got {num_channels!r}")
        check_eps(eps, "LayerNorm2d")
        factory = {"device": device, "dtype": dtype}
        self.num_channels, self.eps, self.elementwise_affine = num_channels, eps, elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(num_channels, **factory))
            self.bias = nn.Parameter(torch.zeros(num_channels, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        check_floating(input, name)
        if input.dim() != 4:
            raise ValueError(f"{name}: expected 4D input (got {input.dim()}D input)")
        if input.shape[1] != self.num_channels:
            raise ValueError(f"{name}: expected input with {self.num_channels} channels at dim 1, "
                             f"got {input.shape[1]} (input shape {tuple(input.shape)})")
        return _layer_norm_2d(input, self.weight, self.bias, self.eps, name)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}")
