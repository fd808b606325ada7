"""BatchNorm and InstanceNorm modules: drop-in for their torch.nn namesakes.

``_NormBase`` owns what the two share -- parameters, running-statistic buffers,
``reset_parameters``, ``extra_repr`` and state-dict versioning -- so that
``state_dict``/``load_state_dict`` work in both directions with torch.nn. The leaf
classes only state their input rank; ``forward`` is one functional call.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import functional as NF
from ..core.checks import check_eps, check_floating, check_momentum
from ._members import registered

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
]


class _NormBase(nn.Module):
    """Parameters and running statistics of a per-channel normalization."""

    _version = 2  # version 2 added num_batches_tracked (as in torch.nn)

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
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"{name}: expected num_features to be a positive int, got {num_features!r}")
        check_eps(eps, name)
        check_momentum(momentum, name, allow_none=True)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # checkpoints from before num_batches_tracked existed start counting at 0
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- shared by the leaf classes ------------------------------------------------
    _input_dims: tuple[int, ...] = ()  # the input ranks a leaf class accepts

    def _check_input(self, input: Tensor) -> None:
        name = type(self).__name__
        check_floating(input, name)
        dims = self._input_dims
        if input.dim() not in dims:
            expected = " or ".join(f"{d}D" for d in dims)
            raise ValueError(f"{name}: expected {expected} input (got {input.dim()}D input)")

    def _check_batched_input(self, input: Tensor) -> None:
        """dtype, rank, and ``num_features`` channels at dim 1."""
        self._check_input(input)
        mismatch = self._channel_mismatch(input, 1)
        if mismatch:
            raise ValueError(mismatch)

    def _channel_mismatch(self, input: Tensor, channel_dim: int) -> str | None:
        """The error message if ``input`` lacks ``num_features`` channels, else None."""
        channels = input.shape[channel_dim]
        if channels == self.num_features:
            return None
        return (f"{type(self).__name__}: expected input with {self.num_features} channels at "
                f"dim {channel_dim}, got {channels} (input shape {tuple(input.shape)})")

    def _step(self, normalize: Callable[[Tensor | None, Tensor | None, bool, float], Tensor]) -> Tensor:
        """One forward under torch.nn's buffer protocol, shared by the BatchNorm variants.

        ``normalize(running_mean, running_var, use_batch_stats, momentum)`` gets the running
        statistics when they are to be updated (training) or used (eval), batch statistics
        in training or without running statistics, and this step's momentum. A batch is
        counted in ``num_batches_tracked`` only after ``normalize`` succeeded.
        """
        training = self.training
        update = training and self.track_running_stats
        running_mean, running_var = (registered(self, "running_mean"), registered(self, "running_var")) \
            if update or not training else (None, None)
        y = normalize(
            running_mean,
            running_var,
            training or running_mean is None,
            self._momentum_for_this_step() if update else 0.0,
        )
        if update:
            registered(self, "num_batches_tracked").add_(1)
        return y

    def _momentum_for_this_step(self) -> float:
        """torch.nn's momentum; ``None`` means the cumulative average 1/(batches seen)."""
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked + 1)
        return self.momentum


class _BatchNorm(_NormBase):
    r"""Batch normalization (Ioffe & Szegedy, 2015).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    with one mean and (biased) variance per channel over the batch and spatial dims.
    In training the running estimates are updated with ``momentum`` (unbiased variance;
    ``momentum=None`` is a cumulative average); in eval they normalize, unless
    ``track_running_stats=False``. Statistics in float32 or wider (see
    :mod:`normlab.core.stats`).

    Args:
        num_features: C of an input (N, C, *).
        eps: added to the variance for stability. Default 1e-5.
        momentum: weight of the new batch in the running statistics, or None. Default 0.1.
        affine: learnable per-channel ``weight`` (init 1) and ``bias`` (init 0). Default True.
        track_running_stats: keep running estimates for eval. Default True.
        bias: keyword-only; with ``affine``, whether to learn ``bias``. Default True.

    Example::

        >>> bn = nl.BatchNorm2d(64)
        >>> y = bn(torch.randn(8, 64, 32, 32))
    """

    def forward(self, input: Tensor) -> Tensor:
        self._check_batched_input(input)
        return self._step(lambda running_mean, running_var, use_batch_stats, momentum: NF._batch_norm(
            input, running_mean, running_var, registered(self, "weight"), registered(self, "bias"),
            use_batch_stats, momentum, self.eps, name=type(self).__name__))

class BatchNorm1d(_BatchNorm):
    """BatchNorm over (N, C) or (N, C, L) inputs. See :class:`_BatchNorm`."""

    _input_dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """BatchNorm over (N, C, H, W) inputs. See :class:`_BatchNorm`."""

    _input_dims = (4,)


class BatchNorm3d(_BatchNorm):
    """BatchNorm over (N, C, D, H, W) inputs. See :class:`_BatchNorm`."""

    _input_dims = (5,)


class _InstanceNorm(_NormBase):
    r"""Instance normalization (Ulyanov et al., 2016).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    with one mean and variance per (sample, channel) over the spatial dims. Defaults
    differ from BatchNorm as in torch.nn: ``affine=False``, ``track_running_stats=False``.
    With ``track_running_stats=True`` the running estimates (per-instance statistics
    averaged over the batch) are updated in training and normalize in eval. Accepts
    unbatched input (C, *spatial) too.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)

    def _spatial_dims(self) -> int:
        return max(self._input_dims) - 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        if version is None and not self.track_running_stats:
            # pre-0.4 checkpoints saved running stats that this configuration lacks
            stale = [prefix + k for k in ("running_mean", "running_var") if prefix + k in state_dict]
            if stale:
                error_msgs.append(
                    f"Unexpected running stats buffer(s) {stale} for {type(self).__name__} "
                    "with track_running_stats=False; remove them from the state_dict or set "
                    "track_running_stats=True."
                )
                for key in stale:
                    state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        name = type(self).__name__
        unbatched = input.dim() == self._spatial_dims() + 1
        mismatch = self._channel_mismatch(input, 0 if unbatched else 1)
        if mismatch:
            if self.affine or self.track_running_stats:
                raise ValueError(mismatch)
            # torch.nn only warns here: num_features is unused without affine or running stats
            warnings.warn(mismatch + "; num_features is unused with affine=False", stacklevel=2)
        x = input.unsqueeze(0) if unbatched else input
        y = NF._instance_norm(
            x, registered(self, "running_mean"), registered(self, "running_var"), registered(self, "weight"),
            registered(self, "bias"),
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0, self.eps, name=name,
        )
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm):
    """InstanceNorm over (N, C, L) or (C, L) inputs. See :class:`_InstanceNorm`."""

    _input_dims = (2, 3)


class InstanceNorm2d(_InstanceNorm):
    """InstanceNorm over (N, C, H, W) or (C, H, W) inputs. See :class:`_InstanceNorm`."""

    _input_dims = (3, 4)


class InstanceNorm3d(_InstanceNorm):
    """InstanceNorm over (N, C, D, H, W) or (C, D, H, W) inputs. See :class:`_InstanceNorm`."""

    _input_dims = (4, 5)
