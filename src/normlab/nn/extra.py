"""Normalizations beyond torch.nn, their registry names, and :func:`get_norm_layer`.

Importing this module registers these names with :func:`normlab.nn.registry.register_norm`
(so the lab's ``--norm`` offers them):

==========  ==========================================  ===================
name        module                                      spatial_dims
==========  ==========================================  ===================
brn         BatchRenorm{1,2,3}d                         0-3
gbn         GhostBatchNorm{1,2,3}d                      0-3
sn          SwitchableNorm{1,2}d                        1-2
frn         FilterResponseNorm2d (with TLU)             2
ln2d        LayerNorm2d (LayerNorm over channels)       2 (0: LayerNorm(C))
frozen_bn   FrozenBatchNorm{1,2,3}d                     0-3
bn_single   SingleSampleBatchNorm{1,2,3}d               0-3
==========  ==========================================  ===================

A name asked for a rank it does not support raises ValueError naming the ranks it
does (``SPATIAL_DIMS`` lists them, for a caller that wants to skip instead).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from .frn import TLU, FilterResponseNorm2d, filter_response_norm, tlu
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, ghost_batch_norm
from .layernorm2d import LayerNorm2d, layer_norm_2d
from .normalization import GroupNorm, LayerNorm
from .registry import build_norm, register_norm, resolve_groups, resolve_norm_name
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, LinearRamp, batch_renorm
from .single_sample import SingleSampleBatchNorm1d, SingleSampleBatchNorm2d, SingleSampleBatchNorm3d
from .switchable import SwitchableNorm1d, SwitchableNorm2d, switchable_norm
from .ws import WSConv2d, standardize_weight

__all__ = [
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "LinearRamp", "batch_renorm",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "ghost_batch_norm",
    "SwitchableNorm1d", "SwitchableNorm2d", "switchable_norm",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
    "FilterResponseNorm2d", "TLU", "filter_response_norm", "tlu",
    "WSConv2d", "standardize_weight",
    "LayerNorm2d", "layer_norm_2d",
    "SingleSampleBatchNorm1d", "SingleSampleBatchNorm2d", "SingleSampleBatchNorm3d",
    "get_norm_layer", "SPATIAL_DIMS",
]


def _by_rank(name: str, classes: dict[int, type[nn.Module]]) -> Callable[..., nn.Module]:
    def factory(num_channels: int, spatial_dims: int = 2, **kwargs: Any) -> nn.Module:
        if spatial_dims not in classes:
            raise ValueError(f"norm {name!r}: expected spatial_dims in "
                             f"{sorted(classes)}, got {spatial_dims}")
        return classes[spatial_dims](num_channels, **kwargs)

    factory.__name__ = f"build_{name}"
    return factory


_EXTRA_NORMS: list[tuple[str, dict[int, type[nn.Module]], tuple[str, ...]]] = [
    ("brn", {0: BatchRenorm1d, 1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}, ("batchrenorm",)),
    ("gbn", {0: GhostBatchNorm1d, 1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d},
     ("ghostbatchnorm",)),
    ("sn", {1: SwitchableNorm1d, 2: SwitchableNorm2d}, ("switchablenorm",)),
    ("frn", {2: FilterResponseNorm2d}, ("filterresponsenorm",)),
    ("ln2d", {0: LayerNorm, 2: LayerNorm2d}, ("layernorm2d",)),  # (N, C): LayerNorm(C)
    ("frozen_bn", {0: FrozenBatchNorm1d, 1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d},
     ("frozenbatchnorm",)),
    ("bn_single", {0: SingleSampleBatchNorm1d, 1: SingleSampleBatchNorm1d, 2: SingleSampleBatchNorm2d,
                   3: SingleSampleBatchNorm3d}, ()),
]
for _name, _classes, _aliases in _EXTRA_NORMS:
    register_norm(_name, _by_rank(_name, _classes), aliases=_aliases, spatial_dims=tuple(sorted(_classes)))
SPATIAL_DIMS: dict[str, tuple[int, ...]] = {name: tuple(sorted(classes)) for name, classes, _ in _EXTRA_NORMS}


class NamedNormFactory:
    """``factory(num_channels, **kwargs)`` for a registered name (picklable)."""

    def __init__(self, name: str, spatial_dims: int, kwargs: dict[str, Any]) -> None:
        self.name, self.spatial_dims, self.kwargs = name, spatial_dims, dict(kwargs)

    def __call__(self, num_channels: int, **kwargs: Any) -> nn.Module:
        return build_norm(self.name, num_channels, self.spatial_dims, **{**self.kwargs, **kwargs})

    def __repr__(self) -> str:
        return f"NamedNormFactory({self.name!r}, spatial_dims={self.spatial_dims}, **{self.kwargs})"


class GroupNormFactory:
    """``factory(num_channels)`` for a GroupNorm class (whose first argument is the group
    count): ``cls(resolve_groups(num_channels, num_groups), num_channels, **kwargs)``."""

    def __init__(self, cls: type[nn.Module], num_groups: int, kwargs: dict[str, Any]) -> None:
        self.cls, self.num_groups, self.kwargs = cls, num_groups, dict(kwargs)

    def __call__(self, num_channels: int, **kwargs: Any) -> nn.Module:
        groups = resolve_groups(num_channels, self.num_groups)
        return self.cls(groups, num_channels, **{**self.kwargs, **kwargs})

    def __repr__(self) -> str:
        return f"GroupNormFactory({self.cls.__name__}, num_groups={self.num_groups}, **{self.kwargs})"


def _is_group_norm(cls: object) -> bool:
    return isinstance(cls, type) and issubclass(cls, (GroupNorm, nn.GroupNorm))


def get_norm_layer(norm: str | type[nn.Module] | functools.partial | Callable[..., nn.Module] | None,
                   spatial_dims: int = 2, **kwargs: Any) -> Callable[..., nn.Module]:
    """A factory ``f(num_channels, **kw) -> nn.Module``: the channel count always first,
    so any normalization swaps for any other in model code.

    ``norm`` may be
      * a registered name (:func:`normlab.nn.norm_names`, e.g. "bn", "gn", "ln2d",
        "frn", or an alias like "batchnorm"); ``spatial_dims`` picks the rank
        (0 for (N, C) features, 2 for (N, C, H, W));
      * a module class whose first argument is the channel count (``nl.BatchNorm2d``,
        ``torch.nn.BatchNorm2d``, ``nl.LayerNorm2d``, ...); GroupNorm classes, whose
        first argument is the group count, are wrapped (``num_groups`` default 32,
        reduced to a divisor of the channel count);
      * a ``functools.partial`` of such a class (its keywords kept), or any other
        callable taking the channel count first (returned as is);
      * None: ``nn.Identity``.

    ``kwargs`` are bound to the factory. Example::

        >>> norm = get_norm_layer("gn", num_groups=8)
        >>> norm(64)
        GroupNorm(8, 64, eps=1e-05, affine=True, bias=True)
        >>> get_norm_layer(functools.partial(nn.GroupNorm, 4))(64)  # group count kept
    """
    if norm is None:
        norm = "none"
    if isinstance(norm, str):
        return NamedNormFactory(resolve_norm_name(norm), spatial_dims, kwargs)
    if isinstance(norm, functools.partial):
        if _is_group_norm(norm.func):
            keywords = {**norm.keywords, **kwargs}
            groups = norm.args[0] if norm.args else keywords.pop("num_groups", 32)
            if len(norm.args) > 1:
                raise ValueError("get_norm_layer: a GroupNorm partial may bind only num_groups "
                                 f"positionally, got args {norm.args}")
            return GroupNormFactory(norm.func, groups, keywords)
        return functools.partial(norm.func, *norm.args, **{**norm.keywords, **kwargs}) if kwargs else norm
    if isinstance(norm, type):
        if not issubclass(norm, nn.Module):
            raise TypeError(f"get_norm_layer: expected an nn.Module class, got {norm.__name__}")
        if _is_group_norm(norm):
            kwargs = dict(kwargs)
            return GroupNormFactory(norm, kwargs.pop("num_groups", 32), kwargs)
        return functools.partial(norm, **kwargs) if kwargs else norm
    if callable(norm):
        return functools.partial(norm, **kwargs) if kwargs else norm
    raise TypeError(f"get_norm_layer: expected a norm name, an nn.Module class, a functools.partial "
                    f"or None, got {type(norm).__name__}")
