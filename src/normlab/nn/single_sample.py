"""BatchNorm that can train on a single sample: an opt-in policy.

A BatchNorm layer in training normalizes with the batch's statistics. When the batch
has one value per channel -- an input (1, C), or (1, C, 1, 1) -- the variance is 0,
the output is all ``bias`` and the gradient to the input is 0; torch.nn and normlab's
``BatchNorm*`` therefore raise. (An input (1, C, H, W) with H*W > 1 is not affected:
the statistics are over the spatial positions of that sample.)

Policy ``single_sample="running"`` (opt-in): such a step is normalized with the
running statistics, exactly as in eval mode -- the output is meaningful, gradients
reach the input, weight and bias (``dx = weight * dy / sqrt(running_var + eps)``) --
and the running statistics and ``num_batches_tracked`` are left untouched, because
one value per channel carries no variance to learn from. Every other step is plain
BatchNorm. ``single_sample="error"`` is BatchNorm's behaviour.

For genuinely tiny batches prefer a batch-independent norm (GroupNorm, LayerNorm2d,
FilterResponseNorm2d) or freeze the statistics (FrozenBatchNorm2d).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import functional as NF
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["SingleSampleBatchNorm1d", "SingleSampleBatchNorm2d", "SingleSampleBatchNorm3d",
           "SINGLE_SAMPLE_POLICIES"]

SINGLE_SAMPLE_POLICIES = ("error", "running")


class _SingleSampleMixin(_BatchNorm):
    """BatchNorm with a ``single_sample`` policy (see :mod:`normlab.nn.single_sample`).
    Same arguments, buffers and state dict as BatchNorm, plus keyword-only
    ``single_sample`` ("running" or "error"; default "running")."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 bias: bool = True, single_sample: str = "running") -> None:
        name = type(self).__name__
        if single_sample not in SINGLE_SAMPLE_POLICIES:
            raise ValueError(f"{name}: expected single_sample in {SINGLE_SAMPLE_POLICIES}, "
                             f"got {single_sample!r}")
        if single_sample == "running" and not track_running_stats:
            raise ValueError(f"{name}: single_sample='running' needs track_running_stats=True")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.single_sample = single_sample

    def forward(self, input: Tensor) -> Tensor:
        one_value = (isinstance(input, Tensor) and input.dim() >= 2
                     and input.shape[0] * math.prod(input.shape[2:]) == 1)
        if not (self.training and one_value and self.single_sample == "running"):
            return super().forward(input)
        self._check_batched_input(input)
        return NF._batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                              False, 0.0, self.eps, name=type(self).__name__)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, single_sample={self.single_sample!r}"


class SingleSampleBatchNorm1d(_SingleSampleMixin, BatchNorm1d):
    """BatchNorm1d with the single-sample policy; input (N, C) or (N, C, L)."""


class SingleSampleBatchNorm2d(_SingleSampleMixin, BatchNorm2d):
    """BatchNorm2d with the single-sample policy; input (N, C, H, W)."""


class SingleSampleBatchNorm3d(_SingleSampleMixin, BatchNorm3d):
    """BatchNorm3d with the single-sample policy; input (N, C, D, H, W)."""
