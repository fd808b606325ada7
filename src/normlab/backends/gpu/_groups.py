"""GroupNorm and InstanceNorm (batch statistics): one statistic per (sample, group).

x is viewed as (N, C, S) through its strides (contiguous NCHW or channels_last, no
copies); group g of sample n is the (Cg, S) block of channels g*Cg .. (g+1)*Cg - 1
(InstanceNorm: G = C, Cg = 1), walked in (BLOCK_C, BLOCK_S) tiles.

When there are enough groups (N*G >= half the programs that fill the device) one
program per (n, g) does everything in one launch:

Forward::

    pass 1: tile (count, mean, M2) merged by Chan's formula -> mean, var, rstd
    pass 2: y = (x - mean) * rstd * w[c] + b[c]

Backward, with g = dy * w[c] and xhat = (x - mean) * rstd::

    pass 1: sum(g), sum(g * xhat) over the group; per channel sum(dy) and
            sum(dy * xhat) into (N, C) partial buffers (summed over N at the end:
            dbias, dweight; deterministic, no atomics)
    pass 2: dx = rstd * (g - sum(g)/m - xhat * sum(g xhat)/m),   m = Cg * S

With few groups (small batches, e.g. N=1, G=32) each group's spatial range is split
over ``splits`` programs instead, like BatchNorm: partial (mean, M2) per (group,
split) -> Chan merge -> apply; backward: per (split, n, c) partial sums -> summed
(dbias, dweight, and the group sums of g, g xhat) -> dx. The same block helpers
serve both shapes of launch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._channels import _apply_rows, _chan_merge_kernel, _grad_sums, _tile_offsets, _welford_lanes
from ._channels import _splits as _channel_splits
from ._channels import _tile as _channel_tile
from ._common import (
    FINISH,
    LAUNCH,
    MERGE,
    PARTIAL,
    TUNING,
    cdiv,
    device_guard,
    dummy,
    fsum,
    merge_step,
    num_programs,
    num_warps,
    phase_barrier,
    pow2,
    resident_programs,
    resident_target,
    run_phases,
    split_blocks,
    split_sum,
    stats_buffers,
    tile_launch,
)

__all__ = ["group_forward", "group_backward"]


@triton.jit
def _welford_block(X, c_first, Cg, s_start, s_end, sxc, sxs,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(count, mean, M2) of channels c_first .. c_first+Cg-1, spatial [s_start, s_end)."""
    cnt = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, Cg, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < Cg
        nc = tl.minimum(Cg - c0, BLOCK_C)
        for s0 in range(s_start, s_end, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (ss < s_end)[None, :]
            x = tl.load(X + (c_first + cc)[:, None] * sxc + ss[None, :] * sxs,
                        mask=mask, other=0.0).to(tl.float32)
            nb = (nc * tl.minimum(s_end - s0, BLOCK_S)).to(tl.float32)
            mb = fsum(fsum(x, axis=1), axis=0) / nb
            d = tl.where(mask, x - mb, 0.0)
            tot = cnt + nb
            delta = mb - mean
            mean = mean + delta * (nb / tot)
            m2 = m2 + fsum(fsum(d * d, axis=1), axis=0) + delta * delta * (cnt * nb / tot)
            cnt = tot
    return cnt, mean, m2


@triton.jit
def _apply_block(X, Y, W, B, c_first, Cg, s_start, s_end, mean, rstd, sxc, sxs, syc, sys,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """y = (x - mean) * rstd * w[c] + b[c] on the block."""
    for c0 in range(0, Cg, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < Cg
        ch = c_first + cc
        scale = tl.full([BLOCK_C], 0.0, tl.float32) + rstd
        if HAS_W:
            scale = scale * tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)
        if HAS_B:
            shift = tl.load(B + ch, mask=cmask, other=0.0).to(tl.float32)
        for s0 in range(s_start, s_end, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (ss < s_end)[None, :]
            x = tl.load(X + ch[:, None] * sxc + ss[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * scale[:, None]
            if HAS_B:
                y = y + shift[:, None]
            tl.store(Y + ch[:, None] * syc + ss[None, :] * sys, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _grad_block(X, DY, W, PSdy, PSdyx, c_first, Cg, s_start, s_end, mean, rstd, sxc, sxs, sdc, sds,
                HAS_W: tl.constexpr, NEED_DWB: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per channel sum(dy), sum(dy * xhat) over the block, stored at PSdy/PSdyx + c
    (if NEED_DWB); returns the block's sum(g) and sum(g * xhat), g = w[c] dy."""
    c1 = 0.0
    c2 = 0.0
    for c0 in range(0, Cg, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < Cg
        ch = c_first + cc
        sdy = tl.full([BLOCK_C, BLOCK_S], 0.0, tl.float32)
        sdyx = tl.full([BLOCK_C, BLOCK_S], 0.0, tl.float32)
        for s0 in range(s_start, s_end, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (ss < s_end)[None, :]
            x = tl.load(X + ch[:, None] * sxc + ss[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + ch[:, None] * sdc + ss[None, :] * sds, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            sdy += dy
            sdyx += dy * xhat
        sdy_c = fsum(sdy, axis=1)
        sdyx_c = fsum(sdyx, axis=1)
        if NEED_DWB:
            tl.store(PSdy + ch, sdy_c, mask=cmask)
            tl.store(PSdyx + ch, sdyx_c, mask=cmask)
        # sum(g) = sum_c w[c] sum(dy)[c], likewise sum(g xhat)
        if HAS_W:
            w = tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)
            c1 += fsum(sdy_c * w, axis=0)
            c2 += fsum(sdyx_c * w, axis=0)
        else:
            c1 += fsum(sdy_c, axis=0)
            c2 += fsum(sdyx_c, axis=0)
    return c1, c2


@triton.jit
def _dx_block(X, DY, DX, W, c_first, Cg, s_start, s_end, mean, rstd, c1, c2,
              sxc, sxs, sdc, sds, soc, sos, HAS_W: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx = rstd * (w[c] dy - c1 - xhat * c2) on the block (c1, c2: group means)."""
    for c0 in range(0, Cg, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < Cg
        ch = c_first + cc
        scale = tl.full([BLOCK_C], 0.0, tl.float32) + rstd
        if HAS_W:
            scale = scale * tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)
        for s0 in range(s_start, s_end, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (ss < s_end)[None, :]
            x = tl.load(X + ch[:, None] * sxc + ss[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + ch[:, None] * sdc + ss[None, :] * sds, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            dx = scale[:, None] * dy - rstd * (c1 + xhat * c2)
            tl.store(DX + ch[:, None] * soc + ss[None, :] * sos, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _group_fwd_kernel(X, Y, W, B, Mean, Var, Rstd, G, Cg, S, sxn, sxc, sxs, syn, syc, sys, eps,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per (n, g): statistics, then y."""
    pid = tl.program_id(0)
    n = pid // G
    c_first = (pid - n * G) * Cg
    cnt, mean, m2 = _welford_block(X + n * sxn, c_first, Cg, 0, S, sxc, sxs, BLOCK_C, BLOCK_S)
    var = m2 / cnt
    rstd = tl.rsqrt(var + eps)
    tl.store(Mean + pid, mean)
    tl.store(Var + pid, var)
    tl.store(Rstd + pid, rstd)
    _apply_block(X + n * sxn, Y + n * syn, W, B, c_first, Cg, 0, S, mean, rstd, sxc, sxs, syc, sys,
                 HAS_W, HAS_B, BLOCK_C, BLOCK_S)


@triton.jit
def _group_bwd_kernel(X, DY, DX, W, Mean, Rstd, PSdy, PSdyx, C, G, Cg, S,
                      sxn, sxc, sxs, sdn, sdc, sds, son, soc, sos,
                      HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_DWB: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per (n, g): per-channel sums (into row n of the (N, C) partial
    buffers) and group sums, then dx."""
    pid = tl.program_id(0)
    n = pid // G
    c_first = (pid - n * G) * Cg
    mean = tl.load(Mean + pid)
    rstd = tl.load(Rstd + pid)
    c1, c2 = _grad_block(X + n * sxn, DY + n * sdn, W, PSdy + n * C, PSdyx + n * C, c_first, Cg, 0, S,
                         mean, rstd, sxc, sxs, sdc, sds, HAS_W, NEED_DWB, BLOCK_C, BLOCK_S)
    if NEED_DX:
        m = Cg * S * 1.0
        _dx_block(X + n * sxn, DY + n * sdn, DX + n * son, W, c_first, Cg, 0, S, mean, rstd, c1 / m, c2 / m,
                  sxc, sxs, sdc, sds, soc, sos, HAS_W, BLOCK_C, BLOCK_S)


@triton.jit
def _group_partial_stats_kernel(X, PMean, PM2, NG, G, Cg, S, sxn, sxc, sxs, s_per_split,
                                BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (n*G + g, split): (mean, M2) of the group's spatial range -> [split, n*G + g]."""
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    n = pid // G
    s_start = sp * s_per_split
    s_end = tl.minimum(s_start + s_per_split, S)
    _cnt, mean, m2 = _welford_block(X + n * sxn, (pid - n * G) * Cg, Cg, s_start, s_end, sxc, sxs,
                                    BLOCK_C, BLOCK_S)
    tl.store(PMean + sp * NG + pid, mean)
    tl.store(PM2 + sp * NG + pid, m2)


@triton.jit
def _group_apply_kernel(X, Y, W, B, Mean, Rstd, G, Cg, S, sxn, sxc, sxs, syn, syc, sys, s_per_split,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    n = pid // G
    s_start = sp * s_per_split
    _apply_block(X + n * sxn, Y + n * syn, W, B, (pid - n * G) * Cg, Cg, s_start,
                 tl.minimum(s_start + s_per_split, S), tl.load(Mean + pid), tl.load(Rstd + pid),
                 sxc, sxs, syc, sys, HAS_W, HAS_B, BLOCK_C, BLOCK_S)


@triton.jit
def _group_partial_grad_kernel(X, DY, Mean, Rstd, PSdy, PSdyx, C, G, Cg, S, NC,
                               sxn, sxc, sxs, sdn, sdc, sds, s_per_split,
                               BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (n*G + g, split): per-channel sums over the split's spatial range ->
    [split, n, c] of the partial buffers."""
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    n = pid // G
    s_start = sp * s_per_split
    offset = sp * NC + n * C
    _grad_block(X + n * sxn, DY + n * sdn, X, PSdy + offset, PSdyx + offset, (pid - n * G) * Cg, Cg,
                s_start, tl.minimum(s_start + s_per_split, S), tl.load(Mean + pid), tl.load(Rstd + pid),
                sxc, sxs, sdc, sds, False, True, BLOCK_C, BLOCK_S)


@triton.jit
def _group_dx_kernel(X, DY, DX, W, Mean, Rstd, C1, C2, G, Cg, S,
                     sxn, sxc, sxs, sdn, sdc, sds, son, soc, sos, s_per_split,
                     HAS_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    n = pid // G
    s_start = sp * s_per_split
    _dx_block(X + n * sxn, DY + n * sdn, DX + n * son, W, (pid - n * G) * Cg, Cg, s_start,
              tl.minimum(s_start + s_per_split, S), tl.load(Mean + pid), tl.load(Rstd + pid),
              tl.load(C1 + pid), tl.load(C2 + pid), sxc, sxs, sdc, sds, soc, sos, HAS_W, BLOCK_C, BLOCK_S)


# ---- channels_last with few channels per group: tiles of adjacent channels -------------
# A group of Cg < 32 channels is a short run of every channels_last row (8 bytes for
# Cg = 2 in float32): walking one group at a time would read memory in scattered
# pieces. These kernels walk (rows x BLOCK_C channels) tiles of one sample, contiguous
# in memory, computing per-channel partials that a merge then folds into groups.


@triton.jit
def _pair_block(kj0, pairs, base, gmask, Cg, C, S, s_per_split, BLOCK_KJ: tl.constexpr):
    """Offsets, mask and row counts of (split k, channel j) pairs kj0 .. kj0+BLOCK_KJ-1
    (kj = k * Cg + j) of each group in ``base``, in a (splits, C) partials layout."""
    kj = kj0 + tl.arange(0, BLOCK_KJ)
    k = kj // Cg
    mask = gmask[:, None] & (kj < pairs)[None, :]
    nb = tl.minimum(s_per_split, S - k * s_per_split).to(tl.float32)[None, :]
    return base[:, None] + (k * C + kj - k * Cg)[None, :], mask, nb


@triton.jit
def _cl_group_stats(PMean, PM2, grp, gmask, G, Cg, C, S, s_per_split, splits,
                    BLOCK: tl.constexpr, BLOCK_KJ: tl.constexpr):
    """(mean, var) of groups ``grp`` (n * G + g) from per-(n, split, c) partials: the
    splits x Cg channel partials folded about the first one's mean (accurate for a large
    offset): mean = m_0 + sum n_k (m_k - m_0) / m, then M2 = sum M2_k + sum n_k (m_k -
    mean)^2. The (split, channel) pairs of a group are walked BLOCK_KJ at a time (a loop
    of single loads was latency-bound: 10 us at (32, 64, 56, 56) on an H100)."""
    n = grp // G
    base = n * splits * C + (grp - n * G) * Cg
    shift = tl.load(PMean + base, mask=gmask, other=0.0)
    pairs = splits * Cg
    offset = tl.full([BLOCK, BLOCK_KJ], 0.0, tl.float32)
    for kj0 in range(0, pairs, BLOCK_KJ):
        at, mask, nb = _pair_block(kj0, pairs, base, gmask, Cg, C, S, s_per_split, BLOCK_KJ)
        offset += tl.where(mask, nb * (tl.load(PMean + at, mask=mask, other=0.0) - shift[:, None]), 0.0)
    count = Cg * S * 1.0  # (not .to(): Cg and S may be specialized to the constant 1)
    mean = shift + fsum(offset, axis=1) / count
    m2 = tl.full([BLOCK, BLOCK_KJ], 0.0, tl.float32)
    for kj0 in range(0, pairs, BLOCK_KJ):
        at, mask, nb = _pair_block(kj0, pairs, base, gmask, Cg, C, S, s_per_split, BLOCK_KJ)
        d = tl.load(PMean + at, mask=mask, other=0.0) - mean[:, None]
        m2 += tl.where(mask, tl.load(PM2 + at, mask=mask, other=0.0) + nb * d * d, 0.0)
    return mean, fsum(m2, axis=1) / count


@triton.jit
def _cl_merge_share(n, G, c_blocks, splits, MERGE_G: tl.constexpr):
    """Groups (n * G + g, and mask) that program (channel tile, split) of sample n merges."""
    local = (tl.program_id(0) * splits + tl.program_id(1)) * MERGE_G + tl.arange(0, MERGE_G)
    return n * G + local, local < G


@triton.jit
def _cl_program(C, S, s_per_split, BLOCK_C: tl.constexpr):
    """Program (channel tile, split, n): its columns (and mask), split, sample and
    spatial range [s_start, s_end)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    sp = tl.program_id(1)
    s_start = sp * s_per_split
    return cols, cols < C, sp, tl.program_id(2), s_start, tl.minimum(s_start + s_per_split, S)


@triton.jit
def _cl_fwd_kernel(X, Y, W, B, PMean, PM2, Mean, Var, Rstd, Arrived, C, G, Cg, S,
                   sxn, sxc, sxs, syn, syc, sys, s_per_split, splits, c_blocks, eps,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, PHASES: tl.constexpr, SYNC: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, MERGE_G: tl.constexpr, BLOCK_KJ: tl.constexpr):
    """GroupNorm forward of program (channel tile, split, n) over a (rows x channels)
    range of sample n: PARTIAL writes per-channel (mean, M2) -> [n, split, c], MERGE
    the statistics of its share of sample n's groups, FINISH y over its rows. The
    programs of a sample meet at each barrier (a group may span channel tiles)."""
    cols, cmask, sp, n, s_start, s_end = _cl_program(C, S, s_per_split, BLOCK_C)
    if PHASES & PARTIAL:
        _cnt, mean, m2 = _welford_lanes(X + n * sxn, cols, cmask, s_start, s_end, S, sxn, sxc, sxs,
                                        BLOCK_R, BLOCK_C)
        out = (n * splits + sp) * C + cols
        tl.store(PMean + out, mean, mask=cmask)
        tl.store(PM2 + out, m2, mask=cmask)
        phase_barrier(Arrived + n, c_blocks * splits, SYNC)
    if PHASES & MERGE:
        grp, gmask = _cl_merge_share(n, G, c_blocks, splits, MERGE_G)
        mean, var = _cl_group_stats(PMean, PM2, grp, gmask, G, Cg, C, S, s_per_split, splits, MERGE_G, BLOCK_KJ)
        tl.store(Mean + grp, mean, mask=gmask)
        tl.store(Var + grp, var, mask=gmask)
        tl.store(Rstd + grp, tl.rsqrt(var + eps), mask=gmask)
        phase_barrier(Arrived + n, 2 * c_blocks * splits, SYNC)
    if PHASES & FINISH:
        gi = n * G + cols // Cg  # every row of this program is of sample n
        _apply_rows(X + n * sxn, Y + n * syn, W, B, cols, cmask, tl.load(Mean + gi, mask=cmask, other=0.0),
                    tl.load(Rstd + gi, mask=cmask, other=0.0), s_start, s_end, S,
                    sxn, sxc, sxs, syn, syc, sys, HAS_W, HAS_B, BLOCK_R)


@triton.jit
def _cl_bwd_kernel(X, DY, DX, W, Mean, Rstd, PSdy, PSdyx, C1, C2, Arrived, C, G, Cg, S, inv_m,
                   sxn, sxc, sxs, sdn, sdc, sds, son, soc, sos, s_per_split, splits, c_blocks,
                   HAS_W: tl.constexpr, PHASES: tl.constexpr, SYNC: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, MERGE_G: tl.constexpr, BLOCK_KJ: tl.constexpr):
    """GroupNorm backward of program (channel tile, split, n): PARTIAL writes per-channel
    sum(dy), sum(dy * xhat) -> [n, split, c], MERGE the group means c1, c2 of g = w dy
    and g * xhat for its share of sample n's groups, FINISH
    dx = rstd * (g - c1 - xhat * c2) over its rows."""
    cols, cmask, sp, n, s_start, s_end = _cl_program(C, S, s_per_split, BLOCK_C)
    gi = n * G + cols // Cg
    mean = tl.load(Mean + gi, mask=cmask, other=0.0)
    rstd = tl.load(Rstd + gi, mask=cmask, other=0.0)
    if PHASES & PARTIAL:
        sdy, sdyx = _grad_sums(X + n * sxn, DY + n * sdn, cols, cmask, mean, rstd, s_start, s_end, S,
                               sxn, sxc, sxs, sdn, sdc, sds, BLOCK_R, BLOCK_C)
        out = (n * splits + sp) * C + cols
        tl.store(PSdy + out, sdy, mask=cmask)
        tl.store(PSdyx + out, sdyx, mask=cmask)
        phase_barrier(Arrived + n, c_blocks * splits, SYNC and (PHASES & MERGE))
    if PHASES & MERGE:
        grp, gmask = _cl_merge_share(n, G, c_blocks, splits, MERGE_G)
        base = n * splits * C + (grp - n * G) * Cg
        pairs = splits * Cg
        s1 = tl.full([MERGE_G, BLOCK_KJ], 0.0, tl.float32)
        s2 = tl.full([MERGE_G, BLOCK_KJ], 0.0, tl.float32)
        for kj0 in range(0, pairs, BLOCK_KJ):
            at, mask, _nb = _pair_block(kj0, pairs, base, gmask, Cg, C, S, s_per_split, BLOCK_KJ)
            t1 = tl.load(PSdy + at, mask=mask, other=0.0)
            t2 = tl.load(PSdyx + at, mask=mask, other=0.0)
            if HAS_W:  # the channel of offset `at` is at % C
                w = tl.load(W + at % C, mask=mask, other=0.0).to(tl.float32)
                t1 = t1 * w
                t2 = t2 * w
            s1 += t1
            s2 += t2
        tl.store(C1 + grp, fsum(s1, axis=1) * inv_m, mask=gmask)
        tl.store(C2 + grp, fsum(s2, axis=1) * inv_m, mask=gmask)
        phase_barrier(Arrived + n, 2 * c_blocks * splits, SYNC)
    if PHASES & FINISH:
        c1 = tl.load(C1 + gi, mask=cmask, other=0.0)
        c2 = tl.load(C2 + gi, mask=cmask, other=0.0)
        if HAS_W:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        else:
            w = rstd  # unused
        tiles = (s_end - s_start + BLOCK_R - 1) // BLOCK_R
        for i in range(0, tiles):  # last tile first: likeliest still in L2
            r = s_start + (tiles - 1 - i) * BLOCK_R + tl.arange(0, BLOCK_R)
            mask = (r < s_end)[:, None] & cmask[None, :]
            x = tl.load(X + n * sxn + _tile_offsets(r, S, sxn, sxs)[:, None] + cols[None, :] * sxc,
                        mask=mask, other=0.0).to(tl.float32)
            g = tl.load(DY + n * sdn + _tile_offsets(r, S, sdn, sds)[:, None] + cols[None, :] * sdc,
                        mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                g = g * w[None, :]
            xhat = (x - mean[None, :]) * rstd[None, :]
            dx = rstd[None, :] * (g - c1[None, :] - xhat * c2[None, :])
            tl.store(DX + n * son + _tile_offsets(r, S, son, sos)[:, None] + cols[None, :] * soc,
                     dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _group_grad_means_kernel(P, W, C1, C2, K, NC, C, G, Cg, inv_m,
                             HAS_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (n, g), from per-(split, n, c) partial sums P[0] = sum(dy), P[1] =
    sum(dy * xhat) (a (2, K, N, C) buffer, NC = N * C): the group means of g = w dy
    and of g * xhat over the group's m = Cg * S elements, c1 and c2 of the dx formula.
    The group's channels are walked BLOCK_C at a time, its splits BLOCK_K at a time."""
    ng = tl.program_id(0)
    n = ng // G
    first = (ng - n * G) * Cg
    g1 = 0.0
    g2 = 0.0
    for c0 in range(0, Cg, BLOCK_C):
        j = c0 + tl.arange(0, BLOCK_C)
        cmask = j < Cg
        s1 = tl.full([BLOCK_K, BLOCK_C], 0.0, tl.float32)
        s2 = tl.full([BLOCK_K, BLOCK_C], 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask = (k < K)[:, None] & cmask[None, :]
            offsets = k[:, None] * NC + n * C + first + j[None, :]
            s1 += tl.load(P + offsets, mask=mask, other=0.0)
            s2 += tl.load(P + K * NC + offsets, mask=mask, other=0.0)
        t1 = fsum(s1, axis=0)
        t2 = fsum(s2, axis=0)
        if HAS_W:
            w = tl.load(W + first + j, mask=cmask, other=0.0).to(tl.float32)
            t1 = t1 * w
            t2 = t2 * w
        g1 += fsum(t1, axis=0)
        g2 += fsum(t2, axis=0)
    tl.store(C1 + ng, g1 * inv_m)
    tl.store(C2 + ng, g2 * inv_m)


#: channels_last groups narrower than this go through the channel-tile kernels above.
CL_TILE_BELOW = 32


def _channel_tiles(x3: torch.Tensor, cg: int) -> bool:
    """Whether the channel-tile kernels take this input: channel stride 1, narrow groups,
    and at most 65535 samples (their grid's third axis, a CUDA limit)."""
    return x3.stride(1) == 1 and cg < CL_TILE_BELOW and x3.shape[1] > 1 and x3.shape[0] <= 65535


class _ClPlan(NamedTuple):
    """Launch shape of the channel-tile kernels for one input shape and group count."""

    block_r: int
    block_c: int
    c_blocks: int
    s_per_split: int
    splits: int
    merge_g: int  # groups of its sample each program merges
    block_kj: int  # (split, channel) pairs a merging program reads per step
    sync: bool  # all phases in one cooperative launch


@functools.lru_cache(maxsize=512)
def _cached_cl_plan(n: int, c: int, s: int, groups: int, programs: int, resident: int,
                    _tuning: tuple[int, ...]) -> _ClPlan:
    block_r, block_c = _channel_tile(c, 1)
    c_blocks = cdiv(c, block_c)
    s_per_split, splits = _channel_splits(s, c_blocks * n, block_r, resident_target(programs, resident, c_blocks * n))
    per_sample = c_blocks * splits  # the programs that meet at a sample's barriers
    merge_g = pow2(cdiv(groups, per_sample))
    return _ClPlan(block_r, block_c, c_blocks, s_per_split, splits, merge_g,
                   merge_step(splits * (c // groups), merge_g), sync=per_sample > 1 and per_sample * n <= resident)


def _cl_plan(x3: torch.Tensor, groups: int) -> _ClPlan:
    """The launch plan of the channel-tile kernels for (N, C, S) view x3: enough (tile,
    split, sample) programs to fill the device, all resident at once where a cooperative
    launch can hold them (computed once per shape, keyed on the TUNING it reads)."""
    n, c, s = x3.shape
    return _cached_cl_plan(n, c, s, groups, num_programs(x3.device), resident_programs(x3.device),
                           (TUNING.channel_tile, TUNING.split_tile))


def _tile(cg: int, s: int, channel_stride: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S): channels_last puts up to 64 adjacent channels in a tile (the
    contiguous axis); NCHW spends the tile on the contiguous spatial axis."""
    tile = pow2(TUNING.tile)
    if channel_stride == 1:
        block_c = min(pow2(cg), 64, tile)
        return block_c, min(pow2(s), max(1, tile // block_c))
    block_s = min(pow2(s), tile)
    return min(pow2(cg), max(1, tile // block_s)), block_s


def _splits(groups_total: int, s: int, block_s: int, target: int) -> tuple[int, int]:
    """(s_per_split, splits): one program per group when there are enough groups for
    ``target`` programs (what fills the device), else each group's spatial range cut
    into pieces of whole tiles."""
    if 2 * groups_total >= target:
        return s, 1
    s_per_split = cdiv(cdiv(s, cdiv(target, groups_total)), block_s) * block_s
    return s_per_split, cdiv(s, s_per_split)


@functools.lru_cache(maxsize=512)
def _cached_group_plan(ng: int, cg: int, s: int, channels_last: bool, programs: int,
                       _tile_size: int) -> tuple[int, int, int, int, int]:
    block_c, block_s = _tile(cg, s, 1 if channels_last else 0)
    s_per_split, splits = _splits(ng, s, block_s, programs)
    return block_c, block_s, s_per_split, splits, num_warps(block_c * block_s)


def _group_plan(x3: torch.Tensor, cg: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_C, BLOCK_S, s_per_split, splits, num_warps) of the per-group kernels for
    (N, C, S) view x3 and groups of cg channels, computed once per shape, layout and
    device size (keyed on the TUNING it reads)."""
    n, c, s = x3.shape
    return _cached_group_plan(n * (c // cg), cg, s, x3.stride(1) == 1, num_programs(x3.device), TUNING.tile)


def group_forward(x3: torch.Tensor, y3: torch.Tensor, weight: torch.Tensor | None,
                  bias: torch.Tensor | None, groups: int, eps: float,
                  stat_shape: tuple[int, ...] | None = None):
    """Normalize the (N, C, S) view x3 into y3 by (sample, group); returns float32
    (mean, var, rstd), contiguous, of ``stat_shape`` (default (N * groups,))."""
    n, c, s = x3.shape
    cg = c // groups
    ng = n * groups
    mean, var, rstd = stats_buffers(3, ng if stat_shape is None else stat_shape, x3)
    w = weight if weight is not None else dummy(mean)
    b = bias if bias is not None else dummy(mean)
    if _channel_tiles(x3, cg):
        _cl_forward(x3, y3, w, b, weight is not None, bias is not None, mean, var, rstd, groups, eps)
        return mean, var, rstd
    block_c, block_s, s_per_split, splits, warps = _group_plan(x3, cg)
    f32 = dict(device=x3.device, dtype=torch.float32)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_C=block_c, BLOCK_S=block_s,
                 num_warps=warps, **LAUNCH)
    with device_guard(x3):
        if splits == 1:
            _group_fwd_kernel[(ng,)](
                x3, y3, w, b, mean, var, rstd, groups, cg, s, *x3.stride(), *y3.stride(), eps, **flags,
            )
            return mean, var, rstd
        pmean = torch.empty((splits, ng), **f32)
        pm2 = torch.empty((splits, ng), **f32)
        _group_partial_stats_kernel[(ng, splits)](
            x3, pmean, pm2, ng, groups, cg, s, *x3.stride(), s_per_split,
            BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps(block_c * block_s), **LAUNCH,
        )
        block_k, merge = split_blocks(splits, ng)
        _chan_merge_kernel[(cdiv(ng, merge),)](
            pmean, pm2, mean, var, rstd, ng, cg * s, cg * s_per_split, splits, eps, BLOCK_K=block_k,
            BLOCK_C=merge, num_warps=num_warps(block_k * merge), **LAUNCH,
        )
        _group_apply_kernel[(ng, splits)](
            x3, y3, w, b, mean, rstd, groups, cg, s, *x3.stride(), *y3.stride(), s_per_split, **flags,
        )
    return mean, var, rstd


_ALL = (PARTIAL, MERGE, FINISH)


def _cl_forward(x3, y3, w, b, has_w, has_b, mean, var, rstd, groups, eps) -> None:
    """Forward of :func:`group_forward` through the channel-tile kernel: one cooperative
    launch on a GPU, else one launch per phase."""
    n, c, s = x3.shape
    plan = _cl_plan(x3, groups)
    partials = torch.empty((2, n, plan.splits, c), device=x3.device, dtype=torch.float32)
    arrived = torch.zeros(n, device=x3.device, dtype=torch.int32) if plan.sync else dummy(mean)

    def launch(phases: int, sync: bool) -> None:
        _cl_fwd_kernel[(plan.c_blocks, plan.splits, n)](
            x3, y3, w, b, *partials.unbind(0), mean, var, rstd, arrived, c, groups, c // groups, s,
            *x3.stride(), *y3.stride(), plan.s_per_split, plan.splits, plan.c_blocks, eps,
            HAS_W=has_w, HAS_B=has_b, PHASES=phases, SYNC=sync, BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
            MERGE_G=plan.merge_g, BLOCK_KJ=plan.block_kj, **tile_launch(cooperative=sync),
        )

    with device_guard(x3):
        run_phases(launch, x3.device, plan.sync, plan.c_blocks * plan.splits == 1, _ALL)


def _cl_backward(dy3, x3, dx3, weight, mean, rstd, groups, need_dwb):
    """Backward of :func:`group_forward` through the channel-tile kernel (one cooperative
    launch on a GPU, else one per phase) and, for dbias/dweight, :func:`split_sum`."""
    if dx3 is None and not need_dwb:
        return None, None
    n, c, s = x3.shape
    plan = _cl_plan(x3, groups)
    partials = torch.empty((2, n, plan.splits, c), device=x3.device, dtype=torch.float32)
    if dx3 is not None:
        c1, c2 = stats_buffers(2, n * groups, x3)  # group means of g = w dy and g * xhat
        phases = _ALL
    else:
        c1 = c2 = dummy(rstd)
        phases = _ALL[:1]
    sync = plan.sync and dx3 is not None
    arrived = torch.zeros(n, device=x3.device, dtype=torch.int32) if sync else dummy(rstd)

    def launch(phase_bits: int, sync: bool) -> None:
        _cl_bwd_kernel[(plan.c_blocks, plan.splits, n)](
            x3, dy3, dx3 if dx3 is not None else dummy(x3), weight if weight is not None else dummy(rstd),
            mean, rstd, *partials.unbind(0), c1, c2, arrived, c, groups, c // groups, s, 1.0 / (c // groups * s),
            *x3.stride(), *dy3.stride(), *(dx3.stride() if dx3 is not None else (0, 0, 0)),
            plan.s_per_split, plan.splits, plan.c_blocks,
            HAS_W=weight is not None, PHASES=phase_bits, SYNC=sync, BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
            MERGE_G=plan.merge_g, BLOCK_KJ=plan.block_kj, **tile_launch(cooperative=sync),
        )

    with device_guard(x3):
        run_phases(launch, x3.device, sync, plan.c_blocks * plan.splits == 1 or dx3 is None, phases)
        # dbias, dweight: the partials summed over samples and splits
        return split_sum(partials.view(2, n * plan.splits, c)).unbind(0) if need_dwb else (None, None)


def group_backward(dy3: torch.Tensor, x3: torch.Tensor, dx3: torch.Tensor | None,
                   weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                   groups: int, need_dwb: bool):
    """Backward of :func:`group_forward`; writes dx3 (if given) and returns float32
    per-channel ``(sum(dy), sum(dy * xhat))`` of shape (C,) when ``need_dwb``."""
    n, c, s = x3.shape
    cg = c // groups
    ng = n * groups
    if _channel_tiles(x3, cg):
        return _cl_backward(dy3, x3, dx3, weight, mean, rstd, groups, need_dwb)
    block_c, block_s, s_per_split, splits, warps = _group_plan(x3, cg)
    f32 = dict(device=x3.device, dtype=torch.float32)
    w = weight if weight is not None else dummy(rstd)
    dx_strides = dx3.stride() if dx3 is not None else (0, 0, 0)
    with device_guard(x3):
        if splits == 1:
            partials = torch.empty((2, n, c), **f32) if need_dwb else None  # per (n, c)
            psdy, psdyx = partials.unbind(0) if need_dwb else (dummy(rstd), dummy(rstd))
            _group_bwd_kernel[(ng,)](
                x3, dy3, dx3 if dx3 is not None else dummy(x3), w, mean, rstd, psdy, psdyx,
                c, groups, cg, s, *x3.stride(), *dy3.stride(), *dx_strides,
                HAS_W=weight is not None, NEED_DX=dx3 is not None, NEED_DWB=need_dwb,
                BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps, **LAUNCH,
            )
            return split_sum(partials).unbind(0) if need_dwb else (None, None)
        partials = torch.empty((2, splits, n, c), **f32)  # sum(dy), sum(dy * xhat) per (split, n, c)
        psdy, psdyx = partials.unbind(0)
        _group_partial_grad_kernel[(ng, splits)](
            x3, dy3, mean, rstd, psdy, psdyx, c, groups, cg, s, n * c, *x3.stride(), *dy3.stride(),
            s_per_split, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps, **LAUNCH,
        )
        if dx3 is not None:
            c1, c2 = stats_buffers(2, ng, x3)  # group means of g = w dy and g * xhat
            block_k, block_g = split_blocks(splits, cg)
            _group_grad_means_kernel[(ng,)](
                partials, w, c1, c2, splits, n * c, c, groups, cg, 1.0 / (cg * s),
                HAS_W=weight is not None, BLOCK_K=block_k, BLOCK_C=block_g,
                num_warps=num_warps(block_k * block_g), **LAUNCH,
            )
            _group_dx_kernel[(ng, splits)](
                x3, dy3, dx3, w, mean, rstd, c1, c2, groups, cg, s, *x3.stride(), *dy3.stride(),
                *dx_strides, s_per_split, HAS_W=weight is not None, BLOCK_C=block_c,
                BLOCK_S=block_s, num_warps=warps, **LAUNCH,
            )
        # dbias, dweight: the partials summed over splits and samples
        return split_sum(partials.view(2, splits * n, c)).unbind(0) if need_dwb else (None, None)
