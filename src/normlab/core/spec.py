"""NormSpec: the one thing that tells the normalization methods apart.

Every method in normlab is the same computation (SPEC §1)::

    y = (x - mean_S(x)) / sqrt(var_S(x) + eps) * gamma + beta

and only the set S of axes that share one (mean, var) differs. A ``NormSpec``
names S for a concrete input shape:

* ``group_shape`` -- the shape the input is viewed as before reducing. It is the
  input's own shape except for GroupNorm, which splits C into (G, C/G).
* ``reduce_dims`` -- the dims of that view that share one statistic.
* ``feature_dims`` -- the dims of the *input* that carry the affine parameters
  (the channel dim, or LayerNorm's trailing ``normalized_shape`` dims).
* ``center`` -- subtract the mean (False for RMSNorm).

Example, input (N, C, H, W) = (2, 6, 5, 5)::

    method          group_shape        reduce_dims   stats per       count
    batch_norm      (2, 6, 5, 5)       (0, 2, 3)     channel         N*H*W = 50
    instance_norm   (2, 6, 5, 5)       (2, 3)        (n, c)          H*W   = 25
    group_norm(G=3) (2, 3, 2, 5, 5)    (2, 3, 4)     (n, group)      2*H*W = 50
    layer_norm([5]) (2, 6, 5, 5)       (3,)          row             W     = 5
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "NormSpec",
    "batch_norm_spec",
    "instance_norm_spec",
    "group_norm_spec",
    "layer_norm_spec",
    "rms_norm_spec",
]


@dataclass(frozen=True)
class NormSpec:
    """Which axes of an input of shape ``input_shape`` share one mean and variance."""

    family: str
    input_shape: tuple[int, ...]
    group_shape: tuple[int, ...]
    reduce_dims: tuple[int, ...]
    feature_dims: tuple[int, ...]
    center: bool = True

    def __hash__(self) -> int:
        # specs key the backends' per-configuration caches on every call: hash once
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.family, self.input_shape, self.group_shape, self.reduce_dims,
                           self.feature_dims, self.center))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict:
        # the cached hash is per process (string hashing is randomized): don't pickle it
        state = dict(self.__dict__)
        state.pop("_hash", None)
        return state

    # Derived shapes, read on every call (a small layer's step reads several): computed
    # once in __post_init__. Not constructor arguments, and no part of equality or hash.
    stat_shape: tuple[int, ...] = field(init=False, compare=False, repr=False)
    """Shape of mean/var with keepdim: ``group_shape`` with the reduced dims set to 1."""
    count: int = field(init=False, compare=False, repr=False)
    """Number of elements averaged into one statistic."""
    affine_shape: tuple[int, ...] = field(init=False, compare=False, repr=False)
    """Shape that weight/bias are viewed as to broadcast against the input."""
    param_shape: tuple[int, ...] = field(init=False, compare=False, repr=False)
    """Shape of weight and bias (e.g. (C,) or ``normalized_shape``)."""
    param_reduce_dims: tuple[int, ...] = field(init=False, compare=False, repr=False)
    """Input dims summed over to get dweight and dbias."""

    def __post_init__(self) -> None:
        derived = {
            "stat_shape": tuple(1 if d in self.reduce_dims else s for d, s in enumerate(self.group_shape)),
            "count": math.prod([self.group_shape[d] for d in self.reduce_dims]),  # a list: torch.compile traces it
            "affine_shape": tuple(s if d in self.feature_dims else 1 for d, s in enumerate(self.input_shape)),
            "param_shape": tuple(self.input_shape[d] for d in self.feature_dims),
            "param_reduce_dims": tuple(d for d in range(len(self.input_shape)) if d not in self.feature_dims),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    def channel_view(self, stat: torch.Tensor | None) -> torch.Tensor | None:
        """A fixed statistic as it broadcasts against the input: ``stat`` itself, or, for
        a spec whose affine is on dim 1 (``feature_dims == (1,)``), a 1-D tensor of one
        value per channel -- the (C,) running statistics a module keeps -- viewed as
        ``affine_shape`` (1, C, 1, ...)."""
        if stat is not None and stat.dim() == 1 and self.feature_dims == (1,):
            return stat.view(self.affine_shape)
        return stat


def _memoized(build: Callable[..., NormSpec]) -> Callable[..., NormSpec]:
    """``build`` with its results cached: every training step asks for the spec of the
    same shapes again (a cached spec costs ~0.3 us instead of ~1.3 us). Arguments that
    don't hash (lists, symbolic sizes) and traced calls go to ``build`` directly."""
    cached = functools.lru_cache(maxsize=1024)(build)

    @functools.wraps(build)
    def spec(*args):
        if torch.compiler.is_compiling():
            return build(*args)
        try:
            return cached(*args)
        except TypeError:  # unhashable arguments (build's own errors are raised again)
            return build(*args)

    return spec


def _spatial(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(range(2, len(shape)))


@_memoized
def batch_norm_spec(shape: Sequence[int]) -> NormSpec:
    """One statistic per channel, over N and all spatial dims of (N, C, *spatial)."""
    shape = tuple(shape)
    return NormSpec("batch_norm", shape, shape, (0, *_spatial(shape)), (1,))


@_memoized
def instance_norm_spec(shape: Sequence[int]) -> NormSpec:
    """One statistic per (sample, channel), over the spatial dims of (N, C, *spatial)."""
    shape = tuple(shape)
    return NormSpec("instance_norm", shape, shape, _spatial(shape), (1,))


@_memoized
def group_norm_spec(shape: Sequence[int], num_groups: int) -> NormSpec:
    """One statistic per (sample, group) over C/G channels and all spatial dims.

    The input (N, C, *spatial) is viewed as (N, G, C/G, *spatial); that view is a
    plain ``reshape`` for contiguous and channels_last layouts alike.
    """
    shape = tuple(shape)
    n, c, *spatial = shape
    group_shape = (n, num_groups, c // num_groups, *spatial)
    return NormSpec("group_norm", shape, group_shape, tuple(range(2, len(group_shape))), (1,))


@_memoized
def layer_norm_spec(shape: Sequence[int], normalized_shape: Sequence[int]) -> NormSpec:
    """One statistic per row, over the trailing ``len(normalized_shape)`` dims."""
    shape = tuple(shape)
    trailing = tuple(range(len(shape) - len(normalized_shape), len(shape)))
    return NormSpec("layer_norm", shape, shape, trailing, trailing)


@_memoized
def rms_norm_spec(shape: Sequence[int], normalized_shape: Sequence[int]) -> NormSpec:
    """LayerNorm's axes without centering: x / sqrt(mean(x^2) + eps)."""
    spec = layer_norm_spec(shape, normalized_shape)
    return NormSpec("rms_norm", spec.input_shape, spec.group_shape, spec.reduce_dims,
                    spec.feature_dims, center=False)
