"""CPU backend ``cpu-numba``: fused numba kernels for every normalization family.

Enable it with :func:`enable` (normlab calls it at import when numba is installed).
Enabling registers the backend and compiles nothing; each kernel compiles on its
first call (1-3 s per kernel and dtype on a 2-core machine, then cached on disk;
see :mod:`normlab.backends.cpu.runtime`).

Which inputs it takes (:func:`accepts`): plain CPU tensors of float32/float64 (and
float16/bfloat16 with float32 arithmetic), contiguous or channels_last, with at least
:data:`MIN_ELEMENTS` elements. Small inputs (below
:data:`~normlab.backends.cpu.backend.SERIAL_BELOW` elements) run on the calling
thread only: a hand-off to other threads would cost more than the work, and one fused
serial call still beats the reference backend's chain of small torch ops. Larger ones
are split over torch's own threads (:mod:`normlab.backends.cpu.team`).
LayerNorm/RMSNorm on a channels_last tensor, other strided inputs, tensor
subclasses and ``torch.func`` transforms go to the reference backend.

The environment variable ``NORMLAB_BACKEND`` overrides the choice: ``reference``
disables this backend; ``cpu-numba`` makes it take every input it has a kernel for,
whatever its size.
"""

from __future__ import annotations

import torch

from ...core.spec import NormSpec
from ...core.stats import set_running_stats_kernel
from .._env import getenv
from . import backend
from .plan import layout_of, make_plan

__all__ = ["MIN_ELEMENTS", "accepts", "enable", "is_enabled"]

#: Inputs with fewer elements go to the reference backend. 0: every size is taken,
#: as the serial kernels are cheaper per call than the reference's torch ops.
MIN_ELEMENTS = 0

_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_enabled = False


def accepts(x: torch.Tensor, spec: NormSpec) -> object:
    """Whether ``cpu-numba`` computes ``spec`` on ``x`` (see module docstring): None or
    False when not; else the kernels' call for x's configuration, which carries the
    backend's ``forward``/``backward`` (see ``register_backend``), or True while traced.
    Runs on every call, so the cheap tests come first."""
    if not x.is_cpu or x.dtype not in _SUPPORTED or x.layout != torch.strided:
        return False
    if MIN_ELEMENTS and x.numel() < MIN_ELEMENTS and getenv("NORMLAB_BACKEND") != "cpu-numba":
        return False
    if torch.compiler.is_compiling():  # traced: plain Python, no cache
        layout = layout_of(x)
        return layout is not None and make_plan(spec, layout) is not None
    if type(x) not in (torch.Tensor, torch.nn.Parameter) or \
            torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False  # tensor subclasses, vmap/grad transforms: no NumPy view of them
    layout = layout_of(x)
    return None if layout is None else backend.call_for(spec, layout, x.dtype)


def enable() -> bool:
    """Register ``cpu-numba`` with :func:`normlab.backends.register_backend`.

    Returns False (and registers nothing) when numba is not installed. Cheap: numba
    itself is imported on the first kernel call.
    """
    global _enabled
    from .. import register_backend
    from . import runtime

    if not runtime.numba_available():
        return False
    register_backend("cpu-numba", accepts, backend)
    set_running_stats_kernel(backend.update_running_stats)
    _enabled = True
    return True


def is_enabled() -> bool:
    """Whether :func:`enable` registered the backend in this process."""
    return _enabled
