"""Per-channel statistics: BatchNorm, and the fixed-statistics (eval) path of
BatchNorm and InstanceNorm.

x is viewed as (N, C, S) through its strides (S = prod(spatial)), which covers
contiguous NCHW (stride_s = 1) and channels_last (stride_c = 1) without copies. The
R = N*S values of one channel are split into ``splits`` ranges of rows; a program
owns a tile of channels x one range, and runs up to three phases::

    PARTIAL:  per (split, channel) (mean_k, M2_k) over the split's rows: a Welford
              update per (row lane, channel) element over the full tiles, the lanes
              merged once at the end, the partial last tile merged by Chan's formula
              (delta = mean_b - mean_a, n = n_a + n_b,
               mean = mean_a + delta * n_b / n, M2 = M2_a + M2_b + delta^2 n_a n_b / n)
    MERGE:    each program of a channel tile merges its share of the tile's channels
              over all splits: mean = mean_0 + sum n_k (mean_k - mean_0) / R (about
              split 0's mean: a large offset costs no accuracy, unlike a running mean
              updated split by split), M2 = sum M2_k + sum n_k (mean_k - mean)^2 ->
              var = M2 / R, rstd
    FINISH:   y = (x - mean[c]) * (w[c] * rstd[c]) + b[c] over the program's rows,
              last tile first

On a GPU the three phases are one cooperative launch (all programs resident, a
barrier per channel tile between phases), so the apply re-reads rows this program has
just read, often from L2; elsewhere (the interpreter runs programs one at a time) each
phase is a launch of the same kernel. The apply keeps ``x - mean`` explicit instead of
``x * scale + shift`` so that an input with a large offset loses no accuracy (SPEC §5).

Backward, the same phases::

    PARTIAL:  per (split, channel) sum(dy), sum(dy * xhat)
    MERGE:    the sums over the splits (dbias = sum(dy), dweight = sum(dy * xhat);
              deterministic, no atomics on data)
    FINISH:   dx = w rstd (dy - sum(dy)/R - xhat sum(dy xhat)/R)   batch statistics
                   w rstd dy                                        fixed statistics
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (
    FINISH,
    MERGE,
    PARTIAL,
    TUNING,
    cdiv,
    column_sums,
    device_guard,
    dummy,
    fsum,
    merge_step,
    num_programs,
    phase_barrier,
    pow2,
    resident_programs,
    resident_target,
    run_phases,
    stats_buffers,
    tile_launch,
)

__all__ = ["channel_forward", "channel_apply", "channel_backward"]


@triton.jit
def _tile_offsets(r, S, stride_n, stride_s):
    """Memory offsets of rows r (flattened (n, s)) of an (N, C, S) strided view."""
    n = r // S
    return n * stride_n + (r - n * S) * stride_s


@triton.jit
def _welford(X, cols, cmask, r_start, r_end, S, sxn, sxc, sxs,
             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(count, mean, M2) per channel of rows [r_start, r_end): tile statistics are
    two-pass in registers and merged by Chan's formula (two reductions across threads
    a tile; :func:`_welford_lanes` avoids them)."""
    # (a count of r_start * 0.0, not 0.0: the loop-carried count must be a tensor from the start)
    return _welford_from(X, cols, cmask, r_start, r_end, S, sxn, sxc, sxs, r_start * 0.0,
                         tl.full([BLOCK_C], 0.0, tl.float32), tl.full([BLOCK_C], 0.0, tl.float32),
                         BLOCK_R, BLOCK_C)


@triton.jit
def _welford_from(X, cols, cmask, r_start, r_end, S, sxn, sxc, sxs, cnt, mean, m2,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """:func:`_welford` continued from the statistics (cnt, mean, m2) of other rows."""
    for start in range(r_start, r_end, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        mask = (r < r_end)[:, None] & cmask[None, :]
        x = tl.load(X + _tile_offsets(r, S, sxn, sxs)[:, None] + cols[None, :] * sxc,
                    mask=mask, other=0.0).to(tl.float32)
        nb = tl.minimum(r_end - start, BLOCK_R).to(tl.float32)
        mb = fsum(x, axis=0) / nb
        d = tl.where(mask, x - mb[None, :], 0.0)
        tot = cnt + nb
        delta = mb - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + fsum(d * d, axis=0) + delta * delta * (cnt * nb / tot)
        cnt = tot
    return cnt, mean, m2


@triton.jit
def _welford_lanes(X, cols, cmask, r_start, r_end, S, sxn, sxc, sxs,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """:func:`_welford` with no reduction across threads per tile: over the full tiles
    of [r_start, r_end) each (row lane, channel) element keeps its own Welford update
    (every lane has seen the same count, so the step's 1/count is one scalar); the lanes
    are merged once at the end (mean = average of lane means, M2 = sum of lane M2s +
    count_lane * sum((lane mean - mean)^2)), then the partial last tile is merged in."""
    full = (r_end - r_start) // BLOCK_R
    lane_mean = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    lane_m2 = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    for i in range(0, full):
        r = r_start + i * BLOCK_R + tl.arange(0, BLOCK_R)
        x = tl.load(X + _tile_offsets(r, S, sxn, sxs)[:, None] + cols[None, :] * sxc,
                    mask=cmask[None, :], other=0.0).to(tl.float32)
        delta = x - lane_mean
        lane_mean += delta * (1.0 / (i + 1.0))
        lane_m2 += delta * (x - lane_mean)
    mean = fsum(lane_mean, axis=0) / BLOCK_R
    d = lane_mean - mean[None, :]
    per_lane = full * 1.0
    m2 = fsum(lane_m2, axis=0) + per_lane * fsum(d * d, axis=0)
    return _welford_from(X, cols, cmask, r_start + full * BLOCK_R, r_end, S, sxn, sxc, sxs,
                         per_lane * BLOCK_R, mean, m2, BLOCK_R, BLOCK_C)


@triton.jit
def _grad_sums(X, DY, cols, cmask, mean, rstd, r_start, r_end, S, sxn, sxc, sxs, sdn, sdc, sds,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per channel sum(dy) and sum(dy * xhat) over rows [r_start, r_end)."""
    # 2D accumulators, reduced once at the end (fewer cross-thread reductions).
    sdy = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    sdyx = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    for start in range(r_start, r_end, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        mask = (r < r_end)[:, None] & cmask[None, :]
        x = tl.load(X + _tile_offsets(r, S, sxn, sxs)[:, None] + cols[None, :] * sxc,
                    mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + _tile_offsets(r, S, sdn, sds)[:, None] + cols[None, :] * sdc,
                     mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
        sdy += dy
        sdyx += dy * xhat
    return fsum(sdy, axis=0), fsum(sdyx, axis=0)


@triton.jit
def _apply_tile(X, Y, r, cols, mask, S, mean, scale, shift, sxn, sxc, sxs, syn, syc, sys,
                HAS_B: tl.constexpr):
    """y = (x - mean) * scale (+ shift) on one (rows r) x (cols) tile."""
    x = tl.load(X + _tile_offsets(r, S, sxn, sxs)[:, None] + cols[None, :] * sxc,
                mask=mask, other=0.0).to(tl.float32)
    y = (x - mean[None, :]) * scale[None, :]
    if HAS_B:
        y = y + shift[None, :]
    tl.store(Y + _tile_offsets(r, S, syn, sys)[:, None] + cols[None, :] * syc,
             y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _apply_rows(X, Y, W, B, cols, cmask, mean, rstd, r_start, r_end, S, sxn, sxc, sxs, syn, syc, sys,
                HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr):
    """y = (x - mean) * rstd * w + b over rows [r_start, r_end) of columns ``cols``
    (mean, rstd per column), last tile first: after a statistics pass over the same
    rows, those are the likeliest still in L2."""
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        shift = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        shift = scale  # unused
    tiles = (r_end - r_start + BLOCK_R - 1) // BLOCK_R
    for i in range(0, tiles):
        r = r_start + (tiles - 1 - i) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (r < r_end)[:, None] & cmask[None, :]
        _apply_tile(X, Y, r, cols, mask, S, mean, scale, shift, sxn, sxc, sxs, syn, syc, sys, HAS_B)


@triton.jit
def _dx_tile(X, DY, DX, r, cols, mask, S, mean, rstd, scale, c1, c2,
             sxn, sxc, sxs, sdn, sdc, sds, son, soc, sos, BATCH_STATS: tl.constexpr):
    """dx = scale * (dy - c1 - xhat * c2) (batch statistics) or scale * dy on one tile."""
    dy = tl.load(DY + _tile_offsets(r, S, sdn, sds)[:, None] + cols[None, :] * sdc,
                 mask=mask, other=0.0).to(tl.float32)
    if BATCH_STATS:
        x = tl.load(X + _tile_offsets(r, S, sxn, sxs)[:, None] + cols[None, :] * sxc,
                    mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        dx = scale[None, :] * (dy - c1[None, :] - xhat * c2[None, :])
    else:
        dx = scale[None, :] * dy
    tl.store(DX + _tile_offsets(r, S, son, sos)[:, None] + cols[None, :] * soc,
             dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _merge_stats(PMean, PM2, cols, cmask, C, R, rows_per_split, splits,
                 BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """(mean, var) per column ``cols`` from the (mean, M2) partials of ``splits`` row
    ranges ((splits, C) contiguous), BLOCK_K splits at a time: the mean as split 0's
    mean plus the count-weighted offsets of the others (accurate for a large offset),
    then M2 = sum(M2_k) + sum(n_k (mean_k - mean)^2)."""
    shift = tl.load(PMean + cols, mask=cmask, other=0.0)
    offset = tl.full([BLOCK_K, BLOCK_C], 0.0, tl.float32)
    for k0 in range(0, splits, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = (k < splits)[:, None] & cmask[None, :]
        nb = tl.minimum(rows_per_split, R - k * rows_per_split).to(tl.float32)[:, None]
        pm = tl.load(PMean + k[:, None] * C + cols[None, :], mask=mask, other=0.0)
        offset += tl.where(mask, nb * (pm - shift[None, :]), 0.0)
    mean = shift + fsum(offset, axis=0) / R
    m2 = tl.full([BLOCK_K, BLOCK_C], 0.0, tl.float32)
    for k0 in range(0, splits, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = (k < splits)[:, None] & cmask[None, :]
        nb = tl.minimum(rows_per_split, R - k * rows_per_split).to(tl.float32)[:, None]
        d = tl.load(PMean + k[:, None] * C + cols[None, :], mask=mask, other=0.0) - mean[None, :]
        m2 += tl.where(mask, tl.load(PM2 + k[:, None] * C + cols[None, :], mask=mask, other=0.0) + nb * d * d,
                       0.0)
    return mean, fsum(m2, axis=0) / R


@triton.jit
def _chan_merge_kernel(PMean, PM2, Mean, Var, Rstd, C, R, rows_per_split, splits, eps,
                       BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Mean, var and rstd per column from per-split partials (:func:`_merge_stats`);
    the GroupNorm split path's merge."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, var = _merge_stats(PMean, PM2, cols, cmask, C, R, rows_per_split, splits, BLOCK_K, BLOCK_C)
    tl.store(Mean + cols, mean, mask=cmask)
    tl.store(Var + cols, var, mask=cmask)
    tl.store(Rstd + cols, tl.rsqrt(var + eps), mask=cmask)


# One kernel per direction in phases (PARTIAL, MERGE, FINISH: see _common); the
# programs of a channel tile -- its splits -- meet at each barrier.


@triton.jit
def _merge_share(c_tile, ps, C, BLOCK_C: tl.constexpr, MERGE_C: tl.constexpr):
    """Columns (and mask) of the MERGE_C channels program ``ps`` merges for its tile."""
    j = ps * MERGE_C + tl.arange(0, MERGE_C)
    cols = c_tile * BLOCK_C + j
    return cols, (j < BLOCK_C) & (cols < C)


@triton.jit
def _chan_fwd_kernel(X, Y, W, B, PMean, PM2, Mean, Var, Rstd, Arrived, C, S, R,
                     sxn, sxc, sxs, syn, syc, sys, rows_per_split, splits, eps,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, PHASES: tl.constexpr, SYNC: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, MERGE_C: tl.constexpr):
    """BatchNorm forward of a (channel tile, split of rows) program: PARTIAL writes its
    rows' (mean, M2) per channel, MERGE the merged mean/var/rstd of its share of the
    tile's channels, FINISH y over its rows (also alone: the fixed-statistics apply)."""
    c_tile = tl.program_id(0)
    ps = tl.program_id(1)
    cols = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    r_start = ps * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    if PHASES & PARTIAL:
        _cnt, pmean, pm2 = _welford_lanes(X, cols, cmask, r_start, r_end, S, sxn, sxc, sxs, BLOCK_R, BLOCK_C)
        tl.store(PMean + ps * C + cols, pmean, mask=cmask)
        tl.store(PM2 + ps * C + cols, pm2, mask=cmask)
        phase_barrier(Arrived + c_tile, splits, SYNC)
    if PHASES & MERGE:
        mcols, mmask = _merge_share(c_tile, ps, C, BLOCK_C, MERGE_C)
        mean, var = _merge_stats(PMean, PM2, mcols, mmask, C, R, rows_per_split, splits, BLOCK_K, MERGE_C)
        tl.store(Mean + mcols, mean, mask=mmask)
        tl.store(Var + mcols, var, mask=mmask)
        tl.store(Rstd + mcols, tl.rsqrt(var + eps), mask=mmask)
        phase_barrier(Arrived + c_tile, 2 * splits, SYNC)
    if PHASES & FINISH:
        _apply_rows(X, Y, W, B, cols, cmask, tl.load(Mean + cols, mask=cmask, other=0.0),
                    tl.load(Rstd + cols, mask=cmask, other=0.0), r_start, r_end, S,
                    sxn, sxc, sxs, syn, syc, sys, HAS_W, HAS_B, BLOCK_R)


@triton.jit
def _chan_bwd_kernel(X, DY, DX, Mean, Rstd, W, PSdy, PSdyx, Sdy, Sdyx, Arrived, C, S, R, inv_count,
                     sxn, sxc, sxs, sdn, sdc, sds, son, soc, sos, rows_per_split, splits,
                     HAS_W: tl.constexpr, BATCH_STATS: tl.constexpr, PHASES: tl.constexpr, SYNC: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, MERGE_C: tl.constexpr):
    """BatchNorm backward of a (channel tile, split of rows) program: PARTIAL writes its
    rows' sum(dy), sum(dy * xhat) per channel, MERGE the sums over all splits of its
    share of the tile's channels (dbias, dweight), FINISH dx over its rows (also alone:
    fixed statistics, dx = w rstd dy)."""
    c_tile = tl.program_id(0)
    ps = tl.program_id(1)
    cols = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    r_start = ps * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    if PHASES & PARTIAL:
        mean = tl.load(Mean + cols, mask=cmask, other=0.0)
        rstd = tl.load(Rstd + cols, mask=cmask, other=0.0)
        sdy, sdyx = _grad_sums(X, DY, cols, cmask, mean, rstd, r_start, r_end, S, sxn, sxc, sxs,
                               sdn, sdc, sds, BLOCK_R, BLOCK_C)
        tl.store(PSdy + ps * C + cols, sdy, mask=cmask)
        tl.store(PSdyx + ps * C + cols, sdyx, mask=cmask)
        phase_barrier(Arrived + c_tile, splits, SYNC)
    if PHASES & MERGE:
        mcols, mmask = _merge_share(c_tile, ps, C, BLOCK_C, MERGE_C)
        tl.store(Sdy + mcols, column_sums(PSdy, splits, C, mcols, mmask, BLOCK_K, MERGE_C), mask=mmask)
        tl.store(Sdyx + mcols, column_sums(PSdyx, splits, C, mcols, mmask, BLOCK_K, MERGE_C), mask=mmask)
        phase_barrier(Arrived + c_tile, 2 * splits, SYNC and (PHASES & FINISH))
    if PHASES & FINISH:
        rstd = tl.load(Rstd + cols, mask=cmask, other=0.0)
        scale = rstd
        if HAS_W:
            scale = scale * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        if BATCH_STATS:
            mean = tl.load(Mean + cols, mask=cmask, other=0.0)
            c1 = tl.load(Sdy + cols, mask=cmask, other=0.0) * inv_count
            c2 = tl.load(Sdyx + cols, mask=cmask, other=0.0) * inv_count
        else:  # unused
            mean = rstd
            c1 = rstd
            c2 = rstd
        tiles = (r_end - r_start + BLOCK_R - 1) // BLOCK_R
        for i in range(0, tiles):  # last tile first: likeliest still in L2
            r = r_start + (tiles - 1 - i) * BLOCK_R + tl.arange(0, BLOCK_R)
            mask = (r < r_end)[:, None] & cmask[None, :]
            _dx_tile(X, DY, DX, r, cols, mask, S, mean, rstd, scale, c1, c2,
                     sxn, sxc, sxs, sdn, sdc, sds, son, soc, sos, BATCH_STATS)


def _tile(c: int, channel_stride: int, itemsize: int = 4) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): for channels_last (channel stride 1) put up to 64 adjacent
    channels in a tile so loads are coalesced along C; otherwise few channels and
    long runs along the contiguous spatial axis. A tile holds ``TUNING.channel_tile``
    float32's worth of bytes: twice the elements for 16-bit inputs (measured on an
    H100: bfloat16 channels_last BatchNorm forward 41 -> 32 us at (32, 64, 56, 56))."""
    tile = pow2(TUNING.channel_tile * 4 // itemsize)
    block_c = min(pow2(c), 64 if channel_stride == 1 else 4, tile)
    return max(1, tile // block_c), block_c


def _splits(r: int, c_blocks: int, block_r: int, programs: int) -> tuple[int, int]:
    """(rows_per_split, splits): about ``programs`` programs over all channel tiles,
    each at least one tile of rows; rows_per_split a multiple of block_r."""
    want = max(1, programs // c_blocks)
    rows_per_split = cdiv(cdiv(r, want), block_r) * block_r
    return rows_per_split, cdiv(r, rows_per_split)


class _Plan(NamedTuple):
    """Launch shape of the per-channel kernels for one input shape and layout."""

    block_r: int
    block_c: int
    c_blocks: int
    rows_per_split: int
    splits: int
    merge_c: int  # channels of a tile each program merges
    block_k: int  # splits a merging program reads per step
    sync: bool  # all phases in one cooperative launch


@functools.lru_cache(maxsize=512)
def _cached_plan(n: int, c: int, s: int, channels_last: bool, itemsize: int, programs: int, resident: int,
                 _tuning: tuple[int, ...]) -> _Plan:
    block_r, block_c = _tile(c, 1 if channels_last else 0, itemsize)
    c_blocks = cdiv(c, block_c)
    rows_per_split, splits = _splits(n * s, c_blocks, block_r, resident_target(programs, resident, c_blocks))
    merge_c = pow2(cdiv(block_c, splits))
    return _Plan(block_r, block_c, c_blocks, rows_per_split, splits, merge_c, merge_step(splits, merge_c),
                 sync=splits > 1 and c_blocks * splits <= resident)


def _plan(x3: torch.Tensor) -> _Plan:
    """The launch plan of (N, C, S) view x3, computed once per shape, layout, dtype
    size and device size (every call pays for host-side arithmetic: ~2 us per
    helper call on the H100 machine's CPU; keyed on the TUNING it reads)."""
    n, c, s = x3.shape
    return _cached_plan(n, c, s, x3.stride(1) == 1, x3.element_size(), num_programs(x3.device),
                        resident_programs(x3.device), (TUNING.channel_tile, TUNING.split_tile))


_ALL = (PARTIAL, MERGE, FINISH)


def _launch_forward(plan: _Plan, x3, y3, weight, bias, pmean, pm2, mean, var, rstd, arrived, eps: float,
                    phases: int, sync: bool) -> None:
    """One launch of :func:`_chan_fwd_kernel` over ``plan``'s grid."""
    n, c, s = x3.shape
    _chan_fwd_kernel[(plan.c_blocks, plan.splits)](
        x3, y3, weight if weight is not None else dummy(mean), bias if bias is not None else dummy(mean),
        pmean, pm2, mean, var, rstd, arrived, c, s, n * s, *x3.stride(), *y3.stride(),
        plan.rows_per_split, plan.splits, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, PHASES=phases, SYNC=sync,
        BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, BLOCK_K=plan.block_k, MERGE_C=plan.merge_c,
        **tile_launch(cooperative=sync),
    )


def channel_forward(x3: torch.Tensor, y3: torch.Tensor, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float, stat_shape: tuple[int, ...] | None = None):
    """BatchNorm of the (N, C, S) view x3 into y3; returns float32 per-channel
    (mean, var, rstd), contiguous, of ``stat_shape`` (default (C,)). One launch on a
    GPU (statistics, merge and apply with a barrier between them), else one per phase."""
    n, c, s = x3.shape
    plan = _plan(x3)
    mean, var, rstd = stats_buffers(3, c if stat_shape is None else stat_shape, x3)
    partials = torch.empty((2, plan.splits, c), device=x3.device, dtype=torch.float32)
    arrived = torch.zeros(plan.c_blocks, device=x3.device, dtype=torch.int32) if plan.sync else dummy(mean)

    def launch(phases: int, sync: bool) -> None:
        _launch_forward(plan, x3, y3, weight, bias, *partials.unbind(0), mean, var, rstd, arrived, eps, phases, sync)

    with device_guard(x3):
        run_phases(launch, x3.device, plan.sync, plan.splits == 1, _ALL)
    return mean, var, rstd


def channel_apply(x3: torch.Tensor, y3: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                  weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    """y3 = (x3 - mean[c]) * rstd[c] * w[c] + b[c] for (N, C, S) views; mean/rstd (C,) float32."""
    with device_guard(x3):  # the FINISH phase alone (mean stands in for the buffers it doesn't touch)
        _launch_forward(_plan(x3), x3, y3, weight, bias, mean, mean, mean, mean, rstd, mean, 0.0, FINISH, False)


def channel_backward(dy3: torch.Tensor, x3: torch.Tensor, dx3: torch.Tensor | None,
                     weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                     batch_statistics: bool, need_dwb: bool):
    """Backward of per-channel normalization of (N, C, S) views. Writes dx3 (if given);
    returns float32 ``(sum(dy), sum(dy * xhat))`` per channel when they were needed
    (for dbias, dweight, or dx with batch statistics), else (None, None). One launch on
    a GPU, else one per phase."""
    n, c, s = x3.shape
    plan = _plan(x3)
    need_sums = need_dwb or (dx3 is not None and batch_statistics)
    phases = (_ALL[:2] if need_sums else ()) + (_ALL[2:] if dx3 is not None else ())
    if not phases:  # nothing asked for (the FINISH phase alone would write into a dummy dx)
        return None, None
    sdy = sdyx = None
    partials = (dummy(rstd), dummy(rstd))
    if need_sums:
        partials = torch.empty((2, plan.splits, c), device=x3.device, dtype=torch.float32).unbind(0)
        sdy, sdyx = stats_buffers(2, c, x3)
    sync = need_sums and plan.sync
    arrived = torch.zeros(plan.c_blocks, device=x3.device, dtype=torch.int32) if sync else dummy(rstd)

    def launch(phase_bits: int, sync: bool) -> None:
        _chan_bwd_kernel[(plan.c_blocks, plan.splits)](
            x3, dy3, dx3 if dx3 is not None else dummy(x3), mean, rstd,
            weight if weight is not None else dummy(rstd), *partials,
            sdy if need_sums else dummy(rstd), sdyx if need_sums else dummy(rstd), arrived,
            c, s, n * s, 1.0 / (n * s), *x3.stride(), *dy3.stride(),
            *(dx3.stride() if dx3 is not None else (0, 0, 0)), plan.rows_per_split, plan.splits,
            HAS_W=weight is not None, BATCH_STATS=batch_statistics, PHASES=phase_bits, SYNC=sync,
            BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, BLOCK_K=plan.block_k, MERGE_C=plan.merge_c,
            **tile_launch(cooperative=sync),
        )

    with device_guard(x3):
        run_phases(launch, x3.device, sync, plan.splits == 1 or not need_sums, phases)
    return sdy, sdyx
