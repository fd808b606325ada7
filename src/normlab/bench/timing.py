"""Timing discipline: providers interleaved (A B C, C A B, B C A, ... shuffled per round), medians of repeats.

On a shared, noisy machine a provider measured minutes after another can look 3x
faster or slower for reasons that have nothing to do with it. Interleaving puts every
provider under the same noise; the median discards the outliers; ratios measured in
one run are what the reports quote.

Two cache policies. *Warm* (the default): each sample is k back-to-back calls, so a
case that fits the caches is timed from them. *Cold*: each sample is one call right
after :func:`cache_flusher`'s read has pushed everything else out of the caches, so
every provider -- and the copy that sets the floor -- starts with its tensors in
memory. Warm suits inputs the caches hold; cold gives a memory-bound case one
well-defined state. (Warm, on the 32 MiB-L3 benchmark machine: the copy of a 25.7 MB
case, timed over ~40 back-to-back calls, ran at 106 GB/s -- more than twice what one
copy after a flush reaches, 42-46 GB/s -- while each provider's sample there was 4
calls taken right after other providers'.)
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Collection

import torch

__all__ = ["interleaved", "cache_flusher", "saved_bytes", "floor_bytes"]


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                min_time: float = 0.02, same_calls: Collection[str] | None = None,
                flush: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin.

    Each sample times ``k`` back-to-back calls and records the mean per call; ``k`` is
    chosen in warm-up so that a sample lasts about ``min_time`` (small inputs would
    otherwise measure the clock). The functions named in ``same_calls`` (default: all)
    share one ``k``, the one that suits the slowest of them: a function timed over more
    consecutive calls runs warmer (its buffers cached) and would look faster than one it
    is compared with. The others (e.g. the copy that sets the floor) get their own.

    ``flush`` (the cold policy, e.g. :func:`cache_flusher`): every sample is a single
    call, and ``flush()`` runs, untimed, right before it.
    """
    same = set(fns) if same_calls is None else set(same_calls)
    once: dict[str, float] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        once[name] = max(time.perf_counter() - start, 1e-7)

    def calls(seconds: float) -> int:
        return max(1, min(1000, int(min_time / seconds)))

    shared = calls(max((once[name] for name in same), default=1e-7))
    inner = {name: 1 if flush is not None else shared if name in same else calls(once[name]) for name in fns}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        # a new order every round: what ran just before a function (its buffers in the
        # caches) changes its time -- the same kernels measured 12% apart right after
        # torch.nn and right after themselves -- so no function may always follow the same one
        shuffle(names)
        for name in names:
            fn = fns[name]
            k = inner[name]
            if flush is not None:
                flush()
            start = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - start) / k)
    return samples


def cache_flusher(nbytes: int | None = None) -> Callable[[], object]:
    """A function that reads ``nbytes`` (default: twice the last-level cache) of its own
    buffer on torch's threads, evicting what the caches held: the shared level and the
    own levels of every core one of those threads runs on (with fewer threads than
    cores, e.g. ``--threads 1``, the other cores' private caches keep their lines; on a
    CPU with several last-level caches -- one per chiplet -- the default size is twice
    one of them, and each sees only the share its cores read). A read, not a fill:
    large fills may bypass the caches (glibc's memset streams them), and the read also
    writes back lines the timed call left dirty before the next sample starts."""
    from ..backends._env import last_level_cache_bytes

    size = nbytes if nbytes is not None else 2 * last_level_cache_bytes()
    buffer = torch.ones(max(1, size // 4), dtype=torch.float32)
    return buffer.sum


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def saved_bytes(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps from forward to backward
    (inputs included -- the tensors a framework must hold to run backward)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def floor_bytes(numel: int, itemsize: int, mode: str) -> int:
    """Bytes a kernel must move at least: forward (and eval) reads x and writes y (2|x|);
    backward reads x and dy and writes dx (3|x|); forward+backward 5|x|."""
    return numel * itemsize * {"forward": 2, "eval": 2, "backward": 3, "forward+backward": 5}[mode]
