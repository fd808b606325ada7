"""Running a kernel on several threads -- torch's own OpenMP threads where possible.

:func:`launch` runs a *team body* -- a C function compiled by numba (see the end of
:mod:`normlab.backends.cpu._kernels`) -- on up to ``threads`` threads; each thread
claims chunks of ``[0, items)`` from an atomic counter in the *job* (:func:`job`) and
runs its kernel on them, until none is left. No thread enters Python or takes the GIL.

**Whose threads.** torch's CPU ops run on a GNU/Intel OpenMP team. After each parallel
op its worker threads spin for a while (libgomp's default wait policy) waiting for the
next op. A second thread pool -- numba's own, or a Python one -- then fights those
spinning workers for the cores: measured on a 2-core machine, a LayerNorm kernel on
two numba threads took 4.4 ms back to back but 8.4 ms right after a torch op (serial:
8.6 ms). So :func:`launch` starts its team through the very OpenMP runtime torch is
linked against (``GOMP_parallel``, also exported by Intel's libiomp5): the spinning
workers are the ones that pick the chunks up. Same measurement: 4.0 and 4.5 ms.

**Why C bodies.** Earlier versions had the threads enter each chunk through a
Python callback. Every chunk then took the GIL, and right after a memory-bound pass --
every cache cold -- a thread's first trip through the interpreter took tens of
microseconds: the second thread started its first chunk 32-105 us after the call, on
passes of ~1 ms (``benchmarks/cpu/team_start.py`` measures the difference).

**Where OpenMP is not available** -- no OpenMP runtime found in the process (torch
built with another parallel backend, or a platform without ``/proc/self/maps``), or a
child forked after the parent started OpenMP threads (libgomp's team does not survive
``fork``: a forked DataLoader worker would hang) -- the body runs on threads of a
``ThreadPoolExecutor`` created in this process, called through ctypes (which releases
the GIL).

**Scheduling.** There are up to :data:`CHUNKS_PER_THREAD` chunks per thread, claimed
dynamically, so a thread delayed by another process does not hold the others up.
Which chunk covers which items depends only on ``items`` and the chunk count, never on
which thread ran it: a kernel that writes per-chunk partial sums gives the same result
whatever the timing.

**Started from a kernel.** Building a job in Python costs ~20 us right after a
memory-bound pass, as much as the kernel itself on a ~1 MB input. So the kernels
called by address (``_kernels.grouped_forward_team_at``, ``planes_forward_at``,
``cl_forward_at`` and their backward twins) build their jobs themselves and call
``GOMP_parallel`` by its address (:func:`team_at` gives it): the same bodies, chunks
and threads as :func:`launch`, without Python in between.

**Errors.** The bodies cannot raise: the kernels they run have no error paths (their
inputs are checked in Python before the launch, and they are compiled with numba's
``error_model="numpy"``, so a division by zero gives Inf or NaN as in torch).
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["launch", "job", "team_at", "chunk_count", "uses_openmp", "NO_TEAM", "CHUNKS_PER_THREAD"]

#: Chunks per thread: enough to even out a late thread, few enough that claiming one
#: (an atomic add) and re-entering the kernel stay negligible.
CHUNKS_PER_THREAD = 4


def chunk_count(items: int, threads: int) -> int:
    """How many chunks :func:`launch` splits ``items`` into on ``threads`` threads (one
    when there is a single thread: the kernel then sees the whole range at once)."""
    if threads <= 1:
        return 1
    return max(1, min(items, threads * CHUNKS_PER_THREAD))


# ------------------------------------------------------------------ OpenMP teams

_gomp_parallel = None
_searched = False
_forked = False


def _find_openmp():
    """``GOMP_parallel`` of the OpenMP runtime torch itself calls, or None.

    Other packages bring their own copies (scikit-learn wheels ship a ``libgomp``); a
    team on one of those would be a second pool of spinning threads. So the symbol is
    looked up through ``libtorch_cpu``'s handle: ``dlsym`` on a library's handle searches
    that library and its own dependencies, i.e. the runtime torch was linked against.
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libtorch_cpu" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            # the same path dlopen()ed again returns the library already loaded
            fn = ctypes.CDLL(path).GOMP_parallel
        except (OSError, AttributeError):
            continue
        fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
        fn.restype = None
        return fn
    return None


def _openmp():
    global _gomp_parallel, _searched
    if not _searched:
        if "parallel backend: OpenMP" in torch.__config__.parallel_info():
            _gomp_parallel = _find_openmp()
        _searched = True
    return None if _forked else _gomp_parallel


def uses_openmp() -> bool:
    """Whether :func:`launch` starts its teams on torch's OpenMP runtime in this process."""
    return _openmp() is not None


_gomp_address = 0


def _openmp_address() -> int:
    """The address of the ``GOMP_parallel`` that :func:`launch` calls (0 where it calls none)."""
    global _gomp_address
    fn = _openmp()
    if fn is None:
        return 0
    if not _gomp_address:
        _gomp_address = ctypes.cast(fn, ctypes.c_void_p).value
    return _gomp_address


# ------------------------------------------------------------------ fallback pool

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
#: Helper threads of the fallback pool (created lazily, never shut down: a pool that is
#: replaced while another thread submits to it would refuse the work).
_POOL_WORKERS = max(8, os.cpu_count() or 1)


def _python_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_POOL_WORKERS, thread_name_prefix="normlab")
        return _pool


def _after_fork_in_child() -> None:
    global _forked, _pool, _pool_lock
    _forked = True
    _pool, _pool_lock = None, threading.Lock()  # the parent's threads are gone


os.register_at_fork(after_in_child=_after_fork_in_child)


# ------------------------------------------------------------------ entry point


def job(items: int, threads: int, args: Sequence) -> tuple[np.ndarray, int]:
    """The job array of a :func:`launch` over ``range(items)`` with the kernel
    arguments ``args`` (layout: see the team bodies in :mod:`normlab.backends.cpu._kernels`),
    and the number of threads to run it on. Tensors and arrays must be dense (tensors: their
    storage from ``data_ptr()`` on, in memory order); the caller keeps them alive until
    the launch returns. (Tensors are the cheaper argument: ``data_ptr()`` costs ~2 us
    right after a memory-bound pass; an array's address took ~8-12 us there through
    ``__array_interface__``, less through :func:`_address`.)"""
    chunks = chunk_count(items, threads)
    words = [0, items, chunks]
    for a in args:
        if isinstance(a, torch.Tensor):
            words += (a.data_ptr(), a.numel())
        elif isinstance(a, np.ndarray):
            if not a.flags.c_contiguous:
                raise ValueError("team.job: expected C-contiguous arrays")
            words += (_address(a), a.size)
        elif isinstance(a, float):
            words += (_FLOAT_BITS.unpack(_FLOAT.pack(a))[0], 0)
        else:
            words += (int(a), 0)
    return np.array(words, dtype=np.int64), min(threads, chunks)


#: A ``team`` argument the kernel never starts (e.g. the statistics pass of a
#: channels-last kernel with one block per sample, which has none).
NO_TEAM = (0, 0, 1, 1)


def team_at(body: int, items: int, threads: int) -> tuple[int, int, int, int]:
    """The ``team`` argument of the by-address kernels that start their own team (see
    ``_kernels._run_team``): ``(GOMP_parallel's address, body, threads, chunks)`` for
    the body at ``body`` over ``range(items)`` on up to ``threads`` threads -- the split
    :func:`job` and :func:`launch` would make, without the ~20 us of Python that building
    the job costs. Only where :func:`uses_openmp` (or for one thread): the fallback pool
    needs Python to start its threads."""
    chunks = chunk_count(items, threads)
    threads = min(threads, chunks)
    gomp = _openmp_address() if threads > 1 else 0
    if threads > 1 and not gomp:
        raise RuntimeError("team.team_at: more than one thread asked for, but no OpenMP runtime to start them on")
    return gomp, body, threads, chunks


def _address(a: np.ndarray) -> int:
    """The address of a C-contiguous array's first element. Through a ctypes view of
    its buffer where it has one (writable, not empty): ~0.85 us, where
    ``__array_interface__`` or ``ctypes.data`` build an object each (~2.2-2.7 us, more
    with cold caches; a launch passes up to three arrays besides its job)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError):  # read-only or empty
        return a.__array_interface__["data"][0]


_FLOAT = struct.Struct("d")
_FLOAT_BITS = struct.Struct("q")
_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
#: body address -> a ctypes function calling it (fallback pool and single-thread calls)
_callers: dict[int, Callable] = {}


def launch(body: int, work: np.ndarray, threads: int) -> None:
    """Run the C body at address ``body`` on the job ``work`` (see :func:`job`) on
    ``threads`` threads, the calling one included; return when every chunk is done.

    The threads are torch's OpenMP team (see the module docstring); they enter the body
    directly: no Python, no GIL. Without OpenMP the fallback pool's threads call it
    through ctypes (which releases the GIL)."""
    at = _address(work)
    if threads > 1:
        parallel = _openmp()
        if parallel is not None:
            parallel(body, at, threads, 0)
            return
    call = _callers.get(body)
    if call is None:
        call = _callers[body] = _BODY(body)
    if threads <= 1:
        call(at)
        return
    pool = _python_pool()
    helpers = [pool.submit(call, at) for _ in range(min(threads - 1, _POOL_WORKERS))]
    call(at)
    for helper in helpers:
        helper.result()
