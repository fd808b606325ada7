"""The Triton GPU backend ("gpu-triton"): fused forward and backward kernels for
every family (BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm) on CUDA
tensors of float32, float16 and bfloat16, with float32 statistics (the precision
policy of :mod:`normlab.core.stats`). Kernel design: ``README.md`` in this folder.

Importing this package does not import triton: :func:`forward` / :func:`backward`
load the kernels on first use, so ``import normlab`` stays cheap on machines with or
without a GPU. :func:`register` puts the backend in front of the reference one for
the inputs :func:`accepts` takes.

What it takes (everything else goes to another backend or the reference):

* CUDA tensors on a GPU of compute capability >= 7.0 -- or CPU tensors when ``TRITON_INTERPRET=1`` and
  ``NORMLAB_TRITON_ON_CPU=1`` are both set (Triton's interpreter; for tests only,
  it is ~1000x slower than a kernel; ``cpu-numba`` is registered first, so CPU tensors
  it takes reach this backend only with ``NORMLAB_BACKEND=gpu-triton`` too);
* dtype float32, float16 or bfloat16 (float64 goes to the reference backend);
* fewer than 2**31 elements, none further than 2**31 elements from the first (32-bit
  offsets), at most 262140 channels;
* LayerNorm/RMSNorm: contiguous input;
* BatchNorm/InstanceNorm/GroupNorm: contiguous (NCHW) or channels_last input -- any
  layout whose spatial dims collapse to one stride -- read and written through its
  strides, never copied.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import torch

from ...core.spec import (
    NormSpec,
    batch_norm_spec,
    group_norm_spec,
    instance_norm_spec,
    layer_norm_spec,
    rms_norm_spec,
)
from ...core.stats import fold_running_stats
from .._env import getenv

__all__ = ["NAME", "accepts", "available", "backward", "forward", "register"]

NAME = "gpu-triton"

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_NUMEL = 2**31
# The per-channel kernels put channel tiles (>= 4 channels) on grid axis 1, at most 65535.
_MAX_CHANNELS = 4 * 65535


def _cpu_allowed() -> bool:
    """CPU tensors run under the interpreter only when both variables ask for it."""
    return getenv("TRITON_INTERPRET") == "1" and getenv("NORMLAB_TRITON_ON_CPU") == "1"


def _expected_spec(x: torch.Tensor, spec: NormSpec) -> NormSpec | None:
    """The spec the kernels implement for ``spec.family`` on ``x`` (None: unknown
    family). A spec that differs (a custom family or axes) is declined."""
    family, shape = spec.family, tuple(x.shape)
    if family in ("layer_norm", "rms_norm"):
        k = len(spec.reduce_dims)
        if not 0 < k <= len(shape):
            return None
        build = layer_norm_spec if family == "layer_norm" else rms_norm_spec
        return build(shape, shape[len(shape) - k:])
    if len(shape) < 2:
        return None
    if family == "batch_norm":
        return batch_norm_spec(shape)
    if family == "instance_norm":
        return instance_norm_spec(shape)
    if family == "group_norm" and len(spec.group_shape) > 1:
        groups = spec.group_shape[1]
        if groups <= 0 or shape[1] % groups:
            return None
        return group_norm_spec(shape, groups)
    return None


# device index -> compute capability >= 7.0 (Triton's minimum). A plain dict rather
# than functools.cache: torch.compile traces accepts(), and reads a dict lookup fine.
_SUPPORTED: dict[int, bool] = {}


def _device_supported(x: torch.Tensor) -> bool:
    index = x.get_device()
    supported = _SUPPORTED.get(index)
    if supported is None:
        supported = _SUPPORTED[index] = torch.cuda.get_device_capability(index)[0] >= 7
    return supported


def _spatial_dims_collapse(x: torch.Tensor) -> bool:
    """Whether (N, C, *spatial) views as (N, C, S) through its strides -- the view the
    channel/group kernels read -- without trying the view (traced code can't catch)."""
    stride = None
    for size, step in zip(reversed(x.shape[2:]), reversed(x.stride()[2:]), strict=True):
        if size == 1:
            continue
        if stride is not None and step != stride:
            return False
        stride = step * size
    return True


def _extent(x: torch.Tensor) -> int:
    """How many elements past x's first one its last one lies, plus one (x not empty):
    the kernels' offsets are 32-bit, and a strided slice can reach further than its
    numel. Dense layouts -- the usual case, checked on every call -- reach exactly their
    numel (the C-side contiguity flags answer that for ~0.1 us, the sum costs ~3)."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) or \
            x.is_contiguous(memory_format=torch.channels_last_3d):
        return x.numel()
    return 1 + sum((size - 1) * abs(step) for size, step in zip(x.shape, x.stride(), strict=True))


def accepts(x: torch.Tensor, spec: NormSpec) -> bool:
    """True when the Triton kernels compute ``spec`` on ``x`` (see the module docstring)."""
    if x.is_cuda:
        if not _device_supported(x):
            return False
    elif not (x.is_cpu and _cpu_allowed()):
        return False
    if x.dtype not in _DTYPES or not 0 < x.numel() < _MAX_NUMEL or _extent(x) >= _MAX_NUMEL:
        return False
    if spec != _expected_spec(x, spec):
        return False
    if spec.family in ("layer_norm", "rms_norm"):
        return x.is_contiguous()
    return x.shape[1] <= _MAX_CHANNELS and _spatial_dims_collapse(x)


def available() -> bool:
    """Whether triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def forward(x, weight, bias, spec, eps, fixed_mean=None, fixed_var=None, running=None):
    """Same contract as :func:`normlab.backends.reference.forward`; traced calls go
    through the custom op (:mod:`normlab.backends.gpu.ops`). The running statistics are
    updated after the kernels (torch ops)."""
    if torch.compiler.is_compiling():
        from . import ops

        out = ops.forward(x, weight, bias, spec, eps, fixed_mean, fixed_var)
    else:
        out = _kernels().forward(x, weight, bias, spec, eps, fixed_mean, fixed_var)
    fold_running_stats(running, out[1], out[2], spec.count)
    return out


def backward(dy, x, weight, mean, rstd, spec, batch_statistics, needs_input_grad=(True, True, True)):
    """Same contract as :func:`normlab.backends.reference.backward` (traced: the custom op)."""
    if torch.compiler.is_compiling():
        from . import ops

        return ops.backward(dy, x, weight, mean, rstd, spec, batch_statistics, needs_input_grad)
    return _kernels().backward(dy, x, weight, mean, rstd, spec, batch_statistics, needs_input_grad)


_KERNELS_MODULE = __name__ + "._ops"


def _kernels() -> ModuleType:
    """The kernel dispatch module (:mod:`._ops`, which imports triton), imported on first
    use; later calls find it in ``sys.modules`` (a function-level ``from . import``
    costs ~1 us a call; the lookup also follows a re-import, as the tests do)."""
    module = sys.modules.get(_KERNELS_MODULE)
    if module is None:
        from . import _ops as module
    return module


def register() -> bool:
    """Register this backend under :data:`NAME` if triton is installed; returns
    whether it did. Does not import triton."""
    if not available():
        return False
    from .. import register_backend
    from . import ops  # noqa: F401  (the custom ops torch.compile sees; no triton import)

    register_backend(NAME, accepts, sys.modules[__name__])
    return True
