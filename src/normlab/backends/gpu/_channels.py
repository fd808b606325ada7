"""Per-channel statistics: BatchNorm, and the fixed-statistics (eval) path of
BatchNorm and InstanceNorm.

x is viewed as (N, C, S) through its strides (S = prod(spatial)), which covers
contiguous NCHW (stride_s = 1) and channels_last (stride_c = 1) without copies. The
R = N*S values of one channel are split into ``splits`` ranges of rows; a program
owns a tile of channels x one range.

Forward, batch statistics (three launches; one fused launch -- statistics then apply
in the same program -- when a single split per channel tile already fills the device,
i.e. small inputs)::

    partial:  per (split, channel) (mean_k, M2_k) over the split's rows; inside a
              split, tile statistics are merged by Chan's formula
              (delta = mean_b - mean_a, n = n_a + n_b,
               mean = mean_a + delta * n_b / n, M2 = M2_a + M2_b + delta^2 n_a n_b / n)
    merge:    per channel, over the splits, BLOCK_K splits at a time:
              mean = mean_0 + sum n_k (mean_k - mean_0) / R  (about split 0's mean: a
              large offset costs no accuracy, unlike a running mean updated split by
              split), M2 = sum M2_k + sum n_k (mean_k - mean)^2 -> var = M2 / R, rstd
    apply:    y = (x - mean[c]) * (w[c] * rstd[c]) + b[c]      (elementwise)

The apply keeps ``x - mean`` explicit instead of ``x * scale + shift`` so that an
input with a large offset loses no accuracy (SPEC §5).

Backward (likewise fused into one launch when there is a single split)::

    partial:  per (split, channel) sum(dy), sum(dy * xhat)   -> reduced over splits
              (dbias = sum(dy), dweight = sum(dy * xhat); deterministic, no atomics)
    dx:       w rstd (dy - sum(dy)/R - xhat sum(dy xhat)/R)   batch statistics
              w rstd dy                                        fixed statistics
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (
    LAUNCH,
    TUNING,
    cdiv,
    device_guard,
    dummy,
    fsum,
    num_programs,
    num_warps,
    pow2,
    split_blocks,
    split_sum,
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
    two-pass in registers and merged by Chan's formula. (Measured on an H100: as fast as
    or faster than per-lane Welford updates reduced once at the end, in both layouts.)"""
    cnt = 0.0
    mean = tl.full([BLOCK_C], 0.0, tl.float32)
    m2 = tl.full([BLOCK_C], 0.0, tl.float32)
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
def _chan_fused_fwd_kernel(X, Y, W, B, Mean, Var, Rstd, C, S, R, sxn, sxc, sxs, syn, syc, sys, eps,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One launch for when one program per channel tile is enough parallelism (small
    inputs, many channels): statistics over all R rows, then the apply."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    cnt, mean, m2 = _welford(X, cols, cmask, 0, R, S, sxn, sxc, sxs, BLOCK_R, BLOCK_C)
    var = m2 / cnt
    rstd = tl.rsqrt(var + eps)
    tl.store(Mean + cols, mean, mask=cmask)
    tl.store(Var + cols, var, mask=cmask)
    tl.store(Rstd + cols, rstd, mask=cmask)
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        shift = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        shift = scale  # unused
    for start in range(0, R, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        mask = (r < R)[:, None] & cmask[None, :]
        _apply_tile(X, Y, r, cols, mask, S, mean, scale, shift, sxn, sxc, sxs, syn, syc, sys, HAS_B)


@triton.jit
def _chan_fused_bwd_kernel(X, DY, DX, Mean, Rstd, W, Sdy, Sdyx, C, S, R, inv_count,
                           sxn, sxc, sxs, sdn, sdc, sds, son, soc, sos,
                           HAS_W: tl.constexpr, BATCH_STATS: tl.constexpr, NEED_DX: tl.constexpr,
                           NEED_SUMS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One launch per channel tile: sum(dy), sum(dy * xhat) over all rows (stored:
    dbias, dweight), then dx."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(Mean + cols, mask=cmask, other=0.0)
    rstd = tl.load(Rstd + cols, mask=cmask, other=0.0)
    c1 = tl.full([BLOCK_C], 0.0, tl.float32)
    c2 = tl.full([BLOCK_C], 0.0, tl.float32)
    if NEED_SUMS:
        sdy, sdyx = _grad_sums(X, DY, cols, cmask, mean, rstd, 0, R, S, sxn, sxc, sxs, sdn, sdc, sds,
                               BLOCK_R, BLOCK_C)
        tl.store(Sdy + cols, sdy, mask=cmask)
        tl.store(Sdyx + cols, sdyx, mask=cmask)
        c1 = sdy * inv_count
        c2 = sdyx * inv_count
    if NEED_DX:
        scale = rstd
        if HAS_W:
            scale = scale * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        for start in range(0, R, BLOCK_R):
            r = start + tl.arange(0, BLOCK_R)
            mask = (r < R)[:, None] & cmask[None, :]
            _dx_tile(X, DY, DX, r, cols, mask, S, mean, rstd, scale, c1, c2,
                     sxn, sxc, sxs, sdn, sdc, sds, son, soc, sos, BATCH_STATS)


@triton.jit
def _chan_partial_stats_kernel(X, PMean, PM2, C, S, R, sxn, sxc, sxs, rows_per_split,
                               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    ps = tl.program_id(1)
    r_start = ps * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    _cnt, mean, m2 = _welford(X, cols, cmask, r_start, r_end, S, sxn, sxc, sxs, BLOCK_R, BLOCK_C)
    tl.store(PMean + ps * C + cols, mean, mask=cmask)
    tl.store(PM2 + ps * C + cols, m2, mask=cmask)


@triton.jit
def _chan_merge_kernel(PMean, PM2, Mean, Var, Rstd, C, R, rows_per_split, splits, eps,
                       BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the (mean, M2) partials of ``splits`` row ranges per column, BLOCK_K splits
    at a time: the mean as split 0's mean plus the count-weighted offsets of the others
    (accurate for a large offset), then M2 = sum(M2_k) + sum(n_k (mean_k - mean)^2)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
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
    var = fsum(m2, axis=0) / R
    tl.store(Mean + cols, mean, mask=cmask)
    tl.store(Var + cols, var, mask=cmask)
    tl.store(Rstd + cols, tl.rsqrt(var + eps), mask=cmask)


@triton.jit
def _chan_apply_kernel(X, Y, Mean, Rstd, W, B, C, S, R, sxn, sxc, sxs, syn, syc, sys,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (r < R)[:, None] & cmask[None, :]
    mean = tl.load(Mean + cols, mask=cmask, other=0.0)
    scale = tl.load(Rstd + cols, mask=cmask, other=0.0)
    if HAS_W:
        scale = scale * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        shift = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        shift = scale  # unused
    _apply_tile(X, Y, r, cols, mask, S, mean, scale, shift, sxn, sxc, sxs, syn, syc, sys, HAS_B)


@triton.jit
def _chan_partial_grad_kernel(X, DY, Mean, Rstd, PSdy, PSdyx, C, S, R, sxn, sxc, sxs,
                              sdn, sdc, sds, rows_per_split,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    ps = tl.program_id(1)
    mean = tl.load(Mean + cols, mask=cmask, other=0.0)
    rstd = tl.load(Rstd + cols, mask=cmask, other=0.0)
    r_start = ps * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    sdy, sdyx = _grad_sums(X, DY, cols, cmask, mean, rstd, r_start, r_end, S, sxn, sxc, sxs,
                           sdn, sdc, sds, BLOCK_R, BLOCK_C)
    tl.store(PSdy + ps * C + cols, sdy, mask=cmask)
    tl.store(PSdyx + ps * C + cols, sdyx, mask=cmask)


@triton.jit
def _chan_dx_kernel(X, DY, DX, Mean, Rstd, W, Sdy, Sdyx, C, S, R, inv_count,
                    sxn, sxc, sxs, sdn, sdc, sds, son, soc, sos,
                    HAS_W: tl.constexpr, BATCH_STATS: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (r < R)[:, None] & cmask[None, :]
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
    apply_grid: tuple[int, int]
    merge_grid: tuple[int]
    merge_block_k: int
    merge_block_c: int
    merge_warps: int


@functools.lru_cache(maxsize=512)
def _cached_plan(n: int, c: int, s: int, channels_last: bool, itemsize: int, programs: int,
                 _tuning: int) -> _Plan:
    block_r, block_c = _tile(c, 1 if channels_last else 0, itemsize)
    c_blocks = cdiv(c, block_c)
    rows_per_split, splits = _splits(n * s, c_blocks, block_r, programs)
    block_k, merge_c = split_blocks(splits, c)
    return _Plan(block_r, block_c, c_blocks, rows_per_split, splits, (cdiv(n * s, block_r), c_blocks),
                 (cdiv(c, merge_c),), block_k, merge_c, num_warps(block_k * merge_c))


def _plan(x3: torch.Tensor) -> _Plan:
    """The launch plan of (N, C, S) view x3, computed once per shape, layout, dtype
    size and device size (every call pays for host-side arithmetic: ~2 us per
    helper call on the H100 machine's CPU; keyed on the TUNING it reads)."""
    n, c, s = x3.shape
    return _cached_plan(n, c, s, x3.stride(1) == 1, x3.element_size(), num_programs(x3.device),
                        TUNING.channel_tile)


def channel_forward(x3: torch.Tensor, y3: torch.Tensor, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float, stat_shape: tuple[int, ...] | None = None):
    """BatchNorm of the (N, C, S) view x3 into y3; returns float32 per-channel
    (mean, var, rstd), contiguous, of ``stat_shape`` (default (C,)). One launch when one program per channel tile
    fills the device (small inputs), else partial statistics, merge and apply."""
    n, c, s = x3.shape
    r = n * s
    plan = _plan(x3)
    mean, var, rstd = stats_buffers(3, c if stat_shape is None else stat_shape, x3)
    w = weight if weight is not None else dummy(mean)
    b = bias if bias is not None else dummy(mean)
    with device_guard(x3):
        if plan.splits == 1:
            _chan_fused_fwd_kernel[(plan.c_blocks,)](
                x3, y3, w, b, mean, var, rstd, c, s, r, *x3.stride(), *y3.stride(), eps,
                HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
                **tile_launch(),
            )
            return mean, var, rstd
        pmean, pm2 = torch.empty((2, plan.splits, c), device=x3.device, dtype=torch.float32).unbind(0)
        _chan_partial_stats_kernel[(plan.c_blocks, plan.splits)](
            x3, pmean, pm2, c, s, r, *x3.stride(), plan.rows_per_split,
            BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
            **tile_launch(),
        )
        _chan_merge_kernel[plan.merge_grid](
            pmean, pm2, mean, var, rstd, c, r, plan.rows_per_split, plan.splits, eps,
            BLOCK_K=plan.merge_block_k, BLOCK_C=plan.merge_block_c, num_warps=plan.merge_warps, **LAUNCH,
        )
        _apply(x3, y3, mean, rstd, weight, bias, plan)
    return mean, var, rstd


def channel_apply(x3: torch.Tensor, y3: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                  weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    """y3 = (x3 - mean[c]) * rstd[c] * w[c] + b[c] for (N, C, S) views; mean/rstd (C,) float32."""
    with device_guard(x3):
        _apply(x3, y3, mean, rstd, weight, bias, _plan(x3))


def _apply(x3, y3, mean, rstd, weight, bias, plan: _Plan) -> None:
    n, c, s = x3.shape
    _chan_apply_kernel[plan.apply_grid](
        x3, y3, mean, rstd, weight if weight is not None else dummy(mean),
        bias if bias is not None else dummy(mean), c, s, n * s, *x3.stride(), *y3.stride(),
        HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
        **tile_launch(),
    )


def channel_backward(dy3: torch.Tensor, x3: torch.Tensor, dx3: torch.Tensor | None,
                     weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                     batch_statistics: bool, need_dwb: bool):
    """Backward of per-channel normalization of (N, C, S) views. Writes dx3 (if given);
    returns float32 ``(sum(dy), sum(dy * xhat))`` per channel when they were needed
    (for dbias, dweight, or dx with batch statistics), else (None, None)."""
    n, c, s = x3.shape
    r = n * s
    plan = _plan(x3)
    block_r, block_c, c_blocks = plan.block_r, plan.block_c, plan.c_blocks
    need_sums = need_dwb or (dx3 is not None and batch_statistics)
    sdy = sdyx = None
    w = weight if weight is not None else dummy(rstd)
    dx_strides = dx3.stride() if dx3 is not None else (0, 0, 0)
    with device_guard(x3):
        if plan.splits == 1:
            if need_sums:
                sdy, sdyx = stats_buffers(2, c, x3)
            _chan_fused_bwd_kernel[(c_blocks,)](
                x3, dy3, dx3 if dx3 is not None else dummy(x3), mean, rstd, w,
                sdy if need_sums else dummy(rstd), sdyx if need_sums else dummy(rstd),
                c, s, r, 1.0 / r, *x3.stride(), *dy3.stride(), *dx_strides,
                HAS_W=weight is not None, BATCH_STATS=batch_statistics, NEED_DX=dx3 is not None,
                NEED_SUMS=need_sums, BLOCK_R=block_r, BLOCK_C=block_c,
                **tile_launch(),
            )
            return sdy, sdyx
        if need_sums:
            # sum(dy), sum(dy * xhat) per split
            partials = torch.empty((2, plan.splits, c), device=x3.device, dtype=torch.float32)
            _chan_partial_grad_kernel[(c_blocks, plan.splits)](
                x3, dy3, mean, rstd, *partials.unbind(0), c, s, r, *x3.stride(), *dy3.stride(),
                plan.rows_per_split, BLOCK_R=block_r, BLOCK_C=block_c,
                **tile_launch(),
            )
            sdy, sdyx = split_sum(partials).unbind(0)
        if dx3 is not None:
            _chan_dx_kernel[plan.apply_grid](
                x3, dy3, dx3, mean, rstd, w,
                sdy if need_sums else dummy(rstd), sdyx if need_sums else dummy(rstd),
                c, s, r, 1.0 / r, *x3.stride(), *dy3.stride(), *dx_strides,
                HAS_W=weight is not None, BATCH_STATS=batch_statistics,
                BLOCK_R=block_r, BLOCK_C=block_c,
                **tile_launch(),
            )
    return sdy, sdyx
