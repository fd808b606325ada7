"""Timing discipline: providers interleaved (A B C A B C ...), medians of repeats.

On a shared, noisy machine a provider measured minutes after another can look 3x
faster or slower for reasons that have nothing to do with it. Interleaving puts every
provider under the same noise; the median discards the outliers; ratios measured in
one run are what the reports quote.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["interleaved", "saved_bytes", "floor_bytes"]


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                min_time: float = 0.02) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin.

    Each sample times ``k`` back-to-back calls (``k`` chosen in warm-up so a sample
    lasts about ``min_time``; small inputs would otherwise measure the clock) and
    records the mean per call.
    """
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        inner[name] = max(1, min(1000, int(min_time / once)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            k = inner[name]
            start = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - start) / k)
    return samples


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
    """Bytes a kernel must move at least: forward reads x and writes y (2|x|); backward
    reads x and dy and writes dx (3|x|); forward+backward 5|x|."""
    return numel * itemsize * {"forward": 2, "backward": 3, "forward+backward": 5}[mode]
