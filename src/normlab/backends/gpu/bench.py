"""GPU benchmark of the Triton kernels against torch.nn and the copy-bandwidth floor.

Run it on a CUDA machine (``benchmarks/gpu/run.sh`` does, with the CUDA tests)::

    from normlab.backends.gpu.bench import run
    rows = run(dtype=torch.bfloat16, modes=("forward", "forward+backward"))

or ``python -m normlab.backends.gpu.bench [--dtype bf16] [--only layer_norm] [--csv out.csv]``.

Per case (norm x shape x layout) and mode it times, interleaved (A B C A B C ...),
the median of ``repeats`` samples, each sample a run of back-to-back calls lasting
~2 ms (CUDA events around the loop), of:

* ``torch.nn``     -- torch.nn.functional (backward through autograd);
* ``gpu-triton``   -- the kernels called directly (``_ops.forward`` / ``_ops.backward``)
  with the backend's own output allocation (the CUDA caching allocator makes that
  cheap after the first call);
* ``normlab``      -- normlab.functional: what normlab's layers run (argument checks,
  the autograd Function, the backend choice -- the Triton kernels on CUDA);
* ``naive``        -- the tutorial composite: mean, variance and normalization as
  separate torch ops, backward through autograd;
* ``copy``         -- ``dst.copy_(x)``: the machine's bandwidth on real data.

Two times per row: ``ms``, eager calls as a training loop makes them (when Python
and the launches take longer than the GPU work, that is what is measured), and
``kernel_ms``, the same calls captured in a CUDA graph and replayed: the GPU's time
alone. The floor is the bytes a normalization must move at the copy's bandwidth:
forward reads x and writes y (2|x|), backward reads x and dy and writes dx (3|x|),
forward+backward 5|x|. Each row reports time, achieved GB/s (floor bytes / time), the
percentage of the copy bandwidth, the speed-up over torch.nn and the peak memory one
call allocates.

On a CPU machine it runs only under the Triton interpreter (``device="cpu"``,
``TRITON_INTERPRET=1``, tiny shapes), which checks the plumbing, not the speed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import functools
import math
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

__all__ = ["BenchCase", "DEFAULT_CASES", "MODES", "PROVIDERS", "format_rows", "run", "main", "summary"]

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


#: Typical CNN/transformer activations (the CPU suite's shapes; 13-50 MB in float32, so
#: they fit or nearly fit an H100's 50 MB L2), large ones (200-400 MB: DRAM-bound, the
#: bandwidth floor proper) and small ones (launch overhead dominates).
DEFAULT_CASES = (
    BenchCase("batch_norm", (32, 64, 56, 56)),
    BenchCase("batch_norm", (32, 64, 56, 56), "channels_last"),
    BenchCase("instance_norm", (32, 64, 56, 56)),
    BenchCase("group_norm", (32, 64, 56, 56)),
    BenchCase("group_norm", (32, 64, 56, 56), "channels_last"),
    BenchCase("layer_norm", (16384, 768)),
    BenchCase("rms_norm", (16384, 768)),
    BenchCase("layer_norm", (4096, 8192)),
    BenchCase("batch_norm", (128, 256, 56, 56)),
    BenchCase("batch_norm", (128, 256, 56, 56), "channels_last"),
    BenchCase("group_norm", (128, 256, 56, 56), "channels_last"),
    BenchCase("layer_norm", (65536, 1024)),
    BenchCase("rms_norm", (65536, 1024)),
    BenchCase("batch_norm", (8, 32, 40)),  # small: per-call overhead dominates
    BenchCase("layer_norm", (8, 32, 40)),
)


def _functions(case: BenchCase) -> tuple[NormSpec, dict[str, Callable]]:
    """The NormSpec of a case and its autograd-level calls ``f(x, w, b)``:
    ``torch.nn`` (torch.nn.functional), ``normlab`` (normlab.functional -- what normlab's
    layers run: argument checks, the autograd Function, the backend choice) and
    ``naive`` (the tutorial composite of torch ops)."""
    from ... import functional as NF

    shape, norm, groups = case.shape, case.norm, case.groups
    # each call takes the functional module f: torch.nn.functional or normlab.functional
    if norm == "batch_norm":
        spec, call = batch_norm_spec(shape), lambda f, x, w, b: f.batch_norm(x, None, None, w, b, True, 0.1, EPS)
    elif norm == "instance_norm":
        spec, call = instance_norm_spec(shape), lambda f, x, w, b: f.instance_norm(x, weight=w, bias=b, eps=EPS)
    elif norm == "group_norm":
        spec, call = group_norm_spec(shape, groups), lambda f, x, w, b: f.group_norm(x, groups, w, b, EPS)
    elif norm == "layer_norm":
        spec, call = layer_norm_spec(shape, shape[-1:]), lambda f, x, w, b: f.layer_norm(x, shape[-1:], w, b, EPS)
    elif norm == "rms_norm":
        spec, call = rms_norm_spec(shape, shape[-1:]), lambda f, x, w, b: f.rms_norm(x, shape[-1:], w, EPS)
    else:
        raise ValueError(f"gpu bench: unknown norm {norm!r}; expected one of batch_norm, instance_norm, "
                         "group_norm, layer_norm, rms_norm")
    calls = {"torch.nn": functools.partial(call, F), "normlab": functools.partial(call, NF)}
    calls["naive"] = lambda x, w, b: _naive(spec, x, w, b)
    return spec, calls


def _naive(spec: NormSpec, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """The tutorial way: statistics and normalization as separate torch ops, in x's dtype."""
    g = x.reshape(spec.group_shape)
    dims = spec.reduce_dims
    d = g - g.mean(dims, keepdim=True) if spec.center else g
    y = (d / torch.sqrt((d * d).mean(dims, keepdim=True) + EPS)).reshape(x.shape)
    if w is not None:
        y = y * w.reshape(spec.affine_shape)
    if b is not None:
        y = y + b.reshape(spec.affine_shape)
    return y


def _autograd_call(fn: Callable, mode: str, x: torch.Tensor, dy: torch.Tensor, params: list[torch.Tensor],
                   w: torch.Tensor, b: torch.Tensor | None,
                   stream: torch.cuda.Stream | None) -> Callable[[], object]:
    """An autograd-level call ``fn(x, w, b)`` in ``mode``.

    The backward-only mode differentiates one kept forward, made on ``stream``: autograd
    runs backward kernels on the forward's stream, so for a CUDA-graph capture the
    forward runs on a side stream, and every call of the backward -- warm-up, timed or
    captured -- runs there too (``capture_stream``, read by :func:`run`). Called from
    another stream, or with the parameters' gradient-accumulator nodes made on another
    one (every provider's kept forward shares ``w`` and ``b``, hence one stream for
    all), autograd synchronizes the streams on each call ("AccumulateGrad node's stream
    does not match") and the eager time includes that wait. The other modes build no
    graph ahead of their calls."""
    if mode == "forward":
        def forward():
            with torch.no_grad():
                return fn(x, w, b)
        return forward
    xg = x.detach().requires_grad_(True)
    if mode == "forward+backward":
        return lambda: torch.autograd.grad(fn(xg, w, b), [xg, *params], dy)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        y_kept = fn(xg, w, b)
    if stream is not None:
        torch.cuda.current_stream().wait_stream(stream)

    def backward():
        return torch.autograd.grad(y_kept, [xg, *params], dy, retain_graph=True)

    backward.capture_stream = stream
    return backward


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _time_calls(fn: Callable[[], object], calls: int, cuda: bool) -> float:
    """Milliseconds per call of ``calls`` back-to-back calls of ``fn`` (CUDA events
    around the loop on a GPU: the CPU keeps queueing while the GPU works, as in a
    training loop, so the time is the GPU's unless launching is the slower side)."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


def _on_its_stream(fn: Callable[[], object]) -> contextlib.AbstractContextManager:
    """The stream a provider must be called on (its ``capture_stream``, if any)."""
    stream = getattr(fn, "capture_stream", None)
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _calls_for(fn: Callable[[], object], cuda: bool, target_ms: float) -> int:
    """Calls per sample so that one sample lasts about ``target_ms``."""
    once = _time_calls(fn, 1, cuda)
    return max(1, min(1000, math.ceil(target_ms / max(once, 1e-6))))


def _graphed(fn: Callable[[], object], calls: int,
             stream: torch.cuda.Stream | None = None) -> Callable[[], object] | None:
    """``calls`` calls of ``fn`` captured in a CUDA graph on ``stream`` (a fresh side
    stream by default); replaying it times the GPU work alone (no Python, no launch
    latency). None when capture fails."""
    stream = stream if stream is not None else torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    except RuntimeError as error:
        print(f"gpu bench: CUDA graph capture failed ({error}); no kernel-only time", file=sys.stderr)
        torch.cuda.synchronize()
        return None
    return graph.replay


def _peak_mb(fn: Callable[[], object], cuda: bool) -> float | None:
    """Memory one call allocates beyond what is already held, at its peak (MiB)."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


#: The providers in the order they are timed (``copy`` is the bandwidth floor).
PROVIDERS = ("torch.nn", "gpu-triton", "normlab", "naive", "copy")


def _providers(case: BenchCase, mode: str, x: torch.Tensor, dy: torch.Tensor,
               w: torch.Tensor, b: torch.Tensor | None) -> dict[str, Callable[[], object]]:
    from . import _ops

    spec, calls = _functions(case)
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
    for p in params:
        p.requires_grad_(True)
    dst = torch.empty_like(x)
    stream = torch.cuda.Stream() if x.is_cuda and mode == "backward" else None
    providers = {
        "torch.nn": _autograd_call(calls["torch.nn"], mode, x, dy, params, w, b, stream),
        # the kernels called directly, with the backend's own output allocation
        "gpu-triton": {"forward": triton_fwd, "backward": triton_bwd, "forward+backward": triton_both}[mode],
        "normlab": _autograd_call(calls["normlab"], mode, x, dy, params, w, b, stream),
        "naive": _autograd_call(calls["naive"], mode, x, dy, params, w, b, stream),
        # x into a preallocated tensor: 2|x| bytes of real data (a fresh torch.empty
        # source copied ~2x faster than HBM allows on an H100 -- never-written pages)
        "copy": lambda: dst.copy_(x),
    }
    return {name: providers[name] for name in PROVIDERS}


def run(cases: Sequence[BenchCase] = DEFAULT_CASES, dtype: torch.dtype = torch.float32,
        modes: Sequence[str] = MODES, repeats: int = 15, warmup: int = 3,
        device: str | torch.device = "cuda", target_ms: float = 2.0,
        graphs: bool = True) -> list[dict[str, object]]:
    """Time every case x mode x provider; returns one dict per (case, mode, provider)
    with keys case, norm, shape, layout, dtype, mode, provider, ms (median per call of
    back-to-back eager calls), gbps, pct_of_copy, speedup_vs_torch, kernel_ms (the
    same calls replayed from a CUDA graph: GPU time alone; None on CPU or when capture
    fails), kernel_pct_of_copy, kernel_speedup_vs_torch, peak_mb, device."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("gpu bench: expected a CUDA device, but torch.cuda.is_available() is False")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"gpu bench: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu (interpreter)"
    import triton

    from ... import __version__

    run_info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__, "triton": triton.__version__, "normlab": __version__}
    rows: list[dict[str, object]] = []
    for case in cases:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(case.shape, generator=gen, device=device).to(dtype)
        if case.layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(x.shape, generator=gen, device=device).to(dtype).contiguous(
            memory_format=torch.channels_last if case.layout == "channels_last" else torch.contiguous_format)
        spec, _ = _functions(case)
        w = torch.randn(spec.param_shape, generator=gen, device=device).to(dtype)
        b = torch.randn(spec.param_shape, generator=gen, device=device).to(dtype) if spec.center else None
        floor_bytes = x.numel() * x.element_size()
        for mode in modes:
            providers = _providers(case, mode, x, dy, w, b)
            calls: dict[str, int] = {}
            peak: dict[str, float | None] = {}
            for name, fn in providers.items():
                with _on_its_stream(fn):
                    for _ in range(warmup):
                        fn()
                    _sync(cuda)
                    calls[name] = _calls_for(fn, cuda, target_ms)
                    peak[name] = _peak_mb(fn, cuda)
            replays = {name: _graphed(fn, calls[name], getattr(fn, "capture_stream", None))
                       for name, fn in providers.items()} if cuda and graphs else {}
            times: dict[str, list[float]] = {name: [] for name in providers}
            kernel: dict[str, list[float]] = {name: [] for name in replays if replays[name] is not None}
            for _ in range(repeats):  # interleaved, so drifts hit every provider alike
                for name, fn in providers.items():
                    with _on_its_stream(fn):  # events recorded on the stream the calls run on
                        times[name].append(_time_calls(fn, calls[name], cuda))
                for name in kernel:
                    kernel[name].append(_time_calls(replays[name], 1, cuda) / calls[name])
            median = {name: statistics.median(t) for name, t in times.items()}
            kernel_median = {name: statistics.median(t) for name, t in kernel.items()}
            del replays  # frees the graphs' private memory pools
            for name, ms in median.items():
                k_ms = kernel_median.get(name)
                k_copy, k_torch = kernel_median.get("copy"), kernel_median.get("torch.nn")
                # the floor: this mode's bytes moved at the copy's bandwidth (the copy
                # itself moves 2|x|)
                traffic = 2 if name == "copy" else _FLOOR_TRAFFIC[mode]
                moved, floor = floor_bytes * traffic, traffic / 2
                rows.append({
                    "case": case.name, "norm": case.norm, "shape": "x".join(map(str, case.shape)),
                    "layout": case.layout, "dtype": str(dtype).replace("torch.", ""), "mode": mode,
                    "provider": name, "ms": ms, "gbps": moved / ms / 1e6,
                    "pct_of_copy": 100.0 * floor * median["copy"] / ms,
                    "speedup_vs_torch": median["torch.nn"] / ms,
                    "kernel_ms": k_ms,
                    "kernel_pct_of_copy": 100.0 * floor * k_copy / k_ms if k_ms and k_copy else None,
                    "kernel_speedup_vs_torch": k_torch / k_ms if k_ms and k_torch else None,
                    "peak_mb": peak[name], "calls_per_sample": calls[name], "device": device_name,
                    **run_info,
                })
    return rows


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def _fmt(value: object, spec: str) -> str:
    return format(value, spec) if isinstance(value, float) else format("-", ">" + spec.split(".")[0])


def summary(rows: Sequence[dict[str, object]], min_mb: float = 1.0,
            provider: str = "gpu-triton") -> dict[str, dict[str, float]]:
    """Per mode, ``provider`` vs torch.nn over the cases of at least ``min_mb`` MB:
    geomean and worst speed-up, worst % of the copy bandwidth (eager and kernel-only)."""
    out: dict[str, dict[str, float]] = {}
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode and r["provider"] == provider
                and math.prod(map(int, str(r["shape"]).split("x"))) * _ITEMSIZE[str(r["dtype"])] >= min_mb * 1e6]
        if not mine:
            continue
        entry: dict[str, float] = {}
        for prefix, speed, pct in (("", "speedup_vs_torch", "pct_of_copy"),
                                   ("kernel_", "kernel_speedup_vs_torch", "kernel_pct_of_copy")):
            speeds = [r[speed] for r in mine if r[speed] is not None]
            pcts = [r[pct] for r in mine if r[pct] is not None]
            if speeds and pcts:
                entry[prefix + "geomean_speedup"] = math.exp(statistics.fmean(map(math.log, speeds)))
                entry[prefix + "min_speedup"] = min(speeds)
                entry[prefix + "min_pct_of_copy"] = min(pcts)
        out[mode] = entry
    return out


def format_rows(rows: Sequence[dict[str, object]]) -> str:
    """The rows as a table (eager and kernel-only columns), then the summary lines."""
    lines = [f"{'case':34s} {'mode':17s} {'provider':11s} {'ms':>9s} {'GB/s':>8s} {'%copy':>6s} {'vs torch':>8s}"
             f" {'kern ms':>9s} {'k%copy':>6s} {'k vs t':>7s} {'peak MB':>8s}"]
    for r in rows:
        lines.append(f"{r['case']:34s} {r['mode']:17s} {r['provider']:11s} {r['ms']:9.4f} {r['gbps']:8.1f} "
                     f"{r['pct_of_copy']:6.1f} {r['speedup_vs_torch']:7.2f}x {_fmt(r['kernel_ms'], '9.4f')} "
                     f"{_fmt(r['kernel_pct_of_copy'], '6.1f')} {_fmt(r['kernel_speedup_vs_torch'], '6.2f')}x "
                     f"{_fmt(r['peak_mb'], '8.1f')}")
    for provider in ("gpu-triton", "normlab"):
        for mode, entry in summary(rows, provider=provider).items():
            lines.append(f"{provider} vs torch.nn, {mode}, cases >= 1 MB: " + ", ".join(
                f"{key} {value:.2f}" for key, value in entry.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time the Triton kernels against torch.nn on a GPU.")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--only", action="append", default=None,
                        help="keep the default cases whose name contains this text (repeatable)")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph (kernel-only) timing")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    cases = [c for c in DEFAULT_CASES if not args.only or any(text in c.name for text in args.only)]
    try:
        rows = run(cases, dtype=_DTYPES[args.dtype], modes=args.modes.split(","), repeats=args.repeats,
                   graphs=not args.no_graphs)
    except (RuntimeError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    print(format_rows(rows))
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
