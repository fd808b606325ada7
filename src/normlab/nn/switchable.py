r"""Switchable Normalization (Luo, Ren, Peng, Zhang & Li, 2019, "Differentiable
Learning-to-Normalize via Switchable Normalization").

Each layer learns a softmax mix of the statistics of InstanceNorm, LayerNorm and
BatchNorm, with separate mixing weights for the mean and for the variance:

.. math::

    \hat\mu = \sum_{k \in \{IN, LN, BN\}} w_k \mu_k, \quad
    \hat\sigma^2 = \sum_k w'_k \sigma^2_k, \quad
    w = \mathrm{softmax}(\lambda), \; w' = \mathrm{softmax}(\lambda')

    y = \frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}} \gamma + \beta

For an input (N, C, *spatial): IN statistics are per (n, c) over the spatial dims,
LN per n over (C, *spatial), BN per c over (N, *spatial). LN and BN statistics are
computed from the IN ones, as in the paper, with the law of total variance written
in two-pass form, ``var_LN = mean_C(var_IN + (mu_IN - mu_LN)^2)``, which has no
``E[x^2] - E[x]^2`` cancellation. In eval (with ``track_running_stats``) the BN
branch uses the running statistics, updated in training like BatchNorm's.

Why this is not on the shared analytic backward: the statistic that normalizes is a
learned mixture of three different reductions, and its gradient must reach the
mixing logits; no single NormSpec describes it. The statistics therefore come from
the core's stable ``batch_stats`` (float32 or wider) and the normalization is
written in differentiable torch ops that autograd differentiates.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.checks import check_eps, check_floating, check_min_dim, check_momentum, check_param
from ..core.spec import instance_norm_spec
from ..core.stats import batch_stats, compute_dtype, memory_format_of, update_running_stats
from .batchnorm import _NormBase

__all__ = ["SwitchableNorm1d", "SwitchableNorm2d", "switchable_norm"]


def _switchable_norm(input: Tensor, mean_weight: Tensor, var_weight: Tensor,
                     running_mean: Tensor | None, running_var: Tensor | None,
                     weight: Tensor | None, bias: Tensor | None, use_batch_stats: bool,
                     momentum: float, eps: float, name: str) -> Tensor:
    check_floating(input, name)
    check_min_dim(input, 3, "(N, C, *spatial)", name)
    channels = input.shape[1]
    for what, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        check_param(t, (channels,), what, name)
    check_param(mean_weight, (3,), "mean_weight", name)
    check_param(var_weight, (3,), "var_weight", name)
    check_eps(eps, name)
    check_momentum(momentum, name)
    if not use_batch_stats and running_mean is None:
        raise ValueError(f"{name}: expected running statistics to normalize with in eval, got None")
    spec = instance_norm_spec(input.shape)
    n = input.shape[0]
    if use_batch_stats and n * spec.count <= 1:
        raise ValueError(f"{name}: expected more than 1 value per channel when training, "
                         f"got input of shape {tuple(input.shape)}")
    cdt = compute_dtype(input.dtype)
    x = input.to(cdt)
    mean_in, var_in = batch_stats(x, spec)  # (N, C, 1, ...)
    mean_ln = mean_in.mean(1, keepdim=True)
    var_ln = (var_in + (mean_in - mean_ln).square()).mean(1, keepdim=True)
    if use_batch_stats:
        mean_bn = mean_in.mean(0, keepdim=True)
        var_bn = (var_in + (mean_in - mean_bn).square()).mean(0, keepdim=True)
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean_bn.detach().reshape(1, channels),
                                 var_bn.detach().reshape(1, channels), n * spec.count, momentum)
    else:
        stat_shape = (1, channels) + (1,) * (input.dim() - 2)
        mean_bn = running_mean.to(cdt).view(stat_shape)
        var_bn = running_var.to(cdt).view(stat_shape)
    wm = torch.softmax(mean_weight.to(cdt), 0)
    wv = torch.softmax(var_weight.to(cdt), 0)
    mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    y = (x - mean) * torch.rsqrt(var + eps)
    affine_shape = (1, channels) + (1,) * (input.dim() - 2)
    if weight is not None:
        y = y * weight.to(cdt).view(affine_shape)
    if bias is not None:
        y = y + bias.to(cdt).view(affine_shape)
    return y.to(input.dtype).contiguous(memory_format=memory_format_of(input))


def switchable_norm(
    input: Tensor,
    mean_weight: Tensor,
    var_weight: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Functional Switchable Normalization of ``input`` (N, C, *spatial).

    ``mean_weight``/``var_weight`` (3,) are the logits of the (IN, LN, BN) mix. In
    training (or without running statistics) the BN branch uses the batch statistics
    and updates ``running_mean``/``running_var`` when given; otherwise it uses them.
    """
    return _switchable_norm(input, mean_weight, var_weight, running_mean, running_var, weight, bias,
                            training or running_mean is None, momentum, eps, name="switchable_norm")


class _SwitchableNorm(_NormBase):
    """Switchable Normalization (Luo et al., 2019); math in :mod:`normlab.nn.switchable`.

    Args:
        num_features: C.
        eps: added to the mixed variance. Default 1e-5.
        momentum: BN-branch running statistics, as BatchNorm (None: cumulative). Default 0.1.
        affine: per-channel ``weight``/``bias``. Default True.
        track_running_stats: running BN statistics for eval. Default True.

    Parameters ``mean_weight`` and ``var_weight`` (3,) are the logits of the
    (IN, LN, BN) mix, initialized equal (the paper's uniform start). A one-hot mix
    reproduces InstanceNorm, LayerNorm over (C, *spatial) (``GroupNorm(1, C)``) or
    BatchNorm.

    Example::

        >>> sn = nl.SwitchableNorm2d(64)
        >>> y = sn(torch.randn(8, 64, 16, 16))
        >>> torch.softmax(sn.mean_weight, 0)   # learned IN/LN/BN importance
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
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.mean_weight = nn.Parameter(torch.ones(3, device=device, dtype=dtype))
        self.var_weight = nn.Parameter(torch.ones(3, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "mean_weight"):
            nn.init.ones_(self.mean_weight)
            nn.init.ones_(self.var_weight)

    def forward(self, input: Tensor) -> Tensor:
        self._check_batched_input(input)
        return self._step(lambda running_mean, running_var, use_batch_stats, momentum: _switchable_norm(
            input, self.mean_weight, self.var_weight, running_mean, running_var, self.weight, self.bias,
            use_batch_stats, momentum, self.eps, name=type(self).__name__))


class SwitchableNorm1d(_SwitchableNorm):
    """Switchable Normalization over (N, C, L). See :class:`_SwitchableNorm`."""

    _input_dims = (3,)


class SwitchableNorm2d(_SwitchableNorm):
    """Switchable Normalization over (N, C, H, W). See :class:`_SwitchableNorm`."""

    _input_dims = (4,)
