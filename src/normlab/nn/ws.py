r"""Weight Standardization (Qiao, Wang, Liu, Shen & Yuille, 2019, "Micro-Batch
Training with Batch-Channel Normalization and Weight Standardization").

The convolution uses its weight standardized per output channel over
(in_channels / groups, *kernel):

.. math:: \hat W_o = \frac{W_o - \mathrm{mean}(W_o)}{\sqrt{\mathrm{var}(W_o) + \epsilon}}

(biased variance). That is LayerNorm over the trailing dims of the weight tensor
(out, in/groups, kh, kw) without affine: it runs on the shared core, so the gradient
to the raw weight is the analytic Z-score backward. Meant to pair with GroupNorm
(GN + WS) for micro-batch training, where BatchNorm's statistics are noise.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..core.autograd import NormFunction, normalize, register_function
from ..core.checks import check_eps
from ..core.spec import NormSpec

__all__ = ["WSConv2d", "standardize_weight"]


class WeightStandardizationFunction(NormFunction):
    pass


register_function("weight_standardization", WeightStandardizationFunction)


def standardize_weight(weight: Tensor, eps: float = 1e-5) -> Tensor:
    """Standardize ``weight`` (out, *) per output channel over all its other dims."""
    shape = tuple(weight.shape)
    if len(shape) < 2:
        raise ValueError(f"standardize_weight: expected a weight (out, in, *kernel), got shape {shape}")
    trailing = tuple(range(1, len(shape)))
    spec = NormSpec("weight_standardization", shape, shape, trailing, trailing)
    return normalize(weight, None, None, spec, eps)[0]


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` with Weight Standardization (same arguments, plus keyword ``eps``).

    The stored ``weight`` is the raw one (state dict identical to ``nn.Conv2d``); the
    standardized weight is computed at every forward.

    Args:
        *args, **kwargs: as ``torch.nn.Conv2d``.
        eps: keyword-only, added to the weight variance. Default 1e-5.

    Example::

        >>> block = nn.Sequential(nl.WSConv2d(64, 64, 3, padding=1, bias=False),
        ...                       nl.GroupNorm(32, 64), nn.ReLU())
    """

    def __init__(self, *args, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_eps(eps, "WSConv2d")
        self.eps = eps

    def standardized_weight(self) -> Tensor:
        """The weight the convolution uses."""
        return standardize_weight(self.weight, self.eps)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"
