"""Statistics and the precision policy shared by every normalization.

Precision policy (cited by the docstrings of every layer):

* Statistics (mean, variance, reciprocal std) are computed in float32 for
  float32/float16/bfloat16 inputs and in float64 for float64 inputs.
* The variance is computed in two passes, ``mean((x - mean(x))**2)``, never as
  ``E[x^2] - E[x]^2``: the latter cancels catastrophically when |mean| >> std
  (an input offset by 1e4 in float32 would lose every digit of its variance).
  A two-pass variance is a sum of squares, so it is never negative.
* The mean is carried to about twice the compute precision (returned as float64):
  a float32 mean of ``x + 1e4`` is itself rounded by up to 5e-4, an error that
  survives normalization. The mean of the residuals ``x - mean`` corrects it, and
  :func:`center` subtracts the float64 mean as a (hi, lo) pair of float32 values.
* The variance that normalizes is the biased one (divide by the count); the
  running variance stores the unbiased one (divide by count - 1), as torch.nn.
* The output has the input's dtype and memory format.
"""

from __future__ import annotations

import torch

from .spec import NormSpec

__all__ = [
    "compute_dtype",
    "batch_stats",
    "center",
    "update_running_stats",
    "fold_running_stats",
    "RunningStats",
    "memory_format_of",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and arithmetic run in for an input of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_stats(x_grouped: torch.Tensor, spec: NormSpec) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Mean and biased variance of ``x_grouped`` (shaped ``spec.group_shape``, in the
    compute dtype) over ``spec.reduce_dims``, kept as ``spec.stat_shape``.

    The mean is float64 (see the module docstring); the variance is in the compute
    dtype. For a non-centering spec (RMSNorm) the mean is None and the "variance" is
    the mean square. Written in differentiable torch ops, so the double-backward path
    can rebuild the statistics as functions of x.
    """
    dims = spec.reduce_dims
    if not spec.center:
        return None, x_grouped.square().mean(dims, keepdim=True)
    rough = x_grouped.mean(dims, keepdim=True)
    residual = x_grouped - rough  # exact where x is near its mean (Sterbenz)
    correction = residual.mean(dims, keepdim=True)
    var = (residual - correction).square().mean(dims, keepdim=True)
    return rough.to(torch.float64) + correction.to(torch.float64), var


def center(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``x - mean``, with a wider ``mean`` applied as hi + lo parts in x's dtype so
    that its extra precision is not rounded away."""
    if mean.dtype == x.dtype:
        return x - mean
    hi = mean.to(x.dtype)
    lo = (mean - hi.to(mean.dtype)).to(x.dtype)
    return (x - hi) - lo


#: An in-place update that a compute backend may install (see
#: :func:`set_running_stats_kernel`): same arguments as :func:`update_running_stats`,
#: returns False for inputs it does not take.
_running_stats_kernel = None


def set_running_stats_kernel(kernel) -> None:
    """Let ``kernel(running_mean, running_var, mean, var, count, momentum) -> bool`` do the
    update where it can (normlab.backends.cpu installs a fused one); None removes it."""
    global _running_stats_kernel
    _running_stats_kernel = kernel


def update_running_stats(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float,
) -> None:
    """In-place ``running = (1 - momentum) * running + momentum * batch_stat``.

    ``mean`` and ``var`` (biased) are shaped (..., C, 1, ...) -- a statistic per channel
    C, as the normalization returned them, or already (..., C): any leading dims
    (InstanceNorm's per-sample statistics) are averaged first, as torch.nn does. The
    variance folded in is the unbiased one, ``var * count / (count - 1)``.

    Runs on every training step of every BatchNorm: a backend's fused kernel does it
    where it can (see :func:`set_running_stats_kernel`), else three small torch ops.
    """
    if running_mean is None and running_var is None:
        return
    kernel = _running_stats_kernel
    if kernel is not None and kernel(running_mean, running_var, mean, var, count, momentum):
        return
    channels = (running_var if running_var is not None else running_mean).shape[0]
    with torch.no_grad():
        if mean.numel() == channels:  # BatchNorm: one row already
            mean, var = mean.reshape(channels), var.reshape(channels)
        else:
            mean, var = mean.reshape(-1, channels).mean(0), var.reshape(-1, channels).mean(0)
        unbiased = var * (count / (count - 1))
        if running_mean is not None:
            running_mean.lerp_(mean if mean.dtype == running_mean.dtype else mean.to(running_mean.dtype),
                               momentum)
        if running_var is not None:
            running_var.lerp_(unbiased if unbiased.dtype == running_var.dtype
                              else unbiased.to(running_var.dtype), momentum)


#: Running statistics to update in a training forward, as passed to the backends:
#: ``(running_mean, running_var, momentum)`` (either tensor may be None).
RunningStats = tuple[torch.Tensor | None, torch.Tensor | None, float]


def fold_running_stats(running: RunningStats | None, mean: torch.Tensor, var: torch.Tensor,
                       count: int) -> None:
    """:func:`update_running_stats` for a backend's ``running`` argument (None: nothing
    to update): what a backend does after its forward when it has no fused update."""
    if running is not None:
        running_mean, running_var, momentum = running
        update_running_stats(running_mean, running_var, mean, var, count, momentum)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format an output should keep to match ``x`` (channels_last or not)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
