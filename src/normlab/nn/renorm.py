r"""Batch Renormalization (Ioffe, 2017, "Batch Renormalization: Towards Reducing
Minibatch Dependence in Batch-Normalized Models").

In training, BatchNorm's output is corrected towards what the running statistics
would give, with two per-channel factors that are treated as constants (no gradient):

.. math::

    \sigma_B = \sqrt{\mathrm{Var}_B[x] + \epsilon}, \quad
    \sigma = \sqrt{\text{running\_var} + \epsilon}

    r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}(\sigma_B / \sigma), \quad
    d = \mathrm{clip}_{[-d_{max},\, d_{max}]}((\mu_B - \text{running\_mean}) / \sigma)

    y = \gamma \left(\frac{x - \mu_B}{\sigma_B} r + d\right) + \beta

Because r and d are stop-gradient per-channel constants, this is the shared batch
Z-score with a modified per-channel affine, weight ``gamma * r`` and bias
``beta + gamma * d``; so it runs on the shared core (one analytic backward) and
autograd carries the gradient from that affine back to gamma and beta. With
``r_max = 1`` and ``d_max = 0``, r = 1 and d = 0 and the layer is exactly BatchNorm.
Eval mode is BatchNorm's eval (running statistics). Running statistics are updated
as BatchNorm's (unbiased variance, ``momentum`` or the cumulative average).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import functional as NF
from ..core.autograd import normalize
from ..core.checks import check_eps, check_floating, check_min_dim, check_momentum, check_param
from ..core.spec import batch_norm_spec
from ..core.stats import batch_stats, compute_dtype, update_running_stats
from .batchnorm import _BatchNorm

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "LinearRamp", "batch_renorm"]

Limit = float | Callable[[int], float]


@dataclass(frozen=True)
class LinearRamp:
    """A picklable schedule ``step -> value``: ``start`` until ``begin``, then linear to
    ``end`` at step ``finish``, constant after. The paper's schedule for ImageNet is
    ``r_max = LinearRamp(1, 3, 5000, 40000)``, ``d_max = LinearRamp(0, 5, 5000, 25000)``
    (step = the layer's ``num_batches_tracked``)."""

    start: float
    end: float
    begin: int
    finish: int

    def __call__(self, step: int) -> float:
        if step <= self.begin:
            return float(self.start)
        if step >= self.finish:
            return float(self.end)
        t = (step - self.begin) / (self.finish - self.begin)
        return float(self.start + t * (self.end - self.start))


def _check_limits(r_max: object, d_max: object, name: str) -> None:
    for what, value, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}: expected {what} to be a real number, got {value!r}")
        if not (math.isfinite(value) and value >= low):
            raise ValueError(f"{name}: expected a finite {what} >= {low:g}, got {value!r}")


def _batch_renorm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                  weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float,
                  eps: float, r_max: float, d_max: float, name: str) -> Tensor:
    if not training:
        return NF._batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps,
                              name=name)
    check_floating(input, name)
    check_min_dim(input, 2, "(N, C, *spatial)", name)
    channels = input.shape[1]
    if running_mean is None or running_var is None:
        raise ValueError(f"{name}: batch renormalization needs running_mean and running_var "
                         "in training (they define r and d), got None")
    for what, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        check_param(t, (channels,), what, name)
    check_eps(eps, name)
    check_momentum(momentum, name)
    _check_limits(r_max, d_max, name)
    spec = batch_norm_spec(input.shape)
    if spec.count <= 1:
        raise ValueError(f"{name}: expected more than 1 value per channel when training, "
                         f"got input of shape {tuple(input.shape)}")
    # r and d need the batch statistics before the normalization runs; they are
    # constants for the gradient, so they are computed outside autograd. (This costs
    # one extra reduction pass; the core then recomputes the same statistics.)
    with torch.no_grad():
        cdt = compute_dtype(input.dtype)
        mean_b, var_b = batch_stats(input.detach().to(cdt).reshape(spec.group_shape), spec)
        mean_b, var_b = mean_b.reshape(channels), var_b.reshape(channels)
        sigma = torch.sqrt(running_var.to(cdt) + eps)
        r = (torch.sqrt(var_b + eps) / sigma).clamp(1.0 / r_max, r_max)
        d = ((mean_b - running_mean.to(cdt)) / sigma).clamp(-d_max, d_max)
    eff_weight = r if weight is None else weight * r
    eff_bias = d if weight is None else weight * d
    if bias is not None:
        eff_bias = eff_bias + bias
    y, mean, var = normalize(input, eff_weight, eff_bias, spec, eps)
    update_running_stats(running_mean, running_var, mean.reshape(-1, channels),
                         var.reshape(-1, channels), spec.count, momentum)
    return y


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
) -> Tensor:
    """Functional Batch Renormalization of ``input`` (N, C, *spatial); see the module
    docstring for the formula. ``running_mean``/``running_var`` (C,) are required and
    are updated in place in training; in eval this is ``batch_norm``.
    """
    return _batch_renorm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                         r_max, d_max, name="batch_renorm")


class _BatchRenorm(_BatchNorm):
    r"""Batch Renormalization (Ioffe, 2017): BatchNorm whose training output is
    corrected by stop-gradient factors r, d towards the running statistics (formula in
    :mod:`normlab.nn.renorm`). State dict identical to BatchNorm's, so checkpoints load
    both ways.

    Args:
        num_features, eps, momentum, affine, bias: as :class:`~normlab.BatchNorm2d`.
        track_running_stats: must be True (r and d are defined by the running statistics).
        r_max: keyword-only, float >= 1 or a callable ``step -> float`` (e.g.
            :class:`LinearRamp`), step being ``num_batches_tracked``. Default 3.0.
        d_max: keyword-only, float >= 0 or a callable. Default 5.0.

    ``r_max=1, d_max=0`` is BatchNorm exactly (outputs, gradients, running statistics).

    Example::

        >>> brn = nl.BatchRenorm2d(64, r_max=LinearRamp(1, 3, 5000, 40000),
        ...                        d_max=LinearRamp(0, 5, 5000, 25000))
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        r_max: Limit = 3.0,
        d_max: Limit = 5.0,
    ) -> None:
        name = type(self).__name__
        if not track_running_stats:
            raise ValueError(f"{name}: expected track_running_stats=True (batch renormalization "
                             "corrects towards the running statistics), got False")
        if not callable(r_max) or not callable(d_max):
            _check_limits(1.0 if callable(r_max) else r_max, 0.0 if callable(d_max) else d_max, name)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.r_max = r_max
        self.d_max = d_max

    def current_limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` for the next training step (schedules evaluated at
        ``num_batches_tracked``)."""
        step = int(self.num_batches_tracked)
        r_max = self.r_max(step) if callable(self.r_max) else self.r_max
        d_max = self.d_max(step) if callable(self.d_max) else self.d_max
        return r_max, d_max

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        self._check_batched_input(input)
        r_max, d_max = self.current_limits()
        y = _batch_renorm(input, self.running_mean, self.running_var, self.weight, self.bias, True,
                          self._momentum_for_this_step(), self.eps, r_max, d_max,
                          name=type(self).__name__)
        self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"


class BatchRenorm1d(_BatchRenorm):
    """Batch Renormalization over (N, C) or (N, C, L). See :class:`_BatchRenorm`."""

    _input_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch Renormalization over (N, C, H, W). See :class:`_BatchRenorm`."""

    _input_dims = (4,)


class BatchRenorm3d(_BatchRenorm):
    """Batch Renormalization over (N, C, D, H, W). See :class:`_BatchRenorm`."""

    _input_dims = (5,)
