"""numba kernels: fused forward and backward of every normalization family.

Imported only on the first kernel call (see :mod:`normlab.backends.cpu.runtime`), so
importing normlab compiles nothing. Every family reaches one of two memory views of
the input, both flat C-ordered buffers:

**grouped** ``(A, P, K, S)`` -- statistic group ``p`` is the ``A`` blocks of ``K*S``
contiguous elements at offsets ``(a*P + p)*K*S``; the affine channel of element
``(a, p, k, s)`` is ``(p % G)*K + k``::

    family / layout         A    P       K      S     G
    BatchNorm NCHW          N    C       1      HW    C
    InstanceNorm NCHW       1    N*C     1      HW    C
    GroupNorm NCHW          1    N*G     C/G    HW    G
    LayerNorm / RMSNorm     1    rows    D      1     1

**channels-last** ``(N, S, G, K)`` -- statistic group ``(n, g)`` over ``(s, k)``; the
affine channel is ``g*K + k``; BatchNorm folds N into S (N=1, S=N*HW, G=C, K=1),
InstanceNorm is G=C, K=1.

Numerics (the precision policy of :mod:`normlab.core.stats`): sums accumulate in
float64; elementwise steps run in the input's dtype (float32 or float64). The forward
pass subtracts the batch mean in two parts, ``(x - mc) - ml`` with ``mc`` the mean
rounded to x's dtype and ``ml`` the rest: ``x - mc`` is exact for x near the mean, so
an input offset by 1e4 in float32 loses nothing beyond its own rounding (the mean
returned -- and used by backward -- is ``mc``, as the contract says).

Variances are two-pass -- ``sum((x - mean)^2)`` after the mean -- on the grouped view
(the second pass over a group reads it from cache), and on the channels-last view per
block of rows that fits in L1, blocks merged with Chan's formula
``M2 = M2a + M2b + delta^2 * na*nb/(na+nb)``. No ``E[x^2] - E[x]^2``.

``fastmath`` is limited to ``reassoc``/``contract`` so that LLVM may vectorize the
reductions while NaN and Inf still propagate as in torch.nn.
"""

from __future__ import annotations

import sys
import types

import numpy as np
from numba import njit, prange

_FM = {"reassoc", "contract"}
_OPTS = {"cache": True, "fastmath": _FM, "nogil": True}

# Elements per block of the channels-last statistics (fits L1 in float64 scratch).
_BLOCK = 4096
# Rows whose dweight/dbias partials are summed in x's dtype before a float64 flush.
_ROW_BLOCK = 32


def _parallel_and_serial(f):
    """Compile ``f`` with ``parallel=True``, and register a serial twin ``<name>_serial``.

    Small inputs use the twin: handing a few microseconds of work to the thread pool
    costs more than the work, and on a busy machine a parallel region waits for every
    one of its threads to be scheduled. The twin is a copy of the function under its
    own name so numba's on-disk cache keeps the two apart (prange runs as range).
    """
    twin = types.FunctionType(f.__code__.replace(co_name=f.__name__ + "_serial"), f.__globals__,
                              f.__name__ + "_serial", f.__defaults__, f.__closure__)
    twin.__qualname__ = f.__qualname__ + "_serial"
    twin.__doc__ = f"Serial twin of :func:`{f.__name__}`."
    setattr(sys.modules[__name__], twin.__name__, njit(**_OPTS)(twin))
    return njit(parallel=True, **_OPTS)(f)


# --------------------------------------------------------------------------- grouped


@_parallel_and_serial
def grouped_forward(x, y, w, b, A, P, K, S, G, eps, center, compute, mean, var, rstd):
    """y = (x - mean_p) * rstd_p * w[c] + b[c] on the (A, P, K, S) view.

    ``compute``: batch statistics are written to mean/var/rstd (P,); otherwise
    mean/rstd are read from them (fixed statistics). ``center`` False: mean 0,
    var = mean square (RMSNorm). w and b hold G*K values in x's dtype (ones/zeros
    if absent). Inner loops run over slices: numba then drops the negative-index
    wraparound and LLVM vectorizes them.
    """
    dt = x.dtype.type
    ks = K * S
    n = A * ks
    for p in prange(P):
        if compute:
            m = 0.0
            if center:
                s1 = 0.0
                for a in range(A):
                    xs = x[(a * P + p) * ks:(a * P + p + 1) * ks]
                    for i in range(ks):
                        s1 += xs[i]
                m = s1 / n
            mc = dt(m)
            ml = dt(m - mc)  # mean = mc + ml to ~48 bits: see the module docstring
            s2 = 0.0
            for a in range(A):
                xs = x[(a * P + p) * ks:(a * P + p + 1) * ks]
                for i in range(ks):
                    d = (xs[i] - mc) - ml
                    s2 += d * d
            v = s2 / n
            r = 1.0 / np.sqrt(v + eps)
            mean[p] = mc
            var[p] = v
            rstd[p] = r
        else:
            mc = dt(mean[p])
            ml = dt(0.0)
            r = rstd[p]
        rc = dt(r)
        c0 = (p % G) * K
        ws = w[c0:c0 + K]
        bs = b[c0:c0 + K]
        for a in range(A):
            base = (a * P + p) * ks
            if S == 1:
                xs = x[base:base + K]
                ys = y[base:base + K]
                for k in range(K):
                    ys[k] = ((xs[k] - mc) - ml) * (rc * ws[k]) + bs[k]
            else:
                for k in range(K):
                    sc = rc * ws[k]
                    sh = bs[k]
                    xs = x[base + k * S:base + (k + 1) * S]
                    ys = y[base + k * S:base + (k + 1) * S]
                    for s in range(S):
                        ys[s] = ((xs[s] - mc) - ml) * sc + sh


@_parallel_and_serial
def grouped_backward(dy, x, w, mean, rstd, A, P, K, S, G, center, batch, need_dx, T,
                     dx, dwp, dbp):
    """Analytic backward on the (A, P, K, S) view.

    Per group: ``xhat = (x - mean) * rstd``, ``g = dy * w``,
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` (batch statistics; no
    ``mean(g)`` term when not centering) or ``rstd * g`` (fixed statistics), evaluated
    as ``dx = (rstd * w) * dy - rstd^2 * mean(g * xhat) * (x - mean) - rstd * mean(g)``.
    Per channel partial sums ``dwp[t, c] = sum dy * xhat`` and ``dbp[t, c] = sum dy``
    for each of the T work chunks (the caller adds the T rows: deterministic).
    Sums accumulate in float64, elementwise terms in x's dtype.
    """
    dt = x.dtype.type
    ks = K * S
    n = A * ks
    for t in prange(T):
        p0 = t * P // T
        p1 = (t + 1) * P // T
        for p in range(p0, p1):
            mc = dt(mean[p])
            r = np.float64(rstd[p])
            rc = dt(r)
            c0 = (p % G) * K
            ws = w[c0:c0 + K]
            dws = dwp[t, c0:c0 + K]
            dbs = dbp[t, c0:c0 + K]
            s1 = 0.0
            s2 = 0.0
            for a in range(A):
                base = (a * P + p) * ks
                if S == 1:
                    xs = x[base:base + K]
                    dys = dy[base:base + K]
                    for k in range(K):
                        d = dys[k]
                        dxh = d * ((xs[k] - mc) * rc)
                        dws[k] += dxh
                        dbs[k] += d
                        s1 += ws[k] * d
                        s2 += ws[k] * dxh
                else:
                    for k in range(K):
                        xs = x[base + k * S:base + (k + 1) * S]
                        dys = dy[base + k * S:base + (k + 1) * S]
                        sdy = 0.0
                        sdyx = 0.0
                        for s in range(S):
                            d = dys[s]
                            sdy += d
                            sdyx += d * (xs[s] - mc)
                        sdyx *= r
                        wc = np.float64(ws[k])
                        dws[k] += sdyx
                        dbs[k] += sdy
                        s1 += wc * sdy
                        s2 += wc * sdyx
            if not need_dx:
                continue
            cb = dt(0.0)
            cc = dt(0.0)
            if batch:
                cb = dt(-r * r * s2 / n)
                if center:
                    cc = dt(-r * s1 / n)
            for a in range(A):
                base = (a * P + p) * ks
                if S == 1:
                    xs = x[base:base + K]
                    dys = dy[base:base + K]
                    dxs = dx[base:base + K]
                    for k in range(K):
                        dxs[k] = (rc * ws[k]) * dys[k] + cb * (xs[k] - mc) + cc
                else:
                    for k in range(K):
                        ca = rc * ws[k]
                        xs = x[base + k * S:base + (k + 1) * S]
                        dys = dy[base + k * S:base + (k + 1) * S]
                        dxs = dx[base + k * S:base + (k + 1) * S]
                        for s in range(S):
                            dxs[s] = ca * dys[s] + cb * (xs[s] - mc) + cc


@_parallel_and_serial
def rows_backward(dy, x, w, mean, rstd, P, K, center, batch, need_dx, T, dx, dwp, dbp):
    """:func:`grouped_backward` for LayerNorm/RMSNorm rows (P rows of K, affine per
    column), one row at a time: its sums, then its dx while it is in L1. The column
    sums for dweight/dbias go through partials in x's dtype over blocks of
    ``_ROW_BLOCK`` rows (float64 read-modify-writes per element would halve the speed),
    flushed into the float64 ``dwp[t]``/``dbp[t]``."""
    dt = x.dtype.type
    for t in prange(T):
        p0 = t * P // T
        p1 = (t + 1) * P // T
        bdw = np.zeros(K, x.dtype)
        bdb = np.zeros(K, x.dtype)
        dws = dwp[t]
        dbs = dbp[t]
        pending = 0
        for p in range(p0, p1):
            xs = x[p * K:(p + 1) * K]
            dys = dy[p * K:(p + 1) * K]
            mc = dt(mean[p])
            r = np.float64(rstd[p])
            rc = dt(r)
            s1 = 0.0
            s2 = 0.0
            for k in range(K):
                d = dys[k]
                xh = (xs[k] - mc) * rc
                bdw[k] += d * xh
                bdb[k] += d
                g = w[k] * d
                s1 += g
                s2 += g * xh
            pending += 1
            if pending == _ROW_BLOCK or p == p1 - 1:
                for k in range(K):
                    dws[k] += bdw[k]
                    dbs[k] += bdb[k]
                    bdw[k] = 0.0
                    bdb[k] = 0.0
                pending = 0
            if not need_dx:
                continue
            cb = dt(0.0)
            cc = dt(0.0)
            if batch:
                cb = dt(-r * r * s2 / K)
                if center:
                    cc = dt(-r * s1 / K)
            dxs = dx[p * K:(p + 1) * K]
            for k in range(K):
                dxs[k] = (rc * w[k]) * dys[k] + cb * (xs[k] - mc) + cc


# ---------------------------------------------------------------------- channels-last


@njit(**_OPTS)
def _cl_block_stats(x, base, rows, G, K, cnt, mu, m2, acc, acc2):
    """Two-pass (mean, M2) per group of ``rows`` channels-last rows from ``base``,
    merged into (cnt, mu, m2) (float64) by Chan's formula. acc/acc2 are scratch (G*K,)
    in x's dtype: a block is at most ``_BLOCK`` elements, so each channel's partial sum
    adds a few dozen values (exact enough in float32) and the loops stay 16 lanes wide.
    The block mean is rounded to x's dtype and M2 taken about that rounded value; the
    merge uses the same value, so the pair stays consistent."""
    C = G * K
    for c in range(C):
        acc[c] = 0.0
        acc2[c] = 0.0
    for r in range(rows):
        xs = x[base + r * C:base + (r + 1) * C]
        for c in range(C):
            acc[c] += xs[c]
    nb = rows * K
    for g in range(G):
        s = 0.0
        for k in range(K):
            s += acc[g * K + k]
        acc[g * K] = s / nb  # block mean of group g, stored at its first channel
    for g in range(G):
        bm = acc[g * K]
        for k in range(K):
            acc[g * K + k] = bm
    for r in range(rows):
        xs = x[base + r * C:base + (r + 1) * C]
        for c in range(C):
            d = xs[c] - acc[c]
            acc2[c] += d * d
    for g in range(G):
        bm2 = 0.0
        for k in range(K):
            bm2 += acc2[g * K + k]
        bm = acc[g * K]
        na = cnt[g]
        tot = na + nb
        delta = bm - mu[g]
        mu[g] += delta * nb / tot
        m2[g] += bm2 + delta * delta * na * nb / tot
        cnt[g] = tot


@_parallel_and_serial
def cl_stats(x, N, S, G, K, B, pcnt, pmu, pm2):
    """Partial statistics of each of the N*B work items (sample n, row block b)."""
    C = G * K
    rows_per = max(1, _BLOCK // C)
    for item in prange(N * B):
        n = item // B
        bi = item % B
        s0 = bi * S // B
        s1 = (bi + 1) * S // B
        acc = np.empty(C, x.dtype)
        acc2 = np.empty(C, x.dtype)
        for g in range(G):
            pcnt[item, g] = 0.0
            pmu[item, g] = 0.0
            pm2[item, g] = 0.0
        s = s0
        while s < s1:
            rows = min(rows_per, s1 - s)
            _cl_block_stats(x, (n * S + s) * C, rows, G, K, pcnt[item], pmu[item], pm2[item],
                            acc, acc2)
            s += rows


@_parallel_and_serial
def cl_apply(x, y, mc, ml, sc, b, N, S, C, B):
    """y = ((x - mc[n, c]) - ml[n, c]) * sc[n, c] + b[c] on the channels-last (N, S, C)
    view; mc + ml is the mean in two parts (see the module docstring)."""
    for item in prange(N * B):
        n = item // B
        bi = item % B
        s0 = bi * S // B
        s1 = (bi + 1) * S // B
        mcn = mc[n]
        mln = ml[n]
        scn = sc[n]
        for s in range(s0, s1):
            o = (n * S + s) * C
            xs = x[o:o + C]
            ys = y[o:o + C]
            for c in range(C):
                ys[c] = ((xs[c] - mcn[c]) - mln[c]) * scn[c] + b[c]


@njit(**_OPTS)
def _cl_grad_block(dy, x, mcn, base, s0, s1, C, sdy, sdyx, bdy, bdyx):
    """Add sum dy and sum dy * (x - mcn) over rows [s0, s1) from ``base`` to the float64
    sums, through per-block partials (bdy, bdyx: scratch in x's dtype)."""
    rows_per = max(1, _BLOCK // C)
    s = s0
    while s < s1:
        e = min(s1, s + rows_per)
        for c in range(C):
            bdy[c] = 0.0
            bdyx[c] = 0.0
        for r in range(s, e):
            o = base + r * C
            xs = x[o:o + C]
            dys = dy[o:o + C]
            for c in range(C):
                d = dys[c]
                bdy[c] += d
                bdyx[c] += d * (xs[c] - mcn[c])
        for c in range(C):
            sdy[c] += bdy[c]
            sdyx[c] += bdyx[c]
        s = e


@_parallel_and_serial
def cl_grad_sums(dy, x, mc, rc, N, S, C, B, psdy, psdyx):
    """Per work item and channel: sum dy and sum dy * xhat, xhat = (x - mc) * rc."""
    for item in prange(N * B):
        n = item // B
        bi = item % B
        s0 = bi * S // B
        s1 = (bi + 1) * S // B
        sdy = psdy[item]
        sdyx = psdyx[item]
        for c in range(C):
            sdy[c] = 0.0
            sdyx[c] = 0.0
        bdy = np.empty(C, x.dtype)
        bdyx = np.empty(C, x.dtype)
        _cl_grad_block(dy, x, mc[n], n * S * C, s0, s1, C, sdy, sdyx, bdy, bdyx)
        rcn = rc[n]
        for c in range(C):
            sdyx[c] *= rcn[c]


@_parallel_and_serial
def cl_forward_fused(x, y, w, b, N, S, G, K, eps, mean, var, rstd):
    """Per-sample statistics (GroupNorm/InstanceNorm channels-last) and the output in
    one sweep per sample: the apply pass re-reads the sample from cache, not memory.
    mean/var/rstd: (N, G) outputs."""
    C = G * K
    dt = x.dtype.type
    rows_per = max(1, _BLOCK // C)
    for n in prange(N):
        acc = np.empty(C, x.dtype)
        acc2 = np.empty(C, x.dtype)
        cnt = np.zeros(G)
        mu = np.zeros(G)
        m2 = np.zeros(G)
        s = 0
        while s < S:
            rows = min(rows_per, S - s)
            _cl_block_stats(x, (n * S + s) * C, rows, G, K, cnt, mu, m2, acc, acc2)
            s += rows
        mcn = np.empty(C, x.dtype)
        mln = np.empty(C, x.dtype)
        scn = np.empty(C, x.dtype)
        for g in range(G):
            v = m2[g] / cnt[g]
            r = 1.0 / np.sqrt(v + eps)
            mean[n, g] = mu[g]
            var[n, g] = v
            rstd[n, g] = r
            for k in range(K):
                mcn[g * K + k] = dt(mu[g])
                mln[g * K + k] = dt(mu[g] - dt(mu[g]))
                scn[g * K + k] = dt(r * w[g * K + k])
        for s in range(S):
            o = (n * S + s) * C
            xs = x[o:o + C]
            ys = y[o:o + C]
            for c in range(C):
                ys[c] = ((xs[c] - mcn[c]) - mln[c]) * scn[c] + b[c]


@_parallel_and_serial
def cl_backward_fused(dy, x, w, mean, rstd, N, S, G, K, center, batch, need_dx, dwp, dbp, dx):
    """Per-sample backward (GroupNorm/InstanceNorm channels-last): the gradient sums of
    sample n, then its dx while x and dy are still in cache. dwp/dbp: (N, C) partial
    dweight/dbias (the caller sums over n)."""
    C = G * K
    dt = x.dtype.type
    for n in prange(N):
        mcn = np.empty(C, x.dtype)
        for g in range(G):
            for k in range(K):
                mcn[g * K + k] = dt(mean[n, g])
        sdy = dbp[n]
        sdyx = dwp[n]
        for c in range(C):
            sdy[c] = 0.0
            sdyx[c] = 0.0
        bdy = np.empty(C, x.dtype)
        bdyx = np.empty(C, x.dtype)
        _cl_grad_block(dy, x, mcn, n * S * C, 0, S, C, sdy, sdyx, bdy, bdyx)
        ca = np.empty(C, x.dtype)
        cb = np.empty(C, x.dtype)
        cc = np.empty(C, x.dtype)
        count = S * K
        for g in range(G):
            r = np.float64(rstd[n, g])
            s1 = 0.0
            s2 = 0.0
            for k in range(K):
                c = g * K + k
                sdyx[c] *= r  # now sum dy * xhat
                s1 += w[c] * sdy[c]
                s2 += w[c] * sdyx[c]
            for k in range(K):
                c = g * K + k
                ca[c] = dt(r * w[c])
                cb[c] = dt(-r * r * s2 / count) if batch else dt(0.0)
                cc[c] = dt(-r * s1 / count) if (batch and center) else dt(0.0)
        if not need_dx:
            continue
        for s in range(S):
            o = (n * S + s) * C
            xs = x[o:o + C]
            dys = dy[o:o + C]
            dxs = dx[o:o + C]
            for c in range(C):
                dxs[c] = ca[c] * dys[c] + cb[c] * (xs[c] - mcn[c]) + cc[c]


@_parallel_and_serial
def cl_dx(dy, x, mc, rc, wr, c1, c2, N, S, C, B, dx):
    """dx = wr[n, c] * dy - c1[n, c] - (x - mc[n, c]) * c2[n, c] on (N, S, C), where
    the caller folded rstd, weight and the two group means into the coefficients."""
    for item in prange(N * B):
        n = item // B
        bi = item % B
        s0 = bi * S // B
        s1 = (bi + 1) * S // B
        mcn = mc[n]
        wrn = wr[n]
        c1n = c1[n]
        c2n = c2[n]
        for s in range(s0, s1):
            o = (n * S + s) * C
            xs = x[o:o + C]
            dys = dy[o:o + C]
            dxs = dx[o:o + C]
            for c in range(C):
                dxs[c] = wrn[c] * dys[c] - c1n[c] - (xs[c] - mcn[c]) * c2n[c]
