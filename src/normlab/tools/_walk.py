"""Module-tree helpers shared by the tools: which modules are norms, and swapping them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..nn import batchnorm as _nlbn
from ..nn import normalization as _nlnorm
from ..nn.extra import (
    FilterResponseNorm2d,
    LayerNorm2d,
    SwitchableNorm1d,
    SwitchableNorm2d,
)
from ..nn.frozen import _FrozenBatchNorm
from ..nn.registry import SampleRMSNorm

# Each kind: the classes (torch.nn and normlab) that count as that norm.
KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "bn": (nn.modules.batchnorm._BatchNorm, _nlbn._BatchNorm),
    "in": (nn.modules.instancenorm._InstanceNorm, _nlbn._InstanceNorm),
    "gn": (nn.GroupNorm, _nlnorm.GroupNorm),
    "ln": (nn.LayerNorm, _nlnorm.LayerNorm, LayerNorm2d),
    "rms": (nn.RMSNorm, _nlnorm.RMSNorm, SampleRMSNorm),
    "frozen_bn": (_FrozenBatchNorm,),
    "sn": (SwitchableNorm1d, SwitchableNorm2d),
    "frn": (FilterResponseNorm2d,),
}
ALL_NORMS: tuple[type[nn.Module], ...] = tuple(c for classes in KINDS.values() for c in classes)


def norm_classes(kind: str) -> tuple[type[nn.Module], ...]:
    """The classes that count as norm ``kind`` -- torch.nn's and normlab's -- for
    ``isinstance`` checks: ``"bn"``, ``"in"``, ``"gn"``, ``"ln"``, ``"rms"``,
    ``"frozen_bn"``, ``"sn"`` (SwitchableNorm) or ``"frn"``.

    normlab's layers are modules of their own, not subclasses of torch.nn's, so
    ``isinstance(m, torch.nn.BatchNorm2d)`` is False for an ``nl.BatchNorm2d``; code that
    picks layers by class (keeping BatchNorm in eval mode while fine-tuning, weight-decay
    groups, custom initialization) should test against these. Example::

        >>> for m in model.modules():
        ...     if isinstance(m, norm_classes("bn")):
        ...         m.eval()   # torch.nn's and normlab's BatchNorm alike

    Raises ValueError naming the kinds for an unknown kind.
    """
    if not isinstance(kind, str):
        raise TypeError(f"norm_classes: expected a norm kind name ({', '.join(KINDS)}), got {kind!r}")
    return resolve_kind(kind, "norm_classes")


def resolve_kind(kind: str | type | tuple[type, ...], caller: str) -> tuple[type, ...]:
    """A kind name ("bn", "gn", ...), a class, or a tuple of classes -> tuple of classes."""
    if isinstance(kind, str):
        if kind not in KINDS:
            raise ValueError(f"{caller}: unknown norm kind {kind!r}; expected one of {', '.join(KINDS)}")
        return KINDS[kind]
    if isinstance(kind, type):
        return (kind,)
    if isinstance(kind, tuple) and all(isinstance(k, type) for k in kind):
        return kind
    raise TypeError(f"{caller}: expected a norm kind name, a class or a tuple of classes, got {kind!r}")


def has_running_stats(module: nn.Module) -> bool:
    return isinstance(getattr(module, "running_mean", None), torch.Tensor) and \
        isinstance(getattr(module, "running_var", None), torch.Tensor)


def channels_of(module: nn.Module) -> int:
    """The channel count of a norm module."""
    for attr in ("num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(tuple(shape)[-1])
    raise ValueError(f"cannot tell the channel count of {type(module).__name__}")


def spatial_dims_of(module: nn.Module) -> int:
    """1, 2 or 3 from a class name ending in 1d/2d/3d; 2 otherwise."""
    name = type(module).__name__
    for k in (1, 2, 3):
        if name.endswith(f"{k}d"):
            return k
    return 2


def place_like(new: nn.Module, old: nn.Module) -> nn.Module:
    """Put ``new`` on ``old``'s device and floating dtype, in ``old``'s training mode."""
    tensors = [t for t in (*old.parameters(recurse=False), *old.buffers(recurse=False))
               if t.is_floating_point()]
    if tensors:
        new.to(device=tensors[0].device, dtype=tensors[0].dtype)
    new.train(old.training)
    return new


def swap_modules(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Replace every module for which ``make(qualified_name, module)`` returns a module.

    Children of a replaced module are not visited. A module shared by several parents
    is replaced once and the replacement shared alike. Returns the (possibly new) root.
    """
    root = make("", model)
    if root is not None:
        return root
    done: dict[int, nn.Module | None] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        # _modules, not named_children(): the latter skips a module's second occurrence
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            if id(child) in done:
                new = done[id(child)]
                if new is not None:
                    setattr(module, name, new)
                continue
            new = make(full, child)
            done[id(child)] = new
            if new is not None:
                setattr(module, name, new)
            else:
                visit(child, full)

    visit(model, "")
    return model
