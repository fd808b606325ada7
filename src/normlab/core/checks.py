"""Input validation shared by the functional API and the modules.

Every message names the caller (a layer such as ``BatchNorm2d`` or a function
such as ``batch_norm``), what was expected and what came. Checks run before any
state is touched, so a failed call never leaves running statistics half-updated.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import torch

__all__ = [
    "check_floating",
    "check_eps",
    "check_momentum",
    "check_param",
    "check_min_dim",
    "normalize_shape_arg",
]


def check_floating(x: object, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point input, got dtype {x.dtype}")


def check_eps(eps: object, name: str) -> None:
    if type(eps) is float and 0.0 <= eps < math.inf:  # the common case, checked per call
        return
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{name}: expected eps to be a real number, got {eps!r}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name}: expected a finite eps >= 0, got {eps!r}")


def check_momentum(momentum: object, name: str, allow_none: bool = False) -> None:
    if type(momentum) is float and 0.0 <= momentum <= 1.0:  # the common case, checked per call
        return
    if momentum is None and allow_none:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        expected = "a real number or None" if allow_none else "a real number"
        raise TypeError(f"{name}: expected momentum to be {expected}, got {momentum!r}")
    if not math.isfinite(momentum) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{name}: expected momentum in [0, 1], got {momentum!r}")


def check_min_dim(x: torch.Tensor, min_dim: int, layout: str, name: str) -> None:
    if x.dim() < min_dim:
        raise ValueError(
            f"{name}: expected input of shape {layout} with at least {min_dim} dims, "
            f"got shape {tuple(x.shape)}"
        )


def check_param(t: torch.Tensor | None, shape: Sequence[int], what: str, name: str) -> None:
    """``t`` (weight, bias or a running statistic) must be None or have ``shape``."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected {what} to be a torch.Tensor, got {type(t).__name__}")
    if t.shape != tuple(shape):
        raise ValueError(
            f"{name}: expected {what} of shape {tuple(shape)} to match the input, "
            f"got shape {tuple(t.shape)}"
        )


def normalize_shape_arg(normalized_shape: int | Sequence[int], name: str) -> tuple[int, ...]:
    """Turn an int or sequence ``normalized_shape`` into a tuple of positive ints."""
    if not torch.compiler.is_compiling():  # traced code must not call a cached function
        try:
            shape = _valid_shape(normalized_shape)  # memoized: asked again on every call
        except TypeError:  # unhashable, e.g. a list
            shape = None
        if shape is not None:
            return shape
    shape = _as_int_tuple(normalized_shape)
    if shape is None:
        raise TypeError(
            f"{name}: expected normalized_shape to be an int or a sequence of ints, "
            f"got {normalized_shape!r}"
        )
    if not _all_positive(shape):
        raise ValueError(f"{name}: expected a non-empty normalized_shape of positive sizes, got {shape}")
    return shape


def _as_int_tuple(normalized_shape: object) -> tuple[int, ...] | None:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    if isinstance(normalized_shape, str | bytes):
        return None
    try:
        return tuple(int(s) for s in normalized_shape)
    except (TypeError, ValueError):
        return None


def _all_positive(shape: tuple[int, ...]) -> bool:
    return bool(shape) and all(s > 0 for s in shape)


@functools.lru_cache(maxsize=256)
def _valid_shape(normalized_shape: object) -> tuple[int, ...] | None:
    """The tuple form of a hashable ``normalized_shape``, or None if it is invalid (the
    caller then raises with the reason)."""
    shape = _as_int_tuple(normalized_shape)
    return shape if shape is not None and _all_positive(shape) else None
