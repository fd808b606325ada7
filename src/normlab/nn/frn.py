r"""Filter Response Normalization and the Thresholded Linear Unit (Singh & Krishnan,
2020, "Filter Response Normalization Layer: Eliminating Batch Dependence in the
Training of Deep Neural Networks").

For an input (N, C, H, W), per (sample, channel), over the spatial dims:

.. math::

    \nu^2 = \mathrm{mean}_{H,W}(x^2), \quad
    \hat x = \frac{x}{\sqrt{\nu^2 + \epsilon}}, \quad
    y = \gamma \hat x + \beta, \quad
    z = \max(y, \tau)

FRN is the shared Z-score without centering over InstanceNorm's axes (an RMS
normalization per (n, c)), so it runs on the shared core with a non-centering
NormSpec and the analytic backward. TLU is a learned per-channel threshold tau that
replaces ReLU after FRN (FRN does not center, so a ReLU's threshold at 0 could leave
a channel dead).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.autograd import NormFunction, normalize, register_function
from ..core.checks import check_eps, check_floating, check_param
from ..core.spec import NormSpec

__all__ = ["TLU", "FilterResponseNorm2d", "filter_response_norm", "filter_response_norm_spec", "tlu"]


class FilterResponseNormFunction(NormFunction):
    pass


register_function("filter_response_norm", FilterResponseNormFunction)


def filter_response_norm_spec(shape: tuple[int, ...]) -> NormSpec:
    """Mean square per (sample, channel) over the spatial dims of (N, C, *spatial)."""
    shape = tuple(shape)
    return NormSpec("filter_response_norm", shape, shape, tuple(range(2, len(shape))), (1,),
                    center=False)


def _check_channels(input: Tensor, channels: int | None, name: str) -> None:
    check_floating(input, name)
    if input.dim() < 3:
        raise ValueError(f"{name}: expected input (N, C, *spatial) with at least 3 dims, "
                         f"got shape {tuple(input.shape)}")
    if channels is not None and input.shape[1] != channels:
        raise ValueError(f"{name}: expected input with {channels} channels at dim 1, "
                         f"got {input.shape[1]} (input shape {tuple(input.shape)})")


def tlu(input: Tensor, tau: Tensor) -> Tensor:
    """Thresholded linear unit ``max(input, tau)`` with ``tau`` (C,) per channel of
    an input (N, C, *)."""
    return torch.maximum(input, tau.to(input.dtype).view((1, -1) + (1,) * (input.dim() - 2)))


def filter_response_norm(input: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                         tau: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Functional FRN (+ TLU when ``tau`` is given) of ``input`` (N, C, *spatial)."""
    return _filter_response_norm(input, weight, bias, tau, eps, "filter_response_norm")


def _filter_response_norm(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                          tau: Tensor | None, eps: float, name: str) -> Tensor:
    _check_channels(input, None, name)
    channels = input.shape[1]
    for what, t in (("weight", weight), ("bias", bias), ("tau", tau)):
        check_param(t, (channels,), what, name)
    check_eps(eps, name)
    y = normalize(input, weight, bias, filter_response_norm_spec(input.shape), eps)[0]
    return tlu(y, tau) if tau is not None else y


class TLU(nn.Module):
    """Thresholded Linear Unit ``max(x, tau)``, tau (C,) learned, init 0 (= ReLU).

    Example::

        >>> act = nl.TLU(64)
    """

    def __init__(self, num_features: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_features = num_features
        self.tau = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def forward(self, input: Tensor) -> Tensor:
        check_floating(input, "TLU")
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(f"TLU: expected input (N, {self.num_features}, *), got shape "
                             f"{tuple(input.shape)}")
        return tlu(input, self.tau)

    def extra_repr(self) -> str:
        return f"{self.num_features}"


class FilterResponseNorm2d(nn.Module):
    """Filter Response Normalization with TLU (Singh & Krishnan, 2020) for (N, C, H, W).

    Args:
        num_features: C.
        eps: added to the mean square. Default 1e-6 (the paper's). (The paper's learned
            eps variant is not implemented.)
        affine: per-channel ``weight`` (init 1) and ``bias`` (init 0). Default True.
        tlu: apply the TLU with learned ``tau`` (init 0). Default True; with False the
            layer is FRN alone (follow it with your own activation).

    Example::

        >>> frn = nl.FilterResponseNorm2d(64)   # replaces BatchNorm2d + ReLU
        >>> y = frn(torch.randn(2, 64, 16, 16))
    """

    def __init__(self, num_features: int, eps: float = 1e-6, affine: bool = True, tlu: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"FilterResponseNorm2d: expected num_features to be a positive int, "
                             f"got {num_features!r}")
        check_eps(eps, "FilterResponseNorm2d")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.affine = num_features, eps, affine
        self.weight = nn.Parameter(torch.ones(num_features, **factory)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features, **factory)) if affine else None
        self.tau = nn.Parameter(torch.zeros(num_features, **factory)) if tlu else None

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        _check_channels(input, self.num_features, name)
        if input.dim() != 4:
            raise ValueError(f"{name}: expected 4D input (got {input.dim()}D input)")
        return _filter_response_norm(input, self.weight, self.bias, self.tau, self.eps, name)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, tlu={self.tau is not None}"
