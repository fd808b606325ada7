"""normlab: batch, layer, instance, group and RMS normalization from first principles.

``import normlab as nl`` gives the drop-in layers (``nl.BatchNorm2d``, ``nl.GroupNorm``,
...); ``normlab.functional`` the functional API; ``normlab.reference`` the NumPy oracle.
"""

from . import functional, tools
from .backends import gpu as _gpu_backend
from .backends.cpu import enable as _enable_cpu_kernels
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
from .nn.extra import (
    TLU,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FilterResponseNorm2d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    LayerNorm2d,
    LinearRamp,
    SingleSampleBatchNorm1d,
    SingleSampleBatchNorm2d,
    SingleSampleBatchNorm3d,
    SwitchableNorm1d,
    SwitchableNorm2d,
    WSConv2d,
    get_norm_layer,
)

# Backends are tried in this order on every call; each declines other devices' tensors.
# cpu-numba first: a CPU training step of a small layer then skips the Triton backend's
# test (~1.4 us of a ~75 us step).
_enable_cpu_kernels()  # "cpu-numba" when numba is installed; compiles nothing now
_gpu_backend.register()  # "gpu-triton" for CUDA tensors when triton is installed; imports nothing now

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
    "TLU",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FilterResponseNorm2d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "LayerNorm2d",
    "LinearRamp",
    "SingleSampleBatchNorm1d",
    "SingleSampleBatchNorm2d",
    "SingleSampleBatchNorm3d",
    "SwitchableNorm1d",
    "SwitchableNorm2d",
    "WSConv2d",
    "get_norm_layer",
    "tools",
    "__version__",
]
