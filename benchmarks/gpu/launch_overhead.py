"""Where the CPU time of one eager call goes (GPU machine): per-call microseconds of
torch.nn and of the Triton backend on tiny inputs (GPU time negligible, so the time is
the CPU's: Python, argument binding, launches), a bare Triton launch for comparison,
and a cProfile of the backend's calls.

    PYTHONPATH=src python3 benchmarks/gpu/launch_overhead.py
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from normlab.backends.gpu import _ops
from normlab.backends.gpu._common import LAUNCH
from normlab.core.spec import batch_norm_spec, group_norm_spec, layer_norm_spec

CALLS = 2000


def per_call_us(fn, calls=CALLS):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


@triton.jit
def _noop(X, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < N), mask=offs < N)


@triton.jit
def _noop20(X, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, N,
            F1: tl.constexpr, F2: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < N), mask=offs < N)


def _compiled_launches(t, ints) -> dict:
    """The same no-op kernels launched through the CompiledKernel that the first launch
    returns (no argument binding or specialization on each call): what a launch costs
    without Triton's binder."""
    k3 = _noop[(1,)](t, 1000, BLOCK=1024, **LAUNCH)
    k20 = _noop20[(1,)](t, *ints, 1000, F1=True, F2=False, BLOCK=1024)
    stream = torch.cuda.current_stream().cuda_stream
    return {
        "compiled noop, 3 args, runner": lambda: k3[(1, 1, 1)](t, 1000, 1024, stream=stream),
        "compiled noop, 3 args, run": lambda: k3.run(1, 1, 1, stream, k3.function, k3.packed_metadata, None,
                                                     None, None, t, 1000, 1024),
        "compiled noop, 20 args, run": lambda: k20.run(1, 1, 1, stream, k20.function, k20.packed_metadata, None,
                                                       None, None, t, *ints, 1000, True, False, 1024),
        "current stream handle": lambda: torch.cuda.current_stream().cuda_stream,
        "raw stream (torch._C)": lambda: torch._C._cuda_getCurrentRawStream(0),
    }


def main():
    dev = torch.device("cuda")
    x = torch.randn(8, 32, 40, device=dev)
    w, b = torch.randn(40, device=dev), torch.randn(40, device=dev)
    xc = torch.randn(8, 32, 40, device=dev)
    wc, bc = torch.randn(32, device=dev), torch.randn(32, device=dev)
    ln, bn, gn = layer_norm_spec(x.shape, (40,)), batch_norm_spec(xc.shape), group_norm_spec(xc.shape, 8)
    t = torch.empty(1024, device=dev)
    ints = list(range(3, 19))
    fwd = {
        "torch.empty(1024)": lambda: torch.empty(1024, device=dev),
        "triton noop, 3 args": lambda: _noop[(1,)](t, 1000, BLOCK=1024),
        "triton noop, 3 args + LAUNCH": lambda: _noop[(1,)](t, 1000, BLOCK=1024, **LAUNCH),
        "triton noop, 20 args": lambda: _noop20[(1,)](t, *ints, 1000, F1=True, F2=False, BLOCK=1024),
        "torch.device guard": lambda: torch.cuda.device(dev).__enter__(),
        "F.layer_norm": lambda: F.layer_norm(x, (40,), w, b),
        "_ops.forward LN": lambda: _ops.forward(x, w, b, ln, 1e-5),
        "F.batch_norm (train)": lambda: F.batch_norm(xc, None, None, wc, bc, True),
        "_ops.forward BN": lambda: _ops.forward(xc, wc, bc, bn, 1e-5),
        "F.group_norm": lambda: F.group_norm(xc, 8, wc, bc),
        "_ops.forward GN": lambda: _ops.forward(xc, wc, bc, gn, 1e-5),
    }
    _, m, _, r = _ops.forward(x, w, b, ln, 1e-5)
    _, mc, _, rc = _ops.forward(xc, wc, bc, bn, 1e-5)
    fwd["_ops.backward LN"] = lambda: _ops.backward(x, x, w, m, r, ln, True)
    fwd["_ops.backward BN"] = lambda: _ops.backward(xc, xc, wc, mc, rc, bn, True)
    fwd.update(_compiled_launches(t, ints))
    for name, fn in fwd.items():
        print(f"{name:32s} {per_call_us(fn):8.1f} us/call")
    for name in ("_ops.forward LN", "_ops.forward BN", "_ops.backward BN"):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            fwd[name]()
        prof.disable()
        torch.cuda.synchronize()
        print(f"\n==== cProfile: 500 x {name}")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
