"""Output tensors for the kernels: large ones from a cache of buffers, free of page faults.

A fresh output of tens of MB is a fresh ``mmap`` (glibc serves every request above its
mmap threshold -- at most 32 MiB -- that way, and often smaller ones too once the heap
was trimmed), and the kernel's first write to it faults in one 4 KiB page at a time.
Measured on the 2-core benchmark machine, LayerNorm (16384, 768) float32: a plain copy
into an existing tensor 4.0 ms, ``x.clone()`` (allocate + copy) 13.4 ms; the faults
cost twice the work itself, and torch.nn pays them on every call.

So outputs of at least :data:`CACHE_FROM` bytes come from a cache of buffers, the way
PyTorch's CUDA caching allocator serves GPU memory: an output is an ordinary tensor
over a NumPy buffer (``torch.from_numpy``); when the tensor and every view of it are
gone, the buffer goes back to the cache (a callback on a weak reference to the array
the tensor keeps alive) and serves the next output of the same size with its pages already in
place. A training loop asks for the same sizes every step, so after the first step
large outputs cost no faults.

Limits:

* at most ``NORMLAB_OUTPUT_CACHE_MB`` MiB (default 512) of *free* buffers are kept,
  the sizes returned least recently evicted first (shapes that change every step, e.g.
  variable sequence lengths, do not pin memory for good); buffers in use are the
  caller's tensors and count against nothing. ``0`` turns the cache off. :func:`clear`
  releases the free buffers.
* the storage of a cached output cannot be resized: ``resize_`` to another size (or an
  ``out=`` argument that would resize it, or ``storage().resize_(0)`` as some offloading
  code does) raises. Everything else -- views, in-place ops, autograd, pickling,
  ``share_memory_`` -- behaves as for any CPU tensor. As with any tensor, a NumPy view
  taken *before* ``share_memory_()`` moved the storage points at the old memory, which
  the cache may hand to the next output.
* these buffers are NumPy allocations, not c10's: ``torch.profiler``'s memory view does
  not see them.

Buffers of at least ``HUGE_PAGES_FROM`` bytes are allocated with transparent huge pages
where the system offers them (``madvise(MADV_HUGEPAGE)``): when the cache is off, or for
a size seen for the first time, that turns ~12,000 faults of 4 KiB per 50 MB into ~25
of 2 MiB (LayerNorm (16384, 768) forward, allocated output: 26 -> 19 ms on one thread).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import weakref
from collections import OrderedDict

import numpy as np
import torch

from .._env import mebibytes

__all__ = ["empty_like", "clear", "cached_bytes", "CACHE_FROM", "HUGE_PAGES_FROM"]

#: Outputs smaller than this come from torch.empty (glibc's heap reuses their memory).
#: Measured in steady module-level loops (2 threads, both limits interleaved in one
#: process, session 17): from 1 MiB the cache beats torch.empty on BatchNorm's 1.6-2 MB
#: outputs -- eval (8, 64, 32, 32) forward 190 against 394 us, training step (8, 256,
#: 14, 14) 621 against 798 us -- and ties on LayerNorm/GroupNorm's 3.2 MB; from 256 KiB
#: it lost 4-10 % on 0.5-0.8 MB outputs, where torch.empty pays no faults.
CACHE_FROM = 1 << 20
#: Fresh buffers of at least this size ask for transparent huge pages.
HUGE_PAGES_FROM = 1 << 25

# NumPy element types of the buffers (16-bit floats as raw uint16 bits)
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.bfloat16: np.uint16,
          torch.float16: np.uint16}

# Re-entrant: creating an object under the lock can start a garbage collection that
# frees a cached output caught in a reference cycle, whose finalizer (_give_back) then
# takes the lock again on the same thread.
_lock = threading.RLock()
# free buffers by size, least recently returned size first (evicted first)
_free: OrderedDict[int, list[np.ndarray]] = OrderedDict()
_free_bytes = 0
_ALIGN = 64  # bytes: what torch's own CPU allocator gives (a cache line, an AVX-512 vector)


def _reset_lock_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_reset_lock_in_child)

_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_madvise = None
if sys.platform.startswith("linux"):
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _madvise = None


def _limit() -> int:
    return mebibytes("NORMLAB_OUTPUT_CACHE_MB", 512 << 20)


def _advise_huge_pages(ptr: int, nbytes: int) -> None:
    """madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior; advisory, failures ignored."""
    if _madvise is None or nbytes < HUGE_PAGES_FROM:
        return
    huge = 1 << 21
    start = (ptr + huge - 1) & ~(huge - 1)
    end = (ptr + nbytes) & ~(huge - 1)
    if end > start:
        _madvise(start, end - start, _MADV_HUGEPAGE)


def _take(nbytes: int) -> np.ndarray | None:
    global _free_bytes
    with _lock:
        buffers = _free.get(nbytes)
        if not buffers:
            return None
        _free_bytes -= nbytes
        buffer = buffers.pop()
        if not buffers:
            del _free[nbytes]
        return buffer


def _give_back(buffer: np.ndarray, nbytes: int) -> None:
    """Finalizer of an output's array: keep its buffer for the next output of its size,
    evicting the least recently returned sizes to stay under the limit."""
    global _free_bytes
    try:
        limit = _limit()
    except ValueError:  # reported by the next empty_like(); a finalizer must not raise
        return
    if nbytes > limit:
        return
    evicted = []
    with _lock:
        while _free_bytes + nbytes > limit and _free:
            size, buffers = next(iter(_free.items()))
            evicted.append(buffers.pop())
            _free_bytes -= size
            if not buffers:
                del _free[size]
        _free.setdefault(nbytes, []).append(buffer)
        _free.move_to_end(nbytes)
        _free_bytes += nbytes
    del evicted  # freed outside the lock (plain memory: no finalizers run)


#: Outputs in use: id of a weak reference to the output's array -> (that reference, its
#: buffer, size). A plain weak reference with a callback, not ``weakref.finalize``: right
#: after a memory-bound pass, with every cache cold, creating one costs ~3 us against
#: ~25 us for a finalizer (measured on the 2-core benchmark machine).
_in_use: dict[int, tuple[weakref.ref, np.ndarray, int]] = {}


def _returned(ref: weakref.ref) -> None:
    """Callback of an output array's weak reference: its buffer goes back to the cache."""
    entry = _in_use.pop(id(ref), None)  # (atomic under the GIL: any thread may free one)
    if entry is not None:
        _give_back(entry[1], entry[2])


def cached_bytes() -> int:
    """Bytes of free buffers held for reuse."""
    return _free_bytes


def clear() -> None:
    """Release every free buffer (outputs in use are not affected)."""
    global _free_bytes
    with _lock:
        dropped = list(_free.values())
        _free.clear()
        _free_bytes = 0
    del dropped  # freed here, outside the lock


def empty_like(like: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(like)`` for a dense floating-point tensor that is contiguous or
    channels_last(_3d): same shape, dtype and memory order, from the cache when large."""
    nbytes = like.numel() * like.element_size()
    if nbytes < CACHE_FROM or like.dtype not in _NUMPY or _limit() == 0:
        out = torch.empty_like(like)
        if nbytes >= HUGE_PAGES_FROM:
            _advise_huge_pages(out.data_ptr(), nbytes)
        return out
    buffer = _take(nbytes)
    if buffer is None:
        raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
        start = -raw.ctypes.data % _ALIGN
        buffer = raw[start:start + nbytes]  # keeps raw alive
        _advise_huge_pages(buffer.ctypes.data, nbytes)
    # shaped by NumPy (a tensor's view() to a shape cost ~5-7 us more than NumPy's
    # reshape); the weak reference is to the very array the tensor keeps alive (a view
    # of a view has the buffer's owner as its base, not the view it was made from)
    channels_last = not like.is_contiguous()
    if channels_last:
        n, c, *spatial = like.shape
        array = buffer.view(_NUMPY[like.dtype]).reshape(n, *spatial, c)
    else:
        array = buffer.view(_NUMPY[like.dtype]).reshape(like.shape)
    ref = weakref.ref(array, _returned)
    _in_use[id(ref)] = (ref, buffer, nbytes)
    out = torch.from_numpy(array)
    if channels_last:
        out = out.movedim(-1, 1)  # channels_last strides
    return out if out.dtype == like.dtype else out.view(like.dtype)  # 16-bit floats: their uint16 bits
