"""Model-level tools for normalization layers.

* :func:`convert_norms` -- swap every norm of one kind for another;
* :func:`from_torch` / :func:`to_torch` -- torch.nn norm layers to normlab's and back, exactly;
* :func:`fold_bn` -- fold eval-mode BatchNorm into the preceding Conv/Linear;
* :func:`recalibrate_bn` -- re-estimate running statistics on data (precise BN / AdaBN);
* :func:`freeze_bn` / :func:`unfreeze_bn` -- FrozenBatchNorm that survives ``model.train()``;
* :func:`inspect_bn` -- per-layer diagnosis (also ``normlab doctor``);
* :func:`norm_classes` -- torch.nn's and normlab's classes of a norm kind, for ``isinstance``.

Converters return a modified copy unless ``inplace=True``; ``recalibrate_bn`` works in
place; ``inspect_bn`` changes nothing.
"""

from ._walk import norm_classes
from .calibrate import recalibrate_bn
from .convert import convert_norms, freeze_bn, from_torch, to_torch, unfreeze_bn
from .diagnose import BNReport, LayerReport, inspect_bn
from .fold import fold_bn, foldable_pairs

__all__ = [
    "convert_norms",
    "from_torch",
    "to_torch",
    "freeze_bn",
    "unfreeze_bn",
    "fold_bn",
    "foldable_pairs",
    "recalibrate_bn",
    "inspect_bn",
    "norm_classes",
    "BNReport",
    "LayerReport",
]
