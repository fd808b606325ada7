r"""SyncBatchNorm: batch statistics shared by every process of a torch.distributed group.

Drop-in for ``torch.nn.SyncBatchNorm`` (same constructor, attributes, buffers and
state_dict keys, ``convert_sync_batchnorm``) that is not tied to CUDA: it uses only
``all_gather`` and ``all_reduce`` on tensors of the input's device, which gloo (CPU)
and nccl (CUDA) both provide. Each process normalizes its own slice of the global
batch with the statistics of the whole batch, so training with N processes of B
samples matches one process with N*B samples.

Forward, per channel, on the W ranks of the group (two collectives)::

    1. header    all_gather int64 [status, dim, channels, num_features, dtype, count]
                 -> every rank checks every rank's input; on a mismatch all of them
                    raise the same error instead of deadlocking in step 2
    2. moments   all_gather [mean_r (C), M2_r (C)]  (compute dtype, see below)
                 n_r    = count of rank r (from the header, exact int64)
                 mean_r = sum(x_r) / n_r,  M2_r = sum((x_r - mean_r)^2)   (0 if n_r = 0)
                 merged with Chan et al.'s parallel formula (:func:`merge_moments`):
                 n      = sum_r n_r
                 mean   = sum_r n_r * mean_r / n
                 M2     = sum_r M2_r + sum_r n_r * (mean_r - mean)^2
                 var    = M2 / n            (biased: normalizes)
                 M2 / (n - 1)               (unbiased: running_var, as torch.nn)
    3. y = (x - mean) / sqrt(var + eps) * weight + bias     (the reference backend)

No E[x^2] - E[x]^2 anywhere, so a large offset costs no accuracy, and ranks may
hold different numbers of samples (even none).

Backward (one collective)::

    all_reduce [sum_r(dy), sum_r(dy * xhat)] (C each)   -> global sums over all ranks
    dx      = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dy * weight
              with the means taken over the global batch (n elements per channel)
    dweight = local sum(dy * xhat),  dbias = local sum(dy)

``dweight``/``dbias`` are the local sums, as torch.nn.SyncBatchNorm returns them:
DistributedDataParallel then averages them over the ranks like every other
parameter gradient. ``dx`` is the gradient of the sum of all ranks' losses with
respect to this rank's input -- which is what makes the layers before the
normalization receive, after DDP's averaging, the gradient of the mean loss.

Precision policy as everywhere in normlab (:mod:`normlab.core.stats`): statistics
in float32 for float32/float16/bfloat16 inputs, float64 for float64; the output in
the input's dtype and memory format.

Outside an initialized process group, with a group of one process, and in eval
mode, the layer is exactly :class:`normlab.nn.batchnorm._BatchNorm` (no
communication).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..backends import reference
from ..core.checks import check_floating
from ..core.spec import NormSpec, batch_norm_spec
from ..core.stats import batch_stats, compute_dtype, memory_format_of, update_running_stats
from ..distributed import sync_world
from .batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm", "merge_moments"]

# Codes exchanged in the header. A dtype code is the position in this tuple + 1;
# 0 marks a non-floating input and len + 1 any other floating dtype.
_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OK, _NOT_FLOATING, _TOO_FEW_DIMS, _WRONG_CHANNELS = 0, 1, 2, 3
# header fields, in order
_STATUS, _DIM, _CHANNELS, _NUM_FEATURES, _DTYPE, _COUNT = range(6)


def _dtype_code(dtype: torch.dtype) -> int:
    if dtype in _DTYPES:
        return _DTYPES.index(dtype) + 1
    return len(_DTYPES) + 1 if dtype.is_floating_point else 0


def _dtype_name(code: int) -> str:
    if 1 <= code <= len(_DTYPES):
        return str(_DTYPES[code - 1])
    return "a non-floating dtype" if code == 0 else "another floating dtype"


def merge_moments(
    counts: Sequence[int], means: Tensor, m2s: Tensor
) -> tuple[Tensor, Tensor, int]:
    r"""Merge per-part moments into those of the concatenation (Chan et al., 1979).

    Args:
        counts: ``n_r``, the number of values of each of the W parts (ints >= 0).
        means: (W, C) per-part means ``mean_r`` (ignored where ``n_r = 0``).
        m2s: (W, C) per-part centred sums of squares ``M2_r = sum((x - mean_r)^2)``.

    Returns:
        ``(mean, M2, n)``: the (C,) mean and centred sum of squares of all the
        values, and their count ``n = sum(n_r)``, with

        .. math::
            \mathrm{mean} = \sum_r \frac{n_r}{n}\,\mathrm{mean}_r, \qquad
            M2 = \sum_r M2_r + \sum_r n_r (\mathrm{mean}_r - \mathrm{mean})^2

    This is the W-way form of Chan's pairwise update
    ``M2 = M2_a + M2_b + (mean_b - mean_a)^2 n_a n_b / n``: every term is a sum of
    squares of deviations, so nothing cancels and the result is never negative.
    """
    n = int(sum(int(c) for c in counts))
    if n <= 0:
        raise ValueError(f"merge_moments: expected a positive total count, got counts {list(counts)}")
    # weights n_r / n in float64 on the host: exact enough even when n exceeds 2^24
    weights = torch.tensor([int(c) / n for c in counts], dtype=torch.float64)
    weights = weights.to(device=means.device, dtype=means.dtype)[:, None]
    present = weights > 0
    # a part without values may carry anything (even NaN) as its mean: mask it out
    means = torch.where(present, means, torch.zeros_like(means))
    mean = (weights * means).sum(0)
    spread = (weights * (means - mean).square()).sum(0) * n
    m2 = torch.where(present, m2s, torch.zeros_like(m2s)).sum(0) + spread
    return mean, m2, n


def _collective_failed(exc: RuntimeError, what: str) -> RuntimeError:
    """The process group's error (a peer died, timed out, ...) with the layer's context."""
    return RuntimeError(
        f"SyncBatchNorm: {what} across the process group failed; another rank probably died, "
        f"hung or stopped calling the layer in step ({type(exc).__name__}: {exc})"
    )


def _gather(tensor: Tensor, group: Any, world_size: int, what: str) -> Tensor:
    """all_gather of equally shaped tensors, stacked to (world_size, *tensor.shape)."""
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    try:
        dist.all_gather(parts, tensor, group=group)
    except RuntimeError as exc:
        raise _collective_failed(exc, what) from exc
    return torch.stack(parts)


class _SyncBatchNormFunction(torch.autograd.Function):
    """``(x, weight, bias) -> (y, mean, var)`` with statistics over all ranks.

    ``counts`` are the per-rank element counts per channel (from the header
    exchange), so every rank knows the global count without another collective.
    ``mean``/``var`` are (C,), biased, non-differentiable; they are returned for
    the running-statistic update.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: NormSpec,
                eps: float, counts: tuple[int, ...], rank: int, group: Any):
        cdt = compute_dtype(x.dtype)
        channels = x.shape[1]
        if counts[rank] > 0:
            local_mean, local_var = batch_stats(x.to(cdt).reshape(spec.group_shape), spec)
            local = torch.cat([local_mean.reshape(-1), local_var.reshape(-1) * counts[rank]])
        else:  # an empty slice: its moments carry no weight in the merge
            local = torch.zeros(2 * channels, dtype=cdt, device=x.device)
        gathered = _gather(local, group, len(counts), "gathering the batch statistics")
        gathered = gathered.view(len(counts), 2, channels)
        mean, m2, n = merge_moments(counts, gathered[:, 0], gathered[:, 1])
        var = m2 / n

        stat_view = spec.affine_shape
        y, _, _, rstd = reference.forward(x, weight, bias, spec, eps,
                                          mean.view(stat_view), var.view(stat_view))
        ctx.spec, ctx.count, ctx.group = spec, n, group
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight, mean.view(stat_view), rstd)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, _dmean: Tensor, _dvar: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        spec = ctx.spec
        cdt = compute_dtype(x.dtype)
        dims = spec.param_reduce_dims
        dy_c = dy.to(cdt)
        xhat = (x.to(cdt) - mean) * rstd
        # local sums: exactly this rank's dbias and dweight
        sum_dy = dy_c.sum(dims)
        sum_dy_xhat = (dy_c * xhat).sum(dims)
        # The one backward collective. It runs whether or not dx is needed, so that
        # every rank that reaches this backward takes part in the same collectives.
        totals = torch.cat([sum_dy, sum_dy_xhat])
        try:
            dist.all_reduce(totals, group=ctx.group)
        except RuntimeError as exc:
            raise _collective_failed(exc, "reducing the gradient sums") from exc

        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dweight = dbias = None
        if need_dx:
            view = spec.affine_shape
            mean_dy, mean_dy_xhat = (totals / ctx.count).view(2, -1)
            # dxhat = dy * weight and weight is per channel, so the global means of
            # dxhat and dxhat * xhat are weight * mean(dy) and weight * mean(dy * xhat)
            scale = rstd if weight is None else rstd * weight.to(cdt).view(view)
            dx = (dy_c - mean_dy.view(view) - xhat * mean_dy_xhat.view(view)) * scale
            dx = dx.to(x.dtype).contiguous(memory_format=memory_format_of(x))
        if need_dw:
            dweight = sum_dy_xhat.to(weight.dtype)
        if need_db:
            dbias = sum_dy.to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization with statistics over all processes of a torch.distributed group.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    where, in training, the mean and (biased) variance per channel are those of the
    global batch: the concatenation of every rank's input along N (and the spatial
    dims). Ranks may hold different batch sizes, including empty ones. Works with
    gloo (CPU) as well as nccl (CUDA) -- torch.nn.SyncBatchNorm refuses CPU inputs.
    The statistics are merged stably (Chan's formula, see :mod:`normlab.nn.syncbn`);
    the running estimates are updated with the global mean and unbiased variance,
    identically on every rank.

    Outside an initialized process group, with a group of one process, or in eval
    mode, it behaves exactly as BatchNorm (no communication). Before the statistics
    are exchanged, the ranks exchange a small header (channel count, dtype, element
    count, validity of the local input), so inputs that disagree across ranks raise
    the same ValueError on every rank instead of deadlocking. A rank that dies makes
    the others fail with the process group's own error within its ``timeout``.

    Every rank of the group must call the layer the same number of times, in the
    same order relative to other collectives (the usual DDP contract). Double
    backward is not supported.

    Args:
        num_features: C of an input (N, C, *).
        eps: added to the variance for stability. Default 1e-5.
        momentum: weight of the new batch in the running statistics, or None for a
            cumulative average. Default 0.1.
        affine: learnable per-channel ``weight`` (init 1) and ``bias`` (init 0). Default True.
        track_running_stats: keep running estimates for eval. Default True.
        process_group: the group to synchronize over. Default None: the whole world.
        device, dtype: of the parameters and buffers.
        bias: keyword-only; with ``affine``, whether to learn ``bias``. Default True.

    Shape:
        Input (N, C, *), output the same shape.

    Example::

        >>> model = nl.SyncBatchNorm.convert_sync_batchnorm(model)   # before DDP
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.process_group = process_group

    def _check_input(self, input: Tensor) -> None:
        check_floating(input, type(self).__name__)
        if input.dim() < 2:
            raise ValueError(f"{type(self).__name__}: expected at least 2D input (got {input.dim()}D input)")

    def _header(self, input: Tensor) -> Tensor:
        """This rank's int64 header (see the module docstring), on the input's device."""
        dim = input.dim()
        channels = input.shape[1] if dim >= 2 else -1
        count = input.numel() // channels if channels > 0 else 0
        if not input.is_floating_point():
            status = _NOT_FLOATING
        elif dim < 2:
            status = _TOO_FEW_DIMS
        elif channels != self.num_features:
            status = _WRONG_CHANNELS
        else:
            status = _OK
        fields = [status, dim, channels, self.num_features, _dtype_code(input.dtype), count]
        return torch.tensor(fields, dtype=torch.int64, device=input.device)

    def _check_headers(self, headers: list[list[int]]) -> None:
        """Raise, identically on every rank, if any rank's input is unusable or the
        ranks disagree. ``headers[r]`` is rank r's header."""
        name = type(self).__name__
        bad = [(r, h) for r, h in enumerate(headers) if h[_STATUS] != _OK]
        if bad:
            reasons = []
            for r, h in bad:
                if h[_STATUS] == _NOT_FLOATING:
                    reasons.append(f"rank {r}: expected a floating-point input, got {_dtype_name(h[_DTYPE])}")
                elif h[_STATUS] == _TOO_FEW_DIMS:
                    reasons.append(f"rank {r}: expected at least 2D input (got {h[_DIM]}D input)")
                else:
                    reasons.append(f"rank {r}: expected input with {h[_NUM_FEATURES]} channels at dim 1, "
                                   f"got {h[_CHANNELS]}")
            error = TypeError if all(h[_STATUS] == _NOT_FLOATING for _, h in bad) else ValueError
            raise error(f"{name}: invalid input on {len(bad)} of {len(headers)} ranks ("
                        + "; ".join(reasons) + "); every rank of the process group raises this error")
        if len({h[_CHANNELS] for h in headers}) > 1:
            listing = ", ".join(f"rank {r}: {h[_CHANNELS]}" for r, h in enumerate(headers))
            raise ValueError(f"{name}: ranks disagree on the number of channels ({listing}); every rank "
                             "must normalize the same channels")
        if len({h[_DTYPE] for h in headers}) > 1:
            listing = ", ".join(f"rank {r}: {_dtype_name(h[_DTYPE])}" for r, h in enumerate(headers))
            raise ValueError(f"{name}: ranks disagree on the input dtype ({listing}); every rank must "
                             "pass the same dtype")
        total = sum(h[_COUNT] for h in headers)
        if total <= 1:
            counts = ", ".join(f"rank {r}: {h[_COUNT]}" for r, h in enumerate(headers))
            raise ValueError(f"{name}: expected more than 1 value per channel over all ranks when "
                             f"training, got {total} ({counts})")

    def forward(self, input: Tensor) -> Tensor:
        world = sync_world(self.process_group) if self.training else None
        if world is None:
            return super().forward(input)  # plain BatchNorm: eval, no group, or a group of one
        group, rank, world_size = world
        if not isinstance(input, Tensor):  # nothing to tell the other ranks about
            check_floating(input, type(self).__name__)

        headers = _gather(self._header(input), group, world_size, "exchanging input headers").tolist()
        self._check_headers(headers)

        update = self.track_running_stats
        momentum = self._momentum_for_this_step() if update else 0.0
        counts = tuple(h[_COUNT] for h in headers)
        y, mean, var = _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, batch_norm_spec(input.shape), self.eps, counts, rank, group
        )
        if update:
            update_running_stats(self.running_mean, self.running_var, mean[None], var[None],
                                 sum(counts), momentum)
            self.num_batches_tracked.add_(1)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any | None = None) -> nn.Module:
        """Replace every BatchNorm layer in ``module`` by a :class:`SyncBatchNorm`.

        Converts torch.nn's BatchNorm1d/2d/3d (and torch.nn.SyncBatchNorm) and
        normlab's (and normlab SyncBatchNorm, re-targeted to ``process_group``).
        The new layer takes over the old one's parameters and buffers themselves
        (the same tensors, so an optimizer built earlier keeps working), its
        hyper-parameters, its train/eval mode and ``qconfig``. Other modules,
        InstanceNorm included, are left alone.

        Returns ``module`` with its layers converted, or a new layer if ``module``
        itself is a BatchNorm. Call it before wrapping the model in
        DistributedDataParallel.
        """
        out = module
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, _BatchNorm)):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group, bias=module.bias is not None)
            if module.affine:
                out.weight = module.weight
                out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
