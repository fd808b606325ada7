"""Where the CPU time of an eager training step goes on a GPU machine: per-step time of
``y = f(x, w, b); autograd.grad(y, ...)`` for torch.nn.functional, normlab.functional
and the Triton kernels called directly, then a cProfile of normlab's step -- the
forward on the calling thread and the backward on autograd's device thread (profiled
separately: cProfile sees one thread).

    PYTHONPATH=src python3 benchmarks/gpu/profile_step.py
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

import normlab.functional as NF
from normlab.backends.gpu import _ops
from normlab.core import autograd
from normlab.core.spec import batch_norm_spec, layer_norm_spec

STEPS = 300


def per_step_us(fn, steps=STEPS):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e6


def cases():
    dev = torch.device("cuda")
    x = torch.randn(8, 32, 40, device=dev)
    yield "layer_norm (8, 32, 40)", x, torch.randn(40, device=dev), torch.randn(40, device=dev), \
        lambda f, x, w, b: f.layer_norm(x, (40,), w, b), layer_norm_spec(x.shape, (40,))
    x = torch.randn(32, 64, 56, 56, device=dev)
    yield "batch_norm (32, 64, 56, 56)", x, torch.randn(64, device=dev), torch.randn(64, device=dev), \
        lambda f, x, w, b: f.batch_norm(x, None, None, w, b, True), batch_norm_spec(x.shape)


def profile_case(name, x, w, b, call, spec) -> None:
    original = autograd.NormFunction.backward
    xg, wg, bg = (t.detach().requires_grad_(True) for t in (x, w, b))
    dy = torch.randn_like(x)

    def torch_step():
        return torch.autograd.grad(call(F, xg, wg, bg), [xg, wg, bg], dy)

    def normlab_step():
        return torch.autograd.grad(call(NF, xg, wg, bg), [xg, wg, bg], dy)

    def forward_only():
        with torch.no_grad():
            return call(NF, x, w, b)

    def kernels():
        _, m, _, r = _ops.forward(x, w, b, spec, 1e-5)
        return _ops.backward(dy, x, w, m, r, spec, True)

    def autograd_only():  # a trivial graph: what autograd.grad itself costs here
        return torch.autograd.grad((xg * 1.0), [xg], dy)

    def forward_graph():  # the forward that records the graph, no backward in between
        return call(NF, xg, wg, bg)

    def on_calling_thread(step):  # autograd's device threads off: backward runs here
        def run():
            with torch.autograd.set_multithreading_enabled(False):
                return step()
        return run

    print(f"\n=== {name}")
    for label, fn in [("torch.nn step", torch_step), ("normlab step", normlab_step),
                      ("normlab forward, no grad", forward_only), ("normlab forward, grad mode", forward_graph),
                      ("_ops forward+backward", kernels), ("autograd.grad of x * 1", autograd_only),
                      ("torch.nn step, 1 thread", on_calling_thread(torch_step)),
                      ("normlab step, 1 thread", on_calling_thread(normlab_step))]:
        print(f"  {label:28s} {per_step_us(fn):8.1f} us")

    timed = {"forward": 0.0, "backward": 0.0}

    def timed_backward(ctx, *grads):
        t0 = time.perf_counter()
        try:
            return original(ctx, *grads)
        finally:
            timed["backward"] += time.perf_counter() - t0

    autograd.NormFunction.backward = staticmethod(timed_backward)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(STEPS):
        t1 = time.perf_counter()
        y = call(NF, xg, wg, bg)
        timed["forward"] += time.perf_counter() - t1
        torch.autograd.grad(y, [xg, wg, bg], dy)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    print(f"  normlab step: {total / STEPS * 1e6:.1f} us, of which forward call "
          f"{timed['forward'] / STEPS * 1e6:.1f} us, Function.backward {timed['backward'] / STEPS * 1e6:.1f} us")

    backward_profile, forward_profile = cProfile.Profile(), cProfile.Profile()

    def profiled_backward(ctx, *grads):
        backward_profile.enable()
        try:
            return original(ctx, *grads)
        finally:
            backward_profile.disable()

    autograd.NormFunction.backward = staticmethod(profiled_backward)
    try:
        for _ in range(STEPS):
            forward_profile.enable()
            y = call(NF, xg, wg, bg)
            forward_profile.disable()
            torch.autograd.grad(y, [xg, wg, bg], dy)
        torch.cuda.synchronize()
    finally:
        autograd.NormFunction.backward = staticmethod(original)
    for label, prof in (("forward (calling thread)", forward_profile),
                        ("backward (autograd thread)", backward_profile)):
        print(f"\n---- cProfile, {STEPS} steps, {label}")
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def main():
    for case in cases():
        profile_case(*case)

if __name__ == "__main__":
    main()
