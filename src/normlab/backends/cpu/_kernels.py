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

Every public kernel is serial and ends with ``lo, hi``: it processes work items
``[lo, hi)`` of its outermost loop (statistic groups, rows, (sample, row block) pairs,
or chunks of partial sums) and :func:`normlab.backends.cpu.team.run` spreads the items
over threads; items write disjoint outputs, so any split gives the same result.

Numerics (the precision policy of :mod:`normlab.core.stats`): totals accumulate in
float64, but each reduction first adds a block (``_BLK`` elements; channels-last: a
lane of a tile of rows, at most ``4 * _FLUSH`` values) in the input's dtype -- a loop
LLVM vectorizes with several accumulators -- and flushes that partial sum into the
float64 total: no element is converted to float64 in an inner loop, and each float32
lane adds only a few dozen values (relative error ~1e-7). Elementwise steps run in the
input's dtype (float32 or float64).

Variances are two-pass, never ``E[x^2] - E[x]^2``. Grouped view: a rough mean ``mc``
(rounded to x's dtype) from the group's first ``_SAMPLE`` elements, then one pass sums
``d = x - mc`` and ``d^2``, so ``mean = mc + mean(d)`` and ``M2 = sum(d^2) - sum(d) *
mean(d)`` (corrected two-pass: d is nearly centred, so little cancels; where more than
two bits would, the pass is repeated about the mean it found, from cache). Channels-last
view: the same, per work item (a sample, or a block of rows), with each group's rough
mean from its first rows and the sums kept per lane of a tile of rows (float32 lanes of
at most ``4 * _FLUSH`` values, flushed to float64); BatchNorm's row blocks are merged with
Chan's formula ``M2 = M2a + M2b + delta^2 * na*nb/(na+nb)``.

The output pass is ``y = (x - mc) * a + b'`` with ``a = rstd * w`` and
``b' = b - (mean - mc) * a`` folded per channel in float64: ``x - mc`` is exact for x
near the mean, so an input offset by 1e4 in float32 loses nothing beyond its own
rounding. The mean returned (and used by backward) is the mean rounded to x's dtype.

``fastmath`` is limited to ``reassoc``/``contract`` so that LLVM may vectorize the
reductions while NaN and Inf still propagate as in torch.nn.
"""

from __future__ import annotations

import platform

import llvmlite.ir as llvm_ir
import numpy as np
from numba import carray, cfunc, literal_unroll, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_FM = {"reassoc", "contract"}
_OPTS = {"cache": True, "fastmath": _FM, "nogil": True}

# Elements summed in x's dtype before the partial sum is added to a float64 total:
# LLVM vectorizes such a loop with several vector accumulators (32+ float32 lanes), so
# each lane adds ~32 values -- relative error ~1e-7 -- and no element is converted to
# float64 (which would halve the vector width and add a conversion per element).
_BLK = 1024
# The rough mean a group's deviations are taken about is the mean of its first
# ``_SAMPLE`` elements (a full pass for it would cost a third of the forward's arithmetic);
# if that lands far from the group's mean -- the squared sum of deviations ``sd^2 / n``
# exceeds ``_RECENTER`` of their sum of squares ``sq``, so that ``M2 = sq - sd^2 / n``
# would cancel more than two bits -- the deviations are summed again about the mean
# just found (from cache), which leaves nothing to cancel.
_SAMPLE = 64
_RECENTER = 0.75
# Rows whose dweight/dbias partials are summed in x's dtype before a float64 flush.
_ROW_BLOCK = 32


# -------------------------------------------------------------- 16-bit floats in place
#
# The kernels also take bfloat16 and float16 tensors as raw 16-bit integer arrays --
# bfloat16 as uint16, float16 as int16 (numba has no 16-bit float type; the two integer
# types tell the formats apart). Each element is decoded to float32 where it is read
# and the float32 result is rounded back, to nearest even, where it is written: the
# arithmetic in between is the float32 kernel's -- without the two conversion passes and
# the float32 copies of upcasting first; the results are bit-identical to upcasting
# (tested), as the decodes vectorize like float32 loads and the sums run in the same
# order. For float32/float64 arrays the helpers compile to nothing.
#
# bfloat16 is the top half of a float32: a shift and a bit cast; rounding back adds to the
# bits (see :func:`_f32_to_bf16`), checked against torch on all 65536 bfloat16 values and
# on every tie. Both are written as LLVM IR in 32-bit lanes. float16 uses LLVM's
# half-precision conversions, which become the CPU's own (F16C on x86), checked against
# torch on all 65536 halves and on every float16 value, rounding tie, subnormal and
# overflow case.


def _const(ty, value):
    """The constant ``value`` of the LLVM type ``ty``, splat over its lanes if ``ty`` is a
    vector (the conversions below serve single elements and whole lines alike)."""
    if isinstance(ty, llvm_ir.VectorType):
        return llvm_ir.Constant(ty, [value] * ty.count)
    return llvm_ir.Constant(ty, value)


def _like(value, element):
    """``element`` (an LLVM scalar type), or a vector of it as wide as ``value``'s."""
    return llvm_ir.VectorType(element, value.type.count) if isinstance(value.type, llvm_ir.VectorType) else element


def _bf16_decode_ir(builder, bits):
    """bfloat16 bits (i16 or a vector of them) -> float32: the bits as the top half."""
    i32 = _like(bits, llvm_ir.IntType(32))
    return builder.bitcast(builder.shl(builder.zext(bits, i32), _const(i32, 16)), _like(bits, llvm_ir.FloatType()))


def _bf16_encode_ir(builder, value):
    """float32 (or a vector) -> bfloat16 bits, as :func:`_f32_to_bf16`."""
    i32 = _like(value, llvm_ir.IntType(32))
    bits = builder.bitcast(value, i32)
    top = builder.lshr(bits, _const(i32, 16))
    rounded = builder.lshr(builder.add(builder.add(bits, _const(i32, 0x7FFF)), builder.and_(top, _const(i32, 1))),
                           _const(i32, 16))
    nan = builder.fcmp_unordered("uno", value, value)
    return builder.trunc(builder.select(nan, builder.or_(top, _const(i32, 0x40)), rounded),
                         _like(value, llvm_ir.IntType(16)))


def _half_decode_ir(builder, bits):
    """float16 bits (i16 or a vector) -> float32, as :func:`_half_to_f32`."""
    return builder.fpext(builder.bitcast(bits, _like(bits, llvm_ir.HalfType())), _like(bits, llvm_ir.FloatType()))


def _half_encode_ir(builder, value):
    """float32 (or a vector) -> float16 bits, as :func:`_f32_to_half`."""
    return builder.bitcast(builder.fptrunc(value, _like(value, llvm_ir.HalfType())), _like(value, llvm_ir.IntType(16)))


@intrinsic
def _bf16_to_f32(typingctx, bits):
    """bfloat16 bits (uint16) -> float32: the bits as the top half of a float32."""
    def codegen(context, builder, signature, args):
        return _bf16_decode_ir(builder, args[0])
    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_bf16(typingctx, value):
    """float32 -> bfloat16 bits (uint16), rounded to nearest even; a NaN stays a (quiet)
    NaN. Written in 32-bit integer IR: numba's own arithmetic widens uint32 to 64 bits,
    which halves the vector width (``y = x * a + b`` on 2**20 bfloat16 values, one
    thread: 521 us with numba's uint32 arithmetic, 186 us with this IR; float32: 121 us).
    The NaN test is a float compare (two instructions fewer than an integer test, 12 %
    on that loop): correct while the kernels' fast-math flags (``_FM``) leave out
    ``nnan``, which the conversion test checks by compiling with those flags."""
    def codegen(context, builder, signature, args):
        return _bf16_encode_ir(builder, args[0])
    return types.uint16(types.float32), codegen


@intrinsic
def _half_to_f32(typingctx, bits):
    """float16 bits (int16) -> float32: LLVM's ``fpext half``, a hardware conversion
    (F16C ``vcvtph2ps`` on x86) that vectorizes like a load."""
    def codegen(context, builder, signature, args):
        return _half_decode_ir(builder, args[0])
    return types.float32(types.int16), codegen


@intrinsic
def _f32_to_half(typingctx, value):
    """float32 -> float16 bits (int16): LLVM's ``fptrunc``, rounding to nearest even
    (F16C ``vcvtps2ph``); overflow gives Inf, NaN stays NaN."""
    def codegen(context, builder, signature, args):
        return _half_encode_ir(builder, args[0])
    return types.int16(types.float32), codegen


def _ld(value):
    """An element as read from an array, in the compute dtype (16-bit floats decoded)."""
    raise NotImplementedError  # numba-only, see the overload


@overload(_ld)
def _ld_impl(value):
    if value == types.uint16:  # bfloat16
        return lambda value: _bf16_to_f32(value)
    if value == types.int16:  # float16
        return lambda value: _half_to_f32(value)
    return lambda value: value


def _enc(value, out):
    """``value`` as stored into the array ``out`` (rounded to its 16-bit format if any;
    a float64 value is rounded to float32 first)."""
    raise NotImplementedError  # numba-only, see the overload


@overload(_enc)
def _enc_impl(value, out):
    if out.dtype == types.uint16:  # bfloat16
        return lambda value, out: _f32_to_bf16(np.float32(value))
    if out.dtype == types.int16:  # float16
        return lambda value, out: _f32_to_half(np.float32(value))
    return lambda value, out: value


def _ctype(x):
    """The compute dtype of an input array: float32 for 16-bit floats, else its own."""
    raise NotImplementedError  # numba-only, see the overload


@overload(_ctype)
def _ctype_impl(x):
    if x.dtype == types.uint16 or x.dtype == types.int16:
        return lambda x: np.float32
    return lambda x: x.dtype.type


# ------------------------------------------------------------------ streaming stores
#
# A large output is written with non-temporal ("streaming") stores: whole 64-byte lines
# go to memory without first being read into the cache. An ordinary store to a line not
# in cache reads the line first (a read-for-ownership), so an output pass that reads x
# and writes y moves three streams, not two, and pushes x's lines out of the cache. On
# the 2-core benchmark machine, ``y = x * a + b`` on 25.7 MB, one thread: 2.26 ms with
# ordinary stores, 1.75 ms streaming; on 4 MB (which the caches hold) streaming was
# slower, 0.24 against 0.18 ms -- hence a size threshold. (torch.nn's normalization
# kernels use ordinary stores.)
#
# A write loop streams whole 64-byte lines of output, each computed and stored by one
# line intrinsic (see "Whole lines" and the write loops below). Streaming stores are
# weakly ordered: every team body that may stream ends with :func:`_store_fence`, so the
# outputs are visible before the team's closing barrier. Whether a call streams is the
# caller's ``stream`` argument (the backend decides by the output's size against the
# cache, ``backend.STREAM_FROM``, and by the length of the runs the loops write,
# ``backend.STREAM_MIN_RUN``).

_LINE = 64  # bytes per non-temporal vector store: a cache line
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


@intrinsic
def _to_line(typingctx, arr, i):
    """How many elements lie from ``arr[i]`` to the next 64-byte boundary (0 if on one)."""
    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        i64 = llvm_ir.IntType(64)
        address = builder.ptrtoint(builder.gep(a.data, [args[1]]), i64)
        gap = builder.and_(builder.neg(address), i64(_LINE - 1))
        itemsize = context.get_abi_sizeof(context.get_value_type(signature.args[0].dtype))
        return builder.lshr(gap, i64(itemsize.bit_length() - 1))
    return types.intp(arr, types.intp), codegen


@intrinsic
def _store_fence(typingctx):
    """Order this thread's streaming stores before its later stores (x86: ``sfence``)."""
    def codegen(context, builder, signature, args):
        if _X86:
            sfence = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(llvm_ir.VoidType(), []),
                                                    "llvm.x86.sse.sfence")
            builder.call(sfence, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


def _stack_buffer(count: int, zero: bool):
    """An intrinsic ``f(like)``: ``count`` elements of ``like``'s type on the stack (zeros
    if ``zero``), as a pointer valid in the calling function (allocated once in its entry
    block)."""
    @intrinsic
    def buffer(typingctx, like):
        def codegen(context, builder, signature, args):
            ty = context.get_value_type(signature.args[0])
            with builder.goto_entry_block():  # (numba's alloca_once would also zero it there)
                arr = builder.alloca(llvm_ir.ArrayType(ty, count))
            if zero:
                builder.store(llvm_ir.Constant(llvm_ir.ArrayType(ty, count), None), arr)
            return builder.bitcast(arr, ty.as_pointer())
        return types.CPointer(like)(like), codegen
    return buffer


@njit(inline="always", **_OPTS)
def _plain_end(dst, i, e, stream):
    """Where the first segment of ordinary stores of a write loop over ``dst[i:e]`` ends:
    at e when not streaming, else at the first 64-byte boundary (at most e), from which
    the loop streams whole lines."""
    return i + min(e - i, _to_line(dst, i)) if stream else e


# Whole lines. Every streamed write, and the channels-last output passes with their
# coefficients in registers (:func:`_slice_affine`, :func:`_slice_dx`), write each
# 64-byte line of output with vector instructions emitted here: loads of x (and dy) at
# the line and of the coefficients (an array's lanes, or a scalar in every lane), the
# arithmetic with the kernels' fast-math flags, one store -- non-temporal when
# streaming. Same arithmetic as the numba loops, in the order LLVM gives the loops
# (:func:`_row_dx_formula`): the same bits (tested). Before, a streamed run of 64
# elements was computed into a buffer on the stack and copied from there with
# non-temporal stores, and the register passes looped over slices, each run paying the
# slices' bounds and LLVM's runtime alias checks. One thread, 25.7 MB float32,
# streaming, before -> after: channels-last (C = 64) output pass 1.78 -> 0.91 ms, dx
# pass 2.35 -> 1.46 ms; NCHW output pass over planes of 3136 elements 1.11-1.23 ->
# 0.85-0.90 ms, of 784 2.18 -> 0.79 ms, of 196 6.40 -> 0.88 ms (a copy: 0.93-1.43 ms in
# the same runs).

_FM_FLAGS = tuple(sorted(_FM))


def _line_pointer(context, builder, aryty, ary, index, lanes):
    """A pointer to the ``lanes`` elements of the array ``ary`` from ``index``, as one vector."""
    data = context.make_array(aryty)(context, builder, ary).data
    vector = llvm_ir.VectorType(context.get_value_type(aryty.dtype), lanes)
    return builder.bitcast(builder.gep(data, [index]), vector.as_pointer())


def _load_line(context, builder, aryty, ary, index, lanes):
    """``lanes`` elements of ``ary`` from ``index`` as a vector in the compute dtype
    (16-bit floats decoded, as :func:`_ld`)."""
    align = context.get_abi_sizeof(context.get_value_type(aryty.dtype))
    value = builder.load(_line_pointer(context, builder, aryty, ary, index, lanes), align=align)
    if aryty.dtype == types.uint16:
        return _bf16_decode_ir(builder, value)
    if aryty.dtype == types.int16:
        return _half_decode_ir(builder, value)
    return value


def _prefetch_line(context, builder, aryty, ary, index):
    """Ask for the cache line holding ``ary[index]`` to be brought into the caches: a hint
    (``llvm.prefetch``, for reading, kept in every level), which neither faults nor
    changes any result."""
    data = context.make_array(aryty)(context, builder, ary).data
    byte_ptr = llvm_ir.IntType(8).as_pointer()
    i32 = llvm_ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, llvm_ir.FunctionType(llvm_ir.VoidType(), [byte_ptr, i32, i32, i32]), "llvm.prefetch.p0i8")
    builder.call(fn, [builder.bitcast(builder.gep(data, [index]), byte_ptr), i32(0), i32(3), i32(1)])


def _store_line(context, builder, aryty, ary, index, value, stream):
    """Store the vector ``value`` into ``ary`` from ``index`` (rounded to its 16-bit format
    if any, as :func:`_enc`); ``stream``: with a non-temporal store, ``ary[index]`` on a
    64-byte boundary."""
    if aryty.dtype == types.uint16:
        value = _bf16_encode_ir(builder, value)
    elif aryty.dtype == types.int16:
        value = _half_encode_ir(builder, value)
    lanes = value.type.count
    align = _LINE if stream else context.get_abi_sizeof(context.get_value_type(aryty.dtype))
    store = builder.store(value, _line_pointer(context, builder, aryty, ary, index, lanes), align=align)
    if stream:
        store.set_metadata("nontemporal", builder.module.add_metadata([llvm_ir.Constant(llvm_ir.IntType(32), 1)]))


def _splat(builder, value, lanes):
    """The scalar ``value`` in every one of ``lanes`` lanes of a vector."""
    vector = llvm_ir.VectorType(value.type, lanes)
    undefined = llvm_ir.Constant(vector, llvm_ir.Undefined)
    one = builder.insert_element(undefined, value, llvm_ir.Constant(llvm_ir.IntType(32), 0))
    return builder.shuffle_vector(one, undefined, llvm_ir.Constant(llvm_ir.VectorType(llvm_ir.IntType(32), lanes),
                                                                   [0] * lanes))


def _line_elems(arr):
    """Elements of ``arr`` in a 64-byte line, as a compile-time constant (``arr.itemsize``
    is read at run time: a loop over a line's lanes by it does not unroll)."""
    raise NotImplementedError  # numba-only, see the overload


def _lanes_of(dtype: types.Type) -> int:
    """Elements of numba type ``dtype`` in a 64-byte line."""
    return _LINE * 8 // dtype.bitwidth


@overload(_line_elems, inline="always")
def _line_elems_impl(arr):
    elems = _lanes_of(arr.dtype)
    return lambda arr: elems


def _line_intrinsic(formula, stream: bool):
    """An intrinsic ``f(inputs, out, i, coefficients, j, ahead)`` that writes the 64-byte
    line of ``out`` from ``i`` (L elements): ``out[i:i + L] = formula(builder, *(a[i:i +
    L] for a in inputs), *coefficients)``, where a coefficient is an array read from ``j``
    (its lanes) or a scalar (the same in every lane); ``stream``: with a non-temporal
    store. ``ahead`` not 0: first asks for each input's line ``ahead`` elements on (see
    the write loops)."""
    @intrinsic
    def line(typingctx, inputs, out, i, coefficients, j, ahead):
        def codegen(context, builder, signature, args):
            inputs_type, out_type, _, coefficients_type, _, _ = signature.args
            with builder.if_then(builder.icmp_signed("!=", args[5], _const(args[5].type, 0))):
                there = builder.add(args[2], args[5])
                for q, ty in enumerate(inputs_type):
                    _prefetch_line(context, builder, ty, builder.extract_value(args[0], q), there)
            lanes = _lanes_of(out_type.dtype)
            values = [_load_line(context, builder, ty, builder.extract_value(args[0], q), args[2], lanes)
                      for q, ty in enumerate(inputs_type)]
            for q, ty in enumerate(coefficients_type):
                value = builder.extract_value(args[3], q)
                values.append(_load_line(context, builder, ty, value, args[4], lanes) if isinstance(ty, types.Array)
                              else _splat(builder, value, lanes))
            _store_line(context, builder, out_type, args[1], args[2], formula(builder, *values), stream)
            return context.get_dummy_value()
        return types.void(inputs, out, types.intp, coefficients, types.intp, types.intp), codegen
    return line


# The formulas of the write loops' runs, with their order of operations.

def _affine_formula(builder, x, m, a, b):
    """(x - m) * a + b, as :func:`_affine_run` and :func:`_scaled_run`."""
    f = _FM_FLAGS
    return builder.fadd(builder.fmul(builder.fsub(x, m, flags=f), a, flags=f), b, flags=f)


def _row_affine_formula(builder, x, mc, rc, sh, w, b):
    """((x - mc) * rc + sh) * w + b, as :func:`_row_affine_run`."""
    f = _FM_FLAGS
    normed = builder.fadd(builder.fmul(builder.fsub(x, mc, flags=f), rc, flags=f), sh, flags=f)
    return builder.fadd(builder.fmul(normed, w, flags=f), b, flags=f)


def _dx_formula(builder, dy, x, m, a, b, k):
    """a * dy + b * (x - m) + k, as :func:`_dx_run` and :func:`_scaled_dx_run`."""
    f = _FM_FLAGS
    scaled = builder.fmul(b, builder.fsub(x, m, flags=f), flags=f)
    return builder.fadd(builder.fadd(builder.fmul(a, dy, flags=f), scaled, flags=f), k, flags=f)


def _row_dx_formula(builder, dy, x, mc, rc, w, b, k):
    """(rc * w) * dy + (b * (x - mc) + k): :func:`_row_dx_run`'s ``(rc * w) * dy + b *
    (x - mc) + k`` as LLVM reassociates it in the loop (the fast-math flags allow it; the
    multiply-adds then fuse ``b * (x - mc) + k`` first). Written in the source's order
    here, the lines' bits differed from the loop's
    (``test_short_group_kernels_equal_the_grouped_kernels``)."""
    f = _FM_FLAGS
    scaled = builder.fmul(b, builder.fsub(x, mc, flags=f), flags=f)
    gradient = builder.fmul(builder.fmul(rc, w, flags=f), dy, flags=f)
    return builder.fadd(gradient, builder.fadd(scaled, k, flags=f), flags=f)


#: ``_affine_line((x,), y, i, (m, a, b), j, ahead)`` and the others: a line of each run's
#: formula, with ordinary stores (the channels-last register passes) and (``*_streamed``)
#: non-temporal ones (every streamed write loop).
_affine_line, _affine_line_streamed = _line_intrinsic(_affine_formula, False), _line_intrinsic(_affine_formula, True)
_dx_line, _dx_line_streamed = _line_intrinsic(_dx_formula, False), _line_intrinsic(_dx_formula, True)
_row_affine_line_streamed = _line_intrinsic(_row_affine_formula, True)
_row_dx_line_streamed = _line_intrinsic(_row_dx_formula, True)

# The write loops. Each computes a run of output into ``out`` (numba loops below) and a
# caller that may stream writes its target in this shape (one copy of each call)::
#
#     i, j = o, _plain_end(y, o, e, stream)
#     while True:
#         run(x[i:j] -> y[i:j])                 # ordinary stores: all of [o, e) when
#         if j == e:                            # not streaming, else the head up to the
#             break                             # first line boundary, then the tail
#         while j + _line_elems(y) <= e:
#             line_streamed((x,), y, j, ...)    # whole lines, streamed
#             j += _line_elems(y)
#         i, j = j, e
#
# ``ahead`` (grouped and row kernels, streamed lines only): where the group the thread
# visits next lies, in elements from this one (0: none in its chunk). Each streamed line
# then asks for the same line of each of that group's inputs (the line intrinsics' own
# ``ahead``: :func:`_prefetch_line`), so the next statistics pass finds its data on the
# way while this one's stores drain. Without
# it, a pass of statistics over a group read from memory and an output pass that only
# wrote took turns. Module level, 2 threads, float32, each sample one call after the
# caches were flushed (``normlab bench --cache cold``'s policy), old vs new code
# alternated twice: forward InstanceNorm and GroupNorm NCHW (32, 64, 56, 56) 1.43-1.52
# -> 1.20-1.37 ms (a copy took 1.13-1.34), LayerNorm/RMSNorm (16384, 768) 2.36-2.49 ->
# 2.21-2.26 ms, BatchNorm NCHW 1.55-1.59 -> 1.47-1.50 ms; backward InstanceNorm/GroupNorm
# 1.98-2.09 -> 1.87-1.90 ms, LayerNorm and BatchNorm unchanged. The channels-last
# per-sample forward (GroupNorm/InstanceNorm, :func:`cl_forward_fused`) asks for the
# next sample: (32, 64, 56, 56) 1.50-1.57 -> 1.43-1.47 ms in one alternated run, 1.51-1.57
# -> 1.48-1.53 in another (copy 1.07-1.14): 0-5 %, kept as the same rule; its backward
# does not (a sample's x and dy, 1.6 MB there, overflow the 1 MiB L2: no gain measured).


@njit(inline="always", **_OPTS)
def _affine_run(xs, out, m, a, b, n):
    """out = (x - m) * a + b over n elements, per-element coefficients."""
    for c in range(n):
        out[c] = _enc((_ld(xs[c]) - m[c]) * a[c] + b[c], out)


@njit(inline="always", **_OPTS)
def _scaled_run(xs, out, mc, a, b, n):
    """out = (x - mc) * a + b over n elements, scalar coefficients."""
    for c in range(n):
        out[c] = _enc((_ld(xs[c]) - mc) * a + b, out)


@njit(inline="always", **_OPTS)
def _row_affine_run(xs, out, mc, rc, sh, w, b, n):
    """out = ((x - mc) * rc + sh) * w + b over n elements of a row (the affine per element)."""
    for k in range(n):
        out[k] = _enc(((_ld(xs[k]) - mc) * rc + sh) * w[k] + b[k], out)


@njit(inline="always", **_OPTS)
def _dx_run(dys, xs, out, m, a, b, k, n):
    """out = a * dy + b * (x - m) + k over n elements, per-element coefficients."""
    for c in range(n):
        out[c] = _enc(a[c] * _ld(dys[c]) + b[c] * (_ld(xs[c]) - m[c]) + k[c], out)


@njit(inline="always", **_OPTS)
def _scaled_dx_run(dys, xs, out, mc, a, b, k, n):
    """out = a * dy + b * (x - mc) + k over n elements, scalar coefficients."""
    for c in range(n):
        out[c] = _enc(a * _ld(dys[c]) + b * (_ld(xs[c]) - mc) + k, out)


@njit(inline="always", **_OPTS)
def _row_dx_run(dys, xs, out, mc, rc, w, b, k, n):
    """out = (rc * w) * dy + b * (x - mc) + k over n elements of a row."""
    for c in range(n):
        out[c] = _enc((rc * w[c]) * _ld(dys[c]) + b * (_ld(xs[c]) - mc) + k, out)


# --------------------------------------------------------------------------- grouped


@njit(inline="always", **_OPTS)
def _rough_mean(xs):
    """Mean of ``xs`` (a group's first elements), rounded to x's dtype."""
    dt = _ctype(xs)
    acc = dt(0.0)
    for i in range(xs.size):
        acc += _ld(xs[i])
    return dt(np.float64(acc) / xs.size)


@njit(inline="always", **_OPTS)
def _dev_sums(xs, mc):
    """(sum(x - mc), sum((x - mc)^2)) over ``xs`` as float64: blocks of ``_BLK`` summed in
    x's dtype, each flushed into the float64 totals. A row of at most one block skips the
    block loop: on short rows (e.g. 40 elements) its slicing cost a third of the sums."""
    dt = _ctype(xs)
    z = dt(0.0)
    n = xs.size
    if n <= _BLK:
        ad = z
        aq = z
        for i in range(n):
            d = _ld(xs[i]) - mc
            ad += d
            aq += d * d
        return np.float64(ad), np.float64(aq)
    sd = 0.0
    sq = 0.0
    for lo in range(0, n, _BLK):
        xb = xs[lo:lo + _BLK]
        ad = z
        aq = z
        for i in range(xb.size):
            d = _ld(xb[i]) - mc
            ad += d
            aq += d * d
        sd += ad
        sq += aq
    return sd, sq


@njit(inline="always", **_OPTS)
def _grad_sums(xs, dys, mc):
    """(sum(dy), sum(dy * (x - mc))) over a row as float64, blocked as :func:`_dev_sums`."""
    dt = _ctype(xs)
    z = dt(0.0)
    n = xs.size
    if n <= _BLK:
        ady = z
        adx = z
        for s in range(n):
            d = _ld(dys[s])
            ady += d
            adx += d * (_ld(xs[s]) - mc)
        return np.float64(ady), np.float64(adx)
    sdy = 0.0
    sdyx = 0.0
    for lo in range(0, n, _BLK):
        xb = xs[lo:lo + _BLK]
        db = dys[lo:lo + _BLK]
        ady = z
        adx = z
        for s in range(xb.size):
            d = _ld(db[s])
            ady += d
            adx += d * (_ld(xb[s]) - mc)
        sdy += ady
        sdyx += adx
    return sdy, sdyx


@njit(inline="always", **_OPTS)
def _near_enough(sd, sq, n):
    """Whether the float64 sums ``sd = sum(x - mc)`` and ``sq = sum((x - mc)^2)`` of n
    values were taken about a shift mc near enough to their mean (see ``_RECENTER``):
    ``sd^2 / n`` at most ``_RECENTER`` of ``sq``. False for an overflowed or NaN sq,
    which is then summed again too."""
    return sq < np.inf and sd * sd <= _RECENTER * n * sq


@njit(inline="always", **_OPTS)
def _moments(sd, sq, n, center, eps):
    """``(dm, var, rstd)`` of a group from the float64 sums of ``d = x - mc`` and ``d^2``
    over its n values: ``dm = mean(d)`` (0 when not centering), ``var = M2 / n`` with
    ``M2 = sq - sd * dm`` (the corrected two-pass formula), ``rstd = 1 / sqrt(var + eps)``."""
    if center:
        dm = sd / n
        m2 = sq - sd * dm
        if m2 < 0.0:  # rounding of a constant group; a NaN fails the test and stays
            m2 = 0.0
    else:
        dm = 0.0
        m2 = sq
    v = m2 / n
    return dm, v, 1.0 / np.sqrt(v + eps)


@njit(inline="always", **_OPTS)
def _dx_shifts(r, s1, s2, n, batch, center, dt):
    """``(cb, cc)`` of ``dx = ca * dy + cb * (x - mc) + cc`` for a group of n values, in
    the compute dtype ``dt``, from ``r = rstd`` and the float64 sums ``s1 = sum(w * dy)``
    and ``s2 = sum(w * dy * xhat)``: with batch statistics ``cb = -r^2 * s2 / n`` and,
    when centering, ``cc = -r * s1 / n``; 0 otherwise (fixed statistics do not move
    with x)."""
    cb = dt(0.0)
    cc = dt(0.0)
    if batch:
        cb = dt(-r * r * s2 / n)
        if center:
            cc = dt(-r * s1 / n)
    return cb, cc


@njit(inline="always", **_OPTS)
def _column_sums(pa, pb, lo, hi):
    """Per column c in [lo, hi): the sums over the rows of the 2-D float64 arrays pa and
    pb (e.g. per-block or per-sample partials, one column per channel), each column's
    terms added in row order from 0.0, a row at a time. Read down a column instead, the
    values lie (columns * 8) bytes apart -- 16 KiB at 2048 columns, every one in the same
    L1 set: summing (64, 4096) partials took 2.0 ms instead of 0.12 (one thread)."""
    ta = np.zeros(hi - lo)
    tb = np.zeros(hi - lo)
    for a in range(pa.shape[0]):
        ra = pa[a, lo:hi]
        rb = pb[a, lo:hi]
        for i in range(hi - lo):
            ta[i] += ra[i]
            tb[i] += rb[i]
    return ta, tb


@njit(inline="always", **_OPTS)
def _group_sums(x, A, P, p, ks, mc):
    """(sum(x - mc), sum((x - mc)^2)) as float64 over group p of the (A, P, ks) view:
    :func:`_dev_sums` of each of its A slabs, added in order."""
    sd = 0.0
    sq = 0.0
    for a in range(A):
        ad, aq = _dev_sums(x[(a * P + p) * ks:(a * P + p + 1) * ks], mc)
        sd += ad
        sq += aq
    return sd, sq


@njit(inline="always", **_OPTS)
def _row_affine(x, y, o, K, mc, rc, sh, w, b, stream, ahead):
    """y = ((x - mc) * rc + sh) * w + b over the row of K elements at offset o
    (streaming, and ``ahead``: see the write loops)."""
    e = o + K
    i, j = o, _plain_end(y, o, e, stream)
    while True:
        _row_affine_run(x[i:j], y[i:j], mc, rc, sh, w[i - o:], b[i - o:], j - i)
        if j == e:
            break
        while j + _line_elems(y) <= e:
            _row_affine_line_streamed((x,), y, j, (mc, rc, sh, w, b), j - o, ahead)
            j += _line_elems(y)
        i, j = j, e


@njit(inline="always", **_OPTS)
def _plane_affine(x, y, o, S, mc, ca, cb, stream, ahead):
    """y = (x - mc) * ca + cb over the plane of S elements at offset o (one channel's
    coefficients; streaming, and ``ahead``: see the write loops)."""
    e = o + S
    i, j = o, _plain_end(y, o, e, stream)
    while True:
        _scaled_run(x[i:j], y[i:j], mc, ca, cb, j - i)
        if j == e:
            break
        while j + _line_elems(y) <= e:
            _affine_line_streamed((x,), y, j, (mc, ca, cb), 0, ahead)
            j += _line_elems(y)
        i, j = j, e


@njit(**_OPTS)
def grouped_forward(x, y, w, b, A, P, K, S, G, eps, center, compute, mean, var, rstd, stream, lo, hi):
    """y = (x - mean_p) * rstd_p * w[c] + b[c] on the (A, P, K, S) view.

    ``compute``: batch statistics are written to mean/var/rstd (P,); otherwise
    mean/rstd are read from them (fixed statistics). ``center`` False: mean 0,
    var = mean square (RMSNorm). w and b hold G*K values in x's dtype (ones/zeros
    if absent). Inner loops run over slices: numba then drops the negative-index
    wraparound and LLVM vectorizes them.

    Statistics: a rough mean ``mc`` of the group's first ``_SAMPLE`` elements; one
    pass sums ``d = x - mc`` and ``d^2`` (blocks in x's dtype, see ``_BLK``), which
    gives the exact correction ``dm = mean(d)`` and ``M2 = sum(d^2) - sum(d) * dm`` (the
    corrected two-pass formula; repeated about ``mc + dm`` when the sample was far from
    the mean, see ``_RECENTER``). The output pass reads the group from cache. (A full
    first pass for ``mc``, as before, cost ~10 % of the forward: GroupNorm/BatchNorm/
    InstanceNorm (32, 64, 56, 56) 1.3 -> 1.2 ms at 2 threads.) The output pass is one
    subtraction and one fused multiply-add per element: ``y = (x - mc) * a + b'`` with ``a = rstd * w`` and
    ``b' = b - dm * a`` folded per channel in float64.
    """
    dt = _ctype(x)
    z = dt(0.0)
    ks = K * S
    n = A * ks
    for p in range(lo, hi):
        if compute:
            mc = _rough_mean(x[p * ks:p * ks + min(ks, _SAMPLE)]) if center else z
            for attempt in range(2):  # (a loop: one inlined copy of the sums to compile)
                sd, sq = _group_sums(x, A, P, p, ks, mc)
                if not center or attempt == 1 or _near_enough(sd, sq, n):
                    break
                mc = dt(mc + sd / n)  # the sample's mean was far from the group's: again
            dm, v, r = _moments(sd, sq, n, center, eps)
            mean[p] = mc + dm
            var[p] = v
            rstd[p] = r
        else:
            mc = dt(mean[p])
            dm = 0.0
            r = np.float64(rstd[p])
        c0 = (p % G) * K
        ws = w[c0:c0 + K]
        bs = b[c0:c0 + K]
        ahead = ks if p + 1 < hi else 0  # the next group's element at the same place
        for a in range(A):
            base = (a * P + p) * ks
            if S == 1:
                rc = dt(r)
                sh = dt(-dm * r)
                _row_affine(x, y, base, K, mc, rc, sh, ws, bs, stream, ahead)
            else:
                for k in range(K):
                    sc = r * ws[k]
                    _plane_affine(x, y, base + k * S, S, mc, dt(sc), dt(bs[k] - dm * sc), stream, ahead)


@njit(inline="always", **_OPTS)
def _row_dx(dy, x, o, K, ws, mc, rc, cb, cc, dx, stream, ahead):
    """dx = (rc * w) * dy + cb * (x - mc) + cc over the row of K elements at offset o
    (streaming, and ``ahead``: see the write loops)."""
    e = o + K
    i, j = o, _plain_end(dx, o, e, stream)
    while True:
        _row_dx_run(dy[i:j], x[i:j], dx[i:j], mc, rc, ws[i - o:], cb, cc, j - i)
        if j == e:
            break
        while j + _line_elems(dx) <= e:
            _row_dx_line_streamed((dy, x), dx, j, (mc, rc, ws, cb, cc), j - o, ahead)
            j += _line_elems(dx)
        i, j = j, e


@njit(inline="always", **_OPTS)
def _plane_dx(dy, x, o, S, mc, ca, cb, cc, dx, stream, ahead):
    """dx = ca * dy + cb * (x - mc) + cc over the plane of S elements at offset o
    (streaming, and ``ahead``: see the write loops)."""
    e = o + S
    i, j = o, _plain_end(dx, o, e, stream)
    while True:
        _scaled_dx_run(dy[i:j], x[i:j], dx[i:j], mc, ca, cb, cc, j - i)
        if j == e:
            break
        while j + _line_elems(dx) <= e:
            _dx_line_streamed((dy, x), dx, j, (mc, ca, cb, cc), 0, ahead)
            j += _line_elems(dx)
        i, j = j, e


@njit(**_OPTS)
def grouped_backward(dy, x, w, mean, rstd, A, P, K, S, G, center, batch, need_dx, T,
                     dx, dwp, dbp, stream, lo, hi):
    """Analytic backward on the (A, P, K, S) view.

    Per group: ``xhat = (x - mean) * rstd``, ``g = dy * w``,
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` (batch statistics; no
    ``mean(g)`` term when not centering) or ``rstd * g`` (fixed statistics), evaluated
    as ``dx = (rstd * w) * dy - rstd^2 * mean(g * xhat) * (x - mean) - rstd * mean(g)``.
    Per channel partial sums ``dwp[t, c] = sum dy * xhat`` and ``dbp[t, c] = sum dy``
    for each of the T work chunks (the caller adds the T rows: deterministic).
    One pass for both sums (blocks of ``_BLK`` in x's dtype, totals in float64), one
    pass for dx (one subtraction and two fused multiply-adds per element).
    """
    dt = _ctype(x)
    ks = K * S
    n = A * ks
    last = hi * P // T  # the end of this call's groups: group p + 1 is the next it visits
    for t in range(lo, hi):
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
                        d = _ld(dys[k])
                        dxh = d * ((_ld(xs[k]) - mc) * rc)
                        dws[k] += dxh
                        dbs[k] += d
                        s1 += ws[k] * d
                        s2 += ws[k] * dxh
                else:
                    for k in range(K):
                        sdy, sdyx = _grad_sums(x[base + k * S:base + (k + 1) * S],
                                               dy[base + k * S:base + (k + 1) * S], mc)
                        sdyx *= r
                        wc = np.float64(ws[k])
                        dws[k] += sdyx
                        dbs[k] += sdy
                        s1 += wc * sdy
                        s2 += wc * sdyx
            if not need_dx:
                continue
            cb, cc = _dx_shifts(r, s1, s2, n, batch, center, dt)
            ahead = ks if p + 1 < last else 0  # the next group's element at the same place
            for a in range(A):
                base = (a * P + p) * ks
                if S == 1:
                    _row_dx(dy, x, base, K, ws, mc, rc, cb, cc, dx, stream, ahead)
                else:
                    for k in range(K):
                        _plane_dx(dy, x, base + k * S, S, mc, rc * ws[k], cb, cc, dx, stream, ahead)


@njit(**_OPTS)
def _flush_partials(bdw, bdb, dws, dbs):
    """Add two arrays of partial sums in x's dtype (a row block's dweight/dbias partials,
    a tile's lanes) to their float64 totals and clear them."""
    for k in range(bdw.size):
        dws[k] += bdw[k]
        dbs[k] += bdb[k]
        bdw[k] = 0.0
        bdb[k] = 0.0


@njit(**_OPTS)
def rows_backward(dy, x, w, mean, rstd, P, K, center, batch, need_dx, T, dx, dwp, dbp, stream, lo, hi):
    """:func:`grouped_backward` for LayerNorm/RMSNorm rows (P rows of K, affine per
    column), one row at a time: its sums, then its dx while it is in L1. The row sums
    ``sum g`` and ``sum g * xhat`` go through blocks of ``_BLK`` in x's dtype; the
    column sums for dweight/dbias through partials in x's dtype over blocks of
    ``_ROW_BLOCK`` rows (float64 read-modify-writes per element would halve the speed),
    flushed into the float64 ``dwp[t]``/``dbp[t]``."""
    dt = _ctype(x)
    z = dt(0.0)
    last = hi * P // T  # (as in grouped_backward)
    for t in range(lo, hi):
        p0 = t * P // T
        p1 = (t + 1) * P // T
        bdw = np.zeros(K, dt)
        bdb = np.zeros(K, dt)
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
            for lo in range(0, K, _BLK):
                xb = xs[lo:lo + _BLK]
                db = dys[lo:lo + _BLK]
                wb = w[lo:lo + _BLK]
                bw = bdw[lo:lo + _BLK]
                bb = bdb[lo:lo + _BLK]
                a1 = z
                a2 = z
                for k in range(xb.size):
                    d = _ld(db[k])
                    dxh = d * ((_ld(xb[k]) - mc) * rc)
                    bw[k] += dxh
                    bb[k] += d
                    a1 += wb[k] * d
                    a2 += wb[k] * dxh
                s1 += a1
                s2 += a2
            pending += 1
            if pending == _ROW_BLOCK or p == p1 - 1:
                _flush_partials(bdw, bdb, dws, dbs)
                pending = 0
            if not need_dx:
                continue
            cb, cc = _dx_shifts(r, s1, s2, K, batch, center, dt)
            _row_dx(dy, x, p * K, K, w, mc, rc, cb, cc, dx, stream, K if p + 1 < last else 0)


# --------------------------------------------------------------- small planes, in order
#
# BatchNorm on NCHW (the grouped view with A = N samples, K = 1) visits a channel's N
# planes before the next channel's: runs of S elements C * S apart. With small planes
# (7x7: 196 bytes) each run touches new pages, and the forward ran at 16 % of the copy
# floor ((32, 2048, 7, 7) float32, one thread). These kernels visit x in memory order
# instead -- sample by sample, all channels: rough means, per-sample sums of each plane,
# the channels' statistics and coefficients from them, then the output pass (backward
# likewise). The backend takes them for small planes, and for fixed statistics (one
# pass) at any plane size; the measurements are at ``backend.SMALL_PLANE_BYTES``.


@njit(inline="always", **_OPTS)
def planes_rough_means(x, P, S, center, mc, lo, hi):
    """Rough mean of channels [lo, hi): of its first plane's first ``_SAMPLE``
    elements, as :func:`grouped_forward` takes it (0 when not centering)."""
    dt = _ctype(x)
    for p in range(lo, hi):
        mc[p] = _rough_mean(x[p * S:p * S + min(S, _SAMPLE)]) if center else dt(0.0)


@njit(inline="always", **_OPTS)
def planes_sums(x, P, S, mc, psd, psq, lo, hi):
    """For samples [lo, hi) and every channel p: ``sum(x - mc[p])`` and ``sum((x -
    mc[p])^2)`` of plane (a, p) of the (A, P, S) view, as float64, into psd/psq (A, P)."""
    for a in range(lo, hi):
        for p in range(P):
            o = (a * P + p) * S
            psd[a, p], psq[a, p] = _dev_sums(x[o:o + S], mc[p])


@njit(inline="always", **_OPTS)
def planes_coefficients(x, psd, psq, A, P, S, eps, center, compute, w, b, mc, mean, var, rstd, ca, cb, lo, hi):
    """Output coefficients ``y = (x - mc) * ca + cb`` of channels [lo, hi), as
    :func:`grouped_forward` computes them. ``compute``: from the per-sample sums (added
    in sample order, as grouped_forward adds its slabs; summed again about the mean
    found when the rough mean was far from it), writing mean/var/rstd; otherwise from
    the fixed mean/rstd given (mc is then written too)."""
    dt = _ctype(x)
    n = A * S
    if compute:
        sds, sqs = _column_sums(psd, psq, lo, hi)
    for p in range(lo, hi):
        if compute:
            sd = sds[p - lo]
            sq = sqs[p - lo]
            m = mc[p]
            if center and not _near_enough(sd, sq, n):
                m = dt(m + sd / n)
                sd, sq = _group_sums(x, A, P, p, S, m)
                mc[p] = m
            dm, v, r = _moments(sd, sq, n, center, eps)
            mean[p] = m + dm
            var[p] = v
            rstd[p] = r
        else:
            mc[p] = dt(mean[p])
            dm = 0.0
            r = np.float64(rstd[p])
        sc = r * w[p]
        ca[p] = dt(sc)
        cb[p] = dt(b[p] - dm * sc)


@njit(inline="always", **_OPTS)
def planes_apply(x, y, P, S, mc, ca, cb, stream, lo, hi):
    """``y = (x - mc[p]) * ca[p] + cb[p]`` over planes [lo, hi) of the (A, P, S) view
    (plane ``a * P + p``), in memory order. Items are planes, not samples, so that a
    batch of one (inference on one image) still splits over threads."""
    q = lo
    while q < hi:  # the planes of one sample at a time
        first = q - q % P
        for p in range(q - first, min(P, hi - first)):
            _plane_affine(x, y, (first + p) * S, S, mc[p], ca[p], cb[p], stream, 0)
        q = min(hi, first + P)


@njit(error_model="numpy", **_OPTS)
def fixed_rstd(var, eps, rstd):
    """``rstd = 1 / sqrt(var + eps)`` of fixed (running) variances, in float64 and
    rounded once to rstd's dtype. A zero variance with eps 0 (allowed in eval) gives
    inf, as torch.rsqrt does: NumPy's error model, not a ZeroDivisionError."""
    for c in range(var.size):
        rstd[c] = 1.0 / np.sqrt(np.float64(var[c]) + eps)


@njit(inline="always", **_OPTS)
def planes_grad_sums(dy, x, P, S, mean, psdy, psdyx, lo, hi):
    """For samples [lo, hi) and every channel p: ``sum(dy)`` and ``sum(dy * (x -
    mean[p]))`` of plane (a, p), as float64, into psdy/psdyx (A, P)."""
    dt = _ctype(x)
    for a in range(lo, hi):
        for p in range(P):
            o = (a * P + p) * S
            psdy[a, p], psdyx[a, p] = _grad_sums(x[o:o + S], dy[o:o + S], dt(mean[p]))


@njit(inline="always", **_OPTS)
def planes_dx_coefficients(psdy, psdyx, A, P, S, center, batch, w, mean, rstd, dw, db, mc, ca, cb, cc, lo, hi):
    """dweight/dbias (float64) of channels [lo, hi) from the per-sample sums, and the
    coefficients of ``dx = ca * dy + cb * (x - mc) + cc``, with
    :func:`grouped_backward`'s arithmetic and order of sums."""
    dt = mc.dtype.type
    n = A * S
    m = hi - lo
    r = np.empty(m)
    wc = np.empty(m)
    for i in range(m):
        r[i] = np.float64(rstd[lo + i])
        wc[i] = np.float64(w[lo + i])
    sw = np.zeros(m)
    sb = np.zeros(m)
    s1 = np.zeros(m)
    s2 = np.zeros(m)
    for a in range(A):  # a row at a time, each channel's terms in sample order (see _column_sums)
        rdy = psdy[a, lo:hi]
        rdyx = psdyx[a, lo:hi]
        for i in range(m):
            sdy = rdy[i]
            sdyx = rdyx[i] * r[i]
            sw[i] += sdyx
            sb[i] += sdy
            s1[i] += wc[i] * sdy
            s2[i] += wc[i] * sdyx
    for i in range(m):
        p = lo + i
        dw[p] = sw[i]
        db[p] = sb[i]
        mc[p] = dt(mean[p])
        ca[p] = dt(r[i]) * w[p]
        cb[p], cc[p] = _dx_shifts(r[i], s1[i], s2[i], n, batch, center, dt)


@njit(inline="always", **_OPTS)
def planes_dx(dy, x, dx, P, S, mc, ca, cb, cc, stream, lo, hi):
    """``dx = ca[p] * dy + cb[p] * (x - mc[p]) + cc[p]`` over samples [lo, hi), plane by
    plane in memory order."""
    for a in range(lo, hi):
        for p in range(P):
            _plane_dx(dy, x, (a * P + p) * S, S, mc[p], ca[p], cb[p], cc[p], dx, stream, 0)


# ----------------------------------------------------------------------- short groups
#
# Short groups -- LayerNorm/RMSNorm rows of at most SHORT_GROUP elements (e.g. the
# (8, 32, 40) of a small model), GroupNorm and InstanceNorm groups of at most
# SHORT_PLANES elements on small planes (see ``backend.SHORT_PLANES``) -- take one
# pass per *tile* of groups instead of per group: each phase is a loop over independent
# groups, so the scalar work of one group (float64 sums, a division, a square root, the
# vector loops' remainders) overlaps with the next group's instead of waiting on it. A
# tile is at most _ROW_TILE elements, so the later phases re-read it from L1/L2.
# Measured on (256, 40) float32 rows, one call: forward 11.7 -> 6.4 us (rows phased);
# then, on a slower day, 15 -> 9.4-10.3 us with the deviation sums in a phase of their
# own through :func:`_dev_sums`. Those sums had looped over range(K) on the row's slice:
# numba kept the negative-index checks, and they took 7.5 us instead of 1.7 (a loop over
# the slice's own size, as in _dev_sums, drops them). Planes, forward, one thread, from
# cache, per-group kernel -> phased: GroupNorm (8, 32, 40) with 8 groups 4.0 -> 2.8 us;
# InstanceNorm (8, 256, 7, 7) 66 -> 38 us, (8, 256, 14, 14) 86 -> 68 us (but at module
# level 14x14 and 16x16 planes came out about even: hence SHORT_PLANES). The backward of
# planes stays per group: phased (``benchmarks/cpu/short_groups.py`` with a phased planes
# backward) it made training steps 0.95x on (8, 256, 7, 7) and 1.15-1.20x on
# (64, 2048, 7, 7) and 14x14 planes; and one backward kernel for rows and planes ran the
# rows 2x slower (LLVM vectorized the rows' loop worse in the larger function). For the
# same reason rows here are LayerNorm/RMSNorm's (one affine over the row): slicing w per
# row for GroupNorm on (N, C) cost the rows 8 %, a second row branch 76 %. The rows'
# phased backward pays off on fewer rows than the forward (``backend.SHORT_ROW_BACKWARD``).

# The caller sends short groups here (``backend._short_groups``).
_ROW_TILE = 8192


@njit(**_OPTS)
def short_groups_forward(x, y, w, b, P, K, S, G, eps, center, mean, var, rstd, stream, lo, hi):
    """:func:`grouped_forward` with batch statistics for A = 1 and short groups (see
    ``backend._short_groups``) -- LayerNorm/RMSNorm rows (S = 1, where G must be 1),
    GroupNorm and InstanceNorm on small planes -- with the same arithmetic (rough mean
    ``mc`` in x's dtype, the deviation sums, the correction ``dm``, the output
    ``y = (x - mc) * a + b'`` per channel) in phases over a tile of groups: the
    statistics (:func:`_tile_statistics`), then the output; kept per group of the tile
    in scratch arrays between the phases."""
    dt = _ctype(x)
    ks = K * S
    tile = max(1, _ROW_TILE // ks)
    mcs = np.empty(tile, dt)
    dms = np.empty(tile)
    rs = np.empty(tile)
    for p0 in range(lo, hi, tile):
        p1 = min(hi, p0 + tile)
        _tile_statistics(x, ks, eps, center, mean, var, rstd, mcs, dms, rs, p0, p1)
        c0 = (p0 % G) * K  # group p's first channel (stepped: a division per group costs)
        for p in range(p0, p1):
            mc = mcs[p - p0]
            dm = dms[p - p0]
            r = rs[p - p0]
            # streamed writes ask for the same element of the group a tile on, which the
            # next tile's statistics read (see grouped_forward)
            ahead = tile * ks if p + tile < hi else 0
            if S == 1:  # a LayerNorm/RMSNorm row
                _row_affine(x, y, p * K, K, mc, dt(r), dt(-dm * r), w, b, stream, ahead)
            else:
                for k in range(K):
                    sc = r * w[c0 + k]
                    _plane_affine(x, y, (p * K + k) * S, S, mc, dt(sc), dt(b[c0 + k] - dm * sc), stream, ahead)
            c0 = c0 + K if c0 + K < G * K else 0


@njit(inline="always", **_OPTS)
def _tile_statistics(x, n, eps, center, mean, var, rstd, mcs, dms, rs, p0, p1):
    """The batch statistics of groups [p0, p1) of n contiguous elements each into
    mean/var/rstd, and for the output pass each group's rough mean ``mc``, correction
    ``dm`` and rstd into ``mcs``/``dms``/``rs`` (indexed from p0), in phases: rough
    means, deviation sums (kept in ``dms``/``rs`` meanwhile), moments (summing again the
    rare group whose rough mean was far off, see ``_RECENTER``)."""
    dt = _ctype(x)
    for p in range(p0, p1):
        mcs[p - p0] = _rough_mean(x[p * n:p * n + min(n, _SAMPLE)]) if center else dt(0.0)
    for p in range(p0, p1):
        dms[p - p0], rs[p - p0] = _dev_sums(x[p * n:(p + 1) * n], mcs[p - p0])
    for p in range(p0, p1):
        mc = mcs[p - p0]
        sd = dms[p - p0]
        sq = rs[p - p0]
        if center and not _near_enough(sd, sq, n):  # as in grouped_forward: again about the mean found
            mc = dt(mc + sd / n)
            sd, sq = _dev_sums(x[p * n:(p + 1) * n], mc)
            mcs[p - p0] = mc
        dm, v, r = _moments(sd, sq, n, center, eps)
        dms[p - p0] = dm
        rs[p - p0] = r
        mean[p] = mc + dm
        var[p] = v
        rstd[p] = r


@njit(**_OPTS)
def short_rows_backward(dy, x, w, mean, rstd, P, K, center, batch, need_dx, T, dx, dwp, dbp, stream, lo, hi):
    """:func:`rows_backward` for short rows (``backend.SHORT_ROW_BACKWARD``), phased per
    tile of rows (same arithmetic, same partial-sum order): the row sums and the
    dweight/dbias partials for every row of the tile, then the tile's dx."""
    dt = _ctype(x)
    z = dt(0.0)
    tile = max(1, _ROW_TILE // K)
    cbs = np.zeros(tile, dt)
    ccs = np.zeros(tile, dt)
    last = hi * P // T  # the end of this call's rows (as in rows_backward)
    for t in range(lo, hi):
        p_first = t * P // T
        p_last = (t + 1) * P // T
        bdw = np.zeros(K, dt)
        bdb = np.zeros(K, dt)
        dws = dwp[t]
        dbs = dbp[t]
        pending = 0
        for p0 in range(p_first, p_last, tile):
            p1 = min(p_last, p0 + tile)
            for p in range(p0, p1):
                xs = x[p * K:(p + 1) * K]
                dys = dy[p * K:(p + 1) * K]
                mc = dt(mean[p])
                r = np.float64(rstd[p])
                rc = dt(r)
                a1 = z
                a2 = z
                for k in range(K):
                    d = _ld(dys[k])
                    dxh = d * ((_ld(xs[k]) - mc) * rc)
                    bdw[k] += dxh
                    bdb[k] += d
                    a1 += w[k] * d
                    a2 += w[k] * dxh
                pending += 1
                if pending == _ROW_BLOCK or p == p_last - 1:
                    _flush_partials(bdw, bdb, dws, dbs)
                    pending = 0
                cbs[p - p0], ccs[p - p0] = _dx_shifts(r, np.float64(a1), np.float64(a2), K, batch, center, dt)
            if not need_dx:
                continue
            for p in range(p0, p1):
                mc = dt(mean[p])
                rc = dt(np.float64(rstd[p]))
                ahead = tile * K if p + tile < last else 0  # (as in short_groups_forward)
                _row_dx(dy, x, p * K, K, w, mc, rc, cbs[p - p0], ccs[p - p0], dx, stream, ahead)


@njit(inline="always", **_OPTS)
def dispatch_grouped_forward(x, y, w, b, A, P, K, S, G, eps, center, compute, short_groups, mean, var, rstd,
                             stream, lo, hi):
    """The grouped-view forward over groups [lo, hi): with batch statistics on short
    groups (``short_groups``, see ``backend._short_groups``), the tile-phased
    :func:`short_groups_forward`, else :func:`grouped_forward`. The one place that choice
    is made, for the threaded calls and the by-address ones alike. ``stream``: write y
    with streaming stores."""
    if compute and short_groups:
        short_groups_forward(x, y, w, b, P, K, S, G, eps, center, mean, var, rstd, stream, lo, hi)
    else:
        grouped_forward(x, y, w, b, A, P, K, S, G, eps, center, compute, mean, var, rstd, stream, lo, hi)


@njit(inline="always", **_OPTS)
def dispatch_grouped_backward(dy, x, w, mean, rstd, A, P, K, S, G, center, batch, need_dx, T, short_rows, dx,
                              dwp, dbp, stream, lo, hi):
    """The grouped-view backward over partial chunks [lo, hi) (see
    :func:`dispatch_grouped_forward`): the row kernels for LayerNorm/RMSNorm rows (the
    tile-phased one for short rows), else :func:`grouped_backward`."""
    if A == 1 and S == 1 and G == 1:
        if short_rows:
            short_rows_backward(dy, x, w, mean, rstd, P, K, center, batch, need_dx, T, dx, dwp, dbp, stream, lo, hi)
        else:
            rows_backward(dy, x, w, mean, rstd, P, K, center, batch, need_dx, T, dx, dwp, dbp, stream, lo, hi)
    else:
        grouped_backward(dy, x, w, mean, rstd, A, P, K, S, G, center, batch, need_dx, T, dx, dwp, dbp, stream, lo,
                         hi)


# ---------------------------------------------------------------------- channels-last
#
# A channels-last row is C contiguous channels, a short loop (e.g. 64): per row, LLVM's
# vector loop pays its setup and runtime alias checks, and below ~32 channels everything
# runs in its scalar tail. The passes therefore sweep tiles of R = _TILE // C rows as
# one flat loop of R*C elements, with each per-channel coefficient repeated R times
# (:func:`_tiled`). (Output pass, 64 channels, a sample in L2: 35 -> 23 us; 3 channels:
# 235 -> 31 us.)
_TILE = 1024


@njit(**_OPTS)
def _tiled(v, R):
    """``v`` (C,) repeated R times: (R*C,); ``v`` itself when R == 1 (tiles are read,
    never written: a block of rows of C = 2048 copied its three coefficient arrays)."""
    if R == 1:
        return v
    C = v.size
    t = np.empty(R * C, v.dtype)
    for r in range(R):  # (an element loop: numba's slice assignment costs ~50 ns a row)
        for c in range(C):
            t[r * C + c] = v[c]
    return t


# Statistics: one pass over a work item's rows sums ``d = x - shift_g`` and ``d^2`` per
# lane of a tile (float32 lanes flushed into float64 every ``_FLUSH`` sweeps of up to
# four tiles), with each group's shift the mean of its first values; mean and M2 follow
# as in the grouped kernels (corrected two-pass), and an item whose shift lay far from
# its mean (``_RECENTER``) is summed again about the mean found. (Before: two passes
# per block of rows, four rows per sweep, and a Chan merge per block: the statistics of
# a 64-channel sample in L2 took 38 us, now ~20 us.)
_FLUSH = 8


@njit(**_OPTS)
def _cl_tile_sums(x, base, rows, C, shT):
    """Per tile lane, float64 ``(sum(x - shT), sum((x - shT)^2))`` over ``rows``
    channels-last rows from ``base``: four tiles (of ``shT.size // C`` rows) per sweep,
    then single tiles, into lanes in x's dtype flushed every ``_FLUSH`` sweeps (each lane
    then holds at most ``4 * _FLUSH`` values)."""
    L = shT.size
    R = L // C
    accd = np.zeros(L, shT.dtype)
    accq = np.zeros(L, shT.dtype)
    sd = np.zeros(L)
    sq = np.zeros(L)
    pending = 0
    s = 0
    while s < rows:
        o = base + s * C
        if s + 4 * R <= rows:
            x0 = x[o:o + L]
            x1 = x[o + L:o + 2 * L]
            x2 = x[o + 2 * L:o + 3 * L]
            x3 = x[o + 3 * L:o + 4 * L]
            for i in range(L):
                m = shT[i]
                d0 = _ld(x0[i]) - m
                d1 = _ld(x1[i]) - m
                d2 = _ld(x2[i]) - m
                d3 = _ld(x3[i]) - m
                accd[i] += (d0 + d1) + (d2 + d3)
                accq[i] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            s += 4 * R
        else:  # a single tile, the last one possibly shorter (the lanes' prefix)
            n = min(R, rows - s) * C
            xs = x[o:o + n]
            for i in range(n):
                d = _ld(xs[i]) - shT[i]
                accd[i] += d
                accq[i] += d * d
            s += R
        pending += 1
        if pending == _FLUSH:
            _flush_partials(accd, accq, sd, sq)
            pending = 0
    _flush_partials(accd, accq, sd, sq)
    return sd, sq


# Statistics with the lanes in registers. The tile lanes above live in memory: every
# sweep loads and stores them again, and a pass that does so reads x at ~22 GB/s on one
# thread where a plain sum reaches ~35 (DRAM, measured on the 2-core benchmark machine).
# Where a row is one slice of 64 or 128 lanes -- C = 64 or 128, or a divisor of 64
# (then 64 elements hold 64 // C whole rows) -- the lanes are arrays on the stack
# (:func:`_lanes`) indexed by constants once LLVM unrolls the lane loop, so they stay in
# vector registers (float32: 4 or 8 zmm per array; where numba compiles AVX2 only, as on
# the EPYC benchmark machine, 8 or 16 ymm of 16, so LLVM spills some): statistics of
# (32, 64, 56, 56) channels_last in 64 row blocks, one thread, 1.28x faster than the
# tile lanes on the Intel machine, 1.07x on the EPYC (C = 128: 1.02-1.25x). The
# lanes are added into float64 totals every _RUN rows (each lane then holds at most _RUN
# values: relative error ~1e-7 before the float64 sum). Wider rows take the tile lanes:
# slices of 64 or 128 channels walked down a block read runs of 256-512 bytes a row
# (C * itemsize) apart, too short for the hardware to stream, and the statistics of
# 12-26 MB float32 inputs with C = 192 to 2048 took 1.27-2.21x as long as the tiles'
# (one thread, in-process).
_MAX_LANES = 128
_RUN = 32


#: ``_lanes(like)``: _MAX_LANES zeros of ``like``'s type on the stack.
_lanes = _stack_buffer(_MAX_LANES, zero=True)


@njit(inline="always", **_OPTS)
def _slice_sums(x, base, rows, stride, shift, W, sd, sq):
    """Add ``sum(x - shift)`` and ``sum((x - shift)^2)`` of W lanes -- W a constant, 64
    or 128 -- over ``rows`` runs of W elements ``stride`` apart from ``base`` to the
    float64 sd/sq (W,); shift (W,)."""
    dt = shift.dtype.type
    sh = carray(_lanes(dt(0)), W)
    for c in range(W):
        sh[c] = shift[c]
    for r0 in range(0, rows, _RUN):
        a = carray(_lanes(dt(0)), W)
        q = carray(_lanes(dt(0)), W)
        for r in range(r0, min(rows, r0 + _RUN)):
            # (a slice: x[o + c] with a signed o would be wrapped, i.e. gathered)
            xs = x[base + r * stride:base + r * stride + W]
            for c in range(W):
                d = _ld(xs[c]) - sh[c]
                a[c] += d
                q[c] += d * d
        for c in range(W):
            sd[c] += a[c]
            sq[c] += q[c]


@njit(**_OPTS)
def _cl_channel_sums(x, base, rows, C, shift, wide=False):
    """Per channel, float64 ``(sum(x - shift), sum((x - shift)^2))`` over ``rows``
    channels-last rows from ``base`` (shift: (C,), x's compute dtype); ``wide``: in
    float64 lanes throughout (tile lanes)."""
    if wide:
        return _cl_tile_channel_sums(x, base, rows, C, shift.astype(np.float64))
    if C != 128 and C != 64 and 64 % C != 0:  # tile lanes in memory
        return _cl_tile_channel_sums(x, base, rows, C, shift)
    sd = np.zeros(C)
    sq = np.zeros(C)
    if C == 128:  # a row is one slice of lanes (wider rows: tiles, see _MAX_LANES)
        _slice_sums(x, base, rows, 128, shift, 128, sd, sq)
    elif C == 64:
        _slice_sums(x, base, rows, 64, shift, 64, sd, sq)
    else:  # runs of 64 elements: 64 // C whole rows, lane j channel j % C
        full = rows * C // 64
        shift64 = _tiled(shift, 64 // C)
        td = np.zeros(64)
        tq = np.zeros(64)
        _slice_sums(x, base, full, 64, shift64, 64, td, tq)
        for c in range(64):
            sd[c % C] += td[c]
            sq[c % C] += tq[c]
        for i in range(full * 64, rows * C):  # the last rows (fewer than 64 // C)
            d = np.float64(_ld(x[base + i]) - shift[i % C])
            sd[i % C] += d
            sq[i % C] += d * d
    return sd, sq


@njit(inline="always", **_OPTS)
def _cl_tile_channel_sums(x, base, rows, C, shift):
    """:func:`_cl_channel_sums` through tile lanes in ``shift``'s dtype (:func:`_cl_tile_sums`)."""
    R = max(1, _TILE // C)
    lanes_d, lanes_q = _cl_tile_sums(x, base, rows, C, _tiled(shift, R))
    if R == 1:  # a tile is one row: its lanes are the channels' sums
        return lanes_d, lanes_q
    sd = np.zeros(C)
    sq = np.zeros(C)
    _add_lanes(lanes_d, lanes_q, C, sd, sq)
    return sd, sq


@njit(**_OPTS)
def _add_lanes(lanes_a, lanes_b, C, out_a, out_b):
    """Add the tile lanes of each of C channels -- ``lanes[r * C + c]``, one lane per row
    of the tile -- to ``out_a[c]`` / ``out_b[c]``, lane by lane (vector loops over C)."""
    for r in range(lanes_a.size // C):
        for c in range(C):
            out_a[c] += lanes_a[r * C + c]
            out_b[c] += lanes_b[r * C + c]


@njit(**_OPTS)
def _cl_rows_stats(x, base, rows, G, K, mean, m2):
    """(mean, M2) of each of the G groups (K channels each) over ``rows`` channels-last
    rows from ``base``, into the float64 arrays mean/m2 (G,). See ``_FLUSH``."""
    C = G * K
    dt = _ctype(x)
    n = rows * K
    # each group's shift: the mean of its first _SAMPLE values (rows x K channels), so
    # that the test below rarely asks for a second pass -- from at most an eighth of the
    # rows: a block of wide rows (e.g. C = 2048: 64 rows) would otherwise be read whole
    # by this loop first, from memory (one thread, (1568, 2048) rows in 64-row blocks:
    # the statistics 1.4x faster)
    ns = min(max(1, rows // 8), max(1, _SAMPLE // K))
    first = np.zeros(C)  # per channel, then per group (row-wise: a vector loop over C)
    for r in range(ns):
        xs = x[base + r * C:base + (r + 1) * C]
        for c in range(C):
            first[c] += _ld(xs[c])
    # per group: its shift (x's dtype), then its sums -- the channels' own arrays where
    # K == 1 (BatchNorm), so that the loops over groups are vector loops without an inner
    # one or a copy (with the tile lanes' shortcut for one-row tiles, statistics of
    # (1568, 2048) in 24 blocks, one thread: 1.39 -> 1.03 ms)
    totals = _group_totals(first, G, K)
    gshift = np.empty(G, dt)
    for g in range(G):
        gshift[g] = dt(totals[g] / (ns * K))
    for attempt in range(3):
        # (a third time in float64 lanes: a float32 square that overflowed even about
        # the mean, values near 1e19; a NaN or Inf input takes that path too, to no effect)
        sd, sq = _cl_channel_sums(x, base, rows, C, _repeat_each(gshift, K), attempt == 2)
        ga = _group_totals(sd, G, K)
        gq = _group_totals(sq, G, K)
        again = 0
        for g in range(G):
            a = ga[g]
            q = gq[g]
            dm = a / n
            mean[g] = gshift[g] + dm
            v = q - a * dm
            m2[g] = 0.0 if v < 0.0 else v  # rounding of a constant group; a NaN (NaN or Inf input) stays
            if attempt == 0:
                again += not _near_enough(a, q, n)
            else:
                again += not q < np.inf
        if again == 0 or attempt == 2:
            break
        if attempt == 0:
            for g in range(G):  # a shift far from its group's mean: again, about the mean
                gshift[g] = dt(mean[g])


@njit(inline="always", **_OPTS)
def _group_totals(v, G, K):
    """Per group, the float64 sum of its K consecutive values of ``v`` (in order, from
    0.0); ``v`` itself where K == 1 (the same values: adding 0.0 changes none of them,
    as none is -0.0)."""
    if K == 1:
        return v
    t = np.zeros(G)
    for g in range(G):
        a = 0.0
        for k in range(K):
            a += v[g * K + k]
        t[g] = a
    return t


@njit(inline="always", **_OPTS)
def _repeat_each(v, K):
    """Each value of ``v`` K times in a row ((G,) -> (G * K,)); ``v`` itself where K == 1."""
    if K == 1:
        return v
    out = np.empty(v.size * K, v.dtype)
    _per_channel(v, K, out)
    return out


@njit(inline="always", **_OPTS)
def _per_channel(v, K, out):
    """``out[g * K + k] = v[g]`` in out's dtype: per-group values (G,) on each group's K
    channels. (Not ``v[c // K]``, an integer division per channel: with it, and a copy
    of the one-row tile's shifts, the gradient sums of (1568, 2048) in 24 blocks took
    1.96 ms instead of 1.72, one thread.)"""
    dt = out.dtype.type
    if K == 1:
        for c in range(out.size):
            out[c] = dt(v[c])
    else:
        for g in range(out.size // K):
            for k in range(K):  # (element stores: numba's slice assignment costs ~50 ns a slice)
                out[g * K + k] = dt(v[g])


@njit(inline="always", **_OPTS)
def _scale_per_group(s, r, K):
    """``s[g * K + k] *= r[g]`` in float64 (e.g. per-channel sums times their group's rstd)."""
    if K == 1:
        for c in range(s.size):
            s[c] *= np.float64(r[c])
    else:
        for g in range(s.size // K):
            f = np.float64(r[g])
            for k in range(K):
                s[g * K + k] *= f


@njit(inline="always", **_OPTS)
def cl_stats(x, N, S, G, K, B, pcnt, pmu, pm2, lo, hi):
    """Partial statistics (count, mean, M2) of each of the N*B work items (sample n, row
    block b), merged by the caller (Chan's formula)."""
    C = G * K
    mean = np.empty(G)
    m2 = np.empty(G)
    for item in range(lo, hi):
        n = item // B
        bi = item % B
        s0 = bi * S // B
        s1 = (bi + 1) * S // B
        _cl_rows_stats(x, (n * S + s0) * C, s1 - s0, G, K, mean, m2)
        for g in range(G):
            pcnt[item, g] = (s1 - s0) * K
            pmu[item, g] = mean[g]
            pm2[item, g] = m2[g]


@njit(**_OPTS)
def cl_coefficients(pcnt, pmu, pm2, N, B, G, K, eps, fixed, w, b, mean, var, rstd, mc, sc, sh):
    """Between the two passes of :func:`cl_stats` and :func:`cl_apply`: the statistics
    of each (n, g) and the output pass's per-(n, c) coefficients.

    Unless ``fixed``, the B partial (count, mean, M2) of each (n, g) -- rows ``n * B + b``
    of pcnt/pmu/pm2 -- are merged (the parallel form of Chan's formula: ``M2 = sum M2_b
    + sum n_b (mean_b - mean)^2``), and mean, var (biased) and rstd (N * G,) are written;
    with ``fixed`` they are read. Then, in float64 (see :func:`_cl_affine_rows`):
    ``mc = mean`` rounded to x's dtype, ``sc = rstd * w``, ``sh = b - (mean - mc) * sc``
    (N, G * K)."""
    dt = mc.dtype.type
    merged = 0 if fixed else G  # (fixed statistics merge nothing)
    tot = np.zeros(merged)
    mu = np.zeros(merged)
    m2 = np.zeros(merged)
    for n in range(N):
        if not fixed:
            # a block's row at a time (a column is strided by G, see _column_sums), each
            # group's terms in block order
            tot[:] = 0.0
            mu[:] = 0.0
            m2[:] = 0.0
            for bi in range(n * B, (n + 1) * B):
                for g in range(G):
                    tot[g] += pcnt[bi, g]
                    mu[g] += pcnt[bi, g] * pmu[bi, g]
            for g in range(G):
                mu[g] = mu[g] / tot[g]
            for bi in range(n * B, (n + 1) * B):
                for g in range(G):
                    d = pmu[bi, g] - mu[g]
                    m2[g] += pm2[bi, g] + pcnt[bi, g] * d * d
        for g in range(G):
            if fixed:
                m = np.float64(mean[n * G + g])
                r = np.float64(rstd[n * G + g])
            else:
                m = mu[g]
                v = m2[g] / tot[g]
                r = 1.0 / np.sqrt(v + eps)
                mean[n * G + g] = m
                var[n * G + g] = v
                rstd[n * G + g] = r
            mr = dt(m)
            for k in range(K):
                c = g * K + k
                a = r * w[c]
                mc[n, c] = mr
                sc[n, c] = a
                sh[n, c] = b[c] - (m - mr) * a


@njit(inline="always", **_OPTS)
def _slice_affine(x, y, start, runs, mc, sc, sh, W, stream, ahead):
    """y = (x - mc) * sc + sh over ``runs`` consecutive runs of W elements (W a constant)
    from ``start``, with the W coefficients of each kind in registers (see ``_lanes``;
    ``ahead``: see the write loops)."""
    dt = mc.dtype.type
    m = carray(_lanes(dt(0)), W)
    a = carray(_lanes(dt(0)), W)
    b = carray(_lanes(dt(0)), W)
    for c in range(W):
        m[c] = mc[c]
        a[c] = sc[c]
        b[c] = sh[c]
    per = _line_elems(y)  # (W is a multiple of it)
    # Runs of whole lines, streamed when the first starts on a line boundary (then all do:
    # W * itemsize is a multiple of 64), else all with ordinary stores. Two loops, as each
    # intrinsic's store is fixed when it compiles; the inner loop, of a constant count,
    # unrolls, so the coefficient lines stay in registers.
    if stream and _to_line(y, start) == 0:
        for o in range(start, start + runs * W, W):
            for j in range(0, W, per):
                _affine_line_streamed((x,), y, o + j, (m, a, b), j, ahead)
    else:
        for o in range(start, start + runs * W, W):
            for j in range(0, W, per):
                _affine_line((x,), y, o + j, (m, a, b), j, 0)


@njit(**_OPTS)
def _cl_affine_rows(x, y, mc, sc, sh, base, s0, s1, C, stream, ahead):
    """y = (x - mc[c]) * sc[c] + sh[c] for channels-last rows [s0, s1) from ``base``:
    with the coefficients in registers for C = 64 or 128 (a run is a row) or C dividing
    64 (a run is 64 // C rows; interleaved, one thread, 1.06-1.22x faster than tiles),
    else -- and for the last rows short of a run -- in tiles of rows (see ``_TILE``).

    ``mc`` is the mean rounded to x's dtype (``x - mc`` is exact near the mean) and
    ``sh = b - (mean - mc) * sc`` carries the rounding remainder: an input offset by
    1e4 in float32 loses nothing beyond its own rounding."""
    start = base + s0 * C
    if C == 64:
        _slice_affine(x, y, start, s1 - s0, mc, sc, sh, 64, stream, ahead)
        return
    if C == 128:
        _slice_affine(x, y, start, s1 - s0, mc, sc, sh, 128, stream, ahead)
        return
    if 64 % C == 0:
        per = 64 // C
        runs = (s1 - s0) // per
        _slice_affine(x, y, start, runs, _tiled(mc, per), _tiled(sc, per), _tiled(sh, per), 64, stream, ahead)
        s0 += runs * per
    _cl_affine_tile_rows(x, y, mc, sc, sh, base, s0, s1, C, stream, ahead)


@njit(inline="always", **_OPTS)
def _cl_affine_tile_rows(x, y, mc, sc, sh, base, s0, s1, C, stream, ahead):
    """:func:`_cl_affine_rows` in tiles of rows (see ``_TILE``)."""
    R = max(1, _TILE // C)
    mt = _tiled(mc, R)
    st = _tiled(sc, R)
    ht = _tiled(sh, R)
    s = s0
    while s < s1:
        n = min(R, s1 - s) * C  # (a last, shorter tile uses the coefficients' prefix)
        o = base + s * C
        e = o + n
        i, j = o, _plain_end(y, o, e, stream)  # (see "The write loops")
        while True:
            _affine_run(x[i:j], y[i:j], mt[i - o:], st[i - o:], ht[i - o:], j - i)
            if j == e:
                break
            while j + _line_elems(y) <= e:
                _affine_line_streamed((x,), y, j, (mt, st, ht), j - o, ahead)
                j += _line_elems(y)
            i, j = j, e
        s += R


@njit(inline="always", **_OPTS)
def cl_apply(x, y, mc, sc, sh, N, S, C, B, stream, lo, hi):
    """y = (x - mc[n, c]) * sc[n, c] + sh[n, c] on the channels-last (N, S, C) view (see
    :func:`_cl_affine_rows`)."""
    for item in range(lo, hi):
        n = item // B
        bi = item % B
        _cl_affine_rows(x, y, mc[n], sc[n], sh[n], n * S * C, bi * S // B, (bi + 1) * S // B, C, stream, 0)


@njit(inline="always", **_OPTS)
def _slice_grad_sums(dy, x, base, rows, stride, mc, W, sdy, sdyx):
    """:func:`_slice_sums` of the backward: add ``sum(dy)`` and ``sum(dy * (x - mc))``
    of W lanes (a constant) over ``rows`` runs ``stride`` apart to the float64 sdy/sdyx."""
    dt = mc.dtype.type
    m = carray(_lanes(dt(0)), W)
    for c in range(W):
        m[c] = mc[c]
    for r0 in range(0, rows, _RUN):
        a = carray(_lanes(dt(0)), W)
        q = carray(_lanes(dt(0)), W)
        for r in range(r0, min(rows, r0 + _RUN)):
            o = base + r * stride
            xs = x[o:o + W]
            ds = dy[o:o + W]
            for c in range(W):
                g = _ld(ds[c])
                a[c] += g
                q[c] += g * (_ld(xs[c]) - m[c])
        for c in range(W):
            sdy[c] += a[c]
            sdyx[c] += q[c]


@njit(**_OPTS)
def _cl_grad_rows(dy, x, mcn, base, s0, s1, C, sdy, sdyx):
    """Add sum dy and sum dy * (x - mcn) per channel over rows [s0, s1) from ``base`` to
    the float64 sdy/sdyx (C,): with the lanes in registers where C allows (as
    :func:`_cl_channel_sums`), else in tiles (:func:`_cl_grad_tile_rows`)."""
    rows = s1 - s0
    start = base + s0 * C
    if C == 128:  # a row is one slice of lanes (wider rows: tiles, see _MAX_LANES)
        _slice_grad_sums(dy, x, start, rows, 128, mcn, 128, sdy, sdyx)
    elif C == 64:
        _slice_grad_sums(dy, x, start, rows, 64, mcn, 64, sdy, sdyx)
    elif 64 % C == 0:  # runs of 64 elements: 64 // C whole rows, lane j channel j % C
        full = rows * C // 64
        ty = np.zeros(64)
        tx = np.zeros(64)
        _slice_grad_sums(dy, x, start, full, 64, _tiled(mcn, 64 // C), 64, ty, tx)
        for c in range(64):
            sdy[c % C] += ty[c]
            sdyx[c % C] += tx[c]
        for i in range(full * 64, rows * C):  # the last rows (fewer than 64 // C)
            g = np.float64(_ld(dy[start + i]))
            sdy[i % C] += g
            sdyx[i % C] += g * (_ld(x[start + i]) - mcn[i % C])
    else:
        _cl_grad_tile_rows(dy, x, mcn, base, s0, s1, C, sdy, sdyx)


@njit(**_OPTS)
def _cl_grad_tile_rows(dy, x, mcn, base, s0, s1, C, sdy, sdyx):
    """:func:`_cl_grad_rows` per lane of a tile of rows, four tiles per sweep, float32
    lanes flushed to float64 every ``_FLUSH`` sweeps (as :func:`_cl_tile_sums`)."""
    dt = _ctype(x)
    R = max(1, _TILE // C)
    L = R * C
    mT = _tiled(mcn, R)
    accy = np.zeros(L, dt)
    accx = np.zeros(L, dt)
    ty = np.zeros(L)
    tx = np.zeros(L)
    pending = 0
    s = s0
    while s < s1:
        o = base + s * C
        if s + 4 * R <= s1:
            x0 = x[o:o + L]
            x1 = x[o + L:o + 2 * L]
            x2 = x[o + 2 * L:o + 3 * L]
            x3 = x[o + 3 * L:o + 4 * L]
            d0 = dy[o:o + L]
            d1 = dy[o + L:o + 2 * L]
            d2 = dy[o + 2 * L:o + 3 * L]
            d3 = dy[o + 3 * L:o + 4 * L]
            for i in range(L):
                m = mT[i]
                g0 = _ld(d0[i])
                g1 = _ld(d1[i])
                g2 = _ld(d2[i])
                g3 = _ld(d3[i])
                accy[i] += (g0 + g1) + (g2 + g3)
                accx[i] += (g0 * (_ld(x0[i]) - m) + g1 * (_ld(x1[i]) - m)) + \
                    (g2 * (_ld(x2[i]) - m) + g3 * (_ld(x3[i]) - m))
            s += 4 * R
        else:  # a single tile, the last one possibly shorter (the lanes' prefix)
            n = min(R, s1 - s) * C
            xs = x[o:o + n]
            ds = dy[o:o + n]
            for i in range(n):
                g = _ld(ds[i])
                accy[i] += g
                accx[i] += g * (_ld(xs[i]) - mT[i])
            s += R
        pending += 1
        if pending == _FLUSH:
            _flush_partials(accy, accx, ty, tx)
            pending = 0
    _flush_partials(accy, accx, ty, tx)
    _add_lanes(ty, tx, C, sdy, sdyx)


@njit(inline="always", **_OPTS)
def cl_grad_sums(dy, x, mean, rstd, N, S, G, K, B, psdy, psdyx, lo, hi):
    """Per work item (sample n, row block b) and channel: sum dy and sum dy * xhat,
    xhat = (x - mean) * rstd with the mean rounded to x's dtype; mean/rstd (N, G)."""
    C = G * K
    dt = _ctype(x)
    mcn = np.empty(C, dt)
    mcn_of = -1  # the sample mcn holds (BatchNorm: one for all items)
    for item in range(lo, hi):
        n = item // B
        bi = item % B
        if n != mcn_of:
            _per_channel(mean[n], K, mcn)
            mcn_of = n
        sdy = psdy[item]
        sdyx = psdyx[item]
        for c in range(C):
            sdy[c] = 0.0
            sdyx[c] = 0.0
        _cl_grad_rows(dy, x, mcn, n * S * C, bi * S // B, (bi + 1) * S // B, C, sdy, sdyx)
        _scale_per_group(sdyx, rstd[n], K)


@njit(inline="always", **_OPTS)
def _dx_coefficients(sdy, sdyx, w, rstd, G, K, count, center, batch, ca, cb, cc):
    """One sample's coefficients of ``dx = ca * dy + cb * (x - mc) + cc`` (C,), in float64
    and rounded once, from its per-channel ``sum(dy)`` and ``sum(dy * xhat)`` (sdy/sdyx)
    and per-group rstd (G,): ``ca = rstd * w``; with batch statistics ``cb = -rstd^2 *
    sum_g(w * dy * xhat) / count`` and, when centering, ``cc = -rstd * sum_g(w * dy) /
    count`` (else 0), count the elements per group."""
    for g in range(G):
        r = np.float64(rstd[g])
        s1 = 0.0
        s2 = 0.0
        for k in range(K):
            c = g * K + k
            s1 += w[c] * sdy[c]
            s2 += w[c] * sdyx[c]
        for k in range(K):
            c = g * K + k
            ca[c] = r * w[c]
            cb[c] = -r * r * s2 / count if batch else 0.0
            cc[c] = -r * s1 / count if (batch and center) else 0.0


@njit(**_OPTS)
def cl_dx_coefficients(psdy, psdyx, N, S, B, G, K, center, batch, w, mean, rstd, mc, ca, cb, cc):
    """Between :func:`cl_grad_sums` and :func:`cl_dx`: the per-(n, c) coefficients of
    ``dx = ca * dy + cb * (x - mc) + cc`` (N, G * K) from the per-block sums psdy/psdyx
    (N * B, G * K; see :func:`_dx_coefficients`), and mc, the mean rounded to x's dtype."""
    C = G * K
    for n in range(N):
        sdy, sdyx = _column_sums(psdy[n * B:(n + 1) * B], psdyx[n * B:(n + 1) * B], 0, C)
        _per_channel(mean[n * G:(n + 1) * G], K, mc[n])
        _dx_coefficients(sdy, sdyx, w, rstd[n * G:(n + 1) * G], G, K, S * K, center, batch, ca[n], cb[n], cc[n])


@njit(inline="always", **_OPTS)
def cl_forward_fused(x, y, w, b, N, S, G, K, eps, mean, var, rstd, stream, lo, hi):
    """Per-sample statistics (GroupNorm/InstanceNorm channels-last) and the output in
    one sweep per sample: the apply pass re-reads the sample from cache, not memory.
    mean/var/rstd: (N, G) outputs."""
    C = G * K
    dt = _ctype(x)
    mu = np.empty(G)
    m2 = np.empty(G)
    for n in range(lo, hi):
        _cl_rows_stats(x, n * S * C, S, G, K, mu, m2)
        mcn = np.empty(C, _ctype(x))
        scn = np.empty(C, _ctype(x))
        shn = np.empty(C, _ctype(x))
        for g in range(G):
            v = m2[g] / (S * K)
            r = 1.0 / np.sqrt(v + eps)
            mean[n, g] = mu[g]
            var[n, g] = v
            rstd[n, g] = r
            m = dt(mu[g])
            ml = mu[g] - m
            for k in range(K):
                c = g * K + k
                a = r * w[c]
                mcn[c] = m
                scn[c] = dt(a)
                shn[c] = dt(b[c] - ml * a)
        _cl_affine_rows(x, y, mcn, scn, shn, n * S * C, 0, S, C, stream, S * C if n + 1 < hi else 0)


@njit(inline="always", **_OPTS)
def _slice_dx(dy, x, dx, start, runs, mc, ca, cb, cc, W, stream):
    """dx = ca * dy + cb * (x - mc) + cc over ``runs`` runs of W elements (W a constant)
    from ``start``, the coefficients in registers (as :func:`_slice_affine`)."""
    dt = mc.dtype.type
    m = carray(_lanes(dt(0)), W)
    a = carray(_lanes(dt(0)), W)
    b = carray(_lanes(dt(0)), W)
    k = carray(_lanes(dt(0)), W)
    for c in range(W):
        m[c] = mc[c]
        a[c] = ca[c]
        b[c] = cb[c]
        k[c] = cc[c]
    per = _line_elems(dx)
    if stream and _to_line(dx, start) == 0:  # (as in _slice_affine)
        for o in range(start, start + runs * W, W):
            for j in range(0, W, per):
                _dx_line_streamed((dy, x), dx, o + j, (m, a, b, k), j, 0)
    else:
        for o in range(start, start + runs * W, W):
            for j in range(0, W, per):
                _dx_line((dy, x), dx, o + j, (m, a, b, k), j, 0)


@njit(**_OPTS)
def _cl_dx_rows(dy, x, mc, ca, cb, cc, base, s0, s1, C, dx, stream):
    """dx = ca[c] * dy + cb[c] * (x - mc[c]) + cc[c] for channels-last rows [s0, s1):
    the coefficients in registers for C = 64 or C dividing 64 (as
    :func:`_cl_affine_rows`; four kinds of 128 would not fit), else in tiles."""
    start = base + s0 * C
    if C == 64:
        _slice_dx(dy, x, dx, start, s1 - s0, mc, ca, cb, cc, 64, stream)
        return
    if 64 % C == 0:
        per = 64 // C
        runs = (s1 - s0) // per
        _slice_dx(dy, x, dx, start, runs, _tiled(mc, per), _tiled(ca, per), _tiled(cb, per), _tiled(cc, per), 64,
                  stream)
        s0 += runs * per
    _cl_dx_tile_rows(dy, x, mc, ca, cb, cc, base, s0, s1, C, dx, stream)


@njit(inline="always", **_OPTS)
def _cl_dx_tile_rows(dy, x, mc, ca, cb, cc, base, s0, s1, C, dx, stream):
    """:func:`_cl_dx_rows` in tiles of rows (as :func:`_cl_affine_tile_rows`)."""
    R = max(1, _TILE // C)
    mt = _tiled(mc, R)
    at = _tiled(ca, R)
    bt = _tiled(cb, R)
    ct = _tiled(cc, R)
    s = s0
    while s < s1:
        n = min(R, s1 - s) * C  # (as in _cl_affine_rows)
        o = base + s * C
        e = o + n
        i, j = o, _plain_end(dx, o, e, stream)
        while True:
            _dx_run(dy[i:j], x[i:j], dx[i:j], mt[i - o:], at[i - o:], bt[i - o:], ct[i - o:], j - i)
            if j == e:
                break
            while j + _line_elems(dx) <= e:
                _dx_line_streamed((dy, x), dx, j, (mt, at, bt, ct), j - o, 0)
                j += _line_elems(dx)
            i, j = j, e
        s += R


@njit(inline="always", **_OPTS)
def cl_backward_fused(dy, x, w, mean, rstd, N, S, G, K, center, batch, need_dx, dwp, dbp, dx, stream, lo, hi):
    """Per-sample backward (GroupNorm/InstanceNorm channels-last): the gradient sums of
    sample n, then its dx while x and dy are still in cache. dwp/dbp: (N, C) partial
    dweight/dbias (the caller sums over n)."""
    C = G * K
    dt = _ctype(x)
    for n in range(lo, hi):
        mcn = np.empty(C, dt)
        _per_channel(mean[n], K, mcn)
        sdy = dbp[n]
        sdyx = dwp[n]
        for c in range(C):
            sdy[c] = 0.0
            sdyx[c] = 0.0
        _cl_grad_rows(dy, x, mcn, n * S * C, 0, S, C, sdy, sdyx)
        _scale_per_group(sdyx, rstd[n], K)  # now sum dy * xhat
        ca = np.empty(C, _ctype(x))
        cb = np.empty(C, _ctype(x))
        cc = np.empty(C, _ctype(x))
        _dx_coefficients(sdy, sdyx, w, rstd[n], G, K, S * K, center, batch, ca, cb, cc)
        if not need_dx:
            continue
        _cl_dx_rows(dy, x, mcn, ca, cb, cc, n * S * C, 0, S, C, dx, stream)


@njit(inline="always", **_OPTS)
def cl_dx(dy, x, mc, ca, cb, cc, N, S, C, B, dx, stream, lo, hi):
    """dx = ca[n, c] * dy + cb[n, c] * (x - mc[n, c]) + cc[n, c] on (N, S, C), where
    the caller folded rstd, weight and the two group means into the coefficients."""
    for item in range(lo, hi):
        n = item // B
        bi = item % B
        _cl_dx_rows(dy, x, mc[n], ca[n], cb[n], cc[n], n * S * C, bi * S // B, (bi + 1) * S // B,
                    C, dx, stream)


@njit(**_OPTS)
def sum_partials(dwp, dbp, dw, db):
    """dw[c] = sum_t dwp[t, c] and db[c] = sum_t dbp[t, c]: the per-chunk float64 partial
    sums of dweight/dbias added in a fixed order (deterministic), rounded once into the
    outputs (x's dtype)."""
    sw, sb = _column_sums(dwp, dbp, 0, dw.size)
    for c in range(dw.size):
        dw[c] = sw[c]
        db[c] = sb[c]


# ------------------------------------------------------------------------ by address
#
# A small layer's training step (e.g. (8, 32, 40): ~10 us of kernel work) is dominated by
# what surrounds the kernels, and the largest item was handing tensors to numba: a
# tensor's NumPy view costs ~0.6-0.9 us (``.numpy()`` and a reshape), a dozen of them per
# step. These entry points take each tensor as its address instead (``data_ptr()``, 0.1
# us). The caller guarantees each address is the start of a dense buffer of the stated
# length that stays alive during the call. ``like_x``/``like_c`` are empty arrays whose
# dtypes (x's, e.g. uint16 for bfloat16 bits, and the compute dtype's) pick the compiled
# specialization.
#
# ``grouped_forward_at``/``grouped_backward_at`` run the kernels here, on the calling
# thread (small inputs). The others (``*_team_at``, ``planes_*_at``, ``cl_*_at``) start
# the thread team themselves (``team``: see :func:`_run_team`) on the team bodies, which
# are compiled per x's dtype: building a launch's job in Python (``team.job``) and
# calling the OpenMP runtime through ctypes cost ~20-50 us right after a memory-bound
# pass -- as much as the kernel on a ~1 MB input. Measured on the 2-core benchmark
# machine, LayerNorm (256, 768) forward: 108 us through ``team.job``, 60 us with the job
# built here (torch.nn: 59 us), the same bits.


@intrinsic
def _address(typingctx, addr):
    """The integer ``addr`` as a void pointer."""
    sig = types.voidptr(types.intp)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], llvm_ir.IntType(8).as_pointer())

    return sig, codegen


@njit(inline="always", **_OPTS)
def _at(addr, n, like):
    """The n elements of ``like``'s dtype at address ``addr``, as a 1-D array."""
    return carray(_address(addr), n, like.dtype)


@intrinsic
def _float_bits(typingctx, value):
    """The bits of the float64 ``value`` as an int64 (a float's job word)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.IntType(64))
    return types.int64(types.float64), codegen


def _words(arg):
    pass


@overload(_words, inline="always")
def _words_impl(arg):
    """The two job words of one kernel argument (see the team bodies' job layout): an
    array's address and size (a caller's buffer given as its ``(address, size)`` pair),
    an integer or bool as itself, a float as the bits of a float64 -- what ``team.job``
    writes for the same argument."""
    if isinstance(arg, types.Array):
        return lambda arg: (np.int64(arg.ctypes.data), np.int64(arg.size))
    if isinstance(arg, types.BaseTuple):
        return lambda arg: (np.int64(arg[0]), np.int64(arg[1]))
    if isinstance(arg, types.Float):
        return lambda arg: (_float_bits(np.float64(arg)), np.int64(0))
    if isinstance(arg, (types.Integer, types.Boolean)):
        return lambda arg: (np.int64(arg), np.int64(0))
    return None


@njit(**_OPTS)  # (not inlined: numba unrolls a loop over a tuple only in its own function)
def _job(items, chunks, args):
    """The job of a launch over ``range(items)`` in ``chunks`` chunks with the kernel
    arguments ``args`` (a tuple of arrays, ``(address, size)`` pairs of the caller's
    buffers, integers, bools and floats: see :func:`_words`)."""
    job = np.empty(_HEADER + 2 * len(args), np.int64)
    job[0] = 0
    job[1] = items
    job[2] = chunks
    i = _HEADER
    for arg in literal_unroll(args):
        job[i], job[i + 1] = _words(arg)
        i += 2
    return job


@intrinsic
def _gomp_parallel(typingctx, gomp_at, body_at, job_at, threads):
    """``GOMP_parallel(body, job, threads, 0)`` through the runtime's address
    ``gomp_at``: each of ``threads`` threads (the caller's included) runs the body on
    the job; returns when all have."""
    sig = types.void(types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        byte_ptr = llvm_ir.IntType(8).as_pointer()
        i32 = llvm_ir.IntType(32)
        fnty = llvm_ir.FunctionType(llvm_ir.VoidType(), [byte_ptr, byte_ptr, i32, i32])
        gomp, body, job, threads = args
        builder.call(builder.inttoptr(gomp, fnty.as_pointer()),
                     [builder.inttoptr(body, byte_ptr), builder.inttoptr(job, byte_ptr),
                      builder.trunc(threads, i32), i32(0)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _call_body(typingctx, body_at, job_at):
    """The team body at ``body_at`` run on the calling thread: ``body(job)``."""
    sig = types.void(types.intp, types.intp)

    def codegen(context, builder, signature, args):
        byte_ptr = llvm_ir.IntType(8).as_pointer()
        fnty = llvm_ir.FunctionType(llvm_ir.VoidType(), [byte_ptr])
        body, job = args
        builder.call(builder.inttoptr(body, fnty.as_pointer()), [builder.inttoptr(job, byte_ptr)])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", **_OPTS)
def _run_team(team, items, args):
    """Run a team body over ``range(items)`` with the kernel arguments ``args`` (see
    :func:`_job`). ``team = (gomp_at, body_at, threads, chunks)`` as
    ``team.team_at`` gives it: the OpenMP runtime's ``GOMP_parallel`` (0 if none), the
    body's address, the thread count and the number of chunks (``team.chunk_count``).
    One thread runs the body itself, as ``team.launch`` does.

    Arrays the calling kernel allocates go into ``args`` themselves, not as addresses:
    numba frees an array right after its last use in the code, and the threads see only
    its address.
    So this returns the job's counter and ``args`` -- used after the call, the job and
    every array in ``args`` stay alive until the team is done (the caller drops them)."""
    gomp_at, body_at, threads, chunks = team
    job = _job(items, chunks, args)
    if threads > 1:
        _gomp_parallel(gomp_at, body_at, job.ctypes.data, threads)
    else:
        _call_body(body_at, job.ctypes.data)
    return job[0], args


@njit(**_OPTS)
def grouped_forward_at(x_at, y_at, w_at, b_at, mean_at, var_at, rstd_at, like_x, like_c, A, P, K, S, G, eps,
                       center, short_groups, running_mean_at, running_var_at, like_r, momentum, correction):
    """:func:`dispatch_grouped_forward` with batch statistics on all P groups;
    mean/var/rstd hold P values each.

    ``running_var_at`` not 0 (BatchNorm/InstanceNorm training, K = 1): the running
    statistics of the G channels are then updated from the P = rows * G statistics, as
    :func:`update_running` (``running_mean_at`` 0: absent; ``like_r``: the buffers'
    storage, see :func:`update_running_at`)."""
    n = A * P * K * S
    x = _at(x_at, n, like_x)
    y = _at(y_at, n, like_x)
    w = _at(w_at, G * K, like_c)
    b = _at(b_at, G * K, like_c)
    mean = _at(mean_at, P, like_c)
    var = _at(var_at, P, like_c)
    rstd = _at(rstd_at, P, like_c)
    dispatch_grouped_forward(x, y, w, b, A, P, K, S, G, eps, center, True, short_groups, mean, var, rstd, False, 0, P)
    if running_var_at:
        update_running_at(running_mean_at, running_var_at, mean_at, var_at, like_r, like_c, P // G, G, momentum,
                          correction)


@njit(**_OPTS)
def grouped_backward_at(dy_at, x_at, w_at, mean_at, rstd_at, dx_at, dw_at, db_at, like_x, like_c, A, P, K, S,
                        G, center, batch, need_dx, T, short_rows):
    """:func:`dispatch_grouped_backward` over all T partial chunks, summed into
    dweight/dbias (G*K values each). dx is written when need_dx."""
    n = A * P * K * S
    C = G * K
    dy = _at(dy_at, n, like_x)
    x = _at(x_at, n, like_x)
    dx = _at(dx_at, n if need_dx else 0, like_x)
    w = _at(w_at, C, like_c)
    mean = _at(mean_at, P, like_c)
    rstd = _at(rstd_at, P, like_c)
    dwp = np.zeros((T, C))
    dbp = np.zeros((T, C))
    dispatch_grouped_backward(dy, x, w, mean, rstd, A, P, K, S, G, center, batch, need_dx, T, short_rows, dx, dwp,
                              dbp, False, 0, T)
    sum_partials(dwp, dbp, _at(dw_at, C, like_c), _at(db_at, C, like_c))


@njit(**_OPTS)
def grouped_forward_team_at(x_at, y_at, w_at, b_at, mean_at, var_at, rstd_at, like_c, A, P, K, S, G, eps, center,
                            short_groups, running_mean_at, running_var_at, like_r, momentum, correction, team, stream):
    """:func:`grouped_forward_at` on a team running ``dispatch_grouped_forward_body``
    (see :func:`_run_team`; ``stream``: write y with streaming stores)."""
    n = A * P * K * S
    C = G * K
    _run_team(team, P, ((x_at, n), (y_at, n), (w_at, C), (b_at, C), A, P, K, S, G, eps, center, True, short_groups,
                        (mean_at, P), (var_at, P), (rstd_at, P), stream))
    if running_var_at:
        update_running_at(running_mean_at, running_var_at, mean_at, var_at, like_r, like_c, P // G, G, momentum,
                          correction)


@njit(**_OPTS)
def grouped_backward_team_at(dy_at, x_at, w_at, mean_at, rstd_at, dx_at, dw_at, db_at, like_c, A, P, K, S, G,
                             center, batch, need_dx, T, short_rows, team, stream):
    """:func:`grouped_backward_at` on a team running ``dispatch_grouped_backward_body``
    (see :func:`_run_team`)."""
    n = A * P * K * S
    C = G * K
    dwp = np.zeros((T, C))
    dbp = np.zeros((T, C))
    _run_team(team, T, ((dy_at, n), (x_at, n), (w_at, C), (mean_at, P), (rstd_at, P), A, P, K, S, G, center, batch,
                        need_dx, T, short_rows, (dx_at, n if need_dx else 0), dwp, dbp, stream))
    sum_partials(dwp, dbp, _at(dw_at, C, like_c), _at(db_at, C, like_c))


@njit(**_OPTS)
def planes_forward_at(x_at, y_at, w_at, b_at, mean_at, var_at, rstd_at, like_c, A, P, S, eps, center,
                      running_mean_at, running_var_at, like_r, momentum, correction, means_team, sums_team,
                      coefficients_team, apply_team, stream):
    """BatchNorm's forward with batch statistics on its per-channel planes (A, P, S) in
    memory order: :func:`planes_rough_means`, :func:`planes_sums`,
    :func:`planes_coefficients` and :func:`planes_apply`, each on its team (see
    :func:`_run_team`). mean/var/rstd hold the P channels' statistics. Running
    statistics as :func:`grouped_forward_at`."""
    n = A * P * S
    coefficients = np.empty((3, P), like_c.dtype)  # y = (x - mc) * ca + cb
    mc, ca, cb = coefficients[0], coefficients[1], coefficients[2]
    psd = np.empty((A, P))
    psq = np.empty((A, P))
    _run_team(means_team, P, ((x_at, n), P, S, center, mc))
    _run_team(sums_team, A, ((x_at, n), A, P, S, mc, psd, psq))
    _run_team(coefficients_team, P, ((x_at, n), psd, psq, A, P, S, eps, center, True, (w_at, P), (b_at, P), mc,
                                     (mean_at, P), (var_at, P), (rstd_at, P), ca, cb))
    _run_team(apply_team, A * P, ((x_at, n), (y_at, n), P, S, mc, ca, cb, stream))
    if running_var_at:
        update_running_at(running_mean_at, running_var_at, mean_at, var_at, like_r, like_c, 1, P, momentum, correction)


@njit(**_OPTS)
def fixed_forward_at(x_at, y_at, w_at, b_at, mean_at, var_at, rstd_at, like_c, O, C, I, B, eps, apply_team,
                     stream):
    """The forward with fixed statistics of one value per channel -- eval-mode
    BatchNorm/InstanceNorm -- on x viewed as (O, C, I): rstd of the C variances into
    rstd_at (:func:`fixed_rstd`), the per-channel coefficients as the Python-launched
    path makes them (:func:`cl_coefficients`), then ``y = (x - mc) * sc + sh``: on planes
    (I > 1, NCHW) by :func:`planes_apply` over the O * C planes, on rows of C channels
    (I = 1: channels_last, or (N, C)) by :func:`cl_apply` over B row blocks; on
    ``apply_team`` (see :func:`_run_team`)."""
    n = O * C * I
    var = _at(var_at, C, like_c)
    rstd = _at(rstd_at, C, like_c)
    fixed_rstd(var, eps, rstd)
    parts = np.empty((3, 0, C))  # (no batch statistics to merge)
    coefficients = np.empty((3, 1, C), like_c.dtype)  # mc, sc, sh
    cl_coefficients(parts[0], parts[1], parts[2], 1, B, C, 1, eps, True, _at(w_at, C, like_c), _at(b_at, C, like_c),
                    _at(mean_at, C, like_c), var, rstd, coefficients[0], coefficients[1], coefficients[2])
    if I > 1:
        _run_team(apply_team, O * C, ((x_at, n), (y_at, n), C, I, coefficients[0, 0], coefficients[1, 0],
                                      coefficients[2, 0], stream))
    else:
        _run_team(apply_team, B, ((x_at, n), (y_at, n), coefficients[0], coefficients[1], coefficients[2], 1, O, C, B,
                                  stream))


@njit(**_OPTS)
def planes_backward_at(dy_at, x_at, w_at, mean_at, rstd_at, dx_at, dw_at, db_at, like_c, A, P, S, center,
                       batch, need_dx, sums_team, coefficients_team, dx_team, stream):
    """BatchNorm's backward on its planes in memory order, dweight/dbias into dw/db (P
    values each): :func:`planes_grad_sums`, :func:`planes_dx_coefficients` and, when
    need_dx, :func:`planes_dx`, each on its team (see :func:`_run_team`)."""
    n = A * P * S
    psdy = np.empty((A, P))
    psdyx = np.empty((A, P))
    _run_team(sums_team, A, ((dy_at, n), (x_at, n), A, P, S, (mean_at, P), psdy, psdyx))
    dwp = np.empty((1, P))
    dbp = np.empty((1, P))
    coefficients = np.empty((4, P), like_c.dtype)  # dx = ca * dy + cb * (x - mc) + cc
    mc, ca, cb, cc = coefficients[0], coefficients[1], coefficients[2], coefficients[3]
    _run_team(coefficients_team, P, (psdy, psdyx, A, P, S, center, batch, (w_at, P), (mean_at, P), (rstd_at, P),
                                     dwp, dbp, mc, ca, cb, cc))
    if need_dx:
        _run_team(dx_team, A, ((dy_at, n), (x_at, n), (dx_at, n), P, S, mc, ca, cb, cc, stream))
    sum_partials(dwp, dbp, _at(dw_at, P, like_c), _at(db_at, P, like_c))


@njit(**_OPTS)
def cl_forward_at(x_at, y_at, w_at, b_at, mean_at, var_at, rstd_at, like_c, N, S, G, K, B, eps,
                  running_mean_at, running_var_at, like_r, momentum, correction, stats_team, apply_team, stream):
    """The channels-last forward with batch statistics of N*G groups: with one block per
    sample (B = 1), :func:`cl_forward_fused` on ``apply_team``; else :func:`cl_stats` on
    ``stats_team``, :func:`cl_coefficients` here, and :func:`cl_apply` on
    ``apply_team`` (teams: see :func:`_run_team`). mean/var/rstd hold N*G values.
    Running statistics as :func:`grouped_forward_at` (K = 1)."""
    C = G * K
    n = N * S * C
    if B == 1:
        _run_team(apply_team, N, ((x_at, n), (y_at, n), (w_at, C), (b_at, C), N, S, G, K, eps, (mean_at, N * G),
                                  (var_at, N * G), (rstd_at, N * G), stream))
    else:
        parts = np.empty((3, N * B, G))  # count, mean, M2 per block
        _run_team(stats_team, N * B, ((x_at, n), N, S, G, K, B, parts[0], parts[1], parts[2]))
        coefficients = np.empty((3, N, C), like_c.dtype)  # mc, sc, sh
        cl_coefficients(parts[0], parts[1], parts[2], N, B, G, K, eps, False, _at(w_at, C, like_c),
                        _at(b_at, C, like_c), _at(mean_at, N * G, like_c), _at(var_at, N * G, like_c),
                        _at(rstd_at, N * G, like_c), coefficients[0], coefficients[1], coefficients[2])
        _run_team(apply_team, N * B, ((x_at, n), (y_at, n), coefficients[0], coefficients[1], coefficients[2],
                                      N, S, C, B, stream))
    if running_var_at:
        update_running_at(running_mean_at, running_var_at, mean_at, var_at, like_r, like_c, N, G, momentum, correction)


@njit(**_OPTS)
def cl_backward_at(dy_at, x_at, w_at, mean_at, rstd_at, dx_at, dw_at, db_at, like_c, N, S, G, K, B,
                   center, batch, need_dx, sums_team, dx_team, stream):
    """The channels-last backward, dweight/dbias summed into dw/db (G*K values each):
    with one block per sample (B = 1), :func:`cl_backward_fused` on ``dx_team``; else
    :func:`cl_grad_sums` on ``sums_team`` and, when need_dx, :func:`cl_dx_coefficients`
    here and :func:`cl_dx` on ``dx_team`` (teams: see :func:`_run_team`)."""
    C = G * K
    n = N * S * C
    m = n if need_dx else 0
    if B == 1:
        dwp = np.empty((N, C))
        dbp = np.empty((N, C))
        _run_team(dx_team, N, ((dy_at, n), (x_at, n), (w_at, C), (mean_at, N * G), (rstd_at, N * G), N, S, G, K,
                               center, batch, need_dx, dwp, dbp, (dx_at, m), stream))
    else:
        dbp = np.empty((N * B, C))  # sum(dy) per block
        dwp = np.empty((N * B, C))  # sum(dy * (x - mean)) * rstd per block
        _run_team(sums_team, N * B, ((dy_at, n), (x_at, n), (mean_at, N * G), (rstd_at, N * G), N, S, G, K, B,
                                     dbp, dwp))
        if need_dx:
            coefficients = np.empty((4, N, C), like_c.dtype)  # mc, ca, cb, cc
            cl_dx_coefficients(dbp, dwp, N, S, B, G, K, center, batch, _at(w_at, C, like_c),
                               _at(mean_at, N * G, like_c), _at(rstd_at, N * G, like_c), coefficients[0],
                               coefficients[1], coefficients[2], coefficients[3])
            _run_team(dx_team, N * B, ((dy_at, n), (x_at, n), coefficients[0], coefficients[1], coefficients[2],
                                       coefficients[3], N, S, C, B, (dx_at, n), stream))
    sum_partials(dwp, dbp, _at(dw_at, C, like_c), _at(db_at, C, like_c))


@njit(**_OPTS)
def update_running_at(running_mean_at, running_var_at, mean_at, var_at, like_r, like_c, rows, channels, momentum,
                      correction):
    """:func:`update_running` by address (``running_mean_at`` 0: absent); ``like_r``:
    the running buffers' storage (a 16-bit model's as its bits), ``like_c``: the
    statistics' compute dtype."""
    running_mean = _at(running_mean_at, channels if running_mean_at else 0, like_r)
    running_var = _at(running_var_at, channels, like_r)
    mean = _at(mean_at, rows * channels, like_c).reshape(rows, channels)
    var = _at(var_at, rows * channels, like_c).reshape(rows, channels)
    update_running(running_mean, running_var, mean, var, momentum, correction)


@njit(cache=True, nogil=True)
def update_running(running_mean, running_var, mean, var, momentum, correction):
    """In place, per channel c: ``running = (1 - momentum) * running + momentum * stat``
    with the statistics averaged over the rows of ``mean``/``var`` (rows, C) and the
    variance made unbiased by ``correction = count / (count - 1)``; float64 arithmetic,
    rounded once to float32/float64 buffers. 16-bit buffers are read and written as
    their bits, rounded through float32: where that first rounding lands on a 16-bit
    tie (about 2**-17 of bfloat16 updates), the result can be an ulp off the correctly
    rounded one. ``running_mean`` may be empty (absent)."""
    rows, channels = var.shape
    for c in range(channels):
        m = 0.0
        v = 0.0
        for r in range(rows):
            m += mean[r, c]
            v += var[r, c]
        if running_mean.size:
            running_mean[c] = _enc((1.0 - momentum) * _ld(running_mean[c]) + momentum * (m / rows), running_mean)
        running_var[c] = _enc((1.0 - momentum) * _ld(running_var[c]) + momentum * (v / rows * correction),
                              running_var)


# ---------------------------------------------------------------------- team bodies
#
# The parallel kernels as C functions that claim their own chunks. A body is what each
# thread of a team runs (see :func:`normlab.backends.cpu.team.launch`): it reads its
# kernel's arguments from a *job* -- an int64 array built by the caller -- then claims
# chunks of the work with an atomic counter in the job and calls the kernel on each,
# until none is left. It is a numba ``cfunc``: a thread enters it straight from the
# OpenMP runtime, without Python and without the GIL. (Through a Python callback, each
# thread took the GIL to claim a chunk and to enter the kernel; measured on the 2-core
# benchmark machine, the second thread started its first chunk 32-105 us late, with
# every cache already cold from the previous pass.)
#
# Job layout (int64): ``[counter, items, chunks, arg0, size0, arg1, size1, ...]`` --
# two slots per kernel argument: an array's address and element count, an integer or
# bool as itself, a float as the bits of a float64 (see :func:`team.job`).
#
# Each body is compiled on first use for one storage dtype (x's: float32, float64, or
# the raw bits of bfloat16/float16 as uint16/int16), with numba's on-disk cache; the
# dtype is carried by the type of the body's single argument -- the job's address typed
# as a pointer to x's elements -- so one Python definition serves every dtype.
#
# (The bodies live in this file because numba's on-disk cache checks only the source
# file of the function it compiled: a body cached from another file would keep running
# the kernels it was compiled with after this file changed.)


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


_BODY_OPTS = {"inline": "always", "fastmath": _FM}


@njit(**_BODY_OPTS)
def _claim(p, job):
    """The next unclaimed chunk ``(lo, hi)`` of the job, or ``(0, 0)`` when none is left."""
    i = _fetch_add(p, 1)
    items, chunks = job[1], job[2]
    if i >= chunks:
        return 0, 0
    return i * items // chunks, (i + 1) * items // chunks


@njit(**_BODY_OPTS)
def _x(job, i, p):
    """Argument ``i``: an array of x's storage dtype."""
    return carray(_typed(job[_HEADER + 2 * i], p), job[_HEADER + 2 * i + 1])


@njit(**_BODY_OPTS)
def _c(job, i, p):
    """Argument ``i``: an array of the compute dtype (float32 for 16-bit storage)."""
    x = carray(p, 0)
    return carray(_address(job[_HEADER + 2 * i]), job[_HEADER + 2 * i + 1], _ctype(x))


@njit(**_BODY_OPTS)
def _f64(job, i):
    """Argument ``i``: a float64 array."""
    return carray(_address(job[_HEADER + 2 * i]), job[_HEADER + 2 * i + 1], np.float64)


@njit(**_BODY_OPTS)
def _int(job, i):
    return job[_HEADER + 2 * i]


@njit(**_BODY_OPTS)
def _float(job, i):
    return _as_float(job[_HEADER + 2 * i])


# One body per parallel kernel above; the argument numbers follow the
# kernel's own signature (see each kernel for what the arguments are). Those kernels are
# ``inline="always"``: each is compiled once, inside its body (as a separate function it
# would be optimized twice, alone and again when linked into the body: 4.0 s instead of
# 3.3 s for BatchNorm2d's first forward with an empty cache).
#
# A body whose kernel writes an output calls it twice, with ``stream`` True and False as
# constants, and picks one per chunk. With ``stream`` a run-time value, LLVM kept the
# streaming write loop around every plane's or row's ordinary one, and on short runs that
# cost more than the work: GroupNorm (8, 2048, 7, 7) forward on one thread, 7x7 planes,
# took 610 us through its body against 206 us through the by-address serial kernel (whose
# ``stream`` is a constant False), and 208 us through the body with this; its backward
# 1035 -> 524 us (serial: 500). (Returning early from the write loops when not streaming
# recovered only part of it: 306 and 631 us.) The price is compile time: an empty cache
# took 13.9 s instead of 11.5 s for BatchNorm2d's first forward, 18.3 s instead of 16.2 s
# for its first backward.


def dispatch_grouped_forward_body(p):
    job = _job_of(p)
    A, P, K_, S, G = _int(job, 4), _int(job, 5), _int(job, 6), _int(job, 7), _int(job, 8)
    eps, center, compute, short = _float(job, 9), _int(job, 10) != 0, _int(job, 11) != 0, _int(job, 12) != 0
    x, y, w, b = _x(job, 0, p), _x(job, 1, p), _c(job, 2, p), _c(job, 3, p)
    mean, var, rstd = _c(job, 13, p), _c(job, 14, p), _c(job, 15, p)
    stream = _int(job, 16) != 0
    lo, hi = _claim(p, job)
    while lo < hi:
        if stream:  # (a constant in each call: see above)
            dispatch_grouped_forward(x, y, w, b, A, P, K_, S, G, eps, center, compute, short, mean, var, rstd, True,
                                     lo, hi)
        else:
            dispatch_grouped_forward(x, y, w, b, A, P, K_, S, G, eps, center, compute, short, mean, var, rstd, False,
                                     lo, hi)
        lo, hi = _claim(p, job)
    _store_fence()  # (streaming stores: see _store_line)


def dispatch_grouped_backward_body(p):
    job = _job_of(p)
    A, P, K_, S, G = _int(job, 5), _int(job, 6), _int(job, 7), _int(job, 8), _int(job, 9)
    center, batch, need_dx = _int(job, 10) != 0, _int(job, 11) != 0, _int(job, 12) != 0
    T, short = _int(job, 13), _int(job, 14) != 0
    dy, x, w, mean, rstd = _x(job, 0, p), _x(job, 1, p), _c(job, 2, p), _c(job, 3, p), _c(job, 4, p)
    dx, dwp, dbp = _x(job, 15, p), _f64(job, 16).reshape(T, -1), _f64(job, 17).reshape(T, -1)
    stream = _int(job, 18) != 0
    lo, hi = _claim(p, job)
    while lo < hi:
        if stream:  # (a constant in each call: see above)
            dispatch_grouped_backward(dy, x, w, mean, rstd, A, P, K_, S, G, center, batch, need_dx, T, short, dx,
                                      dwp, dbp, True, lo, hi)
        else:
            dispatch_grouped_backward(dy, x, w, mean, rstd, A, P, K_, S, G, center, batch, need_dx, T, short, dx,
                                      dwp, dbp, False, lo, hi)
        lo, hi = _claim(p, job)
    _store_fence()  # (streaming stores: see _store_line)


def planes_rough_means_body(p):
    job = _job_of(p)
    P, S, center = _int(job, 1), _int(job, 2), _int(job, 3) != 0
    x, mc = _x(job, 0, p), _c(job, 4, p)
    lo, hi = _claim(p, job)
    while lo < hi:
        planes_rough_means(x, P, S, center, mc, lo, hi)
        lo, hi = _claim(p, job)


def planes_sums_body(p):
    job = _job_of(p)
    A, P, S = _int(job, 1), _int(job, 2), _int(job, 3)
    x, mc = _x(job, 0, p), _c(job, 4, p)
    psd, psq = _f64(job, 5).reshape(A, P), _f64(job, 6).reshape(A, P)
    lo, hi = _claim(p, job)
    while lo < hi:
        planes_sums(x, P, S, mc, psd, psq, lo, hi)
        lo, hi = _claim(p, job)


def planes_coefficients_body(p):
    job = _job_of(p)
    A, P, S, eps = _int(job, 3), _int(job, 4), _int(job, 5), _float(job, 6)
    center, compute = _int(job, 7) != 0, _int(job, 8) != 0
    x, psd, psq = _x(job, 0, p), _f64(job, 1).reshape(-1, P), _f64(job, 2).reshape(-1, P)
    w, b, mc = _c(job, 9, p), _c(job, 10, p), _c(job, 11, p)
    mean, var, rstd, ca, cb = _c(job, 12, p), _c(job, 13, p), _c(job, 14, p), _c(job, 15, p), _c(job, 16, p)
    lo, hi = _claim(p, job)
    while lo < hi:
        planes_coefficients(x, psd, psq, A, P, S, eps, center, compute, w, b, mc, mean, var, rstd, ca, cb, lo, hi)
        lo, hi = _claim(p, job)


def planes_apply_body(p):
    job = _job_of(p)
    P, S = _int(job, 2), _int(job, 3)
    x, y, mc, ca, cb = _x(job, 0, p), _x(job, 1, p), _c(job, 4, p), _c(job, 5, p), _c(job, 6, p)
    stream = _int(job, 7) != 0
    lo, hi = _claim(p, job)
    while lo < hi:
        if stream:  # (a constant in each call: see above)
            planes_apply(x, y, P, S, mc, ca, cb, True, lo, hi)
        else:
            planes_apply(x, y, P, S, mc, ca, cb, False, lo, hi)
        lo, hi = _claim(p, job)
    _store_fence()  # (streaming stores: see _store_line)


def planes_grad_sums_body(p):
    job = _job_of(p)
    A, P, S = _int(job, 2), _int(job, 3), _int(job, 4)
    dy, x, mean = _x(job, 0, p), _x(job, 1, p), _c(job, 5, p)
    psdy, psdyx = _f64(job, 6).reshape(A, P), _f64(job, 7).reshape(A, P)
    lo, hi = _claim(p, job)
    while lo < hi:
        planes_grad_sums(dy, x, P, S, mean, psdy, psdyx, lo, hi)
        lo, hi = _claim(p, job)


def planes_dx_coefficients_body(p):
    job = _job_of(p)
    A, P, S, center, batch = _int(job, 2), _int(job, 3), _int(job, 4), _int(job, 5) != 0, _int(job, 6) != 0
    psdy, psdyx = _f64(job, 0).reshape(A, P), _f64(job, 1).reshape(A, P)
    w, mean, rstd, dw, db = _c(job, 7, p), _c(job, 8, p), _c(job, 9, p), _f64(job, 10), _f64(job, 11)
    mc, ca, cb, cc = _c(job, 12, p), _c(job, 13, p), _c(job, 14, p), _c(job, 15, p)
    lo, hi = _claim(p, job)
    while lo < hi:
        planes_dx_coefficients(psdy, psdyx, A, P, S, center, batch, w, mean, rstd, dw, db, mc, ca, cb, cc, lo, hi)
        lo, hi = _claim(p, job)


def planes_dx_body(p):
    job = _job_of(p)
    P, S = _int(job, 3), _int(job, 4)
    dy, x, dx = _x(job, 0, p), _x(job, 1, p), _x(job, 2, p)
    mc, ca, cb, cc = _c(job, 5, p), _c(job, 6, p), _c(job, 7, p), _c(job, 8, p)
    stream = _int(job, 9) != 0
    lo, hi = _claim(p, job)
    while lo < hi:
        if stream:  # (a constant in each call: see above)
            planes_dx(dy, x, dx, P, S, mc, ca, cb, cc, True, lo, hi)
        else:
            planes_dx(dy, x, dx, P, S, mc, ca, cb, cc, False, lo, hi)
        lo, hi = _claim(p, job)
    _store_fence()  # (streaming stores: see _store_line)


def cl_forward_fused_body(p):
    job = _job_of(p)
    N, S, G, K_, eps = _int(job, 4), _int(job, 5), _int(job, 6), _int(job, 7), _float(job, 8)
    x, y, w, b = _x(job, 0, p), _x(job, 1, p), _c(job, 2, p), _c(job, 3, p)
    mean, var, rstd = _c(job, 9, p).reshape(N, G), _c(job, 10, p).reshape(N, G), _c(job, 11, p).reshape(N, G)
    stream = _int(job, 12) != 0
    lo, hi = _claim(p, job)
    while lo < hi:
        if stream:  # (a constant in each call: see above)
            cl_forward_fused(x, y, w, b, N, S, G, K_, eps, mean, var, rstd, True, lo, hi)
        else:
            cl_forward_fused(x, y, w, b, N, S, G, K_, eps, mean, var, rstd, False, lo, hi)
        lo, hi = _claim(p, job)
    _store_fence()  # (streaming stores: see _store_line)


def cl_backward_fused_body(p):
    job = _job_of(p)
    N, S, G, K_ = _int(job, 5), _int(job, 6), _int(job, 7), _int(job, 8)
    center, batch, need_dx = _int(job, 9) != 0, _int(job, 10) != 0, _int(job, 11) != 0
    dy, x, w = _x(job, 0, p), _x(job, 1, p), _c(job, 2, p)
    mean, rstd = _c(job, 3, p).reshape(N, G), _c(job, 4, p).reshape(N, G)
    dwp, dbp, dx = _f64(job, 12).reshape(N, G * K_), _f64(job, 13).reshape(N, G * K_), _x(job, 14, p)
    stream = _int(job, 15) != 0
    lo, hi = _claim(p, job)
    while lo < hi:
        if stream:  # (a constant in each call: see above)
            cl_backward_fused(dy, x, w, mean, rstd, N, S, G, K_, center, batch, need_dx, dwp, dbp, dx, True, lo, hi)
        else:
            cl_backward_fused(dy, x, w, mean, rstd, N, S, G, K_, center, batch, need_dx, dwp, dbp, dx, False, lo, hi)
        lo, hi = _claim(p, job)
    _store_fence()  # (streaming stores: see _store_line)


def cl_stats_body(p):
    job = _job_of(p)
    N, S, G, K_, B = _int(job, 1), _int(job, 2), _int(job, 3), _int(job, 4), _int(job, 5)
    x = _x(job, 0, p)
    pcnt, pmu, pm2 = _f64(job, 6).reshape(N * B, G), _f64(job, 7).reshape(N * B, G), _f64(job, 8).reshape(N * B, G)
    lo, hi = _claim(p, job)
    while lo < hi:
        cl_stats(x, N, S, G, K_, B, pcnt, pmu, pm2, lo, hi)
        lo, hi = _claim(p, job)


def cl_apply_body(p):
    job = _job_of(p)
    N, S, C, B = _int(job, 5), _int(job, 6), _int(job, 7), _int(job, 8)
    x, y = _x(job, 0, p), _x(job, 1, p)
    mc, sc, sh = _c(job, 2, p).reshape(N, C), _c(job, 3, p).reshape(N, C), _c(job, 4, p).reshape(N, C)
    stream = _int(job, 9) != 0
    lo, hi = _claim(p, job)
    while lo < hi:
        if stream:  # (a constant in each call: see above)
            cl_apply(x, y, mc, sc, sh, N, S, C, B, True, lo, hi)
        else:
            cl_apply(x, y, mc, sc, sh, N, S, C, B, False, lo, hi)
        lo, hi = _claim(p, job)
    _store_fence()  # (streaming stores: see _store_line)


def cl_grad_sums_body(p):
    job = _job_of(p)
    N, S, G, K_, B = _int(job, 4), _int(job, 5), _int(job, 6), _int(job, 7), _int(job, 8)
    dy, x = _x(job, 0, p), _x(job, 1, p)
    mean, rstd = _c(job, 2, p).reshape(N, G), _c(job, 3, p).reshape(N, G)
    psdy, psdyx = _f64(job, 9).reshape(N * B, G * K_), _f64(job, 10).reshape(N * B, G * K_)
    lo, hi = _claim(p, job)
    while lo < hi:
        cl_grad_sums(dy, x, mean, rstd, N, S, G, K_, B, psdy, psdyx, lo, hi)
        lo, hi = _claim(p, job)


def cl_dx_body(p):
    job = _job_of(p)
    N, S, C, B = _int(job, 6), _int(job, 7), _int(job, 8), _int(job, 9)
    dy, x, dx = _x(job, 0, p), _x(job, 1, p), _x(job, 10, p)
    mc, ca = _c(job, 2, p).reshape(N, C), _c(job, 3, p).reshape(N, C)
    cb, cc = _c(job, 4, p).reshape(N, C), _c(job, 5, p).reshape(N, C)
    stream = _int(job, 11) != 0
    lo, hi = _claim(p, job)
    while lo < hi:
        if stream:  # (a constant in each call: see above)
            cl_dx(dy, x, mc, ca, cb, cc, N, S, C, B, dx, True, lo, hi)
        else:
            cl_dx(dy, x, mc, ca, cb, cc, N, S, C, B, dx, False, lo, hi)
        lo, hi = _claim(p, job)
    _store_fence()  # (streaming stores: see _store_line)


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
        body = _compiled[key] = cfunc(sig, cache=True, fastmath=_FM, error_model="numpy")(globals()[name + "_body"])
    return body.address
