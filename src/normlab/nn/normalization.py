"""GroupNorm, LayerNorm and RMSNorm modules: drop-in for their torch.nn namesakes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import functional as NF
from ..core.checks import check_eps, normalize_shape_arg
from ._members import registered

__all__ = ["GroupNorm", "LayerNorm", "RMSNorm"]


class GroupNorm(nn.Module):
    r"""Group normalization (Wu & He, 2018).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    The C channels of an input (N, C, *) are split into ``num_groups`` consecutive
    groups; one mean and variance per (sample, group) over the group's channels and
    all spatial positions. The affine is per channel. No running statistics: train
    and eval compute the same thing. GroupNorm(1, C) is LayerNorm over (C, *) with a
    per-channel affine; GroupNorm(C, C) is InstanceNorm.

    Args:
        num_groups: number of groups G; must divide ``num_channels``.
        num_channels: C.
        eps: added to the variance. Default 1e-5.
        affine: learnable per-channel ``weight`` (init 1) and ``bias`` (init 0). Default True.
        bias: keyword-only; with ``affine``, whether to learn ``bias``. Default True.

    Shape: input (N, C, *), output the same.

    Example::

        >>> gn = nl.GroupNorm(8, 64)
        >>> y = gn(torch.randn(2, 64, 16, 16))
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        for arg, value in (("num_groups", num_groups), ("num_channels", num_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GroupNorm: expected {arg} to be a positive int, got {value!r}")
        if num_channels % num_groups != 0:
            raise ValueError(
                f"GroupNorm: expected num_channels to be divisible by num_groups, "
                f"got num_channels={num_channels}, num_groups={num_groups}"
            )
        check_eps(eps, "GroupNorm")
        factory = {"device": device, "dtype": dtype}
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, **factory))
            self.bias = nn.Parameter(torch.empty(num_channels, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Tensor) and input.dim() >= 2 and input.shape[1] != self.num_channels:
            raise ValueError(
                f"GroupNorm: expected input with {self.num_channels} channels at dim 1, "
                f"got {input.shape[1]} (input shape {tuple(input.shape)})"
            )
        return NF._group_norm(input, self.num_groups, registered(self, "weight"), registered(self, "bias"), self.eps,
                              name="GroupNorm")

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}")


class LayerNorm(nn.Module):
    r"""Layer normalization (Ba et al., 2016).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    One mean and variance per row over the trailing ``normalized_shape`` dims; the
    affine is elementwise with shape ``normalized_shape``. No running statistics.

    Args:
        normalized_shape: int or sequence: the trailing dims of the input to normalize.
        eps: added to the variance. Default 1e-5.
        elementwise_affine: learnable ``weight`` (init 1) and ``bias`` (init 0). Default True.
        bias: with ``elementwise_affine``, whether to learn ``bias``. Default True.

    Shape: input (*, *normalized_shape), output the same.

    Example::

        >>> ln = nl.LayerNorm(768)
        >>> y = ln(torch.randn(4, 128, 768))
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = normalize_shape_arg(normalized_shape, "LayerNorm")
        check_eps(eps, "LayerNorm")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        return NF._layer_norm(input, self.normalized_shape, registered(self, "weight"), registered(self, "bias"),
                              self.eps, name="LayerNorm")

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}")


class RMSNorm(nn.Module):
    r"""Root-mean-square layer normalization (Zhang & Sennrich, 2019).

    .. math:: y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} * \gamma

    Like LayerNorm without centering and without bias. ``eps=None`` uses the machine
    epsilon of the compute dtype (float32 for float16/bfloat16 inputs, as torch.nn does).

    Args:
        normalized_shape: int or sequence: the trailing dims of the input to normalize.
        eps: added to the mean square, or None. Default None.
        elementwise_affine: learnable ``weight`` (init 1). Default True.

    Shape: input (*, *normalized_shape), output the same.

    Example::

        >>> rms = nl.RMSNorm(4096)
        >>> y = rms(torch.randn(2, 16, 4096))
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = normalize_shape_arg(normalized_shape, "RMSNorm")
        if eps is not None:
            check_eps(eps, "RMSNorm")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return NF._rms_norm(x, self.normalized_shape, registered(self, "weight"), self.eps, name="RMSNorm")

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
