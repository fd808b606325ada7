"""Running a kernel on several threads -- torch's own OpenMP threads where possible.

:func:`run` calls ``kernel(*args, lo, hi)`` on chunks that cover ``[0, items)``, on at
most ``threads`` threads. The kernels are serial numba functions compiled with
``nogil=True``, so each chunk runs without the GIL; the threads only take the GIL for
the few microseconds it takes to claim the next chunk and enter the kernel.

**Whose threads.** torch's CPU ops run on a GNU/Intel OpenMP team. After each parallel
op its worker threads spin for a while (libgomp's default wait policy) waiting for the
next op. A second thread pool -- numba's own, or a Python one -- then fights those
spinning workers for the cores: measured on a 2-core machine, a LayerNorm kernel on
two numba threads took 4.4 ms back to back but 8.4 ms right after a torch op (serial:
8.6 ms). So :func:`run` starts its team through the very OpenMP runtime torch is
linked against (``GOMP_parallel``, also exported by Intel's libiomp5): the spinning
workers are the ones that pick the chunks up. Same measurement: 4.0 and 4.5 ms.

**Where that is not possible** -- no OpenMP runtime found in the process (torch built
with another parallel backend, or a platform without ``/proc/self/maps``), or a child
forked after the parent started OpenMP threads (libgomp's team does not survive
``fork``: a forked DataLoader worker would hang) -- the chunks go to a
``ThreadPoolExecutor`` created in this process.

**Scheduling.** There are up to :data:`CHUNKS_PER_THREAD` chunks per thread, claimed
dynamically from a shared counter, so a thread delayed by another process does not
hold the others up. Which chunk covers which items depends only on ``items`` and the
chunk count, never on which thread ran it: a kernel that writes per-chunk partial sums
gives the same result whatever the timing.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

__all__ = ["run", "chunk_count", "uses_openmp", "CHUNKS_PER_THREAD"]

#: Chunks per thread: enough to even out a late thread, few enough that claiming one
#: (a dictionary lookup and a numba dispatch, ~2 us) stays negligible.
CHUNKS_PER_THREAD = 4


def chunk_count(items: int, threads: int) -> int:
    """How many chunks :func:`run` splits ``items`` into on ``threads`` threads (one
    when there is a single thread: the kernel then sees the whole range at once)."""
    if threads <= 1:
        return 1
    return max(1, min(items, threads * CHUNKS_PER_THREAD))


class _Job:
    """One :func:`run` call: the kernel, its arguments and the next unclaimed chunk."""

    __slots__ = ("kernel", "args", "items", "chunks", "claim", "error")

    def __init__(self, kernel: Callable, args: Sequence, items: int, chunks: int) -> None:
        self.kernel = kernel
        self.args = tuple(args)
        self.items = items
        self.chunks = chunks
        self.claim = itertools.count()  # next() is atomic under the GIL
        self.error: BaseException | None = None

    def work(self) -> None:
        """Claim and run chunks until none is left (or one has failed)."""
        items, chunks = self.items, self.chunks
        try:
            while self.error is None:
                i = next(self.claim)
                if i >= chunks:
                    return
                self.kernel(*self.args, i * items // chunks, (i + 1) * items // chunks)
        except BaseException as error:  # re-raised by run() on the calling thread
            if self.error is None:
                self.error = error


# ------------------------------------------------------------------ OpenMP teams

_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_jobs: dict[int, _Job] = {}
_keys = itertools.count(1)  # 0 would reach the callback as None
_gomp_parallel = None
_searched = False
_forked = False


def _omp_body(key: int) -> None:
    job = _jobs[key]
    try:
        job.work()
    except BaseException as error:  # e.g. Ctrl-C before work() was entered: never lost
        if job.error is None:
            job.error = error


_omp_callback = _CALLBACK(_omp_body)  # kept alive for the life of the process


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
        fn.argtypes = (_CALLBACK, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
        fn.restype = None
        return fn
    return None


def _openmp():
    global _gomp_parallel, _searched
    if not _searched:
        import torch

        if "parallel backend: OpenMP" in torch.__config__.parallel_info():
            _gomp_parallel = _find_openmp()
        _searched = True
    return None if _forked else _gomp_parallel


def uses_openmp() -> bool:
    """Whether :func:`run` starts its teams on torch's OpenMP runtime in this process."""
    return _openmp() is not None


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


def run(kernel: Callable, args: Sequence, items: int, threads: int) -> None:
    """Call ``kernel(*args, lo, hi)`` over chunks covering ``range(items)`` on at most
    ``threads`` threads (the calling thread is one of them); return when all are done.

    With one thread or one chunk this is ``kernel(*args, 0, items)``. An exception in
    any chunk stops the others from claiming more and is raised here.
    """
    chunks = chunk_count(items, threads)  # 1 for one thread
    threads = min(threads, chunks)
    if threads <= 1:  # small inputs, one item: as cheap as a direct call
        kernel(*args, 0, items)
        return
    job = _Job(kernel, args, items, chunks)
    parallel = _openmp()
    if parallel is not None:
        key = next(_keys)
        _jobs[key] = job
        try:
            parallel(_omp_callback, key, threads, 0)  # ctypes drops the GIL meanwhile
        finally:
            del _jobs[key]
    else:
        pool = _python_pool()
        helpers = [pool.submit(job.work) for _ in range(min(threads - 1, _POOL_WORKERS))]
        job.work()
        for helper in helpers:
            helper.result()
    if job.error is not None:
        raise job.error
