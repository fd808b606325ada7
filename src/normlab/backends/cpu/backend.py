"""The ``cpu-numba`` backend: same ``forward``/``backward`` contract as
:mod:`normlab.backends.reference`, computed by the fused kernels.

Data path: CPU tensors reach the kernels by address, in the layout they already have --
contiguous or channels_last. For a forward with batch statistics (every training step)
and for the backward, the ``*_at`` kernels take the addresses, build their launches'
jobs and start the thread team themselves (:func:`_forward_at`, :func:`_backward_at`;
small grouped inputs run on the calling thread: :func:`_serial_grouped_forward`), and so
does the forward with fixed per-channel statistics (eval-mode BatchNorm/InstanceNorm:
:func:`_fixed_forward_at`). Other fixed statistics and a process without OpenMP go
through jobs built here (:func:`normlab.backends.cpu.team.job`) and ``team.launch``.
Outputs are allocated in the same layout, large ones from a cache of buffers that
spares them the page faults of fresh memory (:mod:`normlab.backends.cpu.outputs`).
bfloat16 and float16 inputs are read and written as raw 16-bit patterns and converted
inside the kernels (numba has no 16-bit float type), with float32 arithmetic and without
the conversion passes of upcasting (bfloat16: the same bits as upcasting; float16: the
same up to the order of float32 sums).

Under ``torch.compile`` the same computation is reached through the custom ops of
:mod:`normlab.backends.cpu.ops`, which are opaque to the compiler; in eager mode the
kernels are called directly, which saves the dispatcher's per-call overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch

from ...core.spec import NormSpec
from ...core.stats import RunningStats, compute_dtype, fold_running_stats
from .._env import getenv, last_level_cache_bytes, mebibytes
from . import outputs, runtime, team
from .plan import Plan, layout_of, plan_for, row_blocks

__all__ = ["forward", "backward", "forward_impl", "backward_impl", "plan_of", "call_for"]


#: Inputs with fewer elements run the serial twins of the kernels (no thread hand-off).
SERIAL_BELOW = 1 << 17
#: LayerNorm/RMSNorm rows of at most this many elements take the tile-phased forward
#: (see ``_kernels``), and so do the statistic groups of GroupNorm/InstanceNorm on planes
#: of at most ``SHORT_PLANES`` elements in all. Forward, module level, 2 threads, against
#: the per-group kernel: groups of 49 to 160 elements 1.08-1.48x faster phased (trees
#: alternated across processes); InstanceNorm on 14x14 and 16x16 planes about even
#: (0.79-1.01x of the per-group time in one process, ``benchmarks/cpu/short_groups.py``
#: and call-level A/Bs), so they stay per group.
SHORT_GROUP = 256
SHORT_PLANES = 160
#: LayerNorm/RMSNorm rows take the tile-phased backward (``_kernels.short_rows_backward``)
#: up to this many elements, and only while x, dy and dx fit in the last-level cache
#: together. In-process against the per-row backward (2 threads, float32, session 25):
#: rows of 40 to 96 from (256, 40) to (65536, 40) 1.06-1.28x faster phased, rows of 128
#: even, rows of 256 1.08-1.38x slower; and beyond the cache ((65536, 48), (65536, 64),
#: (32768, 96)) 1.06-1.40x slower (why is not measured: its second pass reads a tile
#: back from L2, the per-row kernel's a row from L1).
SHORT_ROW_BACKWARD = 128


#: dweight/dbias are summed through per-chunk partial rows, one per ``PARTIAL_ELEMENTS``
#: input elements (at most ``MAX_PARTIALS``): a function of the input's size only, so the
#: gradients come out bit-identical on any number of threads (1 or torch's count, in a
#: DataLoader worker or not). Each row is one work item of the team.
PARTIAL_ELEMENTS = 1 << 16
MAX_PARTIALS = 64


def _stream_from() -> int:
    """Default of :data:`STREAM_FROM`: ``NORMLAB_STREAM_MB`` if set, else half the
    level-3 cache."""
    return mebibytes("NORMLAB_STREAM_MB", last_level_cache_bytes() // 2)


#: Outputs (y, dx) of at least this many bytes are written with streaming stores (see
#: ``_kernels``: whole cache lines straight to memory, without first reading each line
#: in). At half the level-3 cache a pass's input and output no longer fit in it, so
#: ordinary stores would only add that read. Measured on the 2-core benchmark machine
#: (32 MiB L3), 25.7 MB float32 outputs, in-process A/B: every output pass 1.1-1.3x
#: faster. Read once, at import (``NORMLAB_STREAM_MB`` overrides; a huge value turns
#: streaming off).
STREAM_FROM = _stream_from()


#: Output runs (elements written with one set of coefficients: a plane, a row) shorter
#: than this many bytes are written with ordinary stores even in a streamed output: a
#: streamed run starts and ends with ordinary stores up to a line boundary, which on
#: short runs take most of it. Measured at module level (2 threads, 18-26 MB float32
#: GroupNorm/InstanceNorm NCHW, streamed against ordinary stores): planes of 49 and 81
#: elements 1.1-1.3x slower streamed, 100 even, 144 to 784 1.0-1.4x faster. bfloat16
#: (GroupNorm NCHW forward, 19-26 MB, in-process): 7x7 and 14x14 planes (98 and 392
#: bytes) 1.28x and 1.19x slower streamed, 10x10 even, 12x12 (288 bytes, not streamed)
#: 1.04-1.05x faster streamed, 16x16 (512) even -- the byte threshold holds.
STREAM_MIN_RUN = 512


def _streams(out: torch.Tensor, run: int | None = None) -> bool:
    """Whether a pass writes ``out`` with streaming stores: at least ``STREAM_FROM`` bytes,
    in runs of ``run`` elements of at least ``STREAM_MIN_RUN`` bytes (None: long runs,
    e.g. channels-last tiles)."""
    size = out.element_size()
    return out.numel() * size >= STREAM_FROM and (run is None or run * size >= STREAM_MIN_RUN)


def _run_of(plan: Plan) -> int | None:
    """Elements a grouped-view write loop writes per run (a plane of S, else a row of K);
    None for the channels-last view (tiles of rows)."""
    if plan.kind != "grouped":
        return None
    _, _, kk, s, _ = plan.dims
    return s if s > 1 else kk


def _partials(groups: int, numel: int) -> int:
    return max(1, min(groups, MAX_PARTIALS, numel // PARTIAL_ELEMENTS))


def plan_of(x: torch.Tensor, spec: NormSpec) -> Plan | None:
    """The kernel plan for ``x``, or None when the kernels don't cover it."""
    layout = layout_of(x)
    if layout is None:
        return None
    return plan_for(spec, layout)


@dataclass(frozen=True)
class _Call:
    """What a kernel call needs that depends only on (spec, layout, dtype):
    looked up once per configuration, so a call on a small input pays for little more
    than the kernel (see ``SERIAL_BELOW``)."""

    plan: Plan
    cdt: torch.dtype  # compute dtype: float32 or float64
    npdt: type  # its NumPy scalar type
    stat_shape: tuple[int, ...]
    stats_shape: tuple[int, ...]  # (3, *stat_shape): mean, var, rstd in one buffer
    grads_shape: tuple[int, ...]  # (2, *param_shape): dweight, dbias in one buffer
    param_shape: tuple[int, ...]  # weight's (and each gradient's) shape
    groups: int  # number of statistics
    memory_format: torch.memory_format  # x's layout, for dy
    numel: int
    partials: int  # rows of dweight/dbias partial sums (grouped kernels)
    short_groups: bool  # groups the tile-phased forward takes (see _short_groups)
    short_rows_backward: bool  # rows the tile-phased backward takes (see SHORT_ROW_BACKWARD)
    unbias: float  # count / (count - 1): the running variance's correction (0 for count <= 1)
    memory_order: bool  # BatchNorm's planes visited in memory order with batch statistics (see _memory_order)
    storage: str  # x's dtype as the team bodies are compiled for it (``_STORAGE``)
    fixed_view: tuple[int, int, int, int] | None  # (O, C, I, B) of per-channel fixed statistics (see _fixed_view)
    write_run: int | None  # elements the output passes write per run (see _run_of, _streams)

    #: :meth:`forward` takes per-channel fixed statistics as (C,) tensors as well as
    #: broadcastable ones (see ``normlab.core.autograd.normalize``)
    takes_channel_stats: ClassVar[bool] = True

    @property
    def serial(self) -> bool:
        """Small input: the calling thread only (``SERIAL_BELOW`` read per call)."""
        return self.numel < SERIAL_BELOW

    @property
    def small(self) -> bool:
        """A small input the ``*_at`` kernels run on the calling thread
        (:func:`_serial_grouped_forward`)."""
        return self.numel < SERIAL_BELOW and self.plan.kind == "grouped"

    @property
    def at(self) -> bool:
        """The forward with batch statistics and the backward of this configuration run
        on the ``*_at`` kernels (:func:`_forward_at`, :func:`_backward_at`), which read
        every dtype ``accepts()`` lets in (16-bit floats as their bits), where they can
        start its threads: a small input has none; others need the OpenMP runtime (see
        ``team.team_at``)."""
        return self.numel < SERIAL_BELOW or team.uses_openmp()

    # The backend contract (:func:`forward`, :func:`backward`) for inputs of this
    # configuration: ``cpu.accepts`` hands this object to ``select_backend``, so a call
    # need not look it up again (on a small input each lookup costs about as much as a
    # tenth of the kernels' work).

    def forward(self, x, weight, bias, spec: NormSpec, eps: float, fixed_mean=None, fixed_var=None, running=None):
        """:func:`forward` of an input of this configuration."""
        if torch.compiler.is_compiling():
            return forward(x, weight, bias, spec, eps, fixed_mean, fixed_var, running)
        if fixed_var is None:  # (as forward_impl; one call level less)
            if self.small:
                return _serial_grouped_forward(self, x, weight, bias, spec, eps, running)
            if self.at:
                return _forward_at(self, x, weight, bias, spec, eps, running)
        elif self.at and (stats := _fixed_stats_at(self, spec, fixed_mean, fixed_var)) is not None:
            return _fixed_forward_at(self, x, weight, bias, spec, eps, *stats)
        return forward_impl(x, weight, bias, spec, eps, fixed_mean, fixed_var, call=self, running=running)

    def backward(self, dy, x, weight, mean, rstd, spec: NormSpec, batch_statistics: bool,
                 needs_input_grad=(True, True, True)):
        """:func:`backward` of an input of this configuration."""
        if torch.compiler.is_compiling():
            return backward(dy, x, weight, mean, rstd, spec, batch_statistics, needs_input_grad)
        if dy.dtype == x.dtype:  # (as backward_impl; one call level less)
            if self.small:
                return _serial_grouped_backward(self, dy, x, weight, mean, rstd, spec, batch_statistics,
                                                needs_input_grad)
            if self.at:
                return _backward_at(self, dy, x, weight, mean, rstd, spec, batch_statistics, needs_input_grad)
        return backward_impl(dy, x, weight, mean, rstd, spec, batch_statistics, needs_input_grad, call=self)


#: 16-bit floats reach the kernels as their raw bits (see the module docstring).
_BITS = {torch.bfloat16: np.uint16, torch.float16: np.int16}
#: x's storage dtype as the team bodies are compiled for it (``_kernels.body_address``).
_STORAGE = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
            torch.float16: "float16"}


def _launch(name: str, dtype: str, items: int, threads: int, args: tuple) -> None:
    """Run the team body of kernel ``name`` (see ``_kernels.body_address``) for x's
    storage ``dtype`` over ``range(items)`` on up to ``threads`` threads."""
    team.launch(_body(name, dtype), *team.job(items, threads, args))


#: NumPy scalar type of each compute dtype.
_NUMPY_OF = {torch.float32: np.float32, torch.float64: np.float64}


@lru_cache(maxsize=512)
def call_for(spec: NormSpec, layout: str, dtype: torch.dtype) -> _Call | None:
    """The kernels' call for inputs of ``spec``, ``layout`` (see ``plan.layout_of``) and
    ``dtype`` -- with this backend's ``forward``/``backward`` bound to them -- or None
    when no kernel covers them. Cached per configuration."""
    plan = plan_for(spec, layout)
    if plan is None:
        return None
    cdt = compute_dtype(dtype)
    fmt = torch.contiguous_format
    if layout == "channels_last":
        fmt = torch.channels_last if len(spec.input_shape) == 4 else torch.channels_last_3d
    numel = math.prod(spec.input_shape)
    groups = plan.dims[1] if plan.kind == "grouped" else plan.dims[0] * plan.dims[2]
    return _Call(plan, cdt, _NUMPY_OF[cdt],
                 spec.stat_shape, (3, *spec.stat_shape), (2, *spec.param_shape), spec.param_shape, groups, fmt,
                 numel=numel,
                 partials=_partials(plan.dims[1], numel) if plan.kind == "grouped" else 0,
                 short_groups=_short_groups(plan),
                 short_rows_backward=_short_rows_backward(plan, numel * dtype.itemsize),
                 unbias=spec.count / (spec.count - 1) if spec.count > 1 else 0.0,
                 memory_order=_memory_order(plan, dtype.itemsize),
                 storage=_STORAGE[dtype if dtype in _BITS else cdt],
                 fixed_view=_fixed_view(spec, layout),
                 write_run=_run_of(plan))


def _short_groups(plan: Plan) -> bool:
    """Whether the tile-phased kernels take this plan (``_kernels.short_groups_forward``):
    grouped view with one slab per group (A = 1), and rows of at most ``SHORT_GROUP``
    elements with one affine over the row (G = 1; not GroupNorm on (N, C)) or groups of
    planes (S > 1) of at most ``SHORT_PLANES`` elements."""
    if plan.kind != "grouped":
        return False
    a, _, k, s, g = plan.dims
    if s == 1:
        return a == 1 and g == 1 and k <= SHORT_GROUP
    return a == 1 and k * s <= SHORT_PLANES


def _short_rows_backward(plan: Plan, nbytes: int) -> bool:
    """Whether the tile-phased backward takes this plan (see ``SHORT_ROW_BACKWARD``):
    LayerNorm/RMSNorm rows of at most that many elements whose x, dy and dx (``nbytes``
    each) fit in the last-level cache."""
    if plan.kind != "grouped":
        return False
    a, _, k, s, g = plan.dims
    return a == s == g == 1 and k <= SHORT_ROW_BACKWARD and 3 * nbytes <= last_level_cache_bytes()


def _fixed_view(spec: NormSpec, layout: str) -> tuple[int, int, int, int] | None:
    """How ``_kernels.fixed_forward_at`` views inputs of ``spec`` with fixed statistics:
    ``(O, C, I, B)``, x as (O, C, I) -- planes (N, C, H*W) in contiguous memory, rows of
    C channels (N*H*W, C) in channels_last or for (N, C) -- and B row blocks of the
    rows. None unless the affine is on dim 1 of the input's own shape (BatchNorm,
    InstanceNorm; not GroupNorm, nor LayerNorm over more than one dim)."""
    shape = spec.input_shape
    if spec.feature_dims != (1,) or spec.group_shape != shape or len(shape) < 2:
        return None
    n, c, inner = shape[0], shape[1], math.prod(shape[2:])
    if layout == "channels_last" or inner == 1:
        n, inner = n * inner, 1
    return n, c, inner, row_blocks(n, c) if inner == 1 else 1


def _call_of(x: torch.Tensor, spec: NormSpec) -> _Call:
    layout = layout_of(x)
    call = None if layout is None else call_for(spec, layout, x.dtype)
    if call is None:
        raise ValueError(f"cpu-numba: no kernel for {spec.family} on input of shape "
                         f"{tuple(x.shape)} and strides {x.stride()}")
    return call


#: (n, fill, NumPy dtype) -> the array and a tensor sharing its memory.
_FILLED: dict[tuple[int, float, type], tuple[np.ndarray, torch.Tensor]] = {}


def _filled_pair(n: int, fill: float, npdt: type) -> tuple[np.ndarray, torch.Tensor]:
    """A cached array of ``n`` copies of ``fill`` (absent weight/bias/mean; never
    written), with a tensor over the same memory for the by-address kernels."""
    key = (n, fill, npdt)
    pair = _FILLED.get(key)
    if pair is None:
        if len(_FILLED) > 256:
            _FILLED.clear()
        arr = np.full(n, fill, dtype=npdt)
        pair = _FILLED[key] = (arr, torch.from_numpy(arr))
    return pair


def _filled(n: int, fill: float, npdt: type) -> np.ndarray:
    return _filled_pair(n, fill, npdt)[0]


def _stat_input(stat: torch.Tensor | None, call: _Call) -> np.ndarray:
    """Per-group values (groups,) of a statistic given broadcastable to ``stat_shape``."""
    if stat is None:
        return _filled(call.groups, 0.0, call.npdt)
    if stat.dtype == call.cdt and stat.numel() == call.groups and stat.is_contiguous():
        # batch statistics as forward returned them (any shape with stat_shape's number of
        # elements that broadcasts to it lists them in the same order)
        return stat.numpy(force=True).reshape(-1)
    return torch.broadcast_to(stat.detach().to(call.cdt), call.stat_shape).reshape(-1).contiguous().numpy()


def forward_impl(x, weight, bias, spec: NormSpec, eps: float, fixed_mean=None, fixed_var=None,
                 out: torch.Tensor | None = None, call: _Call | None = None, running: RunningStats | None = None):
    """:func:`normlab.backends.reference.forward` on the kernels (eager, no dispatcher).

    ``out`` (float32/float64 inputs only): a preallocated output of x's shape, dtype
    and layout to write y into -- the benchmark's kernel-level timing uses it.
    ``call``: x's configuration, when the caller has it already. ``running``: see the
    reference; small inputs update it inside the forward kernel. Fixed statistics may
    also be per channel, shaped (C,) (see ``NormSpec.channel_view``).
    """
    if call is None:
        call = _call_of(x, spec)
    cdt, plan = call.cdt, call.plan
    if fixed_var is None and out is None:
        if call.small:
            return _serial_grouped_forward(call, x, weight, bias, spec, eps, running)
        if call.at:
            return _forward_at(call, x, weight, bias, spec, eps, running)
    elif out is None and call.at and (stats := _fixed_stats_at(call, spec, fixed_mean, fixed_var)) is not None:
        return _fixed_forward_at(call, x, weight, bias, spec, eps, *stats)
    xc = x if x.dtype == cdt or x.dtype in _BITS else x.to(cdt)  # 16-bit: decoded in the kernels
    y = out if out is not None and xc is x else outputs.empty_like(xc)
    # the kernels' arguments as tensors (their addresses are cheaper to take than NumPy
    # views: see team.job)
    w = _param_at(weight, call, 1.0)[0]
    b = _param_at(bias, call, 0.0)[0]
    fixed = fixed_var is not None
    if fixed:
        fixed_mean, fixed_var = spec.channel_view(fixed_mean), spec.channel_view(fixed_var)
        var = fixed_var.to(cdt)
        rstd = _fixed_rstd(var, eps)
        mean = fixed_mean.to(cdt) if fixed_mean is not None else None
        mean_in, var_out, rstd_in = _stat_at(mean, call)[0], _filled_pair(0, 0.0, call.npdt)[1], _stat_at(rstd, call)[0]
    else:
        # one allocation for the three statistics (a small input pays per torch call)
        stats = torch.empty(call.stats_shape, dtype=cdt)
        mean, var, rstd = mean_in, var_out, rstd_in = stats.unbind()
    threads = 1 if call.serial else torch.get_num_threads()
    dtype = _STORAGE[xc.dtype]
    if _memory_order(plan, xc.element_size(), fixed):
        _planes_forward(xc, y, w, b, plan, eps, spec.center, fixed, mean_in, var_out, rstd_in, threads)
    elif plan.kind == "grouped":
        a, p, kk, s, g = plan.dims
        _launch("dispatch_grouped_forward", dtype, p, threads,
                (xc, y, w, b, a, p, kk, s, g, float(eps), spec.center, not fixed, call.short_groups,
                 mean_in, var_out, rstd_in, _streams(y, call.write_run)))
    elif not fixed and plan.blocks == 1:
        # one work item per sample: statistics and output in one sweep
        n, s, g, kk = plan.dims
        _launch("cl_forward_fused", dtype, n, threads,
                (xc, y, w, b, n, s, g, kk, float(eps), mean_in, var_out, rstd_in, _streams(y)))
    else:
        _cl_forward_blocks(xc, y, w, b, plan, eps, fixed, mean_in, var_out, rstd_in, threads)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    fold_running_stats(running, mean, var, spec.count)
    return y, (mean if spec.center else None), var, rstd


#: BatchNorm's planes (NCHW: the H*W values of one sample and channel) of at most this
#: many bytes are visited in memory order with batch statistics (see
#: ``_kernels.planes_sums``): in channel order they are runs too short for the hardware
#: to stream. Measured at 2 threads, float32, forward / forward+backward
#: (``benchmarks/cpu/memory_order.py``): (32, 2048, 7, 7) 1.80x / 1.97x faster, (32, 1024,
#: 14, 14) 1.18x / 1.15x, (32, 512, 16, 16) 0.96x / 1.05x, (32, 256, 28, 28) 0.95x / 0.95x.
SMALL_PLANE_BYTES = 1024


def _memory_order(plan: Plan, itemsize: int, fixed: bool = False) -> bool:
    """Whether a per-channel grouped view (BatchNorm on NCHW: A > 1 samples, K = 1,
    planes of more than one element) of x's ``itemsize`` bytes per element is visited
    in memory order: with fixed statistics always (one pass, which then reads and
    writes in order: 1.05-1.27x faster from 7x7 to 112x112 planes), with batch
    statistics when its planes are small."""
    if plan.kind != "grouped":
        return False
    a, _, kk, s, _ = plan.dims
    return a > 1 and kk == 1 and 1 < s and (fixed or s * itemsize <= SMALL_PLANE_BYTES)


def _planes_forward(x, y, w, b, plan: Plan, eps, center, fixed, mean, var, rstd, threads):
    """Forward of a per-channel grouped view in memory order (``_kernels.planes_*``):
    with batch statistics, the rough means and per-sample plane sums first, then the
    channels' statistics (written into mean/var/rstd) and output coefficients; with
    fixed ones, the coefficients from mean and rstd. Then the output pass."""
    a, p, _, s, _ = plan.dims
    dtype = _STORAGE[x.dtype]
    mc, ca, cb = torch.empty((3, p), dtype=rstd.dtype).unbind()  # y = (x - mc) * ca + cb
    psd, psq = np.empty((2, 0 if fixed else a, p))
    if not fixed:
        _launch("planes_rough_means", dtype, p, threads, (x, p, s, center, mc))
        _launch("planes_sums", dtype, a, threads, (x, a, p, s, mc, psd, psq))
    _launch("planes_coefficients", dtype, p, threads,
            (x, psd, psq, a, p, s, float(eps), center, not fixed, w, b, mc, mean, var, rstd, ca, cb))
    _launch("planes_apply", dtype, a * p, threads, (x, y, p, s, mc, ca, cb, _streams(y, s)))


def _planes_backward(dy, x, w, mean, rstd, plan: Plan, center, batch_statistics, need_dx, dx, threads):
    """Backward of a per-channel grouped view in memory order (``_kernels.planes_*``):
    per-sample plane sums, then dweight/dbias and the dx coefficients per channel, then
    (if ``need_dx``) dx. Returns dweight and dbias as (1, C) float64 partial rows."""
    a, p, _, s, _ = plan.dims
    dtype = _STORAGE[x.dtype]
    psdy, psdyx = np.empty((2, a, p))
    _launch("planes_grad_sums", dtype, a, threads, (dy, x, a, p, s, mean, psdy, psdyx))
    dwp, dbp = np.empty((2, 1, p))
    mc, ca, cb, cc = torch.empty((4, p), dtype=rstd.dtype).unbind()  # dx = ca * dy + cb * (x - mc) + cc
    _launch("planes_dx_coefficients", dtype, p, threads,
            (psdy, psdyx, a, p, s, center, batch_statistics, w, mean, rstd, dwp, dbp, mc, ca, cb, cc))
    if need_dx:
        _launch("planes_dx", dtype, a, threads, (dy, x, dx, p, s, mc, ca, cb, cc, _streams(dx, s)))
    return dwp, dbp


def _serial_grouped_forward(call: _Call, x, weight, bias, spec: NormSpec, eps: float,
                            running: RunningStats | None = None):
    """:func:`forward_impl` of a small input in the grouped view with batch statistics --
    every training step of a small layer -- in as few Python and torch calls as the
    kernel allows: each one costs about as much as the kernel's own work at this size,
    so the kernel is entered with the tensors' addresses (see ``_kernels.grouped_forward_at``),
    and updates the running statistics too where it can (see :func:`_running_at`)."""
    y = torch.empty_like(x)
    # one NumPy allocation and one from_numpy per statistic: cheaper than torch.empty + unbind
    mean = torch.from_numpy(np.empty(call.stat_shape, call.npdt))
    var = torch.from_numpy(np.empty(call.stat_shape, call.npdt))
    rstd = torch.from_numpy(np.empty(call.stat_shape, call.npdt))
    w, w_at = _param_at(weight, call, 1.0)
    b, b_at = _param_at(bias, call, 0.0)
    a, p, kk, s, g = call.plan.dims
    fused, running_mean_at, running_var_at, like_r, momentum = _running_args(running, call)
    runtime.kernels().grouped_forward_at(x.data_ptr(), y.data_ptr(), w_at, b_at, mean.data_ptr(), var.data_ptr(),
                                         rstd.data_ptr(), _LIKE[x.dtype], _LIKE[call.cdt], a, p, kk, s, g,
                                         float(eps), spec.center, call.short_groups, running_mean_at, running_var_at,
                                         like_r, momentum, call.unbias)
    return _forward_result(spec, running, fused, y, mean, var, rstd)


def _forward_result(spec: NormSpec, running: RunningStats | None, fused, y, mean, var, rstd):
    """``(y, mean, var, rstd)`` of a by-address forward, with the running statistics
    marked as updated (``fused``: the kernel wrote them) or updated here."""
    if fused:  # written in place: bump the version counters as an in-place torch op would
        running_mean, running_var, _ = running
        torch.autograd.graph.increment_version((running_var,) if running_mean is None else (running_mean, running_var))
    else:
        fold_running_stats(running, mean, var, spec.count)
    return y, (mean if spec.center else None), var, rstd


def _forward_at(call: _Call, x, weight, bias, spec: NormSpec, eps: float, running: RunningStats | None = None):
    """:func:`forward_impl` with batch statistics where the by-address kernels take it
    (see :attr:`_Call.at`; small grouped inputs: :func:`_serial_grouped_forward`): one
    kernel call with the tensors' addresses (``_kernels.grouped_forward_team_at``,
    ``planes_forward_at``, ``cl_forward_at``) that starts its own teams and updates the
    running statistics too where it can (see :func:`_running_at`). On a ~1 MB input,
    building each launch in Python cost as much as the kernel."""
    serial = call.serial
    y = torch.empty_like(x) if serial else outputs.empty_like(x)
    # one NumPy allocation and one from_numpy per statistic: cheaper than torch.empty + unbind
    mean = torch.from_numpy(np.empty(call.stat_shape, call.npdt))
    var = torch.from_numpy(np.empty(call.stat_shape, call.npdt))
    rstd = torch.from_numpy(np.empty(call.stat_shape, call.npdt))
    w, w_at = _param_at(weight, call, 1.0)
    b, b_at = _param_at(bias, call, 0.0)
    fused, running_mean_at, running_var_at, like_r, momentum = _running_args(running, call)
    addresses = (x.data_ptr(), y.data_ptr(), w_at, b_at, mean.data_ptr(), var.data_ptr(), rstd.data_ptr(),
                 _LIKE[call.cdt])
    threads = 1 if serial else torch.get_num_threads()
    stream = not serial and _streams(y, call.write_run)
    if call.memory_order:
        a, p, _, s, _ = call.plan.dims
        runtime.kernels().planes_forward_at(*addresses, a, p, s, float(eps), spec.center, running_mean_at,
                                            running_var_at, like_r, momentum, call.unbias,
                                            _team("planes_rough_means", call, p, threads),
                                            _team("planes_sums", call, a, threads),
                                            _team("planes_coefficients", call, p, threads),
                                            _team("planes_apply", call, a * p, threads), stream)
    elif call.plan.kind == "grouped":
        a, p, kk, s, g = call.plan.dims
        runtime.kernels().grouped_forward_team_at(*addresses, a, p, kk, s, g, float(eps), spec.center,
                                                  call.short_groups, running_mean_at, running_var_at, like_r,
                                                  momentum, call.unbias,
                                                  _team("dispatch_grouped_forward", call, p, threads), stream)
    else:
        n, s, g, kk = call.plan.dims
        stats_team, apply_team = _cl_teams(call, threads, "cl_forward_fused", "cl_stats", "cl_apply")
        runtime.kernels().cl_forward_at(*addresses, n, s, g, kk, call.plan.blocks, float(eps), running_mean_at,
                                        running_var_at, like_r, momentum, call.unbias, stats_team, apply_team, stream)
    return _forward_result(spec, running, fused, y, mean, var, rstd)


def _fixed_stats_at(call: _Call, spec: NormSpec, fixed_mean: torch.Tensor | None,
                    fixed_var: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """``(mean, var)`` as ``_kernels.fixed_forward_at`` reads fixed statistics -- one
    dense value per channel in the compute dtype, shaped (C,) (as the functional API
    passes the running statistics) or ``spec.affine_shape`` -- or None where it does not
    take them: a configuration without a per-channel view (``_Call.fixed_view``),
    statistics of another shape (they broadcast differently: :func:`forward_impl`'s general path),
    statistics not on the CPU or not contiguous, functorch transforms. Statistics in
    another dtype (a bfloat16 model's running statistics) are converted to the compute
    dtype, as the general path converts them."""
    if call.fixed_view is None or torch._C._are_functorch_transforms_active():
        return None
    channels = call.fixed_view[1]
    for stat in (fixed_var,) if fixed_mean is None else (fixed_mean, fixed_var):
        if (stat.shape != (channels,) and stat.shape != spec.affine_shape) or not stat.is_cpu \
                or not stat.is_contiguous():  # ((C,) first: how the layers pass them)
            return None
    if fixed_var.dtype != call.cdt:
        fixed_var = fixed_var.to(call.cdt)
    if fixed_mean is not None and fixed_mean.dtype != call.cdt:
        fixed_mean = fixed_mean.to(call.cdt)
    return fixed_mean, fixed_var


def _fixed_forward_at(call: _Call, x, weight, bias, spec: NormSpec, eps: float, fixed_mean, fixed_var):
    """:func:`forward_impl` with fixed statistics as :func:`_fixed_stats_at` gives them --
    every eval-mode BatchNorm/InstanceNorm call -- in one kernel call with the tensors'
    addresses (``_kernels.fixed_forward_at``): rstd, the coefficients and the output.
    Returns those statistics (the caller's own where they were in the compute dtype, as
    the reference returns them) and rstd of their shape."""
    serial = call.serial
    y = torch.empty_like(x) if serial else outputs.empty_like(x)
    rstd = torch.from_numpy(np.empty(spec.affine_shape, call.npdt))
    w, w_at = _param_at(weight, call, 1.0)
    b, b_at = _param_at(bias, call, 0.0)
    o, c, i, blocks = call.fixed_view
    mean = _filled_pair(c, 0.0, call.npdt)[1] if fixed_mean is None else fixed_mean  # (absent: zeros)
    mean_at = mean.data_ptr()
    threads = 1 if serial else torch.get_num_threads()
    apply_team = _team("planes_apply", call, o * c, threads) if i > 1 else _team("cl_apply", call, blocks, threads)
    runtime.kernels().fixed_forward_at(x.data_ptr(), y.data_ptr(), w_at, b_at, mean_at, fixed_var.data_ptr(),
                                       rstd.data_ptr(), _LIKE[call.cdt], o, c, i, blocks, float(eps), apply_team,
                                       not serial and _streams(y, i if i > 1 else None))
    return y, fixed_mean, fixed_var, rstd


def _fixed_rstd(var: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(var + eps)`` of fixed statistics, as ``_kernels.fixed_forward_at``
    computes it (``_kernels.fixed_rstd``): the Python-launched path gives the same bits."""
    rstd = torch.empty(var.shape, dtype=var.dtype)
    runtime.kernels().fixed_rstd(var.detach().reshape(-1).numpy(force=True), float(eps), rstd.numpy().reshape(-1))
    return rstd


def _team(name: str, call: _Call, items: int, threads: int) -> tuple[int, int, int, int]:
    """The ``team`` of a by-address kernel (see ``team.team_at``) running team body
    ``name`` over ``range(items)`` on up to ``threads`` threads."""
    return team.team_at(_body(name, call.storage), items, threads)


def _cl_teams(call: _Call, threads: int, fused: str, first: str, second: str) -> tuple[tuple, tuple]:
    """The two teams of a channels-last by-address kernel (``cl_forward_at``,
    ``cl_backward_at``): with one block per sample, none and body ``fused`` over the
    samples; else bodies ``first`` and ``second`` over the (sample, block) items."""
    n, nb = call.plan.dims[0], call.plan.blocks
    if nb == 1:
        return team.NO_TEAM, _team(fused, call, n, threads)
    return _team(first, call, n * nb, threads), _team(second, call, n * nb, threads)


#: (team body, storage dtype) -> the body's address (``_kernels.body_address``).
_BODIES: dict[tuple[str, str], int] = {}


def _body(name: str, storage: str) -> int:
    """The address of team body ``name`` for x's ``storage`` dtype (compiled on first use)."""
    address = _BODIES.get((name, storage))
    if address is None:
        address = _BODIES[name, storage] = runtime.kernels().body_address(name, storage)
    return address


def _running_args(running: RunningStats | None, call: _Call) -> tuple[bool, int, int, np.ndarray, float]:
    """The running-statistics arguments of a by-address forward kernel: ``(fused,
    running_mean's address, running_var's address, their ``_LIKE`` storage, momentum)``
    as :func:`_running_at` gives them when the kernel can update them in place
    (``fused``), else ``(False, 0, 0, <compute dtype's>, 0.0)``: the kernel leaves them to
    the caller (:func:`_forward_result`)."""
    fused = running is not None and _running_at(running, call)
    if not fused:
        return False, 0, 0, _LIKE[call.cdt], 0.0
    return (True, *fused, float(running[2]))


def _running_at(running: RunningStats, call: _Call) -> tuple[int, int, np.ndarray] | None:
    """(running_mean's address or 0 if absent, running_var's address, the buffers'
    ``_LIKE`` storage) when the forward kernel can update the running statistics in
    place: buffers as :func:`_in_place_buffers` takes them, in the call's compute dtype
    or one computed in it (a bfloat16/float16 model's, read and written as their bits
    by ``_kernels.update_running``), and one statistic per channel (K = 1). Else None
    (the caller then updates them after the kernel: :func:`_forward_result`)."""
    running_mean, running_var, _ = running
    dims = call.plan.dims
    kk, g = (dims[2], dims[4]) if call.plan.kind == "grouped" else (dims[3], dims[2])
    if kk != 1 or running_var is None:
        return None
    dtype = running_var.dtype
    if dtype not in _LIKE or compute_dtype(dtype) != call.cdt or \
            _in_place_buffers(running_mean, running_var, dtype, g) is None:
        return None
    return (0 if running_mean is None else running_mean.data_ptr()), running_var.data_ptr(), _LIKE[dtype]


def _in_place_buffers(running_mean, running_var, dtype: torch.dtype, channels: int) -> tuple[torch.Tensor, ...] | None:
    """The running-statistics buffers given -- ``(running_var,)`` or ``(running_mean,
    running_var)`` -- when a kernel may write them by address: plain dense CPU tensors of
    ``dtype`` with ``channels`` values each, outside functorch transforms (which may have
    batched them into wrappers without storage); else None."""
    if running_var is None or torch._C._are_functorch_transforms_active():
        return None
    buffers = (running_var,) if running_mean is None else (running_mean, running_var)
    for t in buffers:
        if type(t) is not torch.Tensor or t.dtype != dtype or not t.is_cpu or t.is_inference() \
                or not t.is_contiguous() or t.numel() != channels:
            return None
    return buffers


def _cl_forward_blocks(x, y, w, b, plan: Plan, eps, fixed, mean, var, rstd, threads):
    """Channels-last forward over row blocks (BatchNorm, or fixed statistics): per-block
    (count, mean, M2), merged, then the output pass with per-(sample, channel)
    coefficients (``_kernels.cl_coefficients``). Writes the statistics into the tensors
    mean/var/rstd when not fixed (else reads mean and rstd)."""
    n, s, g, kk = plan.dims
    nb = plan.blocks
    dtype = _STORAGE[x.dtype]
    parts = np.empty((3, 0 if fixed else n * nb, g))  # count, mean, M2 per block
    if not fixed:
        _launch("cl_stats", dtype, n * nb, threads, (x, n, s, g, kk, nb, parts[0], parts[1], parts[2]))
    coefficients = np.empty((3, n, g * kk), _NUMPY_OF[w.dtype])  # mc, sc, sh
    mc, sc, sh = coefficients
    arrays = [t.numpy(force=True).reshape(-1) for t in (w, b, mean, var, rstd)]  # (the kernel is called from Python)
    runtime.kernels().cl_coefficients(parts[0], parts[1], parts[2], n, nb, g, kk, float(eps), fixed, *arrays,
                                      mc, sc, sh)
    _launch("cl_apply", dtype, n * nb, threads, (x, y, mc, sc, sh, n, s, g * kk, nb, _streams(y)))


def backward_impl(dy, x, weight, mean, rstd, spec: NormSpec, batch_statistics: bool,
                  needs_input_grad=(True, True, True), call: _Call | None = None):
    """:func:`normlab.backends.reference.backward` on the kernels (``call``: see
    :func:`forward_impl`)."""
    if call is None:
        call = _call_of(x, spec)
    cdt, plan = call.cdt, call.plan
    if dy.dtype == x.dtype:
        if call.small:
            return _serial_grouped_backward(call, dy, x, weight, mean, rstd, spec, batch_statistics,
                                            needs_input_grad)
        if call.at:
            return _backward_at(call, dy, x, weight, mean, rstd, spec, batch_statistics, needs_input_grad)
    need_dx, need_dw, need_db = needs_input_grad
    if x.dtype in _BITS and dy.dtype == x.dtype:
        xc = x
    else:
        xc = x if x.dtype == cdt else x.to(cdt)
        if dy.dtype != cdt:
            dy = dy.to(cdt)
    dy = dy.contiguous(memory_format=call.memory_format)  # x's memory order (no-op if it has it)
    w = _param_at(weight, call, 1.0)[0]  # tensors: see forward_impl
    mean_in = _stat_at(mean, call)[0]
    rstd_in = _stat_at(rstd, call)[0]
    dx = outputs.empty_like(xc) if need_dx else None
    dx_out = dx if need_dx else _filled_pair(0, 0.0, call.npdt)[1]  # (empty: never written)
    grads = torch.empty(call.grads_shape, dtype=cdt)  # dweight, dbias
    threads = 1 if call.serial else torch.get_num_threads()
    dtype = _STORAGE[xc.dtype]
    channels = plan.channels
    if _memory_order(plan, xc.element_size()):
        dwp, dbp = _planes_backward(dy, xc, w, mean_in, rstd_in, plan, spec.center, batch_statistics, need_dx,
                                    dx_out, threads)
    elif plan.kind == "grouped":
        a, p, kk, s, g = plan.dims
        t = call.partials
        dwp, dbp = np.zeros((2, t, channels))
        _launch("dispatch_grouped_backward", dtype, t, threads,
                (dy, xc, w, mean_in, rstd_in, a, p, kk, s, g, spec.center, batch_statistics, need_dx, t,
                 call.short_rows_backward, dx_out, dwp, dbp, _streams(dx_out, call.write_run)))
    elif plan.blocks == 1:
        n, s, g, kk = plan.dims
        dwp, dbp = np.empty((2, n, channels))
        _launch("cl_backward_fused", dtype, n, threads,
                (dy, xc, w, mean_in, rstd_in, n, s, g, kk, spec.center, batch_statistics, need_dx, dwp, dbp,
                 dx_out, _streams(dx_out)))
    else:
        dwp, dbp = _cl_backward_blocks(dy, xc, w, mean_in, rstd_in, plan, spec.center, batch_statistics,
                                       need_dx, dx_out, dtype, threads)
    k = runtime.kernels()
    dw_np, db_np = grads.numpy().reshape(2, -1)
    k.sum_partials(dwp, dbp, dw_np, db_np)
    if dx is not None and dx.dtype != x.dtype:
        dx = dx.to(x.dtype)
    dw, db = grads.unbind()
    return dx, (dw if need_dw else None), (db if need_db else None)


def _serial_grouped_backward(call: _Call, dy, x, weight, mean, rstd, spec: NormSpec,
                             batch_statistics: bool, needs_input_grad):
    """:func:`backward_impl` of a small input in the grouped view (dy in x's dtype), in
    as few Python and torch calls as possible (see :func:`_serial_grouped_forward`)."""
    need_dx, need_dw, need_db = needs_input_grad
    if not dy.is_contiguous():  # e.g. an expanded gradient: the kernel reads x's order
        dy = dy.contiguous()
    w, w_at = _param_at(weight, call, 1.0)
    mean, mean_at = _stat_at(mean, call)
    rstd, rstd_at = _stat_at(rstd, call)
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.from_numpy(np.empty(call.param_shape, call.npdt))
    db = torch.from_numpy(np.empty(call.param_shape, call.npdt))
    a, p, kk, s, g = call.plan.dims
    runtime.kernels().grouped_backward_at(dy.data_ptr(), x.data_ptr(), w_at, mean_at, rstd_at,
                                          dx.data_ptr() if need_dx else 0, dw.data_ptr(), db.data_ptr(),
                                          _LIKE[x.dtype], _LIKE[call.cdt], a, p, kk, s, g, spec.center,
                                          batch_statistics, need_dx, call.partials, call.short_rows_backward)
    return dx, (dw if need_dw else None), (db if need_db else None)


def _backward_at(call: _Call, dy, x, weight, mean, rstd, spec: NormSpec, batch_statistics: bool, needs_input_grad):
    """:func:`backward_impl` where the by-address kernels take it (dy in x's dtype; see
    :attr:`_Call.at`; small grouped inputs: :func:`_serial_grouped_backward`), in one
    kernel call that starts its own teams (see :func:`_forward_at`)."""
    need_dx, need_dw, need_db = needs_input_grad
    if not dy.is_contiguous(memory_format=call.memory_format):  # e.g. an expanded gradient: x's order
        dy = dy.contiguous(memory_format=call.memory_format)
    w, w_at = _param_at(weight, call, 1.0)
    mean, mean_at = _stat_at(mean, call)
    rstd, rstd_at = _stat_at(rstd, call)
    serial = call.serial
    threads = 1 if serial else torch.get_num_threads()
    dx = None
    if need_dx:
        dx = torch.empty_like(x) if serial else outputs.empty_like(x)
    dw = torch.from_numpy(np.empty(call.param_shape, call.npdt))
    db = torch.from_numpy(np.empty(call.param_shape, call.npdt))
    addresses = (dy.data_ptr(), x.data_ptr(), w_at, mean_at, rstd_at, dx.data_ptr() if need_dx else 0,
                 dw.data_ptr(), db.data_ptr(), _LIKE[call.cdt])
    stream = need_dx and not serial and _streams(dx, call.write_run)
    if call.memory_order:
        a, p, _, s, _ = call.plan.dims
        runtime.kernels().planes_backward_at(*addresses, a, p, s, spec.center, batch_statistics, need_dx,
                                             _team("planes_grad_sums", call, a, threads),
                                             _team("planes_dx_coefficients", call, p, threads),
                                             _team("planes_dx", call, a, threads), stream)
    elif call.plan.kind == "grouped":
        a, p, kk, s, g = call.plan.dims
        runtime.kernels().grouped_backward_team_at(*addresses, a, p, kk, s, g, spec.center, batch_statistics,
                                                   need_dx, call.partials, call.short_rows_backward,
                                                   _team("dispatch_grouped_backward", call, call.partials, threads),
                                                   stream)
    else:
        n, s, g, kk = call.plan.dims
        sums_team, dx_team = _cl_teams(call, threads, "cl_backward_fused", "cl_grad_sums", "cl_dx")
        runtime.kernels().cl_backward_at(*addresses, n, s, g, kk, call.plan.blocks, spec.center, batch_statistics,
                                         need_dx, sums_team, dx_team, stream)
    return dx, (dw if need_dw else None), (db if need_db else None)


#: Empty arrays whose dtype selects the ``*_at`` kernels' specialization: x's as the
#: kernels see it (16-bit floats as their bits) and the compute dtype's.
_LIKE = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64),
         torch.bfloat16: np.empty(0, np.uint16), torch.float16: np.empty(0, np.int16)}

def _param_at(p: torch.Tensor | None, call: _Call, fill: float) -> tuple[torch.Tensor, int]:
    """(tensor, address) of a weight/bias as the ``*_at`` kernels read it: ``channels``
    dense values in the compute dtype (``fill`` when absent). The caller keeps the
    tensor alive during the kernel call."""
    if p is None:
        p = _filled_pair(call.plan.channels, fill, call.npdt)[1]
        return p, p.data_ptr()
    if p.numel() != call.plan.channels:  # the kernel reads that many values from the address
        raise ValueError(f"cpu-numba: expected a weight/bias of {call.plan.channels} values, "
                         f"got shape {tuple(p.shape)}")
    if p.dtype != call.cdt or not p.is_contiguous():
        p = p.detach().to(call.cdt).contiguous()
    return p, p.data_ptr()


def _stat_at(stat: torch.Tensor | None, call: _Call) -> tuple[torch.Tensor, int]:
    """(tensor, address) of a per-group statistic for the ``*_at`` kernels: ``groups``
    dense values in the compute dtype; see :func:`_stat_input` for what is accepted."""
    if stat is None:  # RMSNorm's mean
        stat = _filled_pair(call.groups, 0.0, call.npdt)[1]
    elif stat.dtype != call.cdt or stat.numel() != call.groups or not stat.is_contiguous():
        stat = torch.from_numpy(_stat_input(stat, call))
    return stat, stat.data_ptr()


def _cl_backward_blocks(dy, x, w, mean, rstd, plan: Plan, center, batch_statistics, need_dx, dx, dtype,
                        threads):
    """Channels-last backward over row blocks (BatchNorm): per-block gradient sums, then
    (if ``need_dx``) dx with per-(sample, channel) coefficients
    (``_kernels.cl_dx_coefficients``). Returns the (blocks, C) partial sums of dweight
    and dbias."""
    n, s, g, kk = plan.dims
    nb = plan.blocks
    c = g * kk
    psdy, psdyx = np.empty((2, n * nb, c))
    _launch("cl_grad_sums", dtype, n * nb, threads, (dy, x, mean, rstd, n, s, g, kk, nb, psdy, psdyx))
    if need_dx:
        coefficients = np.empty((4, n, c), _NUMPY_OF[w.dtype])  # mc, ca, cb, cc
        mc, ca, cb, cc = coefficients
        arrays = [t.numpy(force=True).reshape(-1) for t in (w, mean, rstd)]  # (the kernel is called from Python)
        runtime.kernels().cl_dx_coefficients(psdy, psdyx, n, s, nb, g, kk, center, batch_statistics, *arrays,
                                             mc, ca, cb, cc)
        _launch("cl_dx", dtype, n * nb, threads, (dy, x, mc, ca, cb, cc, n, s, c, nb, dx, _streams(dx)))
    return psdyx, psdy


def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float) -> bool:
    """:func:`normlab.core.stats.update_running_stats` in one kernel call, installed with
    :func:`~normlab.core.stats.set_running_stats_kernel`. A small layer's training step
    otherwise pays three torch ops (~12 us), a 16-bit model's two more conversions.

    Takes plain CPU running tensors of one dtype, ``running_var`` given, and statistics
    in its compute dtype: float32 for bfloat16/float16 buffers, which are updated in
    float64 and rounded through float32 (see ``_kernels.update_running``). Measured on
    one step of 64 channels: the float16 buffers came out equal to torch.nn's; torch.nn's
    bfloat16 buffers were an ulp off the correctly rounded update in about half the
    channels, these in none. Returns False for anything else. The running tensors'
    version counters are bumped as an in-place torch op would, so autograd still
    notices if a graph saved them."""
    if running_var is None or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False  # (vmap/grad: buffers or statistics may be batched wrappers without storage)
    forced = getenv("NORMLAB_BACKEND")
    if forced and forced != "cpu-numba":  # another backend forced: its torch ops do it
        return False
    dtype = running_var.dtype
    if dtype not in _LIKE or mean.dtype != compute_dtype(dtype) or var.dtype != mean.dtype or not mean.is_cpu \
            or not (mean.is_contiguous() and var.is_contiguous()):
        return False
    channels = running_var.shape[0]
    running = _in_place_buffers(running_mean, running_var, dtype, channels)
    if running is None:
        return False
    # by address: a BatchNorm step's four NumPy views cost more than the update itself
    runtime.kernels().update_running_at(running_mean.data_ptr() if running_mean is not None else 0,
                                        running_var.data_ptr(), mean.data_ptr(), var.data_ptr(), _LIKE[dtype],
                                        _LIKE[mean.dtype], mean.numel() // channels, channels, float(momentum),
                                        count / (count - 1))
    torch.autograd.graph.increment_version(running)
    return True


def forward(x, weight, bias, spec: NormSpec, eps: float, fixed_mean=None, fixed_var=None, running=None):
    """Backend entry (see :func:`normlab.backends.reference.forward`)."""
    if torch.compiler.is_compiling():
        from . import ops

        out = ops.forward(x, weight, bias, spec, eps, fixed_mean, fixed_var)
        fold_running_stats(running, out[1], out[2], spec.count)
        return out
    return forward_impl(x, weight, bias, spec, eps, fixed_mean, fixed_var, running=running)


def backward(dy, x, weight, mean, rstd, spec: NormSpec, batch_statistics: bool,
             needs_input_grad=(True, True, True)):
    """Backend entry (see :func:`normlab.backends.reference.backward`)."""
    if torch.compiler.is_compiling():
        from . import ops

        return ops.backward(dy, x, weight, mean, rstd, spec, batch_statistics, needs_input_grad)
    return backward_impl(dy, x, weight, mean, rstd, spec, batch_statistics, needs_input_grad)
