"""LayerNorm and RMSNorm: one statistic per contiguous row of length N.

x is viewed as (M, N), N = prod(normalized_shape), rows contiguous.

Forward (a program per row; short rows are batched BLOCK_M to a program)::

    mean = sum(x) / N                 (0 for RMSNorm)
    var  = sum((x - mean)^2) / N      (mean square for RMSNorm)
    rstd = rsqrt(var + eps)
    y    = (x - mean) * rstd * w + b

A row of up to ``TUNING.max_row_block`` elements is held in registers (x read once),
together with as many more rows as fill ``TUNING.row_tile`` elements;
a longer row is read in chunks whose (count, mean, M2) are merged with Chan's
formula, then read again to write y.

Backward (P programs, each a contiguous range of rows)::

    g  = dy * w,  xhat = (x - mean) * rstd
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (no mean(g) for RMSNorm)
    dw_partial[p] = sum over the program's rows of dy * xhat
    db_partial[p] = sum over the program's rows of dy

and dw, db are the column sums of the (P, N) partial buffers -- deterministic, no
atomics.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import (
    LAUNCH,
    TUNING,
    cdiv,
    device_guard,
    fsum,
    num_warps,
    partial_programs,
    pow2,
    split_sum,
    stats_buffers,
)

__all__ = ["rows_forward", "rows_backward"]


@triton.jit
def _rows_fwd_kernel(X, Y, W, B, Mean, Var, Rstd, M, N, eps,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, CENTER: tl.constexpr,
                     BLOCK: tl.constexpr, SINGLE: tl.constexpr, BLOCK_M: tl.constexpr):
    if SINGLE:
        # BLOCK_M rows of up to BLOCK elements per program, held in registers.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        cols = tl.arange(0, BLOCK)
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if CENTER:
            mean = fsum(x, axis=1) / N
            xc = tl.where(mask, x - mean[:, None], 0.0)
            tl.store(Mean + rows, mean, mask=rmask)
        else:
            xc = x
        var = fsum(xc * xc, axis=1) / N
        rstd = tl.rsqrt(var + eps)
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(Var + rows, var, mask=rmask)
        tl.store(Rstd + rows, rstd, mask=rmask)
    else:
        # One long row per program. Pass 1: per-chunk (count, mean, M2) merged by Chan's formula -- stable, one read.
        row = tl.program_id(0)
        X += row * N
        Y += row * N
        cnt = 0.0
        mean = 0.0
        m2 = 0.0
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            if CENTER:
                nb = tl.minimum(N - start, BLOCK).to(tl.float32)
                mb = fsum(x, axis=0) / nb
                d = tl.where(mask, x - mb, 0.0)
                tot = cnt + nb
                delta = mb - mean
                mean = mean + delta * (nb / tot)
                m2 = m2 + fsum(d * d, axis=0) + delta * delta * (cnt * nb / tot)
                cnt = tot
            else:
                m2 = m2 + fsum(x * x, axis=0)
        var = m2 / N
        rstd = tl.rsqrt(var + eps)
        # Pass 2: normalize.
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
        if CENTER:
            tl.store(Mean + row, mean)
        tl.store(Var + row, var)
        tl.store(Rstd + row, rstd)


@triton.jit
def _rows_bwd_kernel(X, DY, DX, W, Mean, Rstd, DWp, DBp, M, N, rows_per_program,
                     HAS_W: tl.constexpr, CENTER: tl.constexpr, NEED_DX: tl.constexpr,
                     NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                     BLOCK: tl.constexpr, SINGLE: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        cmask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        dw = tl.full([BLOCK_M, BLOCK], 0.0, tl.float32)
        db = tl.full([BLOCK_M, BLOCK], 0.0, tl.float32)
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            rmask = rows < row_end
            mask = rmask[:, None] & cmask[None, :]
            offs = rows[:, None] * N + cols[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)[:, None]
            if CENTER:
                mean = tl.load(Mean + rows, mask=rmask, other=0.0)[:, None]
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            else:
                xhat = x * rstd
            if NEED_DX:
                g = dy * w if HAS_W else dy
                c2 = (fsum(g * xhat, axis=1) / N)[:, None]
                if CENTER:
                    c1 = (fsum(g, axis=1) / N)[:, None]
                    dx = (g - c1 - xhat * c2) * rstd
                else:
                    dx = (g - xhat * c2) * rstd
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
            db += dy
        if NEED_DW:
            tl.store(DWp + pid * N + cols, fsum(dw, axis=0), mask=cmask)
        if NEED_DB:
            tl.store(DBp + pid * N + cols, fsum(db, axis=0), mask=cmask)
    else:
        # Long rows: chunked; the partial buffers (zero-initialized, one row per
        # program) accumulate in place -- each program owns its row, so no atomics.
        for row in range(row_start, row_end):
            rstd = tl.load(Rstd + row)
            if CENTER:
                mean = tl.load(Mean + row)
            else:
                mean = 0.0
            c1 = 0.0
            c2 = 0.0
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < N
                x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                if NEED_DX:
                    if HAS_W:
                        g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    else:
                        g = dy
                    c1 += fsum(g, axis=0)
                    c2 += fsum(g * xhat, axis=0)
                if NEED_DW:
                    p = DWp + pid * N + cols
                    tl.store(p, tl.load(p, mask=mask, other=0.0) + dy * xhat, mask=mask)
                if NEED_DB:
                    p = DBp + pid * N + cols
                    tl.store(p, tl.load(p, mask=mask, other=0.0) + dy, mask=mask)
            if NEED_DX:
                c1 = c1 / N
                c2 = c2 / N
                for start in range(0, N, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < N
                    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(tl.float32)
                    xhat = (x - mean) * rstd
                    if HAS_W:
                        g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    else:
                        g = dy
                    if CENTER:
                        dx = (g - c1 - xhat * c2) * rstd
                    else:
                        dx = (g - xhat * c2) * rstd
                    tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)


def _row_block(n: int) -> tuple[int, bool]:
    """(BLOCK, SINGLE): the whole row in one block, or chunks of max_row_block."""
    block = pow2(n)
    if block <= TUNING.max_row_block:
        return block, True
    return pow2(TUNING.max_row_block), False


def _rows_per_tile(block: int, single: bool) -> int:
    """BLOCK_M: short rows are batched so a program still handles ~row_tile elements."""
    return max(1, pow2(TUNING.row_tile) // block) if single else 1


def _row_programs(m: int, block_m: int, target: int) -> tuple[int, int]:
    """(programs, rows_per_program) for the backward: about ``target`` programs (what
    fills the device), each a contiguous range of whole (BLOCK_M, N) tiles of rows (and
    one row of the partial buffers)."""
    programs = max(1, min(cdiv(m, block_m), target))
    rows_per_program = cdiv(cdiv(m, programs), block_m) * block_m
    return cdiv(m, rows_per_program), rows_per_program


@functools.lru_cache(maxsize=256)
def _forward_plan(n: int, _tuning: tuple[int, int]) -> tuple[int, dict[str, object]]:
    """(BLOCK_M, the block launch options) of the forward for rows of n elements (cached:
    this runs on every call; ``_tuning`` keys the cache on the TUNING it read)."""
    block, single = _row_block(n)
    block_m = _rows_per_tile(block, single)
    return block_m, {"BLOCK": block, "SINGLE": single, "BLOCK_M": block_m,
                     "num_warps": num_warps(block * block_m), **LAUNCH}


@functools.lru_cache(maxsize=256)
def _backward_plan(m: int, n: int, programs: int, _tuning: tuple[int, int]) -> tuple[int, int, bool, dict]:
    """(programs, rows_per_program, SINGLE, the block launch options) of the backward
    for m rows of n elements on a device that ``programs`` programs fill (cached, as
    :func:`_forward_plan`, whose blocks it uses)."""
    block_m, options = _forward_plan(n, _tuning)
    programs, rows_per_program = _row_programs(m, block_m, programs)
    return programs, rows_per_program, options["SINGLE"], options


def rows_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 n: int, center: bool, eps: float, stat_shape: int | tuple[int, ...] | None = None):
    """x, weight, bias contiguous, x viewed as (M, n). Returns ``(y, mean | None, var,
    rstd)``, the statistics float32 of ``stat_shape`` (default (M,))."""
    m = x.numel() // n
    y = torch.empty_like(x)
    shape = m if stat_shape is None else stat_shape
    if center:
        mean, var, rstd = stats_buffers(3, shape, x)
    else:
        mean, (var, rstd) = None, stats_buffers(2, shape, x)
    block_m, launch = _forward_plan(n, (TUNING.max_row_block, TUNING.row_tile))
    with device_guard(x):
        _rows_fwd_kernel[(cdiv(m, block_m),)](
            x, y, weight if weight is not None else x, bias if bias is not None else x,
            mean if center else var, var, rstd, m, n, eps,
            HAS_W=weight is not None, HAS_B=bias is not None, CENTER=center, **launch,
        )
    return y, mean, var, rstd


def rows_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                  mean: torch.Tensor | None, rstd: torch.Tensor, n: int,
                  needs_input_grad: tuple[bool, bool, bool]):
    """Gradients for :func:`rows_forward` (x, weight and the statistics contiguous, as
    rows_forward makes them); dweight/dbias float32 of n elements (flat)."""
    need_dx, need_dw, need_db = needs_input_grad
    m = x.numel() // n
    dy = dy.contiguous()
    # the kernel indexes the statistics flat (callers of the public op may pass views)
    mean = mean if mean is None or mean.is_contiguous() else mean.contiguous()
    rstd = rstd if rstd.is_contiguous() else rstd.contiguous()
    programs, rows_per_program, single, options = _backward_plan(
        m, n, partial_programs(x.device, m), (TUNING.max_row_block, TUNING.row_tile))
    # dW and dB partials in one buffer (one allocation, one sum); long rows accumulate
    # into their program's row in place, so they start from zeros
    parts = (torch.empty if single else torch.zeros)((need_dw + need_db, programs, n), device=x.device,
                                                     dtype=torch.float32) if need_dw or need_db else None
    partial = parts.unbind(0) if parts is not None else ()
    dwp = partial[0] if need_dw else rstd
    dbp = partial[-1] if need_db else rstd
    dx = torch.empty_like(x) if need_dx else None
    with device_guard(x):
        _rows_bwd_kernel[(programs,)](
            x, dy, dx if dx is not None else x, weight if weight is not None else x,
            mean if mean is not None else rstd, rstd, dwp, dbp, m, n, rows_per_program,
            HAS_W=weight is not None, CENTER=mean is not None, NEED_DX=need_dx,
            NEED_DW=need_dw, NEED_DB=need_db, **options,
        )
        if parts is None:
            return dx, None, None
        sums = split_sum(parts).unbind(0)
    return dx, sums[0] if need_dw else None, sums[-1] if need_db else None
