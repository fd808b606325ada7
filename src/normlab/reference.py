"""NumPy oracle for normlab: the textbook version of every normalization.

This module is the independent ground truth that normlab's tests compare the
PyTorch implementations against. It is deliberately plain:

* NumPy only. It never imports torch, nor anything from normlab, so a bug in
  the PyTorch code cannot leak into the reference it is checked against.
* Every computation is done in float64 (inputs are cast with
  ``np.asarray(x, dtype=np.float64)``).
* Each method is written out on its own, in the same five steps: pick the axes
  that share one set of statistics, take the mean, take the biased variance
  with the two-pass formula ``mean((x - mean)**2)`` (never
  ``E[x^2] - E[x]^2``, which cancels catastrophically for inputs with a large
  offset), normalize, apply the optional affine.
* Backward passes are the analytic gradients, derived by hand and written
  explicitly for each method's own axes.

All methods compute, for a set S of axes that share one mean and variance,

    x_hat = (x - mean_S(x)) / sqrt(var_S(x) + eps)
    y     = x_hat * weight + bias

and for a group of m elements sharing one (mean, var) the input gradient is

    dx_hat = dy * weight
    dx     = rstd * (dx_hat - mean_S(dx_hat) - x_hat * mean_S(dx_hat * x_hat))

with ``rstd = 1 / sqrt(var + eps)``. RMSNorm has no centering, so its gradient
lacks the ``mean_S(dx_hat)`` term.

Conventions
-----------
Forward functions return ``(y, cache)``. ``cache`` is a dict holding what the
matching backward needs, plus the statistics, shaped like the statistics
(one entry per group that shares them):

* ``"mean"``, ``"var"`` (biased) and ``"rstd"`` for the batch-statistics
  methods: BatchNorm (C,), InstanceNorm (N, C), GroupNorm (N, G),
  LayerNorm (leading shape, i.e. ``x.shape[:-len(normalized_shape)]``);
* ``"mean_square"`` and ``"rstd"`` for RMSNorm (leading shape); RMSNorm does
  not center, so it has no mean or variance.

Backward functions take ``(dy, cache)`` and return ``(dx, dweight, dbias)``
(RMSNorm: ``(dx, dweight)``); ``dweight`` / ``dbias`` are None when the
forward got ``weight`` / ``bias`` None.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_inference",
    "batch_norm_inference_backward",
    "cumulative_momentum",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "rms_norm",
    "rms_norm_backward",
    "update_running_stats",
]

Cache = dict[str, Any]


# ---------------------------------------------------------------------------
# Small helpers (only argument handling; the math lives in each method)
# ---------------------------------------------------------------------------


def _f64(a: np.ndarray | float) -> np.ndarray:
    """Cast to a float64 ndarray."""
    return np.asarray(a, dtype=np.float64)


def _f64_or_none(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else _f64(a)


def _check_channels(x: np.ndarray, name: str, min_ndim: int) -> None:
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name}: expected input of shape (N, C, *spatial) with at least "
            f"{min_ndim} dims, got shape {x.shape}"
        )


def _check_param(p: np.ndarray | None, shape: tuple[int, ...], what: str) -> None:
    if p is not None and p.shape != shape:
        raise ValueError(f"{what}: expected shape {shape}, got {p.shape}")


def _as_shape(normalized_shape: int | tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(normalized_shape, (int, np.integer)):
        return (int(normalized_shape),)
    return tuple(int(d) for d in normalized_shape)


def _channel_view(n_dims: int) -> tuple[int, ...]:
    """Shape that broadcasts a (C,) vector against (N, C, *spatial)."""
    return (1, -1) + (1,) * (n_dims - 2)


# ---------------------------------------------------------------------------
# BatchNorm (training mode: batch statistics)
# ---------------------------------------------------------------------------


def batch_norm(
    x: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, Cache]:
    """BatchNorm with batch statistics (torch.nn training mode).

    Shapes: x (N, C, *spatial) with 0 to 3 spatial dims; weight, bias (C,).
    Statistics are per channel c, over S = the N axis and all spatial axes
    (m = N * prod(spatial) elements each):

        mean[c] = mean_S(x[:, c])                             (C,)
        var[c]  = mean_S((x[:, c] - mean[c])**2)   (biased)   (C,)
        x_hat   = (x - mean[c]) / sqrt(var[c] + eps)          (N, C, *spatial)
        y       = x_hat * weight[c] + bias[c]                 (N, C, *spatial)
    """
    x = _f64(x)
    weight, bias = _f64_or_none(weight), _f64_or_none(bias)
    _check_channels(x, "batch_norm", 2)
    num_channels = x.shape[1]
    _check_param(weight, (num_channels,), "batch_norm weight")
    _check_param(bias, (num_channels,), "batch_norm bias")

    # Axes that share one statistic: batch and spatial, i.e. all but C.
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mean) * rstd

    y = x_hat
    if weight is not None:
        y = y * weight.reshape(_channel_view(x.ndim))
    if bias is not None:
        y = y + bias.reshape(_channel_view(x.ndim))

    cache: Cache = {
        "x_hat": x_hat,
        "axes": axes,
        "weight": weight,
        "has_bias": bias is not None,
        "eps": eps,
        "mean": mean.reshape(num_channels),
        "var": var.reshape(num_channels),
        "rstd": rstd.reshape(num_channels),
    }
    return y, cache


def batch_norm_backward(
    dy: np.ndarray, cache: Cache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradient of :func:`batch_norm` (batch statistics).

    With S = batch and spatial axes and m = N * prod(spatial):

        dbias[c]   = sum_S dy[:, c]                                      (C,)
        dweight[c] = sum_S dy[:, c] * x_hat[:, c]                        (C,)
        dx_hat     = dy * weight[c]                          (N, C, *spatial)
        dx         = rstd[c] * (dx_hat - mean_S(dx_hat)
                                - x_hat * mean_S(dx_hat * x_hat))
    """
    dy = _f64(dy)
    x_hat = cache["x_hat"]
    axes = cache["axes"]
    weight = cache["weight"]
    view = _channel_view(x_hat.ndim)
    rstd = cache["rstd"].reshape(view)

    dbias = dy.sum(axis=axes) if cache["has_bias"] else None
    dweight = (dy * x_hat).sum(axis=axes) if weight is not None else None

    dx_hat = dy * weight.reshape(view) if weight is not None else dy
    mean_dx_hat = dx_hat.mean(axis=axes, keepdims=True)
    mean_dx_hat_x_hat = (dx_hat * x_hat).mean(axis=axes, keepdims=True)
    dx = rstd * (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# InstanceNorm (instance statistics)
# ---------------------------------------------------------------------------


def instance_norm(
    x: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, Cache]:
    """InstanceNorm with per-instance statistics.

    Shapes: x (N, C, *spatial) with 1 to 3 spatial dims; weight, bias (C,).
    Statistics are per (n, c), over S = the spatial axes
    (m = prod(spatial) elements each):

        mean[n, c] = mean_S(x[n, c])                                (N, C)
        var[n, c]  = mean_S((x[n, c] - mean[n, c])**2)   (biased)   (N, C)
        x_hat      = (x - mean[n, c]) / sqrt(var[n, c] + eps)  (N, C, *spatial)
        y          = x_hat * weight[c] + bias[c]               (N, C, *spatial)
    """
    x = _f64(x)
    weight, bias = _f64_or_none(weight), _f64_or_none(bias)
    _check_channels(x, "instance_norm", 3)
    n, num_channels = x.shape[:2]
    _check_param(weight, (num_channels,), "instance_norm weight")
    _check_param(bias, (num_channels,), "instance_norm bias")

    # Axes that share one statistic: the spatial ones.
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mean) * rstd

    y = x_hat
    if weight is not None:
        y = y * weight.reshape(_channel_view(x.ndim))
    if bias is not None:
        y = y + bias.reshape(_channel_view(x.ndim))

    cache: Cache = {
        "x_hat": x_hat,
        "axes": axes,
        "weight": weight,
        "has_bias": bias is not None,
        "eps": eps,
        "mean": mean.reshape(n, num_channels),
        "var": var.reshape(n, num_channels),
        "rstd": rstd.reshape(n, num_channels),
    }
    return y, cache


def instance_norm_backward(
    dy: np.ndarray, cache: Cache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradient of :func:`instance_norm`.

    With S = spatial axes (statistics per (n, c)):

        dbias[c]   = sum over n and S of dy[n, c]                        (C,)
        dweight[c] = sum over n and S of dy[n, c] * x_hat[n, c]          (C,)
        dx_hat     = dy * weight[c]                          (N, C, *spatial)
        dx         = rstd[n, c] * (dx_hat - mean_S(dx_hat)
                                   - x_hat * mean_S(dx_hat * x_hat))
    """
    dy = _f64(dy)
    x_hat = cache["x_hat"]
    axes = cache["axes"]
    weight = cache["weight"]
    n, num_channels = x_hat.shape[:2]
    rstd = cache["rstd"].reshape((n, num_channels) + (1,) * len(axes))
    # The affine is per channel, so its gradient also sums over the batch.
    param_axes = (0,) + axes

    dbias = dy.sum(axis=param_axes) if cache["has_bias"] else None
    dweight = (dy * x_hat).sum(axis=param_axes) if weight is not None else None

    if weight is not None:
        dx_hat = dy * weight.reshape(_channel_view(x_hat.ndim))
    else:
        dx_hat = dy
    mean_dx_hat = dx_hat.mean(axis=axes, keepdims=True)
    mean_dx_hat_x_hat = (dx_hat * x_hat).mean(axis=axes, keepdims=True)
    dx = rstd * (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# GroupNorm (per-sample statistics over groups of channels)
# ---------------------------------------------------------------------------


def group_norm(
    x: np.ndarray,
    num_groups: int,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, Cache]:
    """GroupNorm: channels split into ``num_groups`` consecutive groups.

    Shapes: x (N, C, *spatial) with 0 to 3 spatial dims, G = num_groups
    dividing C; weight, bias (C,). View x as xg of shape
    (N, G, C/G, *spatial); statistics are per (n, g), over S = the C/G
    channels of the group and all spatial axes
    (m = C/G * prod(spatial) elements each):

        mean[n, g] = mean_S(xg[n, g])                               (N, G)
        var[n, g]  = mean_S((xg[n, g] - mean[n, g])**2)  (biased)   (N, G)
        x_hat      = (xg - mean[n, g]) / sqrt(var[n, g] + eps),
                     viewed back as                             (N, C, *spatial)
        y          = x_hat * weight[c] + bias[c]               (N, C, *spatial)
    """
    x = _f64(x)
    weight, bias = _f64_or_none(weight), _f64_or_none(bias)
    _check_channels(x, "group_norm", 2)
    n, num_channels = x.shape[:2]
    spatial = x.shape[2:]
    if num_groups <= 0 or num_channels % num_groups != 0:
        raise ValueError(
            f"group_norm: num_channels ({num_channels}) must be divisible by "
            f"num_groups ({num_groups})"
        )
    _check_param(weight, (num_channels,), "group_norm weight")
    _check_param(bias, (num_channels,), "group_norm bias")

    # Move channels into (group, channel-within-group); a group's statistics
    # are shared over its channels and all spatial positions.
    grouped_shape = (n, num_groups, num_channels // num_groups) + spatial
    xg = x.reshape(grouped_shape)
    axes = tuple(range(2, xg.ndim))
    mean = xg.mean(axis=axes, keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=axes, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    x_hat = ((xg - mean) * rstd).reshape(x.shape)

    y = x_hat
    if weight is not None:
        y = y * weight.reshape(_channel_view(x.ndim))
    if bias is not None:
        y = y + bias.reshape(_channel_view(x.ndim))

    cache: Cache = {
        "x_hat": x_hat,
        "num_groups": num_groups,
        "weight": weight,
        "has_bias": bias is not None,
        "eps": eps,
        "mean": mean.reshape(n, num_groups),
        "var": var.reshape(n, num_groups),
        "rstd": rstd.reshape(n, num_groups),
    }
    return y, cache


def group_norm_backward(
    dy: np.ndarray, cache: Cache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradient of :func:`group_norm`.

    The affine is per channel, the statistics per (n, group):

        dbias[c]   = sum over n and spatial of dy[:, c]                  (C,)
        dweight[c] = sum over n and spatial of dy[:, c] * x_hat[:, c]    (C,)
        dx_hat     = dy * weight[c], viewed as       (N, G, C/G, *spatial)
        dx         = rstd[n, g] * (dx_hat - mean_S(dx_hat)
                                   - x_hat * mean_S(dx_hat * x_hat)),
                     S = channels of the group and spatial, viewed back as
                                                             (N, C, *spatial)
    """
    dy = _f64(dy)
    x_hat = cache["x_hat"]
    weight = cache["weight"]
    num_groups = cache["num_groups"]
    n, num_channels = x_hat.shape[:2]
    spatial = x_hat.shape[2:]

    param_axes = (0,) + tuple(range(2, x_hat.ndim))
    dbias = dy.sum(axis=param_axes) if cache["has_bias"] else None
    dweight = (dy * x_hat).sum(axis=param_axes) if weight is not None else None

    if weight is not None:
        dx_hat = dy * weight.reshape(_channel_view(x_hat.ndim))
    else:
        dx_hat = dy

    grouped_shape = (n, num_groups, num_channels // num_groups) + spatial
    dx_hat_g = dx_hat.reshape(grouped_shape)
    x_hat_g = x_hat.reshape(grouped_shape)
    axes = tuple(range(2, len(grouped_shape)))
    rstd = cache["rstd"].reshape((n, num_groups) + (1,) * len(axes))

    mean_dx_hat = dx_hat_g.mean(axis=axes, keepdims=True)
    mean_dx_hat_x_hat = (dx_hat_g * x_hat_g).mean(axis=axes, keepdims=True)
    dx_g = rstd * (dx_hat_g - mean_dx_hat - x_hat_g * mean_dx_hat_x_hat)
    return dx_g.reshape(x_hat.shape), dweight, dbias


# ---------------------------------------------------------------------------
# LayerNorm (per-row statistics over the trailing dims)
# ---------------------------------------------------------------------------


def layer_norm(
    x: np.ndarray,
    normalized_shape: int | tuple[int, ...],
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, Cache]:
    """LayerNorm over the trailing ``len(normalized_shape)`` dims.

    Shapes: x (*lead, *normalized_shape); weight, bias normalized_shape
    (an int is accepted for a 1-dim normalized_shape). Statistics are per
    leading index i ("row"), over S = the trailing dims
    (m = prod(normalized_shape) elements each):

        mean[i] = mean_S(x[i])                                       lead
        var[i]  = mean_S((x[i] - mean[i])**2)   (biased)             lead
        x_hat   = (x - mean[i]) / sqrt(var[i] + eps)        (*lead, *norm)
        y       = x_hat * weight + bias                     (*lead, *norm)
    """
    x = _f64(x)
    weight, bias = _f64_or_none(weight), _f64_or_none(bias)
    shape = _as_shape(normalized_shape)
    k = len(shape)
    if k == 0 or x.ndim < k or x.shape[x.ndim - k :] != shape:
        raise ValueError(
            f"layer_norm: expected input whose trailing dims are {shape}, "
            f"got shape {x.shape}"
        )
    _check_param(weight, shape, "layer_norm weight")
    _check_param(bias, shape, "layer_norm bias")

    # Axes that share one statistic: the trailing normalized dims.
    axes = tuple(range(x.ndim - k, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mean) * rstd

    # weight/bias have the trailing shape, so they broadcast as they are.
    y = x_hat
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias

    lead = x.shape[: x.ndim - k]
    cache: Cache = {
        "x_hat": x_hat,
        "axes": axes,
        "weight": weight,
        "has_bias": bias is not None,
        "eps": eps,
        "mean": mean.reshape(lead),
        "var": var.reshape(lead),
        "rstd": rstd.reshape(lead),
    }
    return y, cache


def layer_norm_backward(
    dy: np.ndarray, cache: Cache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradient of :func:`layer_norm`.

    With S = trailing normalized dims (statistics per row i) and L = the
    leading dims (the affine is shared over them):

        dbias      = sum_L dy                                 normalized_shape
        dweight    = sum_L dy * x_hat                         normalized_shape
        dx_hat     = dy * weight                              (*lead, *norm)
        dx         = rstd[i] * (dx_hat - mean_S(dx_hat)
                                - x_hat * mean_S(dx_hat * x_hat))
    """
    dy = _f64(dy)
    x_hat = cache["x_hat"]
    axes = cache["axes"]
    weight = cache["weight"]
    lead_axes = tuple(range(x_hat.ndim - len(axes)))
    rstd = cache["rstd"].reshape(cache["rstd"].shape + (1,) * len(axes))

    dbias = dy.sum(axis=lead_axes) if cache["has_bias"] else None
    dweight = (dy * x_hat).sum(axis=lead_axes) if weight is not None else None

    dx_hat = dy * weight if weight is not None else dy
    mean_dx_hat = dx_hat.mean(axis=axes, keepdims=True)
    mean_dx_hat_x_hat = (dx_hat * x_hat).mean(axis=axes, keepdims=True)
    dx = rstd * (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# RMSNorm (LayerNorm without centering)
# ---------------------------------------------------------------------------


def rms_norm(
    x: np.ndarray,
    normalized_shape: int | tuple[int, ...],
    weight: np.ndarray | None = None,
    eps: float | None = None,
) -> tuple[np.ndarray, Cache]:
    """RMSNorm over the trailing ``len(normalized_shape)`` dims.

    Shapes: x (*lead, *normalized_shape); weight normalized_shape (an int is
    accepted for a 1-dim normalized_shape). Per row i, over S = the trailing
    dims, with no centering and no bias:

        mean_square[i] = mean_S(x[i]**2)                             lead
        rstd[i]        = 1 / sqrt(mean_square[i] + eps)              lead
        x_hat          = x * rstd[i]                        (*lead, *norm)
        y              = x_hat * weight                     (*lead, *norm)

    ``eps=None`` means ``np.finfo(np.float32).eps``. torch.nn's RMSNorm uses
    ``torch.finfo(input.dtype).eps`` instead; since the oracle always computes
    in float64, tests checking other dtypes pass that eps explicitly.
    """
    x = _f64(x)
    weight = _f64_or_none(weight)
    if eps is None:
        eps = float(np.finfo(np.float32).eps)
    shape = _as_shape(normalized_shape)
    k = len(shape)
    if k == 0 or x.ndim < k or x.shape[x.ndim - k :] != shape:
        raise ValueError(
            f"rms_norm: expected input whose trailing dims are {shape}, "
            f"got shape {x.shape}"
        )
    _check_param(weight, shape, "rms_norm weight")

    axes = tuple(range(x.ndim - k, x.ndim))
    mean_square = (x**2).mean(axis=axes, keepdims=True)
    rstd = 1.0 / np.sqrt(mean_square + eps)
    x_hat = x * rstd

    y = x_hat * weight if weight is not None else x_hat

    lead = x.shape[: x.ndim - k]
    cache: Cache = {
        "x_hat": x_hat,
        "axes": axes,
        "weight": weight,
        "eps": eps,
        "mean_square": mean_square.reshape(lead),
        "rstd": rstd.reshape(lead),
    }
    return y, cache


def rms_norm_backward(
    dy: np.ndarray, cache: Cache
) -> tuple[np.ndarray, np.ndarray | None]:
    """Gradient of :func:`rms_norm`. Returns ``(dx, dweight)``.

    With S = trailing normalized dims and L = leading dims:

        dweight = sum_L dy * x_hat                            normalized_shape
        dx_hat  = dy * weight                                 (*lead, *norm)
        dx      = rstd[i] * (dx_hat - x_hat * mean_S(dx_hat * x_hat))

    (No ``mean_S(dx_hat)`` term: the mean was never subtracted.)
    """
    dy = _f64(dy)
    x_hat = cache["x_hat"]
    axes = cache["axes"]
    weight = cache["weight"]
    lead_axes = tuple(range(x_hat.ndim - len(axes)))
    rstd = cache["rstd"].reshape(cache["rstd"].shape + (1,) * len(axes))

    dweight = (dy * x_hat).sum(axis=lead_axes) if weight is not None else None

    dx_hat = dy * weight if weight is not None else dy
    mean_dx_hat_x_hat = (dx_hat * x_hat).mean(axis=axes, keepdims=True)
    dx = rstd * (dx_hat - x_hat * mean_dx_hat_x_hat)
    return dx, dweight


# ---------------------------------------------------------------------------
# BatchNorm in eval mode (running statistics)
# ---------------------------------------------------------------------------


def batch_norm_inference(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, Cache]:
    """BatchNorm in eval mode, using stored running statistics.

    Shapes: x (N, C, *spatial); running_mean, running_var, weight, bias (C,).
    The statistics are constants here (they do not depend on x):

        rstd[c] = 1 / sqrt(running_var[c] + eps)                      (C,)
        x_hat   = (x - running_mean[c]) * rstd[c]          (N, C, *spatial)
        y       = x_hat * weight[c] + bias[c]              (N, C, *spatial)
    """
    x = _f64(x)
    running_mean, running_var = _f64(running_mean), _f64(running_var)
    weight, bias = _f64_or_none(weight), _f64_or_none(bias)
    _check_channels(x, "batch_norm_inference", 2)
    num_channels = x.shape[1]
    _check_param(running_mean, (num_channels,), "batch_norm_inference running_mean")
    _check_param(running_var, (num_channels,), "batch_norm_inference running_var")
    _check_param(weight, (num_channels,), "batch_norm_inference weight")
    _check_param(bias, (num_channels,), "batch_norm_inference bias")

    view = _channel_view(x.ndim)
    rstd = 1.0 / np.sqrt(running_var + eps)
    x_hat = (x - running_mean.reshape(view)) * rstd.reshape(view)

    y = x_hat
    if weight is not None:
        y = y * weight.reshape(view)
    if bias is not None:
        y = y + bias.reshape(view)

    cache: Cache = {
        "x_hat": x_hat,
        "axes": (0,) + tuple(range(2, x.ndim)),
        "weight": weight,
        "has_bias": bias is not None,
        "eps": eps,
        "rstd": rstd,
    }
    return y, cache


def batch_norm_inference_backward(
    dy: np.ndarray, cache: Cache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradient of :func:`batch_norm_inference`.

    The running statistics are constants, so the map is affine in x:

        dx         = dy * weight[c] * rstd[c]              (N, C, *spatial)
        dweight[c] = sum over N and spatial of dy[:, c] * x_hat[:, c]  (C,)
        dbias[c]   = sum over N and spatial of dy[:, c]                (C,)
    """
    dy = _f64(dy)
    x_hat = cache["x_hat"]
    axes = cache["axes"]
    weight = cache["weight"]
    view = _channel_view(x_hat.ndim)

    dbias = dy.sum(axis=axes) if cache["has_bias"] else None
    dweight = (dy * x_hat).sum(axis=axes) if weight is not None else None

    scale = cache["rstd"] * weight if weight is not None else cache["rstd"]
    dx = dy * scale.reshape(view)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# Running statistics (torch.nn's update rule)
# ---------------------------------------------------------------------------


def update_running_stats(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    batch_mean: np.ndarray,
    batch_var: np.ndarray,
    count: int,
    momentum: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One running-statistics update, as torch.nn's BatchNorm does it.

    ``batch_var`` is the biased variance (divided by ``count``, the number of
    elements each statistic was taken over, e.g. N * prod(spatial) for
    BatchNorm); the running variance stores the unbiased one:

        unbiased_var = batch_var * count / (count - 1)
        new_mean     = (1 - momentum) * running_mean + momentum * batch_mean
        new_var      = (1 - momentum) * running_var  + momentum * unbiased_var

    Returns new float64 arrays; the inputs are not modified.
    """
    if count < 2:
        raise ValueError(
            f"update_running_stats: the unbiased variance needs count >= 2, got {count}"
        )
    running_mean, running_var = _f64(running_mean), _f64(running_var)
    batch_mean, batch_var = _f64(batch_mean), _f64(batch_var)
    unbiased_var = batch_var * (count / (count - 1))
    new_mean = (1.0 - momentum) * running_mean + momentum * batch_mean
    new_var = (1.0 - momentum) * running_var + momentum * unbiased_var
    return new_mean, new_var


def cumulative_momentum(num_batches_tracked: int) -> float:
    """The momentum that ``momentum=None`` stands for in torch.nn.

    With ``momentum=None`` the running statistics are a cumulative (equal
    weight) average over all batches seen. ``num_batches_tracked`` has already
    been incremented for the current batch, so the k-th batch gets weight 1/k:

        momentum = 1 / num_batches_tracked
    """
    if num_batches_tracked < 1:
        raise ValueError(
            "cumulative_momentum: num_batches_tracked must be >= 1 (it is "
            f"incremented before the update), got {num_batches_tracked}"
        )
    return 1.0 / num_batches_tracked
