"""Norm layers by name: one registry for model builders and the CLI's ``--norm``.

``build_norm("gn", 64, spatial_dims=2)`` returns a module for feature maps
(N, 64, H, W). Every factory takes the channel count first so that a model can
swap normalizations without knowing which one it got. For feature maps the names
mean (following the Group Normalization paper, Wu & He 2018, Fig. 2):

======  =====================================================  ==================
name    statistics shared over                                 module
======  =====================================================  ==================
bn      (N, *spatial) per channel                              BatchNorm{1,2,3}d
ln      (C, *spatial) per sample, per-channel affine           GroupNorm(1, C)
in      (*spatial) per (sample, channel), affine               InstanceNorm{1,2,3}d
gn      (C/G, *spatial) per (sample, group)                    GroupNorm(G, C)
rms     like ln, no centering, per-channel scale               SampleRMSNorm
none    --                                                     nn.Identity
======  =====================================================  ==================

For plain feature vectors (``spatial_dims=0``, input (N, C)), ``ln`` and ``rms``
are LayerNorm(C) and RMSNorm(C). Later modules add names with :func:`register_norm`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..core.autograd import normalize
from ..core.checks import check_eps, check_floating
from ..core.spec import NormSpec
from ..functional import default_rms_eps
from .batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
)
from .normalization import GroupNorm, LayerNorm, RMSNorm

__all__ = [
    "SampleRMSNorm",
    "build_norm",
    "norm_names",
    "register_norm",
    "resolve_groups",
    "resolve_norm_name",
    "supports_spatial_dims",
]

NormFactory = Callable[..., nn.Module]


class SampleRMSNorm(nn.Module):
    r"""RMS normalization of each sample over (C, *spatial), with a per-channel scale.

    .. math:: y = \frac{x}{\sqrt{\mathrm{E}_{C,H,W}[x^2] + \epsilon}} * \gamma_c

    The RMS counterpart of GroupNorm(1, C) ("LayerNorm" for feature maps), so the
    two differ only in centering. Input (N, C, *), output the same.
    """

    def __init__(self, num_channels: int, eps: float | None = None, affine: bool = True) -> None:
        super().__init__()
        if eps is not None:
            check_eps(eps, "SampleRMSNorm")
        self.num_channels, self.eps, self.affine = num_channels, eps, affine
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None

    def forward(self, input: Tensor) -> Tensor:
        check_floating(input, "SampleRMSNorm")
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(f"SampleRMSNorm: expected input (N, {self.num_channels}, *), "
                             f"got shape {tuple(input.shape)}")
        shape = tuple(input.shape)
        spec = NormSpec("rms_norm", shape, shape, tuple(range(1, len(shape))), (1,), center=False)
        eps = default_rms_eps(input.dtype) if self.eps is None else self.eps
        return normalize(input, self.weight, None, spec, eps)[0]

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"


def resolve_groups(num_channels: int, num_groups: int) -> int:
    """The largest group count <= ``num_groups`` that divides ``num_channels``."""
    groups = max(1, min(num_groups, num_channels))
    while num_channels % groups:
        groups -= 1
    return groups


def _per_dim(classes: tuple[type[nn.Module], ...], spatial_dims: int, name: str) -> type[nn.Module]:
    if not 1 <= spatial_dims <= len(classes):
        raise ValueError(f"norm '{name}': expected spatial_dims in 1..{len(classes)}, got {spatial_dims}")
    return classes[spatial_dims - 1]


def _bn(c: int, spatial_dims: int, **kw) -> nn.Module:
    return (BatchNorm1d if spatial_dims == 0 else
            _per_dim((BatchNorm1d, BatchNorm2d, BatchNorm3d), spatial_dims, "bn"))(c, **kw)


def _in(c: int, spatial_dims: int, **kw) -> nn.Module:
    cls = _per_dim((InstanceNorm1d, InstanceNorm2d, InstanceNorm3d), spatial_dims, "in")
    return cls(c, affine=kw.pop("affine", True), **kw)


def _gn(c: int, spatial_dims: int, num_groups: int = 32, **kw) -> nn.Module:
    return GroupNorm(resolve_groups(c, num_groups), c, **kw)


def _ln(c: int, spatial_dims: int, **kw) -> nn.Module:
    return LayerNorm(c, **kw) if spatial_dims == 0 else GroupNorm(1, c, **kw)


def _rms(c: int, spatial_dims: int, **kw) -> nn.Module:
    return RMSNorm(c, **kw) if spatial_dims == 0 else SampleRMSNorm(c, **kw)


def _none(c: int, spatial_dims: int, **kw) -> nn.Module:
    return nn.Identity()


_REGISTRY: dict[str, NormFactory] = {
    "bn": _bn, "ln": _ln, "in": _in, "gn": _gn, "rms": _rms, "none": _none,
}
_ALIASES = {
    "batchnorm": "bn", "layernorm": "ln", "instancenorm": "in", "groupnorm": "gn",
    "rmsnorm": "rms", "identity": "none",
}


# which input ranks (number of spatial dims) each name supports; absent: any
_SPATIAL_DIMS: dict[str, tuple[int, ...]] = {"in": (1, 2, 3)}


def register_norm(name: str, factory: NormFactory, *, aliases: tuple[str, ...] = (),
                  spatial_dims: tuple[int, ...] | None = None) -> None:
    """Add ``name``: ``factory(num_channels, spatial_dims, **kwargs) -> nn.Module``.

    ``aliases`` are other spellings that resolve to ``name``; ``spatial_dims`` the input
    ranks it supports (0 for (N, C), 2 for (N, C, H, W), ...), None for any.
    """
    _REGISTRY[name] = factory
    for alias in aliases:
        _ALIASES[alias] = name
    if spatial_dims is not None:
        _SPATIAL_DIMS[name] = tuple(spatial_dims)


def norm_names() -> list[str]:
    """The registered short names, in registration order (what ``--norm`` accepts)."""
    return list(_REGISTRY)


def resolve_norm_name(name: str) -> str:
    """The registered short name for ``name`` or one of its aliases (case-insensitive)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        raise ValueError(f"unknown norm {name!r}; expected one of {', '.join(norm_names())}")
    return key


def supports_spatial_dims(name: str, spatial_dims: int) -> bool:
    """Whether the norm ``name`` can be built for inputs with ``spatial_dims`` spatial dims."""
    supported = _SPATIAL_DIMS.get(resolve_norm_name(name))
    return supported is None or spatial_dims in supported


def build_norm(name: str, num_channels: int, spatial_dims: int = 2, **kwargs) -> nn.Module:
    """A normalization module for inputs (N, num_channels, *spatial) by ``name``."""
    return _REGISTRY[resolve_norm_name(name)](num_channels, spatial_dims, **kwargs)
