"""Per-kernel GPU time of each benchmark case (GPU machine): torch.profiler's CUDA
kernel durations for torch.nn and for the Triton backend (``_ops.forward/backward``),
forward and backward, averaged over calls. Shows which launch of a multi-kernel path
(BatchNorm's statistics, merge and apply, say) costs what, next to torch.nn's kernels.

    PYTHONPATH=src python3 benchmarks/gpu/profile_kernels.py [--dtype bf16] [--only batch_norm]
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from normlab.backends.gpu import _ops
from normlab.backends.gpu.bench import _DTYPES, DEFAULT_CASES, EPS, _functions

CALLS = 20


def kernel_table(fn, calls: int = CALLS) -> list[tuple[str, float, int]]:
    """(kernel name, mean us per call, launches per call) of ``calls`` calls of fn."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total[event.name] += event.device_time
            count[event.name] += 1
    return sorted(((name[:70], us / calls, count[name] // calls) for name, us in total.items()),
                  key=lambda row: -row[1])


def profile_case(case, label: str, dtype: torch.dtype) -> None:
    x = torch.randn(case.shape, device="cuda").to(dtype)
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    x, dy = x.contiguous(memory_format=fmt), torch.randn_like(x).contiguous(memory_format=fmt)
    spec, calls = _functions(case)
    w = torch.randn(spec.param_shape, device="cuda").to(dtype)
    b = torch.randn(spec.param_shape, device="cuda").to(dtype) if spec.center else None
    _, mean, _, rstd = _ops.forward(x, w, b, spec, EPS)
    xg, wg = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    bg = b.detach().requires_grad_(True) if b is not None else None
    y = calls["torch.nn"](xg, wg, bg)
    runs = {
        "torch.nn forward": lambda: calls["torch.nn"](x, w, b),
        "torch.nn backward": lambda: torch.autograd.grad(y, [xg, wg], dy, retain_graph=True),
        "triton forward": lambda: _ops.forward(x, w, b, spec, EPS),
        "triton backward": lambda: _ops.backward(dy, x, w, mean, rstd, spec, True, (True, True, b is not None)),
    }
    print(f"\n=== {case.name} {label}")
    for what, fn in runs.items():
        rows = kernel_table(fn)
        print(f"  {what}: {sum(r[1] for r in rows):7.1f} us in {sum(r[2] for r in rows)} launches")
        for name, us, n in rows:
            print(f"      {us:7.1f} us x{n}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    parser.add_argument("--only", action="append", default=None)
    args = parser.parse_args()
    dtype = _DTYPES[args.dtype]
    cases = [c for c in DEFAULT_CASES if not args.only or any(t in c.name for t in args.only)]
    for case in cases:
        profile_case(case, args.dtype, dtype)


if __name__ == "__main__":
    main()
