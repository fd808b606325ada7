"""The ``cpu-numba`` backend: same ``forward``/``backward`` contract as
:mod:`normlab.backends.reference`, computed by the fused kernels.

Data path: CPU tensors are handed to numba as zero-copy NumPy views of their
storage (``.detach().numpy()``) in the layout they already have -- contiguous or
channels_last -- and outputs are allocated by torch in the same layout.
float16/bfloat16 inputs are upcast to float32 first (numba has no 16-bit float
arithmetic on CPU), then the output is rounded back once.

Under ``torch.compile`` the same computation is reached through the custom ops of
:mod:`normlab.backends.cpu.ops`, which are opaque to the compiler; in eager mode the
kernels are called directly, which saves the dispatcher's per-call overhead.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import torch

from ...core.spec import NormSpec
from ...core.stats import compute_dtype
from . import runtime, team
from .plan import Plan, layout_of, plan_for

__all__ = ["forward", "backward", "forward_impl", "backward_impl", "plan_of"]

_FLOATS = (torch.float32, torch.float64)

#: Inputs with fewer elements run the serial twins of the kernels (no thread hand-off).
SERIAL_BELOW = 1 << 17


def _threads(numel: int) -> int:
    """Threads for an input of ``numel`` elements: one below :data:`SERIAL_BELOW` (a
    team hand-off costs more than the work), else torch's current thread count."""
    return 1 if numel < SERIAL_BELOW else torch.get_num_threads()


#: Outputs of at least this many bytes ask the kernel for transparent huge pages: glibc
#: serves every allocation of 32 MiB or more with a fresh ``mmap`` (its largest dynamic
#: threshold), so these always fault in their pages. Smaller outputs are usually reused
#: heap memory; advising those measured 2-3x slower (the heap's VMAs get split and
#: re-grown pages go through direct compaction).
HUGE_PAGES_FROM = 1 << 25
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_madvise = None
if sys.platform.startswith("linux"):
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _madvise = None


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(t)`` (same layout), backed by huge pages when it is large.

    A fresh large output comes from ``mmap`` and its first touch -- inside the
    kernel's write pass -- faults one 4 KiB page at a time: measured here, 50 MB cost
    ~10 ms of faults against ~1 ms to write it. ``madvise(MADV_HUGEPAGE)`` on the
    2 MiB-aligned interior (when the system's transparent huge pages are in
    ``madvise`` mode) makes that ~25 faults of 2 MiB: LayerNorm (16384, 768) forward
    with its output allocated, 26 -> 19 ms on one thread. Advisory: where huge pages
    are off it changes nothing. See ``HUGE_PAGES_FROM`` for the size cut.
    """
    out = torch.empty_like(t)
    nbytes = out.untyped_storage().nbytes()
    if _madvise is not None and nbytes >= HUGE_PAGES_FROM:
        huge = 1 << 21
        start = (out.data_ptr() + huge - 1) & ~(huge - 1)
        end = (out.data_ptr() + nbytes) & ~(huge - 1)
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)  # failure is harmless: ignored
    return out


def plan_of(x: torch.Tensor, spec: NormSpec) -> Plan | None:
    """The kernel plan for ``x``, or None when the kernels don't cover it."""
    layout = layout_of(x)
    if layout is None:
        return None
    return plan_for(spec, layout, torch.get_num_threads())


def _flat(t: torch.Tensor) -> np.ndarray:
    """Zero-copy 1-D NumPy view of a dense tensor's storage in memory order."""
    if not t.is_contiguous():  # channels_last: memory order is (N, *spatial, C)
        t = t.permute(0, *range(2, t.dim()), 1)
    return t.detach().reshape(-1).numpy()


_FILLED: dict[tuple[int, float, torch.dtype], np.ndarray] = {}


def _filled(n: int, fill: float, dtype: torch.dtype) -> np.ndarray:
    """A cached array of ``n`` copies of ``fill`` (absent weight/bias/mean; never written)."""
    key = (n, fill, dtype)
    arr = _FILLED.get(key)
    if arr is None:
        if len(_FILLED) > 256:
            _FILLED.clear()
        arr = np.full(n, fill, dtype=np.float64 if dtype == torch.float64 else np.float32)
        _FILLED[key] = arr
    return arr


def _param(p: torch.Tensor | None, channels: int, fill: float, dtype: torch.dtype) -> np.ndarray:
    if p is None:
        return _filled(channels, fill, dtype)
    p = p.detach()
    if p.dtype != dtype or not p.is_contiguous():
        p = p.to(dtype).contiguous()
    return p.view(-1).numpy()


def _stat_input(stat: torch.Tensor | None, spec: NormSpec, plan: Plan, cdt: torch.dtype) -> np.ndarray:
    """Per-group values (P,) of a statistic given broadcastable to ``spec.stat_shape``."""
    if stat is None:
        groups = plan.dims[1] if plan.kind == "grouped" else plan.dims[0] * plan.dims[2]
        return _filled(groups, 0.0, cdt)
    stat = stat.detach()
    if stat.dtype == cdt and stat.shape == spec.stat_shape and stat.is_contiguous():
        return stat.view(-1).numpy()  # batch statistics as forward returned them
    return torch.broadcast_to(stat.to(cdt), spec.stat_shape).reshape(-1).contiguous().numpy()


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in _FLOATS else x.to(compute_dtype(x.dtype))


def forward_impl(x, weight, bias, spec: NormSpec, eps: float, fixed_mean=None, fixed_var=None,
                 out: torch.Tensor | None = None):
    """:func:`normlab.backends.reference.forward` on the kernels (eager, no dispatcher).

    ``out`` (float32/float64 inputs only): a preallocated output of x's shape, dtype
    and layout to write y into -- the benchmark's kernel-level timing uses it.
    """
    plan = plan_of(x, spec)
    if plan is None:
        raise ValueError(f"cpu-numba: no kernel for {spec.family} on input of shape "
                         f"{tuple(x.shape)} and strides {x.stride()}")
    cdt = compute_dtype(x.dtype)
    xc = _upcast(x)
    y = _empty_like(xc) if out is None or xc is not x else out
    channels = plan.channels
    w = _param(weight, channels, 1.0, cdt)
    b = _param(bias, channels, 0.0, cdt)
    fixed = fixed_var is not None
    if fixed:
        var_out = fixed_var.to(cdt)
        rstd_out = torch.rsqrt(var_out + eps)
        mean_out = fixed_mean.to(cdt) if fixed_mean is not None else None
        mean_np = _stat_input(mean_out, spec, plan, cdt)
        rstd_np = _stat_input(rstd_out, spec, plan, cdt)
    k = runtime.kernels()
    threads = _threads(x.numel())
    if plan.kind == "grouped":
        a, p, kk, s, g = plan.dims
        if not fixed:
            mean_t = torch.empty(p, dtype=cdt)
            var_t = torch.empty(p, dtype=cdt)
            rstd_t = torch.empty(p, dtype=cdt)
            mean_np, var_np, rstd_np = mean_t.numpy(), var_t.numpy(), rstd_t.numpy()
        else:
            var_np = np.empty(0, dtype=mean_np.dtype)
        team.run(k.grouped_forward, (_flat(xc), _flat(y), w, b, a, p, kk, s, g, float(eps),
                                     spec.center, not fixed, mean_np, var_np, rstd_np), p, threads)
    else:
        n, s, g, kk = plan.dims
        nb = plan.blocks
        xf = _flat(xc)
        if not fixed and nb == 1:
            # one work item per sample: statistics and output in one sweep
            mean_t = torch.empty(n * g, dtype=cdt)
            var_t = torch.empty(n * g, dtype=cdt)
            rstd_t = torch.empty(n * g, dtype=cdt)
            team.run(k.cl_forward_fused, (xf, _flat(y), w, b, n, s, g, kk, float(eps),
                                          mean_t.numpy().reshape(n, g), var_t.numpy().reshape(n, g),
                                          rstd_t.numpy().reshape(n, g)), n, threads)
            return _forward_result(x, y, spec, mean_t, var_t, rstd_t)
        if not fixed:
            pcnt = np.empty((n * nb, g))
            pmu = np.empty((n * nb, g))
            pm2 = np.empty((n * nb, g))
            team.run(k.cl_stats, (xf, n, s, g, kk, nb, pcnt, pmu, pm2), n * nb, threads)
            mean64, var64 = _merge(pcnt, pmu, pm2, n, nb, g)
            rstd64 = 1.0 / np.sqrt(var64 + eps)
            mean_t = torch.from_numpy(mean64.reshape(-1)).to(cdt)
            var_t = torch.from_numpy(var64.reshape(-1)).to(cdt)
            rstd_t = torch.from_numpy(rstd64.reshape(-1)).to(cdt)
        else:
            mean64 = mean_np.astype(np.float64).reshape(n, g)
            rstd64 = rstd_np.astype(np.float64).reshape(n, g)
        npdt = w.dtype
        mean_rep = np.repeat(mean64, kk, axis=1)
        mc = mean_rep.astype(npdt)
        sc64 = np.repeat(rstd64, kk, axis=1) * w.astype(np.float64)
        # y = (x - mc) * sc + sh, sh = b - (mean - mc) * sc: see _kernels._cl_affine_rows
        sh = (b.astype(np.float64) - (mean_rep - mc) * sc64).astype(npdt)
        team.run(k.cl_apply, (xf, _flat(y), mc, sc64.astype(npdt), sh, n, s, g * kk, nb), n * nb,
                 threads)
    if fixed:
        return (y.to(x.dtype) if x.dtype != y.dtype else y), mean_out, var_out, rstd_out
    return _forward_result(x, y, spec, mean_t, var_t, rstd_t)


def _forward_result(x, y, spec, mean_t, var_t, rstd_t):
    if x.dtype != y.dtype:
        y = y.to(x.dtype)
    shape = spec.stat_shape
    mean = mean_t.view(shape) if spec.center else None
    return y, mean, var_t.view(shape), rstd_t.view(shape)


def _merge(pcnt, pmu, pm2, n, nb, g):
    """Combine the per-block (count, mean, M2) of each (n, g) -- the parallel form of
    Chan's formula: M2 = sum M2_b + sum n_b (mean_b - mean)^2."""
    cnt = pcnt.reshape(n, nb, g)
    mu = pmu.reshape(n, nb, g)
    tot = cnt.sum(1)
    mean = (cnt * mu).sum(1) / tot
    m2 = pm2.reshape(n, nb, g).sum(1) + (cnt * (mu - mean[:, None, :]) ** 2).sum(1)
    return mean, m2 / tot


def backward_impl(dy, x, weight, mean, rstd, spec: NormSpec, batch_statistics: bool,
                  needs_input_grad=(True, True, True)):
    """:func:`normlab.backends.reference.backward` on the kernels."""
    plan = plan_of(x, spec)
    if plan is None:
        raise ValueError(f"cpu-numba: no kernel for {spec.family} on input of shape {tuple(x.shape)}")
    need_dx, need_dw, need_db = needs_input_grad
    cdt = compute_dtype(x.dtype)
    xc = _upcast(x)
    fmt = torch.channels_last if layout_of(x) == "channels_last" else torch.contiguous_format
    if x.dim() == 5 and fmt == torch.channels_last:
        fmt = torch.channels_last_3d
    dyc = _upcast(dy).contiguous(memory_format=fmt)
    if dyc.dtype != xc.dtype:
        dyc = dyc.to(xc.dtype)
    channels = plan.channels
    w = _param(weight, channels, 1.0, cdt)
    mean_np = _stat_input(mean, spec, plan, cdt)
    rstd_np = _stat_input(rstd, spec, plan, cdt)
    dx = _empty_like(xc) if need_dx else None
    k = runtime.kernels()
    threads = _threads(x.numel())
    if plan.kind == "grouped":
        a, p, kk, s, g = plan.dims
        t = team.chunk_count(p, threads)  # one row of dweight/dbias partials per chunk
        dwp = np.zeros((t, channels))
        dbp = np.zeros((t, channels))
        dx_np = _flat(dx) if need_dx else np.empty(0, dtype=w.dtype)
        if a == 1 and s == 1 and g == 1:  # LayerNorm/RMSNorm rows
            team.run(k.rows_backward, (_flat(dyc), _flat(xc), w, mean_np, rstd_np, p, kk, spec.center,
                                       batch_statistics, need_dx, t, dx_np, dwp, dbp), t, threads)
        else:
            team.run(k.grouped_backward, (_flat(dyc), _flat(xc), w, mean_np, rstd_np, a, p, kk, s, g,
                                          spec.center, batch_statistics, need_dx, t, dx_np, dwp, dbp),
                     t, threads)
        dw64, db64 = dwp.sum(0), dbp.sum(0)
    else:
        n, s, g, kk = plan.dims
        nb = plan.blocks
        c = g * kk
        if nb == 1:
            dwp = np.empty((n, c))
            dbp = np.empty((n, c))
            dx_np = _flat(dx) if need_dx else np.empty(0, dtype=w.dtype)
            team.run(k.cl_backward_fused, (_flat(dyc), _flat(xc), w, mean_np.reshape(n, g),
                                           rstd_np.reshape(n, g), n, s, g, kk, spec.center,
                                           batch_statistics, need_dx, dwp, dbp, dx_np), n, threads)
            return _backward_result(x, dx, dwp.sum(0), dbp.sum(0), spec, cdt, need_dw, need_db)
        npdt = w.dtype
        mc = np.repeat(mean_np.reshape(n, g), kk, axis=1).astype(npdt)
        rc = np.repeat(rstd_np.astype(np.float64).reshape(n, g), kk, axis=1)
        psdy = np.empty((n * nb, c))
        psdyx = np.empty((n * nb, c))
        dyf, xf = _flat(dyc), _flat(xc)
        team.run(k.cl_grad_sums, (dyf, xf, mc, rc, n, s, c, nb, psdy, psdyx), n * nb, threads)
        dw64 = psdyx.sum(0)
        db64 = psdy.sum(0)
        if need_dx:
            w64 = w.astype(np.float64)
            wr = rc * w64
            if batch_statistics:
                count = s * kk
                per_n_dy = psdy.reshape(n, nb, c).sum(1) * w64  # sum of g = dy * w
                per_n_dyx = psdyx.reshape(n, nb, c).sum(1) * w64  # sum of g * xhat
                m1 = per_n_dy.reshape(n, g, kk).sum(2) / count
                m2 = per_n_dyx.reshape(n, g, kk).sum(2) / count
                if not spec.center:
                    m1 = np.zeros_like(m1)
                c1 = np.repeat(m1, kk, axis=1) * rc
                c2 = np.repeat(m2, kk, axis=1) * rc * rc
            else:
                c1 = np.zeros((n, c))
                c2 = np.zeros((n, c))
            # dx = wr * dy - c2 * (x - mc) - c1
            team.run(k.cl_dx, (dyf, xf, mc, wr.astype(npdt), (-c2).astype(npdt), (-c1).astype(npdt),
                               n, s, c, nb, _flat(dx)), n * nb, threads)
    return _backward_result(x, dx, dw64, db64, spec, cdt, need_dw, need_db)


def _backward_result(x, dx, dw64, db64, spec, cdt, need_dw, need_db):
    dweight = torch.from_numpy(dw64).to(cdt).reshape(spec.param_shape) if need_dw else None
    dbias = torch.from_numpy(db64).to(cdt).reshape(spec.param_shape) if need_db else None
    if dx is not None and dx.dtype != x.dtype:
        dx = dx.to(x.dtype)
    return dx, dweight, dbias


def forward(x, weight, bias, spec: NormSpec, eps: float, fixed_mean=None, fixed_var=None):
    """Backend entry (see :func:`normlab.backends.reference.forward`)."""
    if torch.compiler.is_compiling():
        from . import ops

        return ops.forward(x, weight, bias, spec, eps, fixed_mean, fixed_var)
    return forward_impl(x, weight, bias, spec, eps, fixed_mean, fixed_var)


def backward(dy, x, weight, mean, rstd, spec: NormSpec, batch_statistics: bool,
             needs_input_grad=(True, True, True)):
    """Backend entry (see :func:`normlab.backends.reference.backward`)."""
    if torch.compiler.is_compiling():
        from . import ops

        return ops.backward(dy, x, weight, mean, rstd, spec, batch_statistics, needs_input_grad)
    return backward_impl(dy, x, weight, mean, rstd, spec, batch_statistics, needs_input_grad)
