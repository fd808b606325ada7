"""Loading numba lazily and running its parallel kernels safely.

* **Nothing compiles at import.** :func:`kernels` imports numba and the kernel module
  on the first call. The first call of each kernel and dtype compiles it and stores it
  with numba's ``cache=True``; later processes load it from the cache. Measured on a
  2-core machine: BatchNorm2d float32, first forward 1.8 s and first backward 1.9 s
  with an empty cache; 0.5 s and 0.01 s with a warm cache (numba's import included);
  later calls cost only the kernel. When the
  package directory is read-only and ``NUMBA_CACHE_DIR`` is unset, the cache goes to
  ``$TMPDIR/normlab-numba-cache`` (numba's own fallback to a user-wide directory is
  tried first).
* **Threads.** Each call runs on at most ``torch.get_num_threads()`` threads (set per
  call with ``numba.set_num_threads``), so the kernels never add threads on top of
  torch's budget. Importing numba is checked not to change torch's thread count.
* **Fork safety.** numba's OpenMP layer shares GNU OpenMP with torch and a forked
  child (a DataLoader worker) that then runs a parallel kernel is killed. Unless the
  user chose a layer with ``NUMBA_THREADING_LAYER``, normlab selects numba's
  ``forksafe`` choice (TBB if installed, else the portable ``workqueue`` layer).
* **Python threads.** The workqueue layer must not be entered by two threads at
  once, so calls are serialized by a lock (re-created in forked children).
"""

from __future__ import annotations

import os
import tempfile
import threading
from types import ModuleType

import torch

__all__ = ["kernels", "kernel_lock", "set_threads", "numba_available"]

_kernels: ModuleType | None = None
_load_lock = threading.Lock()
_call_lock = threading.Lock()
_available: bool | None = None


def _reset_lock_in_child() -> None:
    global _call_lock
    _call_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)


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

            if "NUMBA_THREADING_LAYER" not in os.environ:
                numba.config.THREADING_LAYER = "forksafe"
            if not _package_dir_writable() and "NUMBA_CACHE_DIR" not in os.environ:
                numba.config.CACHE_DIR = os.path.join(tempfile.gettempdir(), "normlab-numba-cache")
            from . import _kernels as module

            if torch.get_num_threads() != threads:  # never let numba move torch's pool
                torch.set_num_threads(threads)
            _kernels = module
    return _kernels


def set_threads() -> None:
    """Cap this thread's numba parallelism at torch's current thread count."""
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def kernel_lock() -> threading.Lock:
    """The lock every parallel kernel launch holds (see module docstring)."""
    return _call_lock
