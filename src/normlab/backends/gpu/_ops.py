"""Dispatch from a :class:`~normlab.core.spec.NormSpec` to the Triton kernels
(imports triton; :mod:`normlab.backends.gpu` loads this lazily).

Same contract as :mod:`normlab.backends.reference`. Cases the kernels don't cover
(fixed statistics for anything but per-channel BatchNorm/InstanceNorm) are handed to
the reference backend, forward and backward alike.
"""

from __future__ import annotations

import functools
import math

import torch

from ...core.spec import NormSpec
from ...core.stats import memory_format_of
from .. import reference
from . import _MAX_NUMEL, _extent
from ._channels import channel_apply, channel_backward, channel_forward
from ._groups import group_backward, group_forward
from ._rows import rows_backward, rows_forward

__all__ = ["forward", "backward"]

_ROWS = ("layer_norm", "rms_norm")


@functools.lru_cache(maxsize=512)
def _shape3(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(N, C, S) of an (N, C, *spatial) shape."""
    return shape[0], shape[1], math.prod(shape[2:])


def _input_view3(t: torch.Tensor, like: torch.Tensor, shape3: tuple[int, int, int]) -> torch.Tensor:
    """(N, C, S) view of an input (x, or the caller's gradient) through its strides; one
    whose spatial dims don't collapse (e.g. an odd-strided gradient), or that reaches
    past 32-bit offsets, is first copied into ``like``'s memory format. (``accepts()``
    checked x, but the custom op under torch.compile may hand over other strides.)
    This backend's own dense outputs are viewed directly."""
    try:
        view = t.view(shape3)
    except RuntimeError:
        return torch.empty_like(like).copy_(t).view(shape3)
    if _extent(view) >= _MAX_NUMEL:
        return torch.empty_like(like).copy_(t).view(shape3)
    return view


def _flat_float32(stat: torch.Tensor) -> torch.Tensor:
    """Statistics as the kernels index them: dense float32, read flat. Those of this
    backend's forward already are (no call per tensor then)."""
    if stat.dtype is torch.float32 and stat.is_contiguous():
        return stat
    return stat.reshape(-1).to(torch.float32).contiguous()


def _empty_out(x: torch.Tensor) -> torch.Tensor:
    """An output for x: x's dtype and memory format (as the reference backend gives),
    dense even when x is a strided slice."""
    return torch.empty_like(x, memory_format=memory_format_of(x))


def _fixed_per_channel(spec: NormSpec, fixed_mean, fixed_var) -> bool:
    """Fixed statistics the per-channel kernels handle: one (mean, var) per channel."""
    channels = spec.input_shape[1]
    return (spec.family in ("batch_norm", "instance_norm") and fixed_mean is not None
            and fixed_var.numel() == channels and fixed_mean.numel() == channels)


def forward(x, weight, bias, spec: NormSpec, eps: float, fixed_mean=None, fixed_var=None):
    """See :func:`normlab.backends.reference.forward`."""
    family = spec.family
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    if fixed_var is not None:
        if not _fixed_per_channel(spec, fixed_mean, fixed_var):
            return reference.forward(x, weight, bias, spec, eps, fixed_mean, fixed_var)
        mean = fixed_mean.to(torch.float32)
        var = fixed_var.to(torch.float32)
        rstd = torch.rsqrt(var + eps)
        y = _empty_out(x)
        shape3 = _shape3(spec.input_shape)
        channel_apply(_input_view3(x, x, shape3), y.view(shape3), mean.reshape(-1).contiguous(),
                      rstd.reshape(-1).contiguous(), w, b)
        return y, mean, var, rstd
    # the statistics are allocated in their final shape (no view per call)
    if family in _ROWS:
        return rows_forward(x, w, b, spec.count, spec.center, eps, spec.stat_shape)
    y = _empty_out(x)
    shape3 = _shape3(spec.input_shape)
    if family == "batch_norm":
        mean, var, rstd = channel_forward(_input_view3(x, x, shape3), y.view(shape3), w, b, eps, spec.stat_shape)
    else:  # group_norm / instance_norm
        mean, var, rstd = group_forward(_input_view3(x, x, shape3), y.view(shape3), w, b, spec.group_shape[1], eps,
                                        spec.stat_shape)
    return y, mean, var, rstd


def backward(dy, x, weight, mean, rstd, spec: NormSpec, batch_statistics: bool,
             needs_input_grad=(True, True, True)):
    """See :func:`normlab.backends.reference.backward`."""
    need_dx, need_dw, need_db = needs_input_grad
    family = spec.family
    w = weight.contiguous() if weight is not None else None
    if family in _ROWS and batch_statistics:
        dx, dweight, dbias = rows_backward(dy, x, w, mean, rstd, spec.count, needs_input_grad)
    elif family == "batch_norm" or (family == "instance_norm" and not batch_statistics):
        if mean is None or rstd.numel() != spec.input_shape[1]:
            return reference.backward(dy, x, weight, mean, rstd, spec, batch_statistics, needs_input_grad)
        dx = _empty_out(x) if need_dx else None
        shape3 = _shape3(spec.input_shape)
        sdy, sdyx = channel_backward(
            _input_view3(dy, x, shape3), _input_view3(x, x, shape3), dx.view(shape3) if need_dx else None, w,
            _flat_float32(mean), _flat_float32(rstd), batch_statistics, need_dw or need_db)
        dweight = sdyx if need_dw else None
        dbias = sdy if need_db else None
    elif family in ("group_norm", "instance_norm") and batch_statistics:
        dx = _empty_out(x) if need_dx else None
        shape3 = _shape3(spec.input_shape)
        sdy, sdyx = group_backward(
            _input_view3(dy, x, shape3), _input_view3(x, x, shape3), dx.view(shape3) if need_dx else None, w,
            _flat_float32(mean), _flat_float32(rstd), spec.group_shape[1], need_dw or need_db)
        dweight = sdyx if need_dw else None
        dbias = sdy if need_db else None
    else:
        return reference.backward(dy, x, weight, mean, rstd, spec, batch_statistics, needs_input_grad)
    shape = spec.param_shape
    if len(shape) == 1:  # the sums are already (C,) or (N,) (a view costs ~1 us)
        return dx, dweight, dbias
    return (dx, dweight.view(shape) if dweight is not None else None,
            dbias.view(shape) if dbias is not None else None)
