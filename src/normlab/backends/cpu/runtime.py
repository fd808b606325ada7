"""Loading numba lazily and running its parallel kernels safely.

* **Nothing compiles at import.** :func:`kernels` imports numba and the kernel module
  on the first call. The first call of each kernel and dtype compiles it and stores it
  with numba's ``cache=True``; later processes load it from the cache. Measured on the
  2-core benchmark machine (AMD EPYC), BatchNorm2d float32 (8, 64, 32, 32): first
  forward 13.9 s and first backward 18.3 s with an empty cache (10.7 and 11.9 s before
  the kernels started their own teams and compiled their bodies for constant
  ``stream``, session 16); 1.0-1.2 s and under 0.1 s with a warm cache (numba's import
  and its one-time setup included); later calls cost only the kernel. Its first
  eval-mode forward compiles ``fixed_forward_at`` and its output pass's team body: 10.0 s
  with an empty cache as the process's first call (session 17); a BatchNorm with small
  planes (7x7) in training, 5.8-7.4 s more (before session 16).
  (The same machine gave 3.3 s and 3.2 s for the first forward and backward in a faster
  period.) When the package directory is read-only and ``NUMBA_CACHE_DIR`` is unset, the cache goes to
  ``$TMPDIR/normlab-numba-cache`` (numba's own fallback to a user-wide directory is
  tried first).
* **Threads.** The kernels are serial numba functions; several threads run them on
  chunks of the work through C team bodies (the team bodies of :mod:`normlab.backends.cpu._kernels`,
  started by :mod:`normlab.backends.cpu.team`) -- on torch's own OpenMP threads, at
  most ``torch.get_num_threads()`` of them. numba's parallel backend is not used (its
  thread pool would fight torch's), so there is no threading layer to choose and
  nothing that breaks in a forked child.
"""

from __future__ import annotations

import os
import tempfile
import threading
from types import ModuleType

import torch

__all__ = ["kernels", "numba_available"]

_kernels: ModuleType | None = None
_load_lock = threading.Lock()
_available: bool | None = None


def numba_available() -> bool:
    """Whether numba can be imported (checked without importing it)."""
    global _available
    if _available is None:
        import importlib.util

        _available = importlib.util.find_spec("numba") is not None
    return _available


def _package_dir_writable() -> bool:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.access(here, os.W_OK)


def kernels() -> ModuleType:
    """The compiled-on-demand kernel module (imports numba on first use)."""
    global _kernels
    if _kernels is not None:
        return _kernels
    with _load_lock:
        if _kernels is None:
            threads = torch.get_num_threads()
            import numba

            if not _package_dir_writable() and "NUMBA_CACHE_DIR" not in os.environ:
                numba.config.CACHE_DIR = os.path.join(tempfile.gettempdir(), "normlab-numba-cache")
            from . import _kernels as module

            if torch.get_num_threads() != threads:  # never let numba move torch's pool
                torch.set_num_threads(threads)
            _kernels = module
    return _kernels
