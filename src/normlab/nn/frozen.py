r"""Frozen BatchNorm: fixed statistics and affine, never updated.

.. math:: y = \frac{x - \text{running\_mean}}{\sqrt{\text{running\_var} + \epsilon}}
          \cdot \text{weight} + \text{bias}

The layer a pretrained backbone is fine-tuned with when batches are too small for
useful batch statistics (as detectron2 does). ``weight``, ``bias``, ``running_mean``
and ``running_var`` are all buffers: they are saved and loaded but are not
parameters, so no optimizer updates them, and ``train()`` / ``eval()`` change
nothing. The state dict has exactly BatchNorm's keys (``num_batches_tracked`` is kept,
never incremented), so it loads from and into ``BatchNorm{1,2,3}d`` (torch.nn or
normlab) with ``strict=True``. Checkpoints without ``weight``/``bias`` (an
``affine=False`` BatchNorm) or without ``num_batches_tracked`` load with weight 1,
bias 0 and count 0.

The computation is BatchNorm's eval on the shared core (fixed statistics, analytic
backward ``dx = rstd * weight * dy``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as NF
from ..core.checks import check_eps, check_floating

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "frozen_class_for"]


class _FrozenBatchNorm(nn.Module):
    """BatchNorm with frozen statistics and affine (see :mod:`normlab.nn.frozen`).

    Args:
        num_features: C.
        eps: added to the running variance. Default 1e-5.

    Example::

        >>> frozen = nl.FrozenBatchNorm2d.from_batch_norm(trained_bn)
        >>> bn = nn.BatchNorm2d(64); bn.load_state_dict(frozen.state_dict())
    """

    _version = 2

    def __init__(self, num_features: int, eps: float = 1e-5,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"{name}: expected num_features to be a positive int, got {num_features!r}")
        check_eps(eps, name)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    _dims: tuple[int, ...] = (4,)

    @classmethod
    def from_batch_norm(cls, bn: nn.Module) -> _FrozenBatchNorm:
        """A frozen copy of a BatchNorm-like module (torch.nn or normlab) with running
        statistics; an ``affine=False`` source gets weight 1, bias 0."""
        running_mean = getattr(bn, "running_mean", None)
        if running_mean is None:
            raise ValueError(f"{cls.__name__}: cannot freeze {type(bn).__name__} without running "
                             "statistics (track_running_stats=False)")
        frozen = cls(bn.num_features, bn.eps, device=running_mean.device, dtype=running_mean.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if getattr(bn, "weight", None) is not None:
                frozen.weight.copy_(bn.weight)
            if getattr(bn, "bias", None) is not None:
                frozen.bias.copy_(bn.bias)
            if getattr(bn, "num_batches_tracked", None) is not None:
                frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        defaults = {"weight": torch.ones_like(self.weight), "bias": torch.zeros_like(self.bias),
                    "num_batches_tracked": torch.zeros_like(self.num_batches_tracked)}
        for key, value in defaults.items():
            state_dict.setdefault(prefix + key, value)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        check_floating(input, name)
        if input.dim() not in self._dims:
            expected = " or ".join(f"{d}D" for d in self._dims)
            raise ValueError(f"{name}: expected {expected} input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise ValueError(f"{name}: expected input with {self.num_features} channels at dim 1, "
                             f"got {input.shape[1]} (input shape {tuple(input.shape)})")
        return NF._batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                              False, 0.0, self.eps, name=name)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen BatchNorm over (N, C) or (N, C, L). See :class:`_FrozenBatchNorm`."""

    _dims = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen BatchNorm over (N, C, H, W). See :class:`_FrozenBatchNorm`."""

    _dims = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen BatchNorm over (N, C, D, H, W). See :class:`_FrozenBatchNorm`."""

    _dims = (5,)


def frozen_class_for(bn: nn.Module) -> type[_FrozenBatchNorm]:
    """The FrozenBatchNorm class matching a BatchNorm module's rank (by its class name)."""
    name = type(bn).__name__
    for suffix, cls in (("1d", FrozenBatchNorm1d), ("3d", FrozenBatchNorm3d)):
        if name.endswith(suffix):
            return cls
    return FrozenBatchNorm2d
