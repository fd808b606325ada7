"""What entering a parallel kernel through Python costs, against normlab's C team bodies.

normlab's parallel kernels run on torch's OpenMP threads, which enter a C "team body"
(in ``normlab.backends.cpu._kernels``, started by ``team.launch``) that claims chunks of the
work and calls the kernel with no Python in between. Earlier versions entered each
chunk through a Python callback instead -- the way one would write it first. This
script rebuilds that callback team (:func:`callback_team`) and measures, on the
(32, 64, 56, 56) channels-last output pass (``cl_apply``, 64 row blocks) and on a plain
``y = x * a + b`` over the same 25.7 MB:

1. a trace of one callback-team call: for each thread, which items each of its chunks
   covered and when it started and ended, in microseconds after the call was entered;
2. the callback team, ``team.launch`` and torch's own ops, interleaved in one process
   (order shuffled every round, medians).

    python benchmarks/cpu/team_start.py [--threads 2] [--rounds 21]
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import random
import statistics
import threading
import time

import numpy as np
import torch
from numba import cfunc, njit, types

from normlab.backends.cpu import runtime, team

_kernels = runtime.kernels()  # numba imported, its cache directory chosen as normlab does

_FM = {"reassoc", "contract"}


@njit(fastmath=_FM, nogil=True)
def _scale_shift(x, y, a, b, lo, hi):
    xs = x[lo:hi]
    ys = y[lo:hi]
    for i in range(xs.size):
        ys[i] = xs[i] * a + b


def _scale_shift_body(p):
    """Team body of ``_scale_shift``: x, y (float32 arrays), a, b (floats)."""
    job = _kernels._job_of(p)
    x, y = _kernels._x(job, 0, p), _kernels._x(job, 1, p)
    a, b = np.float32(_kernels._float(job, 2)), np.float32(_kernels._float(job, 3))
    lo, hi = _kernels._claim(p, job)
    while lo < hi:
        _scale_shift(x, y, a, b, lo, hi)
        lo, hi = _kernels._claim(p, job)


_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def callback_team(kernel, args, items: int, threads: int, on_chunk=None) -> None:
    """``kernel(*args, lo, hi)`` over ``team.chunk_count`` chunks on torch's OpenMP
    threads, each of which claims chunks and enters the kernel through Python (and so
    takes the GIL for it). ``on_chunk(lo, hi, start, end)`` sees every chunk."""
    chunks = team.chunk_count(items, threads)
    claim = itertools.count()

    def body(_):
        while (i := next(claim)) < chunks:
            lo, hi = i * items // chunks, (i + 1) * items // chunks
            start = time.perf_counter()
            kernel(*args, lo, hi)
            if on_chunk is not None:
                on_chunk(lo, hi, start, time.perf_counter())

    callback = _CALLBACK(body)
    team._openmp()(ctypes.cast(callback, ctypes.c_void_p).value, None, min(threads, chunks), 0)


def trace(kernel, args, items: int, threads: int, repeats: int = 5) -> None:
    """Per-thread chunk start/end times of the last ``repeats`` of 25 callback-team calls."""
    log: list[tuple[int, int, int, float, float]] = []
    for run in range(25):
        log.clear()
        entered = time.perf_counter()
        callback_team(kernel, args, items, threads,
                      lambda lo, hi, s, e: log.append((threading.get_ident(), lo, hi, s, e)))
        total = time.perf_counter() - entered
        if run < 25 - repeats:
            continue
        first = {}
        for ident, _, _, start, _ in log:
            first[ident] = min(start, first.get(ident, start))
        print(f"  callback team {total * 1e6:7.0f} us")
        for number, ident in enumerate(sorted(first, key=first.get)):
            chunks = " ".join(f"[items {lo}-{hi}: {(s - entered) * 1e6:.0f}-{(e - entered) * 1e6:.0f} us]"
                              for i, lo, hi, s, e in log if i == ident)
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
    if not team.uses_openmp():
        raise SystemExit("torch here does not run on an OpenMP runtime: nothing to compare")

    x = torch.randn(32, 64, 56, 56).contiguous(memory_format=torch.channels_last)
    y = torch.empty_like(x)
    kernels = runtime.kernels()
    xf, yf = x.numpy().ravel("K"), y.numpy().ravel("K")
    rows, channels, blocks = 32 * 56 * 56, 64, 64
    mc, sc, sh = np.zeros((1, channels), np.float32), np.ones((1, channels), np.float32), \
        np.zeros((1, channels), np.float32)
    apply_args = (xf, yf, mc, sc, sh, 1, rows, channels, blocks)
    print(f"cl_apply (32, 64, 56, 56) channels_last, {blocks} row blocks, {threads} threads, callback team:")
    trace(kernels.cl_apply, apply_args, blocks, threads)

    apply_body = _kernels.body_address("cl_apply", "float32")
    scale_body = cfunc(types.void(types.CPointer(types.float32)), fastmath=_FM)(_scale_shift_body).address
    n = x.numel()
    tx, ty = torch.from_numpy(xf), torch.from_numpy(yf)
    a, b = np.float32(1.5), np.float32(0.5)

    def launch(body, *call_args, items):
        team.launch(body, *team.job(items, threads, call_args))

    fns = {
        "cl_apply, callback team": lambda: callback_team(kernels.cl_apply, apply_args, blocks, threads),
        "cl_apply, team.launch": lambda: launch(apply_body, xf, yf, mc, sc, sh, 1, rows, channels, blocks,
                                                items=blocks),
        "x*a+b, numba, 1 thread": lambda: _scale_shift(xf, yf, a, b, 0, n),
        "x*a+b, callback team": lambda: callback_team(_scale_shift, (xf, yf, a, b), n, threads),
        "x*a+b, team.launch": lambda: launch(scale_body, xf, yf, 1.5, 0.5, items=n),
        "x*a+b, torch.add": lambda: torch.add(tx, tx, alpha=0.5, out=ty),
        "torch copy_": lambda: ty.copy_(tx),
    }
    print(f"\n{threads} threads, 25.7 MB in and out, median of {args.rounds} interleaved rounds:")
    for name, ms in interleaved_ms(fns, args.rounds).items():
        print(f"  {name:26s} {ms:.3f} ms")


if __name__ == "__main__":
    main()
