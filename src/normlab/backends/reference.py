"""The reference backend: normalization forward and analytic backward in torch ops.

This is the readable definition every faster backend must agree with, and the
fallback for whatever those backends don't cover. It works on any device and
dtype. All methods share the two functions below; a ``NormSpec`` says which axes
share one statistic.

Forward, for the m elements of one statistic group::

    mean = sum(x) / m                       (0 for RMSNorm)
    var  = sum((x - mean)^2) / m            (mean square for RMSNorm)
    rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd
    y    = xhat * weight + bias             (weight/bias broadcast over feature dims)

Backward, with dxhat = dy * weight::

    dbias   = sum over non-feature dims of dy
    dweight = sum over non-feature dims of dy * xhat
    dx      = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))   batch statistics
    dx      = rstd * (dxhat             - xhat * mean(dxhat * xhat))     RMSNorm
    dx      = rstd * dxhat                                               fixed (running) statistics

Forward-mode tangent (``torch.func.jvp``/``jacfwd``), with tangents t of x, w_t, b_t::

    xhat_t = rstd * (t - mean(t) - xhat * mean(t * xhat))                  batch statistics
    xhat_t = rstd * (t           - xhat * mean(t * xhat))                  RMSNorm
    xhat_t = rstd * t                                                      fixed (running) statistics
    y_t    = xhat_t * weight + xhat * w_t + b_t
"""

from __future__ import annotations

import torch

from ..core.spec import NormSpec
from ..core.stats import RunningStats, batch_stats, center, compute_dtype, fold_running_stats, memory_format_of

__all__ = ["forward", "backward", "forward_tangent"]


def _normalize(x_grouped: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor) -> torch.Tensor:
    return center(x_grouped, mean) * rstd if mean is not None else x_grouped * rstd


def _affine(xhat: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            spec: NormSpec) -> torch.Tensor:
    if weight is not None:
        xhat = xhat * weight.to(xhat.dtype).view(spec.affine_shape)
    if bias is not None:
        xhat = xhat + bias.to(xhat.dtype).view(spec.affine_shape)
    return xhat


def _without_statistics(g: torch.Tensor, xhat: torch.Tensor, spec: NormSpec) -> torch.Tensor:
    """``g - mean(g) - xhat * mean(g * xhat)`` per statistic group (no ``mean(g)`` term
    for a non-centering spec), g and xhat shaped ``spec.group_shape``: g without its
    components along the directions the batch statistics absorb. Times rstd it is dx
    of the backward (g = dxhat) and xhat's tangent in forward mode (g = x's tangent):
    the map is self-adjoint."""
    dims = spec.reduce_dims
    inner = g - xhat * (g * xhat).mean(dims, keepdim=True)
    if spec.center:
        inner = inner - g.mean(dims, keepdim=True)
    return inner


def _sum_to_params(t: torch.Tensor, spec: NormSpec) -> torch.Tensor:
    """Sum over the non-feature dims to the parameter shape. (``sum(())`` would sum
    everything, so an input with only feature dims is returned as is.)"""
    dims = spec.param_reduce_dims
    return (t.sum(dims) if dims else t).reshape(spec.param_shape)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    spec: NormSpec,
    eps: float,
    fixed_mean: torch.Tensor | None = None,
    fixed_var: torch.Tensor | None = None,
    running: RunningStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Normalize ``x`` (shape ``spec.input_shape``).

    With ``fixed_mean``/``fixed_var`` None the statistics are the batch's own;
    otherwise they are given (running statistics), broadcastable to ``x``.
    ``running`` (batch statistics only): ``(running_mean, running_var, momentum)`` to
    update in place from this batch's statistics, after they are computed
    (:func:`normlab.core.stats.update_running_stats`; a backend may fuse it).

    Returns ``(y, mean, var, rstd)``: y in x's dtype and memory format; var and
    rstd in the compute dtype and mean in float64 (see :mod:`normlab.core.stats`),
    shaped ``spec.stat_shape`` (batch statistics) or as given (fixed statistics).
    ``mean`` is None for a non-centering spec.
    """
    cdt = compute_dtype(x.dtype)
    x_grouped = x.to(cdt).reshape(spec.group_shape)
    if fixed_var is None:
        mean, var = batch_stats(x_grouped, spec)
    else:
        mean, var = fixed_mean, fixed_var.to(cdt)
    rstd = torch.rsqrt(var + eps)
    xhat = _normalize(x_grouped, mean, rstd).reshape(x.shape)
    y = _affine(xhat, weight, bias, spec)
    fold_running_stats(running, mean, var, spec.count)
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x)), mean, var, rstd


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    spec: NormSpec,
    batch_statistics: bool,
    needs_input_grad: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Analytic gradients ``(dx, dweight, dbias)`` of :func:`forward`; dx in x's
    dtype and memory format, dweight/dbias in the compute dtype (the caller casts).

    ``mean``/``rstd`` are what forward returned. Every step is a differentiable
    torch op, so when the statistics are rebuilt from x with grad enabled this same
    function gives correct second derivatives (double backward).
    """
    cdt = compute_dtype(x.dtype)
    dy_c = dy.to(cdt)
    need_dx, need_dw, need_db = needs_input_grad
    dx = dweight = dbias = None

    if need_db:
        dbias = _sum_to_params(dy_c, spec)
    if need_dw or (need_dx and batch_statistics):
        xhat = _normalize(x.to(cdt).reshape(spec.group_shape), mean, rstd).reshape(x.shape)
        if need_dw:
            dweight = _sum_to_params(dy_c * xhat, spec)
    if need_dx:
        dxhat = dy_c * weight.to(cdt).view(spec.affine_shape) if weight is not None else dy_c
        if batch_statistics:
            dx = (rstd * _without_statistics(dxhat.reshape(spec.group_shape), xhat.reshape(spec.group_shape),
                                             spec)).reshape(x.shape)
        else:
            dx = dxhat * rstd
        dx = dx.to(x.dtype).contiguous(memory_format=memory_format_of(x))
    return dx, dweight, dbias


def forward_tangent(
    x_t: torch.Tensor | None,
    weight_t: torch.Tensor | None,
    bias_t: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    spec: NormSpec,
    batch_statistics: bool,
) -> torch.Tensor:
    """Forward-mode derivative of :func:`forward`: the tangent of y (x's dtype and
    shape) for tangents of x, weight and bias (None: zero), at the point where forward
    returned ``mean``/``rstd`` (see the module docstring for the formula). Fixed
    statistics are constants (running statistics carry no tangent)."""
    cdt = compute_dtype(x.dtype)
    xhat = _normalize(x.to(cdt).reshape(spec.group_shape), mean, rstd)
    if x_t is None:
        y_t = torch.zeros(x.shape, dtype=cdt, device=x.device)
    else:
        t = x_t.to(cdt).reshape(spec.group_shape)
        xhat_t = rstd * (_without_statistics(t, xhat, spec) if batch_statistics else t)
        y_t = _affine(xhat_t.reshape(x.shape), weight, None, spec)
    if weight_t is not None:
        y_t = y_t + xhat.reshape(x.shape) * weight_t.to(cdt).view(spec.affine_shape)
    if bias_t is not None:
        y_t = y_t + bias_t.to(cdt).view(spec.affine_shape)
    return y_t.to(x.dtype)
