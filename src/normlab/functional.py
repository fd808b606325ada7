"""Functional API with torch.nn.functional's signatures.

Each function validates its arguments, builds the :class:`~normlab.core.spec.NormSpec`
of its method and hands it to the shared core (:func:`normlab.core.autograd.normalize`).
Running statistics, where given, are updated in place after the normalization has
succeeded, with torch.nn's rule (SPEC §2).

The leading-underscore variants take the caller's name for error messages; the
modules in :mod:`normlab.nn` call those.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .core.autograd import normalize
from .core.checks import (
    check_eps,
    check_floating,
    check_min_dim,
    check_momentum,
    check_param,
    normalize_shape_arg,
)
from .core.spec import (
    batch_norm_spec,
    group_norm_spec,
    instance_norm_spec,
    layer_norm_spec,
    rms_norm_spec,
)
from .core.stats import compute_dtype

__all__ = ["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"]

Tensor = torch.Tensor


def _check_running(running_mean: Tensor | None, running_var: Tensor | None, channels: int, name: str) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: expected running_mean and running_var both given or both None")
    check_param(running_mean, (channels,), "running_mean", name)
    check_param(running_var, (channels,), "running_var", name)


def _channel_stat_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                       weight: Tensor | None, bias: Tensor | None, use_batch_stats: bool,
                       momentum: float, eps: float, spec_of, min_dim: int, too_few: str,
                       name: str) -> Tensor:
    """Shared body of batch_norm and instance_norm: per-channel affine, optional
    running statistics of shape (C,) that are updated or used."""
    check_floating(input, name)
    check_min_dim(input, min_dim, "(N, C, *spatial)", name)
    channels = input.shape[1]
    _check_running(running_mean, running_var, channels, name)
    check_param(weight, (channels,), "weight", name)
    check_param(bias, (channels,), "bias", name)
    check_eps(eps, name)
    check_momentum(momentum, name)
    spec = spec_of(input.shape)
    if not use_batch_stats:
        if running_mean is None:
            raise ValueError(f"{name}: expected running_mean and running_var to normalize with, got None")
        return normalize(input, weight, bias, spec, eps, running_mean, running_var)[0]  # (C,) each
    empty = input.numel() == 0  # an empty batch passes through, as in torch.nn
    if spec.count <= 1 and not empty:
        raise ValueError(
            f"{name}: expected more than 1 {too_few} when training, got input of shape {tuple(input.shape)}"
        )
    if eps <= 0:
        # as torch.nn: a constant channel would divide by zero
        raise ValueError(f"{name}: expected eps > 0 when normalizing with batch statistics, got {eps!r}")
    # the running statistics are updated once the batch statistics are computed (by the
    # backend's forward, fused where it can): nothing is touched if the call fails before
    running = (running_mean, running_var, momentum) if running_mean is not None and not empty else None
    return normalize(input, weight, bias, spec, eps, running=running)[0]


def _batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float,
                eps: float, name: str) -> Tensor:
    return _channel_stat_norm(input, running_mean, running_var, weight, bias, training, momentum,
                              eps, batch_norm_spec, 2, "value per channel", name)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalization of ``input`` (N, C, *spatial): one mean/variance per channel
    over N and the spatial dims (SPEC §1), then a per-channel affine.

    In training the batch statistics normalize and, when given, ``running_mean`` and
    ``running_var`` (C,) are updated in place: ``running = (1 - momentum) * running +
    momentum * stat`` with the unbiased variance. Otherwise the running statistics
    normalize. Same signature and semantics as ``torch.nn.functional.batch_norm``.
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       name="batch_norm")


def _instance_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                   weight: Tensor | None, bias: Tensor | None, use_input_stats: bool,
                   momentum: float, eps: float, name: str) -> Tensor:
    return _channel_stat_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                              momentum, eps, instance_norm_spec, 3, "spatial element", name)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Instance normalization of ``input`` (N, C, *spatial): one mean/variance per
    (sample, channel) over the spatial dims, then a per-channel affine.

    With running statistics given and ``use_input_stats``, they are updated with the
    per-instance statistics averaged over the batch; with ``use_input_stats=False``
    they normalize. Same signature as ``torch.nn.functional.instance_norm``.
    """
    return _instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                          momentum, eps, name="instance_norm")


def _group_norm(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                eps: float, name: str) -> Tensor:
    check_floating(input, name)
    check_min_dim(input, 2, "(N, C, *spatial)", name)
    channels = input.shape[1]
    if num_groups <= 0 or channels % num_groups != 0:
        raise ValueError(
            f"{name}: expected the number of channels to be divisible by num_groups={num_groups}, "
            f"got {channels} channels (input shape {tuple(input.shape)})"
        )
    check_param(weight, (channels,), "weight", name)
    check_param(bias, (channels,), "bias", name)
    check_eps(eps, name)
    return normalize(input, weight, bias, group_norm_spec(input.shape, num_groups), eps)[0]


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Group normalization of ``input`` (N, C, *spatial): channels split into
    ``num_groups`` consecutive groups; one mean/variance per (sample, group) over the
    group's channels and the spatial dims; then a per-channel affine (C,).
    Same signature as ``torch.nn.functional.group_norm``.
    """
    return _group_norm(input, num_groups, weight, bias, eps, name="group_norm")


def _check_trailing(input: Tensor, normalized_shape: tuple[int, ...], name: str) -> None:
    k = len(normalized_shape)
    if input.dim() < k or input.shape[-k:] != normalized_shape:
        raise ValueError(
            f"{name}: expected input with shape (*, {', '.join(map(str, normalized_shape))}) "
            f"for normalized_shape={normalized_shape}, got shape {tuple(input.shape)}"
        )


def _layer_norm(input: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None,
                bias: Tensor | None, eps: float, name: str) -> Tensor:
    check_floating(input, name)
    shape = normalize_shape_arg(normalized_shape, name)
    _check_trailing(input, shape, name)
    check_param(weight, shape, "weight", name)
    check_param(bias, shape, "bias", name)
    check_eps(eps, name)
    return normalize(input, weight, bias, layer_norm_spec(input.shape, shape), eps)[0]


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dims of ``input``
    (*, *normalized_shape): one mean/variance per row, then an elementwise affine of
    shape ``normalized_shape``. Same signature as ``torch.nn.functional.layer_norm``.
    """
    return _layer_norm(input, normalized_shape, weight, bias, eps, name="layer_norm")


def default_rms_eps(dtype: torch.dtype) -> float:
    """The eps RMSNorm uses when given None: machine epsilon of the compute dtype.

    torch.nn documents ``torch.finfo(x.dtype).eps``, but computes float16/bfloat16
    inputs in float32 and uses float32's epsilon for them; normlab does the same.
    """
    return torch.finfo(compute_dtype(dtype)).eps


def _rms_norm(input: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None,
              eps: float | None, name: str) -> Tensor:
    check_floating(input, name)
    shape = normalize_shape_arg(normalized_shape, name)
    _check_trailing(input, shape, name)
    check_param(weight, shape, "weight", name)
    eps = default_rms_eps(input.dtype) if eps is None else eps
    check_eps(eps, name)
    return normalize(input, weight, None, rms_norm_spec(input.shape, shape), eps)[0]


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """Root-mean-square normalization over the trailing ``normalized_shape`` dims:
    ``y = x / sqrt(mean(x^2) + eps) * weight`` (no centering, no bias).
    ``eps=None`` uses :func:`default_rms_eps`. Same signature as
    ``torch.nn.functional.rms_norm``.
    """
    return _rms_norm(input, normalized_shape, weight, eps, name="rms_norm")
