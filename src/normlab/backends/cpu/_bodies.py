"""Team bodies: the parallel kernels as C functions that claim their own chunks.

A body is what each thread of a team runs (see :func:`normlab.backends.cpu.team.launch`):
it reads its kernel's arguments from a *job* -- an int64 array built by the caller --
then claims chunks of the work with an atomic counter in the job and calls the kernel
on each, until none is left. It is a numba ``cfunc``: a thread enters it straight from
the OpenMP runtime, without Python and without the GIL. (Through a Python callback,
each thread took the GIL to claim a chunk and to enter the kernel; measured on the
2-core benchmark machine, the second thread started its first chunk 32-105 us late,
with every cache already cold from the previous pass.)

Job layout (int64): ``[counter, items, chunks, arg0, size0, arg1, size1, ...]`` --
two slots per kernel argument: an array's address and element count, an integer or
bool as itself, a float as the bits of a float64 (see :func:`team.job`).

Each body is compiled on first use for one storage dtype (x's: float32, float64, or
the raw bits of bfloat16/float16 as uint16/int16), with numba's on-disk cache; the
dtype is carried by the type of the body's single argument -- the job's address typed
as a pointer to x's elements -- so one Python definition serves every dtype.
"""

from __future__ import annotations

import llvmlite.ir as llvm_ir
import numpy as np
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

from . import _kernels as K

__all__ = ["body_address"]

_HEADER = 3  # counter, items, chunks


@intrinsic
def _job_of(typingctx, p):
    """The job (int64 words) at the body's argument ``p``, as a pointer."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.IntType(64).as_pointer())
    return types.CPointer(types.int64)(p), codegen


@intrinsic
def _fetch_add(typingctx, p, value):
    """Atomically add ``value`` to the job's counter (its first word); the old value."""
    def codegen(context, builder, signature, args):
        counter = builder.bitcast(args[0], llvm_ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", counter, args[1], "monotonic")
    return types.int64(p, types.int64), codegen


@intrinsic
def _typed(typingctx, addr, p):
    """The address ``addr`` as a pointer of ``p``'s type (x's elements)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
    return p(types.int64, p), codegen


@intrinsic
def _as_float(typingctx, bits):
    """The float64 whose bits are the int64 ``bits``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.DoubleType())
    return types.float64(types.int64), codegen


_OPTS = {"inline": "always", "fastmath": K._FM}


@njit(**_OPTS)
def _claim(p, job):
    """The next unclaimed chunk ``(lo, hi)`` of the job, or ``(0, 0)`` when none is left."""
    i = _fetch_add(p, 1)
    items, chunks = job[1], job[2]
    if i >= chunks:
        return 0, 0
    return i * items // chunks, (i + 1) * items // chunks


@njit(**_OPTS)
def _x(job, i, p):
    """Argument ``i``: an array of x's storage dtype."""
    return carray(_typed(job[_HEADER + 2 * i], p), job[_HEADER + 2 * i + 1])


@njit(**_OPTS)
def _c(job, i, p):
    """Argument ``i``: an array of the compute dtype (float32 for 16-bit storage)."""
    x = carray(p, 0)
    return carray(K._address(job[_HEADER + 2 * i]), job[_HEADER + 2 * i + 1], K._ctype(x))


@njit(**_OPTS)
def _f64(job, i):
    """Argument ``i``: a float64 array."""
    return carray(K._address(job[_HEADER + 2 * i]), job[_HEADER + 2 * i + 1], np.float64)


@njit(**_OPTS)
def _int(job, i):
    return job[_HEADER + 2 * i]


@njit(**_OPTS)
def _float(job, i):
    return _as_float(job[_HEADER + 2 * i])


# One body per parallel kernel of ``_kernels``; the argument numbers follow the
# kernel's own signature (see each kernel for what the arguments are). Those kernels are
# ``inline="always"``: each is compiled once, inside its body (as a separate function it
# would be optimized twice, alone and again when linked into the body: 4.0 s instead of
# 3.3 s for BatchNorm2d's first forward with an empty cache).


def dispatch_grouped_forward(p):
    job = _job_of(p)
    A, P, K_, S, G = _int(job, 4), _int(job, 5), _int(job, 6), _int(job, 7), _int(job, 8)
    eps, center, compute, short = _float(job, 9), _int(job, 10) != 0, _int(job, 11) != 0, _int(job, 12) != 0
    x, y, w, b = _x(job, 0, p), _x(job, 1, p), _c(job, 2, p), _c(job, 3, p)
    mean, var, rstd = _c(job, 13, p), _c(job, 14, p), _c(job, 15, p)
    lo, hi = _claim(p, job)
    while lo < hi:
        K.dispatch_grouped_forward(x, y, w, b, A, P, K_, S, G, eps, center, compute, short, mean, var, rstd, lo, hi)
        lo, hi = _claim(p, job)


def dispatch_grouped_backward(p):
    job = _job_of(p)
    A, P, K_, S, G = _int(job, 5), _int(job, 6), _int(job, 7), _int(job, 8), _int(job, 9)
    center, batch, need_dx = _int(job, 10) != 0, _int(job, 11) != 0, _int(job, 12) != 0
    T, short = _int(job, 13), _int(job, 14) != 0
    dy, x, w, mean, rstd = _x(job, 0, p), _x(job, 1, p), _c(job, 2, p), _c(job, 3, p), _c(job, 4, p)
    dx, dwp, dbp = _x(job, 15, p), _f64(job, 16).reshape(T, -1), _f64(job, 17).reshape(T, -1)
    lo, hi = _claim(p, job)
    while lo < hi:
        K.dispatch_grouped_backward(dy, x, w, mean, rstd, A, P, K_, S, G, center, batch, need_dx, T, short,
                                    dx, dwp, dbp, lo, hi)
        lo, hi = _claim(p, job)


def cl_forward_fused(p):
    job = _job_of(p)
    N, S, G, K_, eps = _int(job, 4), _int(job, 5), _int(job, 6), _int(job, 7), _float(job, 8)
    x, y, w, b = _x(job, 0, p), _x(job, 1, p), _c(job, 2, p), _c(job, 3, p)
    mean, var, rstd = _c(job, 9, p).reshape(N, G), _c(job, 10, p).reshape(N, G), _c(job, 11, p).reshape(N, G)
    lo, hi = _claim(p, job)
    while lo < hi:
        K.cl_forward_fused(x, y, w, b, N, S, G, K_, eps, mean, var, rstd, lo, hi)
        lo, hi = _claim(p, job)


def cl_backward_fused(p):
    job = _job_of(p)
    N, S, G, K_ = _int(job, 5), _int(job, 6), _int(job, 7), _int(job, 8)
    center, batch, need_dx = _int(job, 9) != 0, _int(job, 10) != 0, _int(job, 11) != 0
    dy, x, w = _x(job, 0, p), _x(job, 1, p), _c(job, 2, p)
    mean, rstd = _c(job, 3, p).reshape(N, G), _c(job, 4, p).reshape(N, G)
    dwp, dbp, dx = _f64(job, 12).reshape(N, G * K_), _f64(job, 13).reshape(N, G * K_), _x(job, 14, p)
    lo, hi = _claim(p, job)
    while lo < hi:
        K.cl_backward_fused(dy, x, w, mean, rstd, N, S, G, K_, center, batch, need_dx, dwp, dbp, dx, lo, hi)
        lo, hi = _claim(p, job)


def cl_stats(p):
    job = _job_of(p)
    N, S, G, K_, B = _int(job, 1), _int(job, 2), _int(job, 3), _int(job, 4), _int(job, 5)
    x = _x(job, 0, p)
    pcnt, pmu, pm2 = _f64(job, 6).reshape(N * B, G), _f64(job, 7).reshape(N * B, G), _f64(job, 8).reshape(N * B, G)
    lo, hi = _claim(p, job)
    while lo < hi:
        K.cl_stats(x, N, S, G, K_, B, pcnt, pmu, pm2, lo, hi)
        lo, hi = _claim(p, job)


def cl_apply(p):
    job = _job_of(p)
    N, S, C, B = _int(job, 5), _int(job, 6), _int(job, 7), _int(job, 8)
    x, y = _x(job, 0, p), _x(job, 1, p)
    mc, sc, sh = _c(job, 2, p).reshape(N, C), _c(job, 3, p).reshape(N, C), _c(job, 4, p).reshape(N, C)
    lo, hi = _claim(p, job)
    while lo < hi:
        K.cl_apply(x, y, mc, sc, sh, N, S, C, B, lo, hi)
        lo, hi = _claim(p, job)


def cl_grad_sums(p):
    job = _job_of(p)
    N, S, G, K_, B = _int(job, 4), _int(job, 5), _int(job, 6), _int(job, 7), _int(job, 8)
    dy, x = _x(job, 0, p), _x(job, 1, p)
    mean, rstd = _c(job, 2, p).reshape(N, G), _c(job, 3, p).reshape(N, G)
    psdy, psdyx = _f64(job, 9).reshape(N * B, G * K_), _f64(job, 10).reshape(N * B, G * K_)
    lo, hi = _claim(p, job)
    while lo < hi:
        K.cl_grad_sums(dy, x, mean, rstd, N, S, G, K_, B, psdy, psdyx, lo, hi)
        lo, hi = _claim(p, job)


def cl_dx(p):
    job = _job_of(p)
    N, S, C, B = _int(job, 6), _int(job, 7), _int(job, 8), _int(job, 9)
    dy, x, dx = _x(job, 0, p), _x(job, 1, p), _x(job, 10, p)
    mc, ca = _c(job, 2, p).reshape(N, C), _c(job, 3, p).reshape(N, C)
    cb, cc = _c(job, 4, p).reshape(N, C), _c(job, 5, p).reshape(N, C)
    lo, hi = _claim(p, job)
    while lo < hi:
        K.cl_dx(dy, x, mc, ca, cb, cc, N, S, C, B, dx, lo, hi)
        lo, hi = _claim(p, job)


_STORAGE = {"float32": types.float32, "float64": types.float64, "bfloat16": types.uint16,
            "float16": types.int16}
_compiled: dict[tuple[str, str], object] = {}


def body_address(name: str, dtype: str) -> int:
    """The C address of body ``name`` for x's storage ``dtype`` (torch's dtype name),
    compiled (or loaded from numba's cache) on first use."""
    key = (name, dtype)
    body = _compiled.get(key)
    if body is None:
        sig = types.void(types.CPointer(_STORAGE[dtype]))
        body = _compiled[key] = cfunc(sig, cache=True, fastmath=K._FM, error_model="numpy")(globals()[name])
    return body.address
