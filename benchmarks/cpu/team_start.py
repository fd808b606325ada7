"""How late the threads of ``normlab.backends.cpu.team.run`` start, and what that costs.

Two measurements on the (32, 64, 56, 56) channels-last output pass (``cl_apply``, one
work item per row block), at torch's thread count:

1. A trace of one ``team.run`` (through a wrapper around the kernel): for each thread,
   which items each of its chunks covered and when it started and ended, in microseconds
   after ``team.run`` was entered. Every thread enters its chunks through a Python
   callback that takes the GIL, so the helper starts only once the calling thread has
   dispatched its own first chunk and the helper has been woken.
2. A plain streaming loop ``y = x * a + b`` over the same 25.7 MB -- numba on one thread,
   numba through ``team.run``, torch's own ``torch.add`` -- interleaved in one process
   (order shuffled every round, medians). The gap between the last two at 2 threads, with
   the 1-thread loops even, is what the late start costs a memory-bound pass.

    python benchmarks/cpu/team_start.py [--threads 2] [--rounds 21]
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time

import numpy as np
import torch
from numba import njit

from normlab.backends.cpu import backend, runtime, team


@njit(fastmath={"reassoc", "contract"}, nogil=True)
def _scale_shift(x, y, a, b, lo, hi):
    xs = x[lo:hi]
    ys = y[lo:hi]
    for i in range(xs.size):
        ys[i] = xs[i] * a + b


def trace_run(kernel, args, items: int, threads: int, repeats: int = 5) -> None:
    """Print per-thread chunk start/end times of the last ``repeats`` of 25 runs."""
    log: list[tuple[int, tuple[int, int], float, float]] = []

    def recorded(*call):  # the kernel, timing each chunk team.run hands it
        start = time.perf_counter()
        kernel(*call)
        log.append((threading.get_ident(), call[-2:], start, time.perf_counter()))

    for run in range(25):
        log.clear()
        entered = time.perf_counter()
        team.run(recorded, args, items, threads)
        total = time.perf_counter() - entered
        if run < 25 - repeats:
            continue
        first_start = {}
        for ident, _, start, _ in log:
            first_start[ident] = min(start, first_start.get(ident, start))
        print(f"  team.run {total * 1e6:7.0f} us")
        for number, ident in enumerate(sorted(first_start, key=first_start.get)):
            chunks = " ".join(f"[items {lo}-{hi}: {(s - entered) * 1e6:.0f}-{(e - entered) * 1e6:.0f} us]"
                              for i, (lo, hi), s, e in log if i == ident)
            print(f"    thread {number}: {chunks}")


def interleaved_ms(fns: dict, rounds: int, calls: int = 10) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    names = list(fns)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            start = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            samples[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    threads = args.threads
    torch.set_num_threads(threads)
    random.seed(0)

    x = torch.randn(32, 64, 56, 56).contiguous(memory_format=torch.channels_last)
    y = torch.empty_like(x)
    kernels = runtime.kernels()
    xf, yf = backend._flat(x), backend._flat(y)
    rows, channels, blocks = 32 * 56 * 56, 64, 64
    coefficients = [np.zeros((1, channels), np.float32), np.ones((1, channels), np.float32),
                    np.zeros((1, channels), np.float32)]
    apply_args = (xf, yf, *coefficients, 1, rows, channels, blocks)
    print(f"cl_apply (32, 64, 56, 56) channels_last, {blocks} row blocks, {threads} threads:")
    trace_run(kernels.cl_apply, apply_args, blocks, threads)

    n = x.numel()
    tx, ty = torch.from_numpy(xf), torch.from_numpy(yf)
    a, b = np.float32(1.5), np.float32(0.5)
    fns = {
        "numba loop, 1 thread": lambda: _scale_shift(xf, yf, a, b, 0, n),
        f"numba loop, team.run ({threads} threads)": lambda: team.run(_scale_shift, (xf, yf, a, b), n, threads),
        f"torch.add ({threads} threads)": lambda: torch.add(tx, tx, alpha=0.5, out=ty),
        f"torch copy_ ({threads} threads)": lambda: ty.copy_(tx),
    }
    print(f"\ny = x * a + b over {n * 4 / 1e6:.1f} MB, median of {args.rounds} interleaved rounds:")
    for name, ms in interleaved_ms(fns, args.rounds).items():
        print(f"  {name:36s} {ms:.3f} ms")


if __name__ == "__main__":
    main()
