"""GPU benchmark of the Triton kernels against torch.nn and the copy-bandwidth floor.

A stub for ``normlab bench`` to call on a CUDA machine (it has not been run on a GPU
yet -- no figures are committed)::

    from normlab.backends.gpu.bench import run
    rows = run(dtype=torch.bfloat16, modes=("forward", "forward+backward"))

or ``python -m normlab.backends.gpu.bench [--dtype bf16] [--csv out.csv]``.

Per case (norm x shape x layout) and mode it times, interleaved (A B C A B C ...)
and as the median of ``repeats`` CUDA-event measurements:

* ``torch.nn``     -- torch.nn.functional (backward through autograd);
* ``gpu-triton``   -- the kernels called directly (``_ops.forward`` / ``_ops.backward``),
  i.e. kernel level with the backend's own output allocation (the CUDA caching
  allocator makes that cheap after the first call);
* ``copy``         -- ``dst.copy_(src)`` of the same size: the machine's bandwidth.

The floor is the bytes a normalization must move: forward reads x and writes y
(2|x|), backward reads x and dy and writes dx (3|x|), forward+backward 5|x|. Each
row reports time, achieved GB/s (floor bytes / time), the percentage of the copy
bandwidth measured in the same run, and the speed-up over torch.nn.

On a CPU machine it runs only under the Triton interpreter (``device="cpu"``,
``TRITON_INTERPRET=1``, tiny shapes), which checks the plumbing, not the speed.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...core.spec import (
    NormSpec,
    batch_norm_spec,
    group_norm_spec,
    instance_norm_spec,
    layer_norm_spec,
    rms_norm_spec,
)

__all__ = ["BenchCase", "DEFAULT_CASES", "MODES", "run", "main"]

MODES = ("forward", "backward", "forward+backward")
_FLOOR_TRAFFIC = {"forward": 2, "backward": 3, "forward+backward": 5}  # multiples of |x| bytes
EPS = 1e-5


@dataclass(frozen=True)
class BenchCase:
    """One benchmark input: ``norm`` in batch_norm / instance_norm / group_norm /
    layer_norm / rms_norm, ``shape`` (N, C, *spatial) or (rows, features),
    ``layout`` 'nchw' or 'channels_last', ``groups`` for group_norm."""

    norm: str
    shape: tuple[int, ...]
    layout: str = "nchw"
    groups: int = 32

    @property
    def name(self) -> str:
        dims = "x".join(map(str, self.shape))
        return f"{self.norm}[{dims}]{'-cl' if self.layout == 'channels_last' else ''}"


DEFAULT_CASES = (
    BenchCase("batch_norm", (32, 64, 56, 56)),
    BenchCase("batch_norm", (32, 64, 56, 56), "channels_last"),
    BenchCase("instance_norm", (32, 64, 56, 56)),
    BenchCase("group_norm", (32, 64, 56, 56)),
    BenchCase("group_norm", (32, 64, 56, 56), "channels_last"),
    BenchCase("layer_norm", (16384, 768)),
    BenchCase("rms_norm", (16384, 768)),
    BenchCase("layer_norm", (4096, 8192)),
    BenchCase("batch_norm", (8, 32, 40)),  # small: per-call overhead dominates
    BenchCase("layer_norm", (8, 32, 40)),
)


def _spec_and_torch(case: BenchCase) -> tuple[NormSpec, Callable]:
    """The NormSpec and the torch.nn.functional call ``f(x, w, b)`` of a case."""
    shape, norm = case.shape, case.norm
    if norm == "batch_norm":
        return batch_norm_spec(shape), lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, EPS)
    if norm == "instance_norm":
        return instance_norm_spec(shape), lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=EPS)
    if norm == "group_norm":
        return group_norm_spec(shape, case.groups), lambda x, w, b: F.group_norm(x, case.groups, w, b, EPS)
    if norm == "layer_norm":
        return (layer_norm_spec(shape, shape[-1:]),
                lambda x, w, b: F.layer_norm(x, shape[-1:], w, b, EPS))
    if norm == "rms_norm":
        return rms_norm_spec(shape, shape[-1:]), lambda x, w, b: F.rms_norm(x, shape[-1:], w, EPS)
    raise ValueError(f"gpu bench: unknown norm {norm!r}; expected one of batch_norm, instance_norm, "
                     "group_norm, layer_norm, rms_norm")


class _Timer:
    """Elapsed milliseconds of ``fn()``: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def _providers(case: BenchCase, mode: str, x: torch.Tensor, dy: torch.Tensor,
               w: torch.Tensor, b: torch.Tensor | None) -> dict[str, Callable[[], object]]:
    from . import _ops

    spec, torch_fn = _spec_and_torch(case)
    needs = (True, True, b is not None)

    def triton_fwd():
        return _ops.forward(x, w, b, spec, EPS)

    _, mean, _, rstd = triton_fwd()

    def triton_bwd(mean=mean, rstd=rstd):
        return _ops.backward(dy, x, w, mean, rstd, spec, True, needs)

    def triton_both():
        _, m, _, r = triton_fwd()
        return triton_bwd(m, r)

    params = [p for p in (w, b) if p is not None]
    xg = x.detach().requires_grad_(True)
    for p in params:
        p.requires_grad_(True)
    y_kept = torch_fn(xg, w, b)

    def torch_bwd():
        return torch.autograd.grad(y_kept, [xg, *params], dy, retain_graph=True)

    def torch_both():
        return torch.autograd.grad(torch_fn(xg, w, b), [xg, *params], dy)

    def torch_fwd():
        with torch.no_grad():
            return torch_fn(x, w, b)

    traffic = _FLOOR_TRAFFIC[mode]
    src = torch.empty(x.numel() * traffic // 2, dtype=x.dtype, device=x.device)
    dst = torch.empty_like(src)
    return {
        "torch.nn": {"forward": torch_fwd, "backward": torch_bwd, "forward+backward": torch_both}[mode],
        "gpu-triton": {"forward": triton_fwd, "backward": triton_bwd, "forward+backward": triton_both}[mode],
        # reads and writes the same number of bytes as the floor of this mode
        "copy": lambda: dst.copy_(src),
    }


def run(cases: Sequence[BenchCase] = DEFAULT_CASES, dtype: torch.dtype = torch.float32,
        modes: Sequence[str] = MODES, repeats: int = 20, warmup: int = 3,
        device: str | torch.device = "cuda") -> list[dict[str, object]]:
    """Time every case x mode x provider; returns one dict per (case, mode, provider)
    with keys case, norm, shape, layout, dtype, mode, provider, ms (median), gbps,
    pct_of_copy, speedup_vs_torch, device."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("gpu bench: expected a CUDA device, but torch.cuda.is_available() is False")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"gpu bench: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    timer = _Timer(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    rows: list[dict[str, object]] = []
    for case in cases:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(case.shape, generator=gen, device=device).to(dtype)
        if case.layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(x.shape, generator=gen, device=device).to(dtype).contiguous(
            memory_format=torch.channels_last if case.layout == "channels_last" else torch.contiguous_format)
        spec, _ = _spec_and_torch(case)
        w = torch.randn(spec.param_shape, generator=gen, device=device).to(dtype)
        b = torch.randn(spec.param_shape, generator=gen, device=device).to(dtype) if spec.center else None
        floor_bytes = x.numel() * x.element_size()
        for mode in modes:
            providers = _providers(case, mode, x, dy, w, b)
            for fn in providers.values():
                for _ in range(warmup):
                    fn()
            times: dict[str, list[float]] = {name: [] for name in providers}
            for _ in range(repeats):  # interleaved, so drifts hit every provider alike
                for name, fn in providers.items():
                    times[name].append(timer(fn))
            median = {name: statistics.median(t) for name, t in times.items()}
            moved = floor_bytes * _FLOOR_TRAFFIC[mode]
            for name, ms in median.items():
                rows.append({
                    "case": case.name, "norm": case.norm, "shape": "x".join(map(str, case.shape)),
                    "layout": case.layout, "dtype": str(dtype).replace("torch.", ""), "mode": mode,
                    "provider": name, "ms": ms, "gbps": moved / ms / 1e6,
                    "pct_of_copy": 100.0 * median["copy"] / ms,
                    "speedup_vs_torch": median["torch.nn"] / ms, "device": device_name,
                })
    return rows


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time the Triton kernels against torch.nn on a GPU.")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    try:
        rows = run(dtype=_DTYPES[args.dtype], modes=args.modes.split(","), repeats=args.repeats)
    except (RuntimeError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    print(f"{'case':34s} {'mode':17s} {'provider':11s} {'ms':>9s} {'GB/s':>8s} {'%copy':>6s} {'vs torch':>8s}")
    for r in rows:
        print(f"{r['case']:34s} {r['mode']:17s} {r['provider']:11s} {r['ms']:9.4f} {r['gbps']:8.1f} "
              f"{r['pct_of_copy']:6.1f} {r['speedup_vs_torch']:7.2f}x")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
