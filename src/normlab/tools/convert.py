"""Swap normalization layers throughout a model.

Contract shared by these functions: by default the input model is left untouched and
a converted deep copy is returned (``inplace=True`` converts the model itself and
returns it -- or its replacement, when the root module is itself a norm). Replaced
layers keep their device, dtype and training mode. Parameter objects are new, so an
optimizer built before the conversion must be rebuilt.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import nn as nlnn
from ..nn.extra import get_norm_layer
from ..nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, _FrozenBatchNorm
from ._walk import (
    KINDS,
    channels_of,
    has_running_stats,
    place_like,
    resolve_kind,
    spatial_dims_of,
    swap_modules,
)

__all__ = ["convert_norms", "from_torch", "to_torch", "freeze_bn", "unfreeze_bn"]


def _maybe_copy(model: nn.Module, inplace: bool) -> nn.Module:
    return model if inplace else copy.deepcopy(model)


def _carry_state(src: nn.Module, dst: nn.Module) -> None:
    """Copy every state entry of ``src`` whose key exists in ``dst`` with the same shape."""
    target = dst.state_dict()
    with torch.no_grad():
        for key, value in src.state_dict().items():
            if key in target and target[key].shape == value.shape:
                target[key].copy_(value)


def convert_norms(model: nn.Module, to: str | type | Callable[..., nn.Module] = "gn",
                  source: str | type | tuple[type, ...] = "bn", *, carry_state: bool = True,
                  inplace: bool = False, **kwargs: Any) -> nn.Module:
    """Replace every norm of kind ``source`` by one built from ``to``.

    Args:
        model: any module tree.
        to: a registered norm name ("gn", "ln2d", "frn", "frozen_bn", ...; the rank
            follows the replaced layer: BatchNorm1d -> spatial_dims 1, ...), a module
            class or ``functools.partial`` (see :func:`normlab.nn.extra.get_norm_layer`).
        source: the kind to replace -- "bn" (torch.nn and normlab BatchNorm, including
            SyncBatchNorm and normlab's BatchNorm variants), "in", "gn", "ln", "rms",
            "frozen_bn", "sn", "frn" -- or a class / tuple of classes.
        carry_state: copy each state entry of the old layer whose name and shape the
            new one shares (BN -> GN keeps weight and bias; BN -> frozen_bn or brn keeps
            the running statistics too). Default True.
        inplace: convert ``model`` itself instead of a copy. Default False.
        **kwargs: passed to the new layers (e.g. ``num_groups=8``).

    Returns the converted model. Example::

        >>> model = convert_norms(resnet, to="gn", num_groups=8)
    """
    classes = resolve_kind(source, "convert_norms")
    model = _maybe_copy(model, inplace)

    def make(name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, classes):
            return None
        factory = get_norm_layer(to, spatial_dims=spatial_dims_of(module), **kwargs) \
            if isinstance(to, str) else get_norm_layer(to, **kwargs)
        new = factory(channels_of(module))
        place_like(new, module)
        if carry_state:
            _carry_state(module, new)
        return new

    return swap_modules(model, make)


def _bn_args(m: nn.Module) -> tuple[tuple, dict[str, Any]]:
    return (), {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
                "track_running_stats": m.track_running_stats}


def _gn_args(m: nn.Module) -> tuple[tuple, dict[str, Any]]:
    return (m.num_groups, m.num_channels, m.eps, m.affine), {}


def _ln_args(m: nn.Module) -> tuple[tuple, dict[str, Any]]:
    return (m.normalized_shape, m.eps, m.elementwise_affine), {"bias": m.bias is not None}


def _rms_args(m: nn.Module) -> tuple[tuple, dict[str, Any]]:
    return (m.normalized_shape, m.eps, m.elementwise_affine), {}


# (torch.nn class, normlab class, constructor arguments read off an instance of either)
_COUNTERPARTS: list[tuple[type, type, Callable[[nn.Module], tuple[tuple, dict[str, Any]]]]] = [
    (nn.BatchNorm1d, nlnn.BatchNorm1d, _bn_args),
    (nn.BatchNorm2d, nlnn.BatchNorm2d, _bn_args),
    (nn.BatchNorm3d, nlnn.BatchNorm3d, _bn_args),
    (nn.InstanceNorm1d, nlnn.InstanceNorm1d, _bn_args),
    (nn.InstanceNorm2d, nlnn.InstanceNorm2d, _bn_args),
    (nn.InstanceNorm3d, nlnn.InstanceNorm3d, _bn_args),
    (nn.GroupNorm, nlnn.GroupNorm, _gn_args),
    (nn.LayerNorm, nlnn.LayerNorm, _ln_args),
    (nn.RMSNorm, nlnn.RMSNorm, _rms_args),
]


def _builder(cls: type, args_of: Callable[[nn.Module], tuple[tuple, dict[str, Any]]]
             ) -> Callable[[nn.Module], nn.Module]:
    def build(m: nn.Module) -> nn.Module:
        args, kwargs = args_of(m)
        return cls(*args, **kwargs)
    return build


_TO_NORMLAB: dict[type, Callable[[nn.Module], nn.Module]] = {
    th: _builder(ours, args_of) for th, ours, args_of in _COUNTERPARTS}
_TO_TORCH: dict[type, Callable[[nn.Module], nn.Module]] = {
    ours: _builder(th, args_of) for th, ours, args_of in _COUNTERPARTS}


def _exact_swap(model: nn.Module, table: dict[type, Callable[[nn.Module], nn.Module]],
                inplace: bool, caller: str) -> nn.Module:
    model = _maybe_copy(model, inplace)

    def make(name: str, module: nn.Module) -> nn.Module | None:
        build = table.get(type(module))  # exact types: a user subclass may behave differently
        if build is None:
            return None
        if getattr(module, "affine", False) and module.bias is None:
            raise ValueError(f"{caller}: {name or 'model'} ({type(module).__name__}) has affine "
                             "weight without bias, which the target class cannot represent")
        new = place_like(build(module), module)
        new.load_state_dict(module.state_dict())  # strict: every parameter and buffer carried
        new_params = dict(new.named_parameters())
        for pname, p_old in module.named_parameters():
            new_params[pname].requires_grad_(p_old.requires_grad)
        return new

    return swap_modules(model, make)


def from_torch(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace torch.nn's BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, GroupNorm, LayerNorm
    and RMSNorm by normlab's namesakes, carrying every parameter and buffer exactly
    (and ``requires_grad``, device, dtype, training mode): outputs are identical up
    to floating-point summation order. Subclasses of those torch classes are left
    alone. Example::

        >>> model = from_torch(torchvision_resnet)   # now runs on normlab's kernels
    """
    return _exact_swap(model, _TO_NORMLAB, inplace, "from_torch")


def to_torch(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The inverse of :func:`from_torch`: normlab's drop-in layers back to torch.nn's
    (normlab-only layers such as BatchRenorm2d are left as they are)."""
    return _exact_swap(model, _TO_TORCH, inplace, "to_torch")


def freeze_bn(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every BatchNorm that has running statistics (torch.nn or normlab) by a
    :class:`~normlab.nn.frozen.FrozenBatchNorm2d` (1d/3d by rank) holding its
    statistics and affine as buffers.

    The result stays frozen through ``model.train()`` -- the statistics are not
    updated and normalization never uses batch statistics -- and the affine is not a
    parameter, so optimizers skip it. BatchNorms with ``track_running_stats=False``
    (no statistics to freeze) are left as they are. Undo with :func:`unfreeze_bn`.
    Example::

        >>> backbone = freeze_bn(backbone)
        >>> backbone.train()   # still frozen
    """
    model = _maybe_copy(model, inplace)
    frozen = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}

    def make(name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, KINDS["bn"]) or not has_running_stats(module):
            return None
        return frozen[spatial_dims_of(module)].from_batch_norm(module)

    return swap_modules(model, make)


def unfreeze_bn(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every FrozenBatchNorm by a normlab BatchNorm of the same rank with the
    same statistics and affine (now trainable), in the frozen layer's training mode."""
    model = _maybe_copy(model, inplace)
    classes = {1: nlnn.BatchNorm1d, 2: nlnn.BatchNorm2d, 3: nlnn.BatchNorm3d}

    def make(name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, _FrozenBatchNorm):
            return None
        bn = classes[spatial_dims_of(module)](module.num_features, module.eps)
        place_like(bn, module)
        bn.load_state_dict(module.state_dict())
        return bn

    return swap_modules(model, make)
