"""Drop-in normalization modules (same signatures, buffers and state_dict keys as torch.nn)."""

from .batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
)
from .normalization import GroupNorm, LayerNorm, RMSNorm
from .registry import (
    SampleRMSNorm,
    build_norm,
    norm_names,
    register_norm,
    resolve_groups,
    resolve_norm_name,
    supports_spatial_dims,
)
from .syncbn import SyncBatchNorm, merge_moments

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "GroupNorm",
    "LayerNorm",
    "RMSNorm",
    "SampleRMSNorm",
    "SyncBatchNorm",
    "merge_moments",
    "build_norm",
    "norm_names",
    "register_norm",
    "resolve_groups",
    "resolve_norm_name",
    "supports_spatial_dims",
]

# the normalizations beyond torch.nn; importing registers their names
from . import extra  # noqa: E402
from .extra import *  # noqa: E402,F403

__all__ += extra.__all__
