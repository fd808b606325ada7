r"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017, "Train longer,
generalize better: closing the generalization gap in large batch training of
neural networks").

In training, the batch (N, C, *spatial) is split into ghost batches of
``virtual_batch_size`` samples and each is batch-normalized with its own
statistics -- the regularizing noise of a small batch at the throughput of a large
one. Eval mode is BatchNorm's eval.

On the shared core this is one more :class:`~normlab.core.spec.NormSpec`: the input
is viewed as (G, N/G, C, *spatial) and one statistic is shared per (ghost batch,
channel) over (N/G, *spatial). That view is a plain reshape (N is the outermost dim
in both contiguous and channels_last layouts), so no data moves.

Running statistics (policy): one update per forward with the ghost batches' mean and
unbiased variance averaged (weighted by ghost-batch size), so that a virtual batch
of the whole batch gives exactly BatchNorm's running statistics. When N is not a
multiple of ``virtual_batch_size`` the last ghost batch is smaller (a remainder that
would leave a single value per channel is merged into the previous ghost batch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as NF
from ..core.autograd import NormFunction, normalize, register_function
from ..core.checks import check_eps, check_floating, check_min_dim, check_momentum, check_param
from ..core.spec import NormSpec, batch_norm_spec
from ..core.stats import memory_format_of
from .batchnorm import _BatchNorm

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "ghost_batch_norm",
           "ghost_batch_norm_spec"]


class GhostBatchNormFunction(NormFunction):
    pass


register_function("ghost_batch_norm", GhostBatchNormFunction)


def ghost_batch_norm_spec(shape: tuple[int, ...], virtual_batch_size: int) -> NormSpec:
    """Spec of an input (N, C, *spatial) with N a multiple of ``virtual_batch_size``:
    group_shape (G, N/G, C, *spatial), statistics over (N/G, *spatial)."""
    n, c, *spatial = shape
    group_shape = (n // virtual_batch_size, virtual_batch_size, c, *spatial)
    reduce_dims = (1, *range(3, len(group_shape)))
    return NormSpec("ghost_batch_norm", tuple(shape), group_shape, reduce_dims, (1,))


def _chunk_sizes(n: int, per_sample: int, vbs: int) -> list[int]:
    sizes = [vbs] * (n // vbs)
    rest = n - vbs * len(sizes)
    if rest:
        if rest * per_sample <= 1 and sizes:
            sizes[-1] += rest  # a lone value per channel has no variance: merge it
        else:
            sizes.append(rest)
    return sizes


def _ghost_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                      weight: Tensor | None, bias: Tensor | None, update: bool, momentum: float,
                      eps: float, virtual_batch_size: int, name: str) -> Tensor:
    check_floating(input, name)
    check_min_dim(input, 2, "(N, C, *spatial)", name)
    channels = input.shape[1]
    for what, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        check_param(t, (channels,), what, name)
    check_eps(eps, name)
    check_momentum(momentum, name)
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) \
            or virtual_batch_size <= 0:
        raise ValueError(f"{name}: expected virtual_batch_size to be a positive int, "
                         f"got {virtual_batch_size!r}")
    n = input.shape[0]
    per_sample = batch_norm_spec(input.shape).count // max(n, 1)
    vbs = min(virtual_batch_size, n)
    if vbs * per_sample <= 1 and n * per_sample > 1:
        vbs = n  # ghost batches of one value per channel have no variance
    if n * per_sample <= 1:
        raise ValueError(f"{name}: expected more than 1 value per channel when training, "
                         f"got input of shape {tuple(input.shape)}")
    if n % vbs == 0:
        spec = ghost_batch_norm_spec(tuple(input.shape), vbs)
        y, mean, var = normalize(input, weight, bias, spec, eps)
        means = mean.reshape(-1, channels)
        variances = var.reshape(-1, channels)
        sizes = [vbs] * means.shape[0]
    else:
        # uneven ghost batches cannot share one spec; normalize each and concatenate
        sizes = _chunk_sizes(n, per_sample, vbs)
        outs, mean_list, var_list = [], [], []
        for chunk in torch.split(input, sizes, dim=0):
            y_i, m_i, v_i = normalize(chunk, weight, bias, batch_norm_spec(chunk.shape), eps)
            outs.append(y_i)
            mean_list.append(m_i.reshape(channels))
            var_list.append(v_i.reshape(channels))
        y = torch.cat(outs, 0).contiguous(memory_format=memory_format_of(input))
        means, variances = torch.stack(mean_list), torch.stack(var_list)
    if update and running_mean is not None:
        with torch.no_grad():
            w = torch.tensor(sizes, dtype=means.dtype, device=means.device) / n
            counts = torch.tensor(sizes, dtype=means.dtype, device=means.device) * per_sample
            unbiased = variances * (counts / (counts - 1)).unsqueeze(1)
            running_mean.lerp_((w @ means).to(running_mean.dtype), momentum)
            running_var.lerp_((w @ unbiased).to(running_var.dtype), momentum)
    return y


def ghost_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    virtual_batch_size: int = 32,
) -> Tensor:
    """Functional Ghost BatchNorm of ``input`` (N, C, *spatial). In training (or without
    running statistics) each ghost batch of ``virtual_batch_size`` samples is
    normalized with its own statistics and the running statistics, when given, are
    updated (policy in :mod:`normlab.nn.ghost`); otherwise this is ``batch_norm``'s eval.
    """
    if not training and running_mean is not None:
        return NF._batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps,
                              name="ghost_batch_norm")
    return _ghost_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                             virtual_batch_size, name="ghost_batch_norm")


class _GhostBatchNorm(_BatchNorm):
    """Ghost BatchNorm (Hoffer et al., 2017): BatchNorm whose training statistics are
    taken per ghost batch of ``virtual_batch_size`` samples (see
    :mod:`normlab.nn.ghost`). Eval is BatchNorm's eval; the state dict is BatchNorm's.

    Args:
        num_features, eps, momentum, affine, track_running_stats, bias: as BatchNorm.
        virtual_batch_size: keyword-only; samples per ghost batch. Default 32.

    Example::

        >>> gbn = nl.GhostBatchNorm2d(64, virtual_batch_size=16)
        >>> y = gbn(torch.randn(128, 64, 8, 8))   # 8 ghost batches of 16
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
        virtual_batch_size: int = 32,
    ) -> None:
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) \
                or virtual_batch_size <= 0:
            raise ValueError(f"{type(self).__name__}: expected virtual_batch_size to be a positive "
                             f"int, got {virtual_batch_size!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        if not self.training and self.running_mean is not None:
            return super().forward(input)
        self._check_batched_input(input)
        # here every step uses ghost-batch statistics; running ones arrive only to be updated
        return self._step(lambda running_mean, running_var, _, momentum: _ghost_batch_norm(
            input, running_mean, running_var, self.weight, self.bias, running_mean is not None,
            momentum, self.eps, self.virtual_batch_size, name=type(self).__name__))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost BatchNorm over (N, C) or (N, C, L). See :class:`_GhostBatchNorm`."""

    _input_dims = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost BatchNorm over (N, C, H, W). See :class:`_GhostBatchNorm`."""

    _input_dims = (4,)


class GhostBatchNorm3d(_GhostBatchNorm):
    """Ghost BatchNorm over (N, C, D, H, W). See :class:`_GhostBatchNorm`."""

    _input_dims = (5,)
