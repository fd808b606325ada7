"""normlab: batch, layer, instance, group and RMS normalization from first principles.

``import normlab as nl`` gives the drop-in layers (``nl.BatchNorm2d``, ``nl.GroupNorm``,
...); ``normlab.functional`` the functional API; ``normlab.reference`` the NumPy oracle.
"""

from . import functional
from .nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
    SampleRMSNorm,
    SyncBatchNorm,
    build_norm,
    norm_names,
    register_norm,
)

__version__ = "0.1.0"

__all__ = [
    "functional",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
    "SampleRMSNorm",
    "SyncBatchNorm",
    "build_norm",
    "norm_names",
    "register_norm",
    "__version__",
]
