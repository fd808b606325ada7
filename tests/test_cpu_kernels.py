"""The cpu-numba backend against the NumPy oracle and torch.nn.

Every family (BN with batch and running statistics, IN, GN, LN, RMSNorm), float64 /
float32 / bfloat16 / float16, contiguous and channels_last, odd sizes; forward,
input/weight/bias gradients and the statistics. Then the runtime behaviour the
issue asks for: thread caps, forked children, two Python threads, small-input
routing, no compilation at enable().
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close

pytest.importorskip("numba")
from numba import njit  # noqa: E402

import normlab.functional as NF  # noqa: E402
from normlab import reference as R  # noqa: E402
from normlab.backends import cpu, select_backend  # noqa: E402
from normlab.backends import reference as reference_backend  # noqa: E402
from normlab.backends._env import last_level_cache_bytes  # noqa: E402
from normlab.backends.cpu import backend as numba_backend  # noqa: E402
from normlab.backends.cpu import runtime, team  # noqa: E402

_kernels = runtime.kernels()  # numba imported and its cache directory chosen, as the backend does
from normlab.core.spec import (  # noqa: E402
    batch_norm_spec,
    group_norm_spec,
    instance_norm_spec,
    layer_norm_spec,
    rms_norm_spec,
)

CL = torch.channels_last
# large enough for the parallel kernels (SERIAL_BELOW elements and more)
PARALLEL_SHAPE = (4, 16, 48, 48)


@pytest.fixture(autouse=True)
def numba_forced(monkeypatch):
    """Register the backend and make it take inputs of every size."""
    assert cpu.enable()
    monkeypatch.setenv("NORMLAB_BACKEND", "cpu-numba")


@pytest.fixture(params=["parallel", "serial"])
def kernel_mode(request, monkeypatch):
    """Run a test on the parallel kernels (every size) and on their serial twins."""
    monkeypatch.setattr(numba_backend, "SERIAL_BELOW", 0 if request.param == "parallel" else 1 << 62)
    return request.param


def _uses_numba(x, spec):
    # (the backend hands out its per-configuration call, which carries its forward/backward)
    assert isinstance(select_backend(x, spec), numba_backend._Call), "cpu-numba was not selected"


# ---------------------------------------------------------------- oracle, float64

CHANNEL_SHAPES = [(3, 6, 5, 7), (2, 6, 9), (5, 6, 3, 2, 3), (7, 6)]


def _grads(fn, x, params, dy, memory_format=None):
    xt = torch.tensor(x, requires_grad=True)
    if memory_format is not None:
        xt = xt.detach().contiguous(memory_format=memory_format).requires_grad_()
    pt = [None if p is None else torch.tensor(p, requires_grad=True) for p in params]
    y = fn(xt, *pt)
    y.backward(torch.tensor(dy))
    return y, xt.grad, [None if p is None else p.grad for p in pt]


def _check(ours, oracle, what):
    y, dx, dps = ours
    oy, (odx, *odps) = oracle
    assert_close(y, oy, torch.float64, what=f"{what} output")
    assert_close(dx, odx, torch.float64, what=f"{what} dx")
    for i, (a, e) in enumerate(zip(dps, odps, strict=True)):
        if e is not None:
            assert_close(a, e, torch.float64, what=f"{what} dparam{i}")


# channels_last exists for 4D/5D tensors only
LAYOUT_CASES = [(s, cl) for s in CHANNEL_SHAPES for cl in (False, True) if not cl or len(s) in (4, 5)]


@pytest.mark.parametrize("shape,channels_last", LAYOUT_CASES)
def test_batch_group_instance_norm_match_oracle(shape, channels_last, kernel_mode):
    fmt = (CL if len(shape) == 4 else torch.channels_last_3d) if channels_last else None
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape) * 2.5 + 1.5
    dy = rng.standard_normal(shape)
    c = shape[1]
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    xt = torch.tensor(x)
    _uses_numba(xt, batch_norm_spec(shape))

    ours = _grads(lambda t, w_, b_: NF.batch_norm(t, None, None, w_, b_, training=True), x, [w, b],
                  dy, fmt)
    y, cache = R.batch_norm(x, w, b)
    _check(ours, (y, R.batch_norm_backward(dy, cache)), "batch_norm")
    if channels_last:
        assert ours[0].is_contiguous(memory_format=fmt) and ours[1].is_contiguous(memory_format=fmt)

    ours = _grads(lambda t, w_, b_: NF.group_norm(t, 3, w_, b_), x, [w, b], dy, fmt)
    y, cache = R.group_norm(x, 3, w, b)
    _check(ours, (y, R.group_norm_backward(dy, cache)), "group_norm")

    if len(shape) >= 3:
        ours = _grads(lambda t, w_, b_: NF.instance_norm(t, weight=w_, bias=b_), x, [w, b], dy, fmt)
        y, cache = R.instance_norm(x, w, b)
        _check(ours, (y, R.instance_norm_backward(dy, cache)), "instance_norm")


@pytest.mark.parametrize("shape,normalized", [((4, 7, 13), (13,)), ((3, 5, 6), (5, 6)), ((33, 1), (1,)),
                                              ((5, 300), (300,))])
def test_layer_and_rms_norm_match_oracle(shape, normalized, kernel_mode):
    rng = np.random.default_rng(len(shape) + normalized[0])
    x = rng.standard_normal(shape) * 3 - 2
    dy = rng.standard_normal(shape)
    w, b = rng.standard_normal(normalized), rng.standard_normal(normalized)
    _uses_numba(torch.tensor(x), layer_norm_spec(shape, normalized))
    ours = _grads(lambda t, w_, b_: NF.layer_norm(t, normalized, w_, b_), x, [w, b], dy)
    y, cache = R.layer_norm(x, normalized, w, b)
    _check(ours, (y, R.layer_norm_backward(dy, cache)), "layer_norm")

    ours = _grads(lambda t, w_: NF.rms_norm(t, normalized, w_, eps=1e-6), x, [w], dy)
    y, cache = R.rms_norm(x, normalized, w, eps=1e-6)
    dx, dw = R.rms_norm_backward(dy, cache)
    _check(ours, (y, (dx, dw)), "rms_norm")


def test_statistics_returned_match_oracle():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6, 5, 3)) + 4.0
    for xt in (torch.tensor(x), torch.tensor(x).contiguous(memory_format=CL)):
        spec = group_norm_spec(x.shape, 2)
        y, mean, var, rstd = numba_backend.forward_impl(xt, None, None, spec, 1e-5)
        _, cache = R.group_norm(x, 2, eps=1e-5)
        assert mean.shape == var.shape == rstd.shape == spec.stat_shape
        assert_close(mean.reshape(4, 2), cache["mean"].reshape(4, 2), torch.float64, what="mean")
        assert_close(var.reshape(4, 2), cache["var"].reshape(4, 2), torch.float64, what="var")
        assert_close(rstd.reshape(4, 2), cache["rstd"].reshape(4, 2), torch.float64, what="rstd")


# ------------------------------------------------- torch.nn, float32 and 16-bit

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("c", [8, 64, 128])  # channels_last: lanes of 64 // C rows, of 64, of 128
def test_layers_match_torch_nn(dtype, channels_last, c, kernel_mode):
    torch.manual_seed(0)
    x0 = torch.randn(3, c, 5, 7) * 2 + 1
    fmt = CL if channels_last else torch.contiguous_format
    pairs = [
        (torch.nn.BatchNorm2d(c), NF.batch_norm, "bn"),
        (torch.nn.GroupNorm(4, c), None, "gn"),
        (torch.nn.InstanceNorm2d(c, affine=True), None, "in"),
    ]
    if not channels_last:
        pairs += [(torch.nn.LayerNorm((5, 7)), None, "ln"), (torch.nn.RMSNorm(7), None, "rms")]
    import normlab as nl

    ours_of = {"bn": lambda: nl.BatchNorm2d(c), "gn": lambda: nl.GroupNorm(4, c),
               "in": lambda: nl.InstanceNorm2d(c, affine=True), "ln": lambda: nl.LayerNorm((5, 7)),
               "rms": lambda: nl.RMSNorm(7)}
    for ref, _, name in pairs:
        ours = ours_of[name]()
        with torch.no_grad():
            for p_ref, p_ours in zip(ref.parameters(), ours.parameters(), strict=True):
                p_ref.copy_(torch.randn_like(p_ref))
                p_ours.copy_(p_ref)
        ref, ours = ref.to(dtype), ours.to(dtype)
        x_ref = x0.to(dtype).contiguous(memory_format=fmt).requires_grad_()
        x_ours = x0.to(dtype).contiguous(memory_format=fmt).requires_grad_()
        dy = torch.randn_like(x_ref)
        y_ref, y_ours = ref(x_ref), ours(x_ours)
        y_ref.backward(dy)
        y_ours.backward(dy)
        assert y_ours.dtype == dtype and y_ours.is_contiguous(memory_format=fmt), name
        assert x_ours.grad.is_contiguous(memory_format=fmt), name
        scale = 4.0 if dtype != torch.float32 else 1.0
        assert_close(y_ours, y_ref, dtype, scale, what=f"{name} {dtype} y")
        assert_close(x_ours.grad, x_ref.grad, dtype, 2 * scale, what=f"{name} {dtype} dx")
        for p_ref, p_ours in zip(ref.parameters(), ours.parameters(), strict=True):
            assert p_ours.grad.dtype == p_ours.dtype
            # parameter gradients sum many terms: compare relative to their size
            assert_close(p_ours.grad, p_ref.grad, dtype, 4 * scale * (1 + float(p_ref.grad.abs().max())),
                         what=f"{name} {dtype} dparam")
        for buf in ("running_mean", "running_var"):
            if getattr(ref, buf, None) is not None:
                assert_close(getattr(ours, buf), getattr(ref, buf), dtype, scale, what=buf)


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_eval_running_statistics(channels_last, kernel_mode):
    torch.manual_seed(1)
    import normlab as nl

    ref, ours = torch.nn.BatchNorm2d(6), nl.BatchNorm2d(6)
    x = torch.randn(4, 6, 5, 5) * 3 + 2
    if channels_last:
        x = x.contiguous(memory_format=CL)
    ref(x)
    ours(x)  # one training step updates the running statistics
    ref.eval()
    ours.eval()
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn_like(x)
    yr, yo = ref(xr), ours(xo)
    yr.backward(dy)
    yo.backward(dy)
    assert_close(yo, yr, torch.float32, what="eval y")
    assert_close(xo.grad, xr.grad, torch.float32, what="eval dx")
    assert_close(ours.weight.grad, ref.weight.grad, torch.float32, 5, what="eval dweight")
    assert_close(ours.bias.grad, ref.bias.grad, torch.float32, 5, what="eval dbias")


def test_instance_norm_with_running_statistics_in_eval():
    torch.manual_seed(2)
    x = torch.randn(3, 4, 6, 6)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    ours = NF.instance_norm(x, rm, rv, use_input_stats=False)
    ref = F.instance_norm(x, rm, rv, use_input_stats=False)
    assert_close(ours, ref, torch.float32, what="instance_norm eval")


# ------------------------------------------------------------------- numerics

@pytest.mark.parametrize("channels_last", [False, True])
def test_large_offset_is_stable(channels_last, kernel_mode):
    """x + 1e4 normalizes like x (no E[x^2] - E[x]^2 cancellation)."""
    torch.manual_seed(3)
    x = torch.randn(4, 8, 9, 9, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    for fn in (lambda t: NF.batch_norm(t, None, None, training=True), lambda t: NF.group_norm(t, 2)):
        assert_close(fn(x + 1e4), fn(x), torch.float64, scale=1e3, what="float64 offset")
        y32 = fn((x + 1e4).float())
        # float32 input: mean rounded to float32 (ulp(1e4) ~ 1e-3) bounds the error
        assert (y32.double() - fn(x)).abs().max() < 5e-3
    xr = torch.randn(6, 37, dtype=torch.float64) + 1e4
    spec = layer_norm_spec(xr.shape, (37,))
    _, _, var, _ = numba_backend.forward_impl(xr, None, None, spec, 0.0)
    assert_close(var.reshape(-1), (xr - xr.mean(1, keepdim=True)).square().mean(1), torch.float64,
                 what="variance with offset")


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_blocks_match_float64_with_offset(channels_last):
    """float32 partial sums in blocks (groups longer than one block, ragged tails)
    flushed to float64 keep the float32 result within ~1e-6 of the same input computed
    in float64 -- also offset by 1e4, where a float32 running sum of x would lose ~1e-3."""
    torch.manual_seed(4)
    fmt = CL if channels_last else torch.contiguous_format
    # IN group 2115 and GN group 4230 elements: two-plus blocks of 1024 with a tail;
    # channels-last BN: 6345 rows of 8 channels, several row blocks and work items
    x64 = torch.randn(3, 8, 45, 47, dtype=torch.float64) * 2 + 1e4
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    x32 = x64.float().contiguous(memory_format=fmt)
    cases = [
        ("bn", lambda t, w_, b_: NF.batch_norm(t, None, None, w_, b_, training=True)),
        ("gn", lambda t, w_, b_: NF.group_norm(t, 2, w_, b_)),
        ("in", lambda t, w_, b_: NF.instance_norm(t, weight=w_, bias=b_)),
    ]
    for name, fn in cases:
        for xin in (x32, (x32 - 1e4).contiguous(memory_format=fmt)):
            y = fn(xin, w, b)
            expected = fn(xin.double(), w.double(), b.double())  # float64 kernels, same input
            err = float((y.double() - expected).abs().max())
            assert err < 1e-5, f"{name}: float32 blocks differ from float64 by {err:.2e}"
    if not channels_last:
        xr = (torch.randn(40, 3000, dtype=torch.float64) + 1e4).float()
        wr, br = torch.rand(3000) + 0.5, torch.randn(3000)
        for fn in (lambda t, w_, b_: NF.layer_norm(t, (3000,), w_, b_),
                   lambda t, w_, b_: NF.rms_norm(t, (3000,), w_)):
            err = float((fn(xr, wr, br).double() - fn(xr.double(), wr.double(), br.double())).abs().max())
            assert err < 1e-5, f"rows: float32 blocks differ from float64 by {err:.2e}"


@pytest.mark.parametrize("channels", [1, 3, 16, 32, 48, 64, 128, 192, 256, 640, 1100])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_channel_sums_match_float64(channels, dtype):
    """Per-channel sums of x - shift and its square over channels-last rows, on each path
    of ``_cl_channel_sums`` (register lanes of 128 or 64 channels, 64-element runs of
    several rows with a ragged last run, tile lanes in memory -- of several rows, or of
    one row from C = 513 on, whose lanes are the sums themselves), from an offset base,
    against float64 sums; rows long enough to flush the lanes several times."""
    rng = np.random.default_rng(channels)
    rows, base = 203, 5 * channels
    x = (rng.standard_normal(base + rows * channels + 7) * 3 + 100).astype(dtype)
    shift = (rng.standard_normal(channels) + 100).astype(dtype)
    sd, sq = _kernels._cl_channel_sums(x, base, rows, channels, shift)
    d = x[base:base + rows * channels].reshape(rows, channels).astype(np.float64) - shift
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(sd, d.sum(0), rtol=tol, atol=tol * np.abs(d).sum(0).max())
    np.testing.assert_allclose(sq, (d * d).sum(0), rtol=tol)


@pytest.mark.parametrize("channels", [1, 3, 16, 32, 48, 64, 128, 192, 256, 640, 1100])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_gradient_sums_match_float64(channels, dtype):
    """The backward's per-channel ``sum(dy)`` and ``sum(dy * (x - mc))`` over rows
    [s0, s1) (``_cl_grad_rows``), on each of its paths, against float64 sums; the
    outputs are added to, not overwritten."""
    rng = np.random.default_rng(channels + 1)
    rows, s0, s1 = 240, 11, 226
    x = (rng.standard_normal(rows * channels) * 3 + 100).astype(dtype)
    dy = rng.standard_normal(rows * channels).astype(dtype)
    mc = (rng.standard_normal(channels) + 100).astype(dtype)
    sdy, sdyx = np.ones(channels), np.full(channels, 2.0)
    _kernels._cl_grad_rows(dy, x, mc, 0, s0, s1, channels, sdy, sdyx)
    g = dy.reshape(rows, channels)[s0:s1].astype(np.float64)
    d = x.reshape(rows, channels)[s0:s1].astype(np.float64) - mc
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(sdy, 1 + g.sum(0), rtol=tol, atol=tol * np.abs(g).sum(0).max())
    np.testing.assert_allclose(sdyx, 2 + (g * d).sum(0), rtol=tol, atol=tol * np.abs(g * d).sum(0).max())


# ------------------------------------------------------------------ streaming stores
# Outputs of at least backend.STREAM_FROM bytes are written with non-temporal stores
# (whole 64-byte lines, after a head of ordinary stores up to the first line boundary).

@njit
def _write_loop_copy(dst, o, e, src, stream):
    """``dst[o:e] = src[o:e]`` in the shape of the kernels' write loops (see "The write
    loops" in ``_kernels``): ordinary stores up to the first line boundary (or all of
    them), whole lines streamed (``y = (x - 0) * 1 + 0`` through a line intrinsic), the
    tail; then the store fence. Returns where the first ordinary segment ended."""
    dt = _kernels._ctype(dst)
    per = _kernels._line_elems(dst)
    i, j = o, _kernels._plain_end(dst, o, e, stream)
    head = j
    while True:
        dst[i:j] = src[i:j]
        if j == e:
            break
        while j + per <= e:
            _kernels._affine_line_streamed((src,), dst, j, (dt(0), dt(1), dt(0)), 0, 0)
            j += per
        i, j = j, e
    _kernels._store_fence()
    return head


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int16])  # uint16/int16: bf16/f16 bits
def test_write_loop_streams_exactly_its_run(dtype):
    """``_plain_end`` and the streamed line intrinsics in the write-loop shape write
    dst[o:e] and nothing else, for every start offset within a line and lengths around
    one and several lines; the ordinary head ends on the first line boundary (all of
    the run when not streaming)."""
    itemsize = np.dtype(dtype).itemsize
    per = 64 // itemsize  # elements per line
    for o in range(per + 2):
        for n in (0, 1, per - 1, per, per + 1, 2 * per - 1, 4 * per, 8 * per - 1, 8 * per, 9 * per + 3, 12 * per + 7):
            raw = np.zeros(16 * per + 64, dtype)
            first = (-raw.ctypes.data % 64) // itemsize
            dst = raw[first:first + 15 * per]  # from a line boundary
            src = np.arange(1, dst.size + 1).astype(dtype)
            if dtype in (np.uint16, np.int16):  # 16-bit floats: the bits of 1, 2, ... (normal numbers)
                bits = torch.float16 if dtype is np.int16 else torch.bfloat16
                src = torch.arange(1, dst.size + 1, dtype=bits).view(torch.int16).numpy().view(dtype)
            for stream in (True, False):
                dst[:] = 0
                head = _write_loop_copy(dst, o, o + n, src, stream)
                expected = np.zeros_like(dst)
                expected[o:o + n] = src[o:o + n]
                np.testing.assert_array_equal(dst, expected, err_msg=f"offset {o}, length {n}, stream {stream}")
                to_line = (-o) % per
                assert head == (o + min(n, to_line) if stream else o + n), (o, n, stream, head)


# (norm, shape, layout, groups): planes/rows whose starts fall off the 64-byte lines (odd
# spatial sizes, rows of 1023, channels_last rows of 3 or 24 channels), on every write
# loop: grouped NCHW (BN/IN/GN), LayerNorm/RMSNorm long and short rows, channels_last BN
# (register runs of 16 and 64 channels, 128 in the forward; tiles of 3 and 24) and the per-sample channels_last
# GN/IN kernels.
_STREAMED = [
    ("bn", (4, 16, 37, 41), "contiguous", None),
    ("in", (4, 16, 37, 41), "contiguous", None),
    ("gn", (4, 16, 37, 41), "contiguous", 4),
    ("ln", (211, 1023), "contiguous", None),
    ("rms", (211, 1023), "contiguous", None),
    ("ln", (1690, 128), "contiguous", None),
    ("bn", (4, 16, 37, 41), "channels_last", None),
    ("bn", (4, 3, 120, 121), "channels_last", None),
    ("bn", (4, 24, 37, 41), "channels_last", None),
    ("gn", (4, 16, 37, 41), "channels_last", 4),
    ("in", (4, 24, 37, 41), "channels_last", None),
    ("bn", (2, 64, 9, 11), "channels_last", None),  # rows of 64 and 128 channels: whole lines
    ("gn", (2, 128, 5, 7), "channels_last", 8),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("norm,shape,layout,groups", _STREAMED)
def test_streamed_outputs_match_torch(norm, shape, layout, groups, dtype, monkeypatch):
    """Forward and input gradient written with streaming stores (every output streamed:
    ``STREAM_FROM = 0``, runs of any length; parallel kernels at every size) against torch.nn in float64 on
    the same input, at the dtype's tolerance."""
    monkeypatch.setattr(numba_backend, "STREAM_FROM", 0)
    monkeypatch.setattr(numba_backend, "STREAM_MIN_RUN", 0)
    monkeypatch.setattr(numba_backend, "SERIAL_BELOW", 0)
    gen = torch.Generator().manual_seed(len(shape) + shape[1])
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    if layout == "channels_last":
        x, dy = x.contiguous(memory_format=CL), dy.contiguous(memory_format=CL)
    c = shape[1]
    make = {
        "bn": lambda m: m.BatchNorm2d(c),
        "in": lambda m: m.InstanceNorm2d(c, affine=True),
        "gn": lambda m: m.GroupNorm(groups or 1, c),
        "ln": lambda m: m.LayerNorm(shape[-1]),
        "rms": lambda m: m.RMSNorm(shape[-1]),
    }[norm]
    import normlab as nl

    ours, theirs = make(nl).to(dtype), make(torch.nn).double()
    with torch.no_grad():
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            p.copy_(torch.randn(p.shape, generator=gen))
            q.copy_(p)
    results = []
    for module, xm, dym in ((ours, x, dy), (theirs, x.double(), dy.double())):
        xi = xm.clone().requires_grad_()
        y = module(xi)
        y.backward(dym)
        results.append((y.detach(), xi.grad))
    (y, dx), (ey, edx) = results
    what = f"{norm} {shape} {layout} {dtype}"
    assert_close(y, ey, dtype, scale=2, what=f"{what} y")
    assert_close(dx, edx, dtype, scale=8, what=f"{what} dx")


def _aligned(n: int, dtype) -> np.ndarray:
    """n elements of ``dtype`` from a 64-byte boundary (where streaming stores may write)."""
    raw = np.empty(n * np.dtype(dtype).itemsize + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + n * np.dtype(dtype).itemsize].view(dtype)


@pytest.mark.parametrize("storage", [np.float32, np.float64, np.uint16, np.int16])  # uint16/int16: bf16/f16 bits
@pytest.mark.parametrize("channels", [64, 128, 16])
def test_whole_line_passes_equal_the_tiled_loops(storage, channels):
    """The channels-last output and dx passes with their coefficients in registers write
    whole 64-byte lines through the kernels' own vector IR (``_affine_line``/``_dx_line``,
    streamed or not); the tiled passes compute the same formulas as numba loops. Both
    must give the same bits, for every storage format (16-bit floats decoded and rounded
    back in the lines), streamed or not, from a line boundary or off one (the register
    passes then use ordinary stores; the tiles stream after their head), with NaN and Inf
    among the inputs. (The dx pass has no register path for 128 channels: there it
    checks the tiles, streamed against not.)"""
    compute = np.float64 if storage is np.float64 else np.float32
    rows = 37
    gen = np.random.default_rng(channels)

    def values(n: int) -> np.ndarray:
        v = (gen.standard_normal(n) * 3 + 1).astype(np.float32)
        v[[3, 70]] = np.nan, np.inf
        if storage is np.uint16:
            return torch.from_numpy(v).bfloat16().view(torch.uint16).numpy().astype(np.uint16)
        if storage is np.int16:
            return torch.from_numpy(v).half().view(torch.int16).numpy()
        return v.astype(storage)

    n = (rows + 1) * channels
    x, dy = _aligned(n, storage), _aligned(n, storage)
    x[:], dy[:] = values(n), values(n)
    mc, sc, sh, cb, cc = (gen.standard_normal(channels).astype(compute) for _ in range(5))
    for base in (0, 3):
        want = {}
        for stream in (False, True):
            what = f"base {base}, stream {stream}"
            lines, tiles = _aligned(n, storage), _aligned(n, storage)
            lines[:] = tiles[:] = 0
            # (the register pass asking for the row after each one's input: a hint, same bits)
            _kernels._cl_affine_rows(x, lines, mc, sc, sh, base, 0, rows, channels, stream, channels)
            _kernels._cl_affine_tile_rows(x, tiles, mc, sc, sh, base, 0, rows, channels, stream, 0)
            want.setdefault("affine", tiles.copy())
            for got in (lines, tiles):  # and the same bits streamed or not
                np.testing.assert_array_equal(got.view(np.uint8), want["affine"].view(np.uint8), err_msg=f"y, {what}")
            _kernels._cl_dx_rows(dy, x, mc, sc, cb, cc, base, 0, rows, channels, lines, stream)
            _kernels._cl_dx_tile_rows(dy, x, mc, sc, cb, cc, base, 0, rows, channels, tiles, stream)
            want.setdefault("dx", tiles.copy())
            for got in (lines, tiles):
                np.testing.assert_array_equal(got.view(np.uint8), want["dx"].view(np.uint8), err_msg=f"dx, {what}")
            end = base + rows * channels  # written up to there, not beyond
            assert lines[end - 1] != 0 and not lines[end:].any() and not lines[:base].any(), what


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dims", [(4, 16, 1, 37 * 41, 16), (1, 64, 1, 196, 16), (1, 16, 4, 197, 4),
                                  (1, 8, 1023, 1, 1)])
def test_grouped_kernels_stream_the_same_bits(dims, dtype):
    """The grouped (NCHW) kernels' output and dx passes give the same bits with streaming
    stores (whole lines through the line intrinsics between ordinary heads and tails) as
    without: BatchNorm (A, P, 1, S, P), InstanceNorm, GroupNorm and LayerNorm-row views."""
    a, p, k, s, g = dims
    rng = np.random.default_rng(a * p * k * s)
    x = (rng.standard_normal(a * p * k * s) * 3 + 10).astype(dtype)  # offset: the mean correction
    dy = rng.standard_normal(x.size).astype(dtype)
    w, b = (rng.random(g * k) + 0.5).astype(dtype), rng.standard_normal(g * k).astype(dtype)
    outs, grads = [], []
    for stream in (False, True):
        y, stats = np.empty_like(x), [np.empty(p, dtype) for _ in range(3)]
        _kernels.grouped_forward(x, y, w, b, a, p, k, s, g, 1e-5, True, True, *stats, stream, 0, p)
        outs.append((y, *stats))
    for got, want in zip(outs[1], outs[0], strict=True):
        np.testing.assert_array_equal(got, want)
    for stream in (False, True):
        dx, dwp, dbp = np.empty_like(x), np.zeros((3, g * k)), np.zeros((3, g * k))
        _kernels.grouped_backward(dy, x, w, outs[0][1], outs[0][3], a, p, k, s, g, True, True, True, 3, dx, dwp, dbp,
                                  stream, 0, 3)
        grads.append((dx, dwp, dbp))
    for got, want in zip(grads[1], grads[0], strict=True):
        np.testing.assert_array_equal(got, want)


def test_streamed_grouped_passes_prefetch_the_next_group():
    """The grouped kernels' streamed write loops -- per group, and the tile-phased ones --
    ask for the next group's input (the line intrinsics' ``ahead``: a hint, so the bit
    tests above cannot see it; this checks that it is compiled in). numba shows no IR of
    cached code: the kernels are compiled afresh here."""
    def fresh(kernel):
        return njit(**{**_kernels._OPTS, "cache": False})(kernel.py_func)

    x = np.zeros(4 * 256, np.float32)
    stats = [np.empty(4, np.float32) for _ in range(3)]
    w, b = np.ones(256, np.float32), np.zeros(256, np.float32)
    grouped, short = fresh(_kernels.grouped_forward), fresh(_kernels.short_groups_forward)
    grouped(x, np.empty_like(x), w, b, 1, 4, 256, 1, 1, 1e-5, True, True, *stats, True, 0, 4)
    short(x, np.empty_like(x), w, b, 4, 256, 1, 1, 1e-5, True, *stats, True, 0, 4)
    short_backward = fresh(_kernels.short_rows_backward)
    mean, rstd = np.zeros(4, np.float32), np.ones(4, np.float32)
    short_backward(x, x, w, mean, rstd, 4, 256, True, True, True, 1, np.empty_like(x), np.zeros((1, 256)),
                   np.zeros((1, 256)), True, 0, 1)
    for kernel in (grouped, short, short_backward):
        assert any("@llvm.prefetch" in ir for ir in kernel.inspect_llvm().values()), kernel.py_func.__name__


_SMALL_PLANES = [(16, 512, 4, 4), (9, 300, 7, 7), (8, 96, 13), (6, 64, 3, 5, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", _SMALL_PLANES)
def test_small_planes_match_torch(shape, dtype, monkeypatch):
    """BatchNorm with small planes (NCHW: visited in memory order, ``planes_*`` kernels)
    in training: y, the gradients, the batch statistics and the updated running
    statistics against torch.nn in float64; one channel's first sample is offset so far
    from the rest that its rough mean is summed about again."""
    monkeypatch.setattr(numba_backend, "SERIAL_BELOW", 0)
    gen = torch.Generator().manual_seed(shape[1])
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    x[0, 1] += 1e3  # the rough mean of channel 1 comes from this plane alone
    x = x.to(dtype)
    import normlab as nl

    make = {3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    ours, theirs = getattr(nl, make)(shape[1]).to(dtype), getattr(torch.nn, make)(shape[1]).double()
    with torch.no_grad():
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            q.copy_(p)
    call = numba_backend.call_for(batch_norm_spec(shape), "contiguous", dtype)
    assert numba_backend._memory_order(call.plan, x.element_size())
    xo, xt = x.clone().requires_grad_(), x.double().requires_grad_()
    y, ey = ours(xo), theirs(xt)
    dy = torch.randn(shape, generator=gen).to(dtype)
    y.backward(dy)
    ey.backward(dy.double())
    what = f"{shape} {dtype}"
    assert_close(y, ey, dtype, scale=2, what=f"{what} y")
    assert_close(xo.grad, xt.grad, dtype, scale=8, what=f"{what} dx")
    assert_close(ours.weight.grad, theirs.weight.grad, dtype, 1 + float(theirs.weight.grad.abs().max()),
                 what=f"{what} dweight")
    assert_close(ours.bias.grad, theirs.bias.grad, dtype, 1 + float(theirs.bias.grad.abs().max()), what=f"{what} dbias")
    assert_close(ours.running_mean, theirs.running_mean, dtype, what=f"{what} running_mean")
    assert_close(ours.running_var, theirs.running_var, dtype, what=f"{what} running_var")
    spec = batch_norm_spec(shape)
    _, mean, var, _ = numba_backend.forward_impl(x, ours.weight, ours.bias, spec, 1e-5)
    xd = x.double().transpose(0, 1).reshape(shape[1], -1)
    assert_close(mean.reshape(-1), xd.mean(1), dtype, what=f"{what} mean")
    assert_close(var.reshape(-1), xd.var(1, unbiased=False), dtype, what=f"{what} var")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 96, 5, 6), (3, 8, 24, 24)])  # small planes; large (fixed only)
def test_memory_order_equals_channel_order(shape, dtype, monkeypatch, request):
    """Memory order changes where the kernels read, not what they add: forward (batch
    and fixed statistics) and backward (with and without dx) are bit-identical to the
    channel-order kernels."""
    monkeypatch.setattr(numba_backend, "SERIAL_BELOW", 0)
    request.addfinalizer(numba_backend.call_for.cache_clear)  # (configurations record their order)
    spec = batch_norm_spec(shape)
    c = shape[1]
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=gen) * 3 + 40).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    fixed_mean, fixed_var = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.1
    results = []
    for order in ("memory", "channel"):
        if order == "channel":
            monkeypatch.setattr(numba_backend, "_memory_order", lambda plan, itemsize, fixed=False: False)
            numba_backend.call_for.cache_clear()
        assert numba_backend.call_for(spec, "contiguous", dtype).memory_order == (order == "memory" and shape[2] < 8)
        y, mean, var, rstd = numba_backend.forward_impl(x, w, b, spec, 1e-5)
        y_fixed = numba_backend.forward_impl(x, w, b, spec, 1e-5, fixed_mean, fixed_var)[0]
        grads = numba_backend.backward_impl(dy, x, w, mean, rstd, spec, True)
        fixed_grads = numba_backend.backward_impl(dy, x, w, mean, rstd, spec, False, (False, True, True))
        results.append((y, mean, var, rstd, y_fixed, *grads, *fixed_grads[1:]))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


def test_memory_order_threshold():
    """A per-channel view with more than one element per plane and more than one sample
    is visited in memory order with fixed statistics, and with batch statistics when
    its planes have at most ``SMALL_PLANE_BYTES``."""
    def memory_order(shape, dtype=torch.float32, fixed=False):
        x = torch.empty(shape, dtype=dtype)
        plan = numba_backend.call_for(batch_norm_spec(shape), "contiguous", dtype).plan
        return numba_backend._memory_order(plan, x.element_size(), fixed)

    limit = numba_backend.SMALL_PLANE_BYTES
    assert memory_order((8, 16, limit // 4)) and not memory_order((8, 16, limit // 4 + 1))
    assert memory_order((8, 16, limit // 8), torch.float64) and not memory_order((8, 16, limit // 4), torch.float64)
    assert memory_order((8, 16, 4 * limit), fixed=True)
    assert not memory_order((8, 16)) and not memory_order((8, 16, 1))  # one element per plane: rows of channels
    # one sample: its channels' planes are already in memory order
    assert not memory_order((1, 16, 5, 5)) and not memory_order((1, 16, 5, 5), fixed=True)


def test_channels_last_batch_norm_blocks():
    """Channels-last BatchNorm rows are split into blocks by size alone: one per
    ``_BLOCK_ELEMENTS`` elements, at most ``_MAX_BLOCKS``, and of at least
    ``_MIN_BLOCK_ROWS`` rows unless that would leave fewer than ``_FEW_BLOCKS``."""
    from normlab.backends.cpu import plan as cpu_plan

    def blocks(shape):
        return cpu_plan.make_plan(batch_norm_spec(shape), "channels_last").blocks

    rows_min, few = cpu_plan._MIN_BLOCK_ROWS, cpu_plan._FEW_BLOCKS
    assert blocks((32, 64, 56, 56)) == cpu_plan._MAX_BLOCKS  # many rows: the cap
    wide = (32, 2048, 7, 7)  # 1568 rows of 2048: 49 blocks by size, of 32 rows
    assert 32 * 2048 * 7 * 7 // cpu_plan._BLOCK_ELEMENTS > 1568 // rows_min
    assert blocks(wide) == 1568 // rows_min
    assert blocks((few * rows_min - 1, 4096)) == few  # short of the rows: still `few` blocks
    assert blocks((8, 4096)) == 1  # below one block's elements


@pytest.mark.parametrize("channels", [1100, 96])
def test_channels_last_batch_norm_of_offset_inputs_matches_float64(channels):
    """Channels-last BatchNorm over several row blocks -- rows of more than _TILE
    channels (one-row tiles: the lanes are the sums, the per-channel arrays used as they
    are) and of fewer (tiles of several rows) -- with a large per-channel offset: y,
    mean, var and the three gradients of the float32 kernels against float64 torch."""
    torch.manual_seed(5)
    shape = (8, channels, 6, 6) if channels > 1024 else (8, channels, 16, 16)
    spec = batch_norm_spec(shape)
    assert cpu.backend.call_for(spec, "channels_last", torch.float32).plan.blocks > 1
    offset = torch.linspace(-1e3, 1e3, channels).view(1, -1, 1, 1)
    x = (torch.randn(shape) * 2 + offset).contiguous(memory_format=CL)
    dy = torch.randn(shape).contiguous(memory_format=CL)
    w = torch.rand(channels) + 0.5
    b = torch.randn(channels)
    y, mean, var, rstd = numba_backend.forward_impl(x, w, b, spec, 1e-5)
    dx, dw, db = numba_backend.backward_impl(dy, x, w, mean, rstd, spec, True)
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    b64 = b.double().requires_grad_()
    y64 = F.batch_norm(x64, None, None, w64, b64, training=True, eps=1e-5)
    y64.backward(dy.double())
    close = functools.partial(torch.testing.assert_close, check_dtype=False)
    close(y, y64, rtol=1e-5, atol=1e-4)
    close(mean.reshape(-1), x64.detach().mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    close(var.reshape(-1), x64.detach().var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
    close(dx, x64.grad, rtol=1e-4, atol=1e-4)
    close(dw, w64.grad, rtol=1e-4, atol=1e-3)
    close(db, b64.grad, rtol=1e-5, atol=1e-3)


def test_streamed_outputs_need_size_and_long_runs(monkeypatch):
    """An output is streamed from ``STREAM_FROM`` bytes on, and only where each run the
    write loops write (a plane, a row) has at least ``STREAM_MIN_RUN`` bytes: GroupNorm
    NCHW with 7x7 planes is not, with 14x14 planes it is; LayerNorm by its row length;
    channels-last tiles always."""
    monkeypatch.setattr(numba_backend, "STREAM_FROM", 1 << 20)
    monkeypatch.setattr(numba_backend, "STREAM_MIN_RUN", 512)
    big, small = torch.empty(1 << 18), torch.empty(1 << 17)  # float32: 1 MiB and half of it
    assert numba_backend._streams(big) and not numba_backend._streams(small)
    assert numba_backend._streams(big, 128) and not numba_backend._streams(big, 127)
    half = torch.empty(1 << 19, dtype=torch.bfloat16)  # 1 MiB too: runs counted in bytes
    assert numba_backend._streams(half, 256) and not numba_backend._streams(half, 255)

    def run(shape, spec, layout="contiguous"):
        return numba_backend._run_of(numba_backend.plan_of(torch.empty(shape).contiguous(
            memory_format=CL if layout == "channels_last" else torch.contiguous_format), spec))

    assert run((2, 64, 7, 7), group_norm_spec((2, 64, 7, 7), 8)) == 49
    assert run((2, 64, 14, 14), group_norm_spec((2, 64, 14, 14), 8)) == 196
    assert run((8, 768), layer_norm_spec((8, 768), (768,))) == 768
    assert run((2, 64, 7, 7), group_norm_spec((2, 64, 7, 7), 8), "channels_last") is None


def test_stream_threshold_from_cache_and_environment(monkeypatch):
    """``STREAM_FROM`` defaults to half the level-3 cache; ``NORMLAB_STREAM_MB`` sets it,
    and a value that is not a number is refused with the variable's name."""
    monkeypatch.delenv("NORMLAB_STREAM_MB", raising=False)
    assert numba_backend._stream_from() == last_level_cache_bytes() // 2 > 0
    monkeypatch.setenv("NORMLAB_STREAM_MB", "4.5")
    assert numba_backend._stream_from() == int(4.5 * 2**20)
    monkeypatch.setenv("NORMLAB_STREAM_MB", "lots")
    with pytest.raises(ValueError, match="NORMLAB_STREAM_MB"):
        numba_backend._stream_from()


def test_float32_block_gradients_match_float64():
    """Backward sums through float32 blocks: dx, dweight, dbias of long groups against
    the float64 kernels on the same float32 input (torch.nn's tolerance for float32)."""
    torch.manual_seed(5)
    import normlab as nl

    for layer, shape, fmt in ((nl.GroupNorm(2, 8), (3, 8, 45, 47), torch.contiguous_format),
                              (nl.GroupNorm(2, 8), (3, 8, 45, 47), CL),
                              (nl.BatchNorm2d(8), (3, 8, 45, 47), torch.contiguous_format),
                              (nl.LayerNorm(3000), (40, 3000), torch.contiguous_format)):
        x = (torch.randn(shape) * 3 + 5).contiguous(memory_format=fmt)  # never requires grad
        dy = torch.randn(shape).contiguous(memory_format=fmt)
        with torch.no_grad():
            layer.weight.copy_(torch.rand_like(layer.weight) + 0.5)
            layer.bias.copy_(torch.randn_like(layer.bias))
        grads = []
        for dtype in (torch.float32, torch.float64):
            m = layer.to(dtype)
            m.zero_grad()
            xt = x.to(dtype, copy=True).requires_grad_()
            m(xt).backward(dy.to(dtype))
            grads.append((xt.grad, m.weight.grad, m.bias.grad))
        (dx, dw, db), (dx64, dw64, db64) = grads
        assert_close(dx, dx64, torch.float32, what=f"{type(layer).__name__} dx")
        assert_close(dw, dw64, torch.float32, 1 + float(dw64.abs().max()), what="dweight")
        assert_close(db, db64, torch.float32, 1 + float(db64.abs().max()), what="dbias")


#: (P, K, S, G) grouped views of short groups: LayerNorm rows (S = G = 1), GroupNorm
#: (N*G groups of K channels of S elements), InstanceNorm (K = 1). The kernels take any
#: size (the backend sends them short groups only), so the bits are checked beyond too.
_SHORT_GROUPS = [(1, 1, 1, 1), (37, 3, 1, 1), (700, 40, 1, 1), (33, 256, 1, 1),
                 (24, 4, 7, 8), (150, 1, 49, 50), (6, 2, 128, 3), (64, 4, 40, 8)]


@pytest.mark.parametrize("groups,k,s,g", _SHORT_GROUPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_short_group_kernels_equal_the_grouped_kernels(groups, k, s, g, dtype):
    """The tile-phased kernels for short groups (forward; backward: rows) do the
    per-group kernels' arithmetic in another order of groups: results must be
    bit-identical (forward and backward, centred or not, batch or fixed statistics,
    ragged tiles and chunks), with ordinary and with streaming stores (``stream``: what
    the dispatchers pass for large outputs)."""
    kern = runtime.kernels()
    n = groups * k * s
    rng = np.random.default_rng(n + g)
    x = (rng.standard_normal(n) * 3 + 1e3).astype(dtype)  # offset: exercises the mean correction
    dy = rng.standard_normal(n).astype(dtype)
    w = (rng.random(g * k) + 0.5).astype(dtype)
    b = rng.standard_normal(g * k).astype(dtype)
    for center in (True, False):
        outs = []
        for fwd, stream in itertools.product(("grouped_forward", "short_groups_forward"), (False, True)):
            y = np.empty_like(x)
            stats = [np.empty(groups, dtype) for _ in range(3)]
            if fwd == "grouped_forward":
                kern.grouped_forward(x, y, w, b, 1, groups, k, s, g, 1e-5, center, True, *stats, stream, 0, groups)
            else:
                kern.short_groups_forward(x, y, w, b, groups, k, s, g, 1e-5, center, *stats, stream, 0, groups)
            outs.append((y, *stats))
        for other in outs[1:]:
            for got, want in zip(other, outs[0], strict=True):
                np.testing.assert_array_equal(got, want)
        if s > 1:
            continue  # planes have one backward kernel
        mean, rstd = outs[0][1], outs[0][3]
        for batch in (True, False):
            grads = []
            for bwd, stream in itertools.product((kern.rows_backward, kern.short_rows_backward), (False, True)):
                dx = np.empty_like(x)
                dwp, dbp = np.zeros((3, k)), np.zeros((3, k))
                bwd(dy, x, w, mean, rstd, groups, k, center, batch, True, 3, dx, dwp, dbp, stream, 0, 3)
                grads.append((dx, dwp, dbp))
            for other in grads[1:]:
                for got, want in zip(other, grads[0], strict=True):
                    np.testing.assert_array_equal(got, want)


def test_short_groups_are_the_contiguous_groups_of_at_most_short_group_elements():
    """Which configurations take the tile-phased kernels: grouped view with one slab per
    group (A = 1), rows of at most SHORT_GROUP elements, groups of planes of at most
    SHORT_PLANES -- not BatchNorm (N slabs per channel), nor channels_last, nor GroupNorm
    on (N, C) (rows whose affine is not the whole row's: the phased kernel's rows are
    LayerNorm's)."""
    limit = numba_backend.SHORT_GROUP
    planes = numba_backend.SHORT_PLANES
    cases = {
        "LayerNorm row of SHORT_GROUP": (layer_norm_spec((8, limit), (limit,)), "contiguous", True),
        "LayerNorm row one longer": (layer_norm_spec((8, limit + 1), (limit + 1,)), "contiguous", False),
        "GroupNorm (8, 32, 40), 8 groups": (group_norm_spec((8, 32, 40), 8), "contiguous", True),
        "GroupNorm (32, 64, 56, 56)": (group_norm_spec((32, 64, 56, 56), 32), "contiguous", False),
        "InstanceNorm 7x7 planes": (instance_norm_spec((64, 2048, 7, 7)), "contiguous", True),
        "InstanceNorm planes of SHORT_PLANES": (instance_norm_spec((4, 8, planes)), "contiguous", True),
        "InstanceNorm planes one longer": (instance_norm_spec((4, 8, planes + 1)), "contiguous", False),
        "BatchNorm (8, 32, 40)": (batch_norm_spec((8, 32, 40)), "contiguous", False),
        "GroupNorm channels_last": (group_norm_spec((2, 8, 3, 3), 4), "channels_last", False),
        "GroupNorm on (N, C)": (group_norm_spec((30, 15), 3), "contiguous", False),
        "GroupNorm on (N, C), one group": (group_norm_spec((30, 15), 1), "contiguous", True),
    }
    for what, (spec, layout, short) in cases.items():
        assert numba_backend.call_for(spec, layout, torch.float32).short_groups is short, what


def test_short_rows_backward_are_rows_of_at_most_short_row_backward_elements_that_fit_in_the_cache():
    """The tile-phased backward takes LayerNorm/RMSNorm rows of at most
    SHORT_ROW_BACKWARD elements while x, dy and dx fit in the last-level cache."""
    limit = numba_backend.SHORT_ROW_BACKWARD
    in_cache = max(2, last_level_cache_bytes() // (3 * 4 * limit))  # rows of float32 that fit
    cases = {
        "rows of SHORT_ROW_BACKWARD": ((8, limit), True),
        "rows one longer": ((8, limit + 1), False),
        "as many rows as fit in the cache": ((in_cache, limit), True),
        "one row more": ((in_cache + 1, limit), False),
    }
    for what, (shape, short) in cases.items():
        spec = layer_norm_spec(shape, shape[-1:])
        assert numba_backend.call_for(spec, "contiguous", torch.float32).short_rows_backward is short, what
    gn = group_norm_spec((8, 32, 40), 8)  # planes: the per-group backward
    assert not numba_backend.call_for(gn, "contiguous", torch.float32).short_rows_backward


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_kernels_results_do_not_depend_on_the_arrays_addresses(dtype):
    """The same rows at other addresses give the same bits. A vectorized loop that also
    stores (the backward's dweight/dbias partials) may get a run-time overlap check
    from LLVM, whose scalar fallback sums in another order: a draft of the short-row
    backward that indexed the row from its offset instead of slicing it gave other dx
    bits (the rows of its first chunk: their dx coefficients' row sums) for some
    layouts of the heap: this test failed on it in one fresh process of three."""
    kern = runtime.kernels()
    rows, k = 33, 256
    rng = np.random.default_rng(5)
    x0 = (rng.standard_normal(rows * k) * 3 + 1e3).astype(dtype)
    dy0 = rng.standard_normal(rows * k).astype(dtype)
    w = (rng.random(k) + 0.5).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)

    def shifted(values, shift):  # a copy starting `shift` elements into a fresh buffer
        buffer = np.empty(values.size + 16, dtype)
        view = buffer[shift:shift + values.size]
        view[:] = values
        return view

    stats = [np.empty(rows, dtype) for _ in range(3)]
    kern.grouped_forward(x0, np.empty_like(x0), w, b, 1, rows, k, 1, 1, 1e-5, True, True, *stats, False, 0, rows)
    mean, rstd = stats[0], stats[2]
    results = {}
    for run in range(32):
        shift = run % 8
        x, dy = shifted(x0, shift), shifted(dy0, shift)
        for fwd in ("grouped_forward", "short_groups_forward"):
            y = shifted(np.zeros_like(x0), shift)
            got = [np.empty(rows, dtype) for _ in range(3)]
            if fwd == "grouped_forward":
                kern.grouped_forward(x, y, w, b, 1, rows, k, 1, 1, 1e-5, True, True, *got, False, 0, rows)
            else:
                kern.short_groups_forward(x, y, w, b, rows, k, 1, 1, 1e-5, True, *got, False, 0, rows)
            results.setdefault(fwd, []).append((y.copy(), *got))
        for bwd in ("rows_backward", "short_rows_backward"):
            dx = shifted(np.zeros_like(x0), shift)
            dwp, dbp = np.zeros((3, k)), np.zeros((3, k))
            getattr(kern, bwd)(dy, x, w, mean, rstd, rows, k, True, True, True, 3, dx, dwp, dbp, False, 0, 3)
            results.setdefault(bwd, []).append((dx.copy(), dwp, dbp))
    for name, runs in results.items():
        for run, outputs in enumerate(runs[1:], 1):
            for got, want in zip(outputs, runs[0], strict=True):
                np.testing.assert_array_equal(got, want, err_msg=f"{name}, run {run}")


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-identical, with NaN (whatever its payload) equal to NaN."""
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family,channels_last", [
    *((f, False) for f in ("ln_short", "ln_long", "rms", "gn", "bn", "in", "bn_eval")),
    *((f, True) for f in ("gn", "bn", "in", "bn_eval")),  # rows have no channels_last layout
])
def test_16_bit_floats_decoded_in_kernel_equal_upcasting(family, channels_last, dtype):
    """bfloat16/float16 are decoded and rounded inside the kernels, with the float32
    kernels' arithmetic: the result must be bit-identical to computing on the float32
    upcast and rounding once (torch's round to nearest even)."""
    torch.manual_seed(11)
    shapes = {"ln_short": ((37, 40), layer_norm_spec, (40,)), "ln_long": ((9, 1000), layer_norm_spec, (1000,)),
              "rms": ((37, 40), rms_norm_spec, (40,)), "gn": ((4, 12, 7, 5), group_norm_spec, 3),
              "bn": ((4, 12, 7, 5), batch_norm_spec, None), "in": ((4, 12, 7, 5), instance_norm_spec, None),
              "bn_eval": ((4, 12, 7, 5), batch_norm_spec, None)}
    shape, make, arg = shapes[family]
    spec = make(shape) if arg is None else make(shape, arg)
    fmt = CL if channels_last else torch.contiguous_format
    x = (torch.randn(shape) * 3 + 20).to(dtype)  # an offset, and a NaN in one group
    x.view(-1)[3] = float("nan")
    x = x.contiguous(memory_format=fmt)
    dy = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    w = torch.rand(spec.param_shape) + 0.5
    b = torch.randn(spec.param_shape) if family != "rms" else None
    fixed = {}
    if family == "bn_eval":
        fixed = {"fixed_mean": torch.randn(1, 12, 1, 1), "fixed_var": torch.rand(1, 12, 1, 1) + 0.5}
    assert x.dtype in numba_backend._BITS  # the in-kernel 16-bit path, not an upcast
    y, mean, _, rstd = numba_backend.forward_impl(x, w, b, spec, 1e-5, **fixed)
    y32, mean32, _, rstd32 = numba_backend.forward_impl(x.float().contiguous(memory_format=fmt), w, b, spec,
                                                           1e-5, **fixed)
    assert y.dtype == dtype
    _same_bits(y, y32.to(dtype))
    _same_bits(rstd, rstd32)
    batch = not fixed
    grads = numba_backend.backward_impl(dy, x, w, mean, rstd, spec, batch)
    grads32 = numba_backend.backward_impl(dy.float().contiguous(memory_format=fmt),
                                          x.float().contiguous(memory_format=fmt), w, mean32, rstd32, spec, batch)
    assert grads[0].dtype == dtype
    _same_bits(grads[0], grads32[0].to(dtype))
    for got, want in zip(grads[1:], grads32[1:], strict=True):
        _same_bits(got, want)


def _elementwise(convert):
    """A compiled loop ``out[i] = convert(values[i])`` over an array, for one of the
    kernels' 16-bit conversion intrinsics (they exist only inside numba code), with the
    kernels' fast-math flags (the bfloat16 NaN test relies on them leaving out nnan)."""
    from numba import njit

    @njit(fastmath=runtime.kernels()._FM)
    def convert_all(values, out):
        for i in range(values.size):
            out[i] = convert(values[i])

    return convert_all


def test_float16_conversions_match_torch_bit_for_bit():
    """The kernels' float16 decode on all 65536 bit patterns, and their round-to-nearest-
    even encode on every float16 value, every midpoint between neighbours (the ties),
    subnormals, overflow and random floats, against torch's conversions."""
    kern = runtime.kernels()
    decode_all, encode_all = _elementwise(kern._half_to_f32), _elementwise(kern._f32_to_half)

    bits = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    got = np.empty(bits.size, np.float32)
    decode_all(bits, got)
    want = torch.from_numpy(bits.copy()).view(torch.float16).float().numpy()
    nan = np.isnan(want)
    assert np.isnan(got[nan]).all()
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.array_equal(np.signbit(got[~nan]), np.signbit(want[~nan]))

    finite = np.sort(want[~nan & np.isfinite(want)]).astype(np.float64)
    rng = np.random.default_rng(0)
    values = np.concatenate([
        want[~nan], ((finite[1:] + finite[:-1]) / 2).astype(np.float32),
        (rng.standard_normal(200_000) * 100).astype(np.float32),
        (rng.standard_normal(200_000) * 1e-6).astype(np.float32),
        np.array([65504, 65519.99, 65520, 1e10, -1e10, np.inf, -np.inf, 2.98e-8, 2.99e-8, -0.0], np.float32),
    ])
    out = np.empty(values.size, np.int16)
    encode_all(values, out)
    np.testing.assert_array_equal(out, torch.from_numpy(values).half().view(torch.int16).numpy())
    nan_out = np.empty(2, np.int16)
    encode_all(np.array([np.nan, -np.nan], np.float32), nan_out)
    assert torch.from_numpy(nan_out).view(torch.float16).isnan().all()


def test_bfloat16_conversions_match_torch_bit_for_bit():
    """The kernels' bfloat16 decode on all 65536 bit patterns, and their round-to-nearest-
    even encode on float32s of every bfloat16 top half with the low halves that decide the
    rounding (0, just below / at / just above the tie, the largest, random): every tie,
    the carry into the exponent, overflow to Inf, and NaNs whose rounding add would carry
    them to Inf. Against torch's conversions."""
    kern = runtime.kernels()
    decode_all, encode_all = _elementwise(kern._bf16_to_f32), _elementwise(kern._f32_to_bf16)

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = np.empty(bits.size, np.float32)
    decode_all(bits, got)
    want = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # NaN payloads too

    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF,
                    *np.random.default_rng(0).integers(0, 1 << 16, 4)], np.uint32)
    patterns = ((np.arange(1 << 16, dtype=np.uint32)[:, None] << np.uint32(16)) | low).reshape(-1)
    values = patterns.view(np.float32)
    out = np.empty(values.size, np.uint16)
    encode_all(values, out)
    ref = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(values)
    np.testing.assert_array_equal(out[~nan], ref[~nan])
    decoded = np.empty(out.size, np.float32)
    decode_all(out, decoded)
    assert np.isnan(decoded[nan]).all()  # NaN stays NaN (its payload may differ from torch's)


def test_nan_propagates_only_to_its_group():
    x = torch.randn(2, 4, 3, 3)
    x[0, 1, 0, 0] = float("nan")
    y = NF.group_norm(x, 2)
    assert torch.isnan(y[0, :2]).all() and not torch.isnan(y[0, 2:]).any()
    assert not torch.isnan(y[1]).any()


# ------------------------------------------------------------------- routing

def test_accepts_declines_what_it_does_not_cover(monkeypatch):
    monkeypatch.delenv("NORMLAB_BACKEND")
    big = torch.randn(64, 64, 64)
    assert cpu.accepts(big, batch_norm_spec(big.shape))
    small = torch.randn(8, 32, 40)
    assert cpu.accepts(small, batch_norm_spec(small.shape)), "small inputs use the serial kernels"
    assert numba_backend._call_of(small, batch_norm_spec(small.shape)).serial
    assert not numba_backend._call_of(big, batch_norm_spec(big.shape)).serial
    assert not cpu.accepts(torch.randn(8, 3, requires_grad=True).as_subclass(_Sub), layer_norm_spec((8, 3), (3,)))
    assert not cpu.accepts(torch.empty(0, 3), layer_norm_spec((0, 3), (3,)))
    cl = torch.randn(8, 32, 16, 16).contiguous(memory_format=CL)
    assert cpu.accepts(cl, group_norm_spec(cl.shape, 4))
    assert not cpu.accepts(cl, layer_norm_spec(cl.shape, (16,))), "LN on channels_last"
    strided = torch.randn(64, 64, 32)[:, :, ::2]
    assert not cpu.accepts(strided, batch_norm_spec(strided.shape))
    assert not cpu.accepts(big.to(torch.int32), batch_norm_spec(big.shape))
    meta = torch.empty(64, 64, 16, device="meta")
    assert not cpu.accepts(meta, batch_norm_spec(meta.shape))
    monkeypatch.setenv("NORMLAB_BACKEND", "reference")
    assert select_backend(big, batch_norm_spec(big.shape)) is reference_backend


class _Sub(torch.Tensor):
    pass


def test_functorch_tensors_are_declined():
    """Inside torch.func transforms a tensor has no NumPy view: leave it to the reference."""
    seen = []

    def probe(t):
        seen.append(cpu.accepts(t, layer_norm_spec(t.shape, (6,))))
        return t * 2

    torch.vmap(probe)(torch.randn(3, 4, 6))
    assert seen == [False]


def test_instance_norm_spec_plans():
    # instance norm of (N, C, L) uses the grouped view; (N, C) batch norm the channels-last one
    x = torch.randn(3, 5, 4)
    assert numba_backend.plan_of(x, instance_norm_spec(x.shape)).kind == "grouped"
    x2 = torch.randn(9, 5)
    assert numba_backend.plan_of(x2, batch_norm_spec(x2.shape)).kind == "cl"
    assert numba_backend.plan_of(x2, rms_norm_spec(x2.shape, (5,))).kind == "grouped"


# ------------------------------------------------------------------- runtime

def test_importing_numba_keeps_torch_threads():
    before = torch.get_num_threads()
    runtime.kernels()
    assert torch.get_num_threads() == before, "importing numba changed torch's thread count"


def _record_chunks(p):
    """Test body: for each chunk it claims, ``ends[lo] = hi`` and ``runs[lo] += 1``
    (arguments 0 and 1, float64)."""
    job = _kernels._job_of(p)
    ends = _kernels._f64(job, 0)
    runs = _kernels._f64(job, 1)
    lo, hi = _kernels._claim(p, job)
    while lo < hi:
        ends[lo] = hi
        runs[lo] += 1
        lo, hi = _kernels._claim(p, job)


@pytest.fixture(scope="module")
def recording_body():
    """The address of :func:`_record_chunks` compiled as a team body."""
    from numba import cfunc, types

    return cfunc(types.void(types.CPointer(types.float64)))(_record_chunks)


def _launch_recorded(body, items, threads, from_kernel=False):
    """Launch the recording body over ``items`` -- from Python (``team.job`` and
    ``team.launch``) or as a by-address kernel does (``_kernels._run_team``); the chunks
    it ran, as (lo, hi)."""
    ends = np.zeros(items)
    runs = np.zeros(items)
    if from_kernel:
        at_team = team.team_at(body.address, items, threads)
        assert at_team[2:] == (min(threads, team.chunk_count(items, threads)), team.chunk_count(items, threads))
        runtime.kernels()._run_team(at_team, items, (ends, runs))
    else:
        work, width = team.job(items, threads, (ends, runs))
        assert width == min(threads, team.chunk_count(items, threads))
        team.launch(body.address, work, width)
    chunks = []
    lo = 0
    while lo < items:
        assert runs[lo] == 1, f"chunk at {lo} ran {runs[lo]} times"
        chunks.append((lo, int(ends[lo])))
        lo = int(ends[lo])
    assert runs.sum() == len(chunks), "a chunk started inside another"
    return chunks


@pytest.mark.parametrize("start", ["openmp", "python-pool", "from-kernel"])
@pytest.mark.parametrize("items,threads", [(1, 2), (7, 2), (100, 2), (100, 3), (5, 1)])
def test_team_covers_every_item_once(monkeypatch, recording_body, start, items, threads):
    if start == "python-pool":
        monkeypatch.setattr(team, "_forked", True)  # what a forked child uses
    elif not team.uses_openmp():
        pytest.skip("torch here does not run on an OpenMP runtime")
    chunks = _launch_recorded(recording_body, items, threads, from_kernel=start == "from-kernel")
    assert chunks[0][0] == 0 and chunks[-1][1] == items
    assert len(chunks) == team.chunk_count(items, threads)


def test_team_job_encodes_arguments():
    """Arrays and tensors as (address, size), ints and bools as themselves, floats as
    their float64 bits; non-contiguous arrays are refused."""
    a = np.zeros(5)
    t = torch.zeros(2, 3)
    work, width = team.job(10, 2, (a, t, 7, True, 0.5, np.float64(-2.5), np.int32(9)))
    assert width == 2
    assert list(work[:3]) == [0, 10, team.chunk_count(10, 2)]
    assert list(work[3:7]) == [a.ctypes.data, 5, t.data_ptr(), 6]
    assert list(work[7:11:2]) == [7, 1]
    assert work[11:12].view(np.float64)[0] == 0.5
    assert work[13:14].view(np.float64)[0] == -2.5  # a NumPy float is a float
    assert work[15] == 9
    with pytest.raises(ValueError, match="C-contiguous"):
        team.job(4, 2, (np.zeros((4, 4))[:, 0],))
    # addresses of views, of read-only arrays and of empty ones (no buffer to view)
    grid = np.zeros((3, 4, 5), np.float32)
    frozen = np.arange(6.0)
    frozen.setflags(write=False)
    arrays = (grid[1], grid[2, 3], grid[1:2], frozen, np.zeros(0))
    work, _ = team.job(4, 2, arrays)
    assert list(work[3::2]) == [v.__array_interface__["data"][0] for v in arrays]


def test_kernel_built_job_matches_team_job():
    """The by-address kernels build the job ``team.job`` builds for the same arguments
    (arrays they allocate as themselves, callers' buffers as (address, size) pairs)."""
    a = np.zeros(5)
    t = torch.zeros(2, 3)
    args = (a, t, 7, True, False, 0.5, -2.5, 1e-5)
    want, _ = team.job(10, 2, args)
    got = runtime.kernels()._job(10, team.chunk_count(10, 2),
                                 (a, (t.data_ptr(), t.numel()), 7, True, False, 0.5, -2.5, 1e-5))
    assert got.dtype == np.int64 and list(got) == list(want)


def test_team_at_gives_launchs_split_and_needs_openmp_for_threads(monkeypatch):
    """``team.team_at`` splits as ``team.job`` does; more than one thread needs the
    OpenMP runtime (the fallback pool is started from Python)."""
    for items, threads in ((1, 2), (7, 2), (100, 3), (5, 1)):
        chunks = team.chunk_count(items, threads)
        gomp, body, width, got_chunks = team.team_at(1234, items, threads)
        assert (body, width, got_chunks) == (1234, min(threads, chunks), chunks)
        assert (gomp != 0) == (width > 1 and team.uses_openmp())
    monkeypatch.setattr(team, "_forked", True)
    assert team.team_at(1234, 100, 1) == (0, 1234, 1, 1)
    with pytest.raises(RuntimeError, match="no OpenMP runtime"):
        team.team_at(1234, 100, 2)


@pytest.mark.parametrize("case", ["ln", "ln_short", "gn", "in_running", "bn_running", "bn_planes_running",
                                  "bn_cl_running", "gn_cl_fused", "gn_cl_few_samples"])
def test_teams_started_by_kernels_match_launches_from_python(case, monkeypatch):
    """With batch statistics the by-address kernels build their jobs and start their
    teams themselves; without OpenMP (a forked child) the same bodies run through
    ``team.job`` and ``team.launch``. Forward, running statistics and backward (with and
    without dx) come out bit-identical."""
    if not team.uses_openmp():
        pytest.skip("torch here does not run on an OpenMP runtime")
    monkeypatch.setattr(numba_backend, "SERIAL_BELOW", 0)
    torch.manual_seed(17)
    shapes = {"ln": ((300, 700), layer_norm_spec, (700,), False),
              "ln_short": ((500, 40), layer_norm_spec, (40,), False),
              "gn": ((4, 16, 24, 24), group_norm_spec, 4, False),
              "in_running": ((4, 16, 24, 24), instance_norm_spec, None, False),
              "bn_running": ((4, 16, 24, 24), batch_norm_spec, None, False),
              "bn_planes_running": ((9, 256, 7, 9), batch_norm_spec, None, False),  # in memory order
              "bn_cl_running": ((8, 512, 8, 8), batch_norm_spec, None, True),  # 4 row blocks
              "gn_cl_fused": ((9, 16, 12, 12), group_norm_spec, 4, True),  # one block per sample
              "gn_cl_few_samples": ((2, 16, 24, 12), group_norm_spec, 4, True)}  # blocks per sample
    shape, make, arg, cl = shapes[case]
    spec = make(shape) if arg is None else make(shape, arg)
    fmt = CL if cl else torch.contiguous_format
    x = (torch.randn(shape) * 2 + 3).contiguous(memory_format=fmt)
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    w, b = torch.rand(spec.param_shape) + 0.5, torch.randn(spec.param_shape)
    call = numba_backend.call_for(spec, "channels_last" if cl else "contiguous", torch.float32)
    running_mean, running_var = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5
    results = []
    for forked in (False, True):
        monkeypatch.setattr(team, "_forked", forked)
        assert call.at != forked
        running = None
        if case.endswith("running"):
            running = (running_mean.clone(), running_var.clone(), 0.1)
        y, mean, var, rstd = numba_backend.forward_impl(x, w, b, spec, 1e-5, running=running)
        grads = numba_backend.backward_impl(dy, x, w, mean, rstd, spec, True)
        param_grads = numba_backend.backward_impl(dy, x, w, mean, rstd, spec, True, (False, True, True))
        results.append((y, mean, var, rstd, *grads, *param_grads[1:], *(running[:2] if running else ())))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["bn_planes", "bn_one_sample", "bn1d_rows", "bn1d_planes", "bn_cl", "bn3d_cl",
                                  "in_planes", "in_cl", "bn_planes_bf16", "bn_cl_fp16", "bn_planes_f64",
                                  "bn_planes_bf16_stats", "bn_cl_fp16_stats", "bn1d_rows_f64_stats"])
def test_fixed_statistics_by_address_match_launches_from_python(case, monkeypatch):
    """Eval-mode BatchNorm/InstanceNorm (fixed per-channel statistics) runs in one
    by-address kernel call (``_kernels.fixed_forward_at``) that starts its own team;
    without OpenMP (a forked child) the Python-launched kernels compute it. y and rstd
    come out bit-identical, the statistics come back as given (statistics in another
    dtype, converted to the compute dtype on both paths), and both agree with the
    reference backend. The gradients of the frozen layer follow from them."""
    if not team.uses_openmp():
        pytest.skip("torch here does not run on an OpenMP runtime")
    monkeypatch.setattr(numba_backend, "SERIAL_BELOW", 0)
    cases = {"bn_planes": ((9, 40, 7, 9), batch_norm_spec, torch.float32, False),
             "bn_one_sample": ((1, 48, 20, 20), batch_norm_spec, torch.float32, False),  # planes split over threads
             "bn1d_rows": ((300, 24), batch_norm_spec, torch.float32, False),  # (N, C): rows of channels
             "bn1d_planes": ((6, 24, 50), batch_norm_spec, torch.float32, False),
             "bn_cl": ((8, 72, 6, 6), batch_norm_spec, torch.float32, True),
             "bn3d_cl": ((2, 16, 3, 5, 7), batch_norm_spec, torch.float32, True),
             "in_planes": ((3, 20, 9, 11), instance_norm_spec, torch.float32, False),
             "in_cl": ((3, 20, 9, 11), instance_norm_spec, torch.float32, True),
             "bn_planes_bf16": ((5, 24, 9, 9), batch_norm_spec, torch.bfloat16, False),
             "bn_cl_fp16": ((5, 24, 9, 9), batch_norm_spec, torch.float16, True),
             "bn_planes_f64": ((5, 24, 9, 9), batch_norm_spec, torch.float64, False),
             # statistics in another dtype (a bfloat16 model's running statistics), converted
             "bn_planes_bf16_stats": ((5, 24, 9, 9), batch_norm_spec, torch.bfloat16, False, torch.bfloat16),
             "bn_cl_fp16_stats": ((5, 24, 9, 9), batch_norm_spec, torch.float16, True, torch.float16),
             "bn1d_rows_f64_stats": ((300, 24), batch_norm_spec, torch.float32, False, torch.float64)}
    shape, make, dtype, cl, *stats_dtype = cases[case]
    spec = make(shape)
    fmt = (CL if len(shape) == 4 else torch.channels_last_3d) if cl else torch.contiguous_format
    gen = torch.Generator().manual_seed(23)
    x = (torch.randn(shape, generator=gen) * 2 + 3).to(dtype).contiguous(memory_format=fmt)
    c, cdt = shape[1], torch.float64 if dtype == torch.float64 else torch.float32
    w, b = torch.rand(c, generator=gen, dtype=cdt) + 0.5, torch.randn(c, generator=gen, dtype=cdt)
    sdt = stats_dtype[0] if stats_dtype else cdt
    wide = torch.float64 if sdt == torch.float64 else cdt  # float64 statistics: drawn in float64, rounded on the way
    fixed_mean = (torch.randn(c, generator=gen, dtype=wide) + 3).to(sdt).view(spec.affine_shape)
    fixed_var = (torch.rand(c, generator=gen, dtype=wide) * 4 + 0.1).to(sdt).view(spec.affine_shape)
    by_address = []
    real = numba_backend._fixed_forward_at
    monkeypatch.setattr(numba_backend, "_fixed_forward_at", lambda *a: by_address.append(1) or real(*a))
    results = []
    for forked in (False, True):
        monkeypatch.setattr(team, "_forked", forked)
        y, mean, var, rstd = numba_backend.forward_impl(x, w, b, spec, 1e-5, fixed_mean, fixed_var)
        if sdt == cdt:  # returned as given
            assert mean is fixed_mean and var is fixed_var
        else:  # in the compute dtype, on both paths
            assert torch.equal(mean, fixed_mean.to(cdt)) and torch.equal(var, fixed_var.to(cdt))
        assert y.is_contiguous(memory_format=fmt) and y.dtype == dtype and rstd.shape == spec.affine_shape
        results.append((y, rstd))
    assert len(by_address) == 1  # the first call only: without OpenMP, the Python launches
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    y_ref, _, _, rstd_ref = reference_backend.forward(x, w, b, spec, 1e-5, fixed_mean, fixed_var)
    assert_close(results[0][0], y_ref, dtype, what=f"{case} y")
    assert_close(results[0][1], rstd_ref, cdt, what=f"{case} rstd")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fixed_statistics_with_zero_variance_and_eps_zero(layout, monkeypatch):
    """Eval mode allows eps = 0: a channel whose running variance is 0 then divides by
    zero. It comes out non-finite (as torch.nn's does) on both the by-address and the
    Python-launched path, with the same bits, instead of raising; the other channels
    are torch.nn's."""
    monkeypatch.setattr(numba_backend, "SERIAL_BELOW", 0)
    torch.manual_seed(31)
    bn = torch.nn.BatchNorm2d(6, eps=0.0).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.running_var[2] = 0.0
    x = torch.randn(4, 6, 20, 20)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    want = bn(x).detach()
    ours = []
    for forked in (False, True):
        monkeypatch.setattr(team, "_forked", forked and team.uses_openmp())
        with torch.no_grad():
            ours.append(NF.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=0.0))
    torch.testing.assert_close(ours[0], ours[1], rtol=0, atol=0, equal_nan=True)
    keep = [c for c in range(6) if c != 2]
    assert_close(ours[0][:, keep], want[:, keep], torch.float32, what=f"{layout} finite channels")
    assert not torch.isfinite(ours[0][:, 2]).any()


def test_fixed_statistics_of_other_shapes_take_the_general_path(monkeypatch):
    """Fixed statistics the by-address kernel does not read -- per (sample, channel), or
    strided -- go the general way and still give the reference's result. Per-channel
    ones are read shaped (1, C, 1, 1) or (C,) (the module's running statistics, passed
    without a view; see ``NormSpec.channel_view``), on either path. (Another dtype is
    converted and taken: see the test above.)"""
    spec = instance_norm_spec((3, 8, 5, 5))
    gen = torch.Generator().manual_seed(29)
    x = torch.randn(spec.input_shape, generator=gen)
    w, b = torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen)
    call = numba_backend.call_for(spec, "contiguous", torch.float32)
    per_channel = (torch.randn(1, 8, 1, 1, generator=gen), torch.rand(1, 8, 1, 1, generator=gen) + 0.5)
    flat = (per_channel[0].reshape(8), per_channel[1].reshape(8))
    for mean, var in (per_channel, flat):
        taken = numba_backend._fixed_stats_at(call, spec, mean, var)
        assert taken[0] is mean and taken[1] is var
    want = reference_backend.forward(x, w, b, spec, 1e-5, *per_channel)[0]
    assert_close(numba_backend.forward_impl(x, w, b, spec, 1e-5, *flat)[0], want, torch.float32, what="flat")
    flat_strided = (torch.randn(16, generator=gen)[::2], torch.rand(16, generator=gen)[::2] + 0.5)
    declined = {"per instance": (torch.randn(3, 8, 1, 1, generator=gen), torch.rand(3, 8, 1, 1, generator=gen) + 0.5),
                "strided": (torch.randn(1, 16, 1, 1, generator=gen)[:, ::2], per_channel[1]),
                "flat strided": flat_strided}
    for what, (mean, var) in declined.items():
        assert numba_backend._fixed_stats_at(call, spec, mean, var) is None, what
        y = numba_backend.forward_impl(x, w, b, spec, 1e-5, mean, var)[0]
        want = reference_backend.forward(x, w, b, spec, 1e-5, spec.channel_view(mean), spec.channel_view(var))[0]
        assert_close(y, want, torch.float32, what=what)
    assert numba_backend.call_for(group_norm_spec((3, 8, 5, 5), 2), "contiguous", torch.float32).fixed_view is None


def test_team_runs_on_torchs_openmp_runtime():
    """Where torch uses OpenMP (Linux wheels), teams start on that same runtime."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info() or sys.platform != "linux":
        pytest.skip("torch here does not run on an OpenMP runtime")
    assert team.uses_openmp()


@pytest.mark.parametrize("case", ["bn", "bn_small_planes", "bn_cl", "bn_cl_wide", "bn_cl_one_row_tiles",
                                  "gn_cl_few_samples", "gn_cl", "in", "in_small_planes", "ln", "ln_short", "gn",
                                  "gn_short_groups"])
def test_results_are_the_same_on_any_number_of_threads(case):
    """Work splits and dweight/dbias partials depend on the input's size, never on the
    thread count: 1, 2 and 3 threads give the same bits (a DataLoader worker with one
    thread computes what the main process does)."""
    torch.manual_seed(13)
    shapes = {"bn": ((4, 16, 48, 48), batch_norm_spec, None, False),
              "bn_small_planes": ((9, 256, 7, 9), batch_norm_spec, None, False),
              "bn_cl": ((4, 16, 48, 48), batch_norm_spec, None, True),
              "bn_cl_wide": ((8, 512, 8, 8), batch_norm_spec, None, True),  # tile lanes, 4 blocks
              "bn_cl_one_row_tiles": ((8, 1024, 6, 6), batch_norm_spec, None, True),  # 4 blocks
              "gn_cl_few_samples": ((2, 16, 96, 48), group_norm_spec, 4, True),
              "gn_cl": ((9, 16, 32, 32), group_norm_spec, 4, True),
              "in": ((4, 16, 48, 48), instance_norm_spec, None, False),
              "in_small_planes": ((16, 256, 7, 7), instance_norm_spec, None, False),  # short groups
              "ln": ((300, 700), layer_norm_spec, (700,), False),
              "ln_short": ((4000, 40), layer_norm_spec, (40,), False),
              "gn": ((4, 16, 48, 48), group_norm_spec, 4, False),
              "gn_short_groups": ((32, 64, 8, 8), group_norm_spec, 32, False)}
    shape, make, arg, cl = shapes[case]
    spec = make(shape) if arg is None else make(shape, arg)
    fmt = CL if cl else torch.contiguous_format
    x = (torch.randn(shape) * 2 + 3).contiguous(memory_format=fmt)
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    w = torch.rand(spec.param_shape) + 0.5
    b = torch.randn(spec.param_shape)
    assert x.numel() >= numba_backend.SERIAL_BELOW
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y, mean, var, rstd = numba_backend.forward_impl(x, w, b, spec, 1e-5)
            grads = numba_backend.backward_impl(dy, x, w, mean, rstd, spec, True)
            results.append((y, mean, var, rstd, *grads))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            assert torch.equal(got, want)


def test_team_uses_torchs_openmp_not_another_packages():
    """scikit-learn wheels ship their own libgomp; a team on it would be a second pool."""
    pytest.importorskip("sklearn")
    import ctypes

    if not team.uses_openmp():
        pytest.skip("torch here does not run on an OpenMP runtime")

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                    ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

    monkey = pytest.MonkeyPatch()
    monkey.setattr(team, "_searched", False)  # search again, now that sklearn is loaded
    try:
        found = team._openmp()
        info = DlInfo()
        ctypes.CDLL(None).dladdr(ctypes.c_void_p(ctypes.cast(found, ctypes.c_void_p).value), ctypes.byref(info))
    finally:
        monkey.undo()
    assert b"scikit_learn" not in info.fname and b"sklearn" not in info.fname, info.fname


def test_fallback_pool_under_concurrent_calls_of_different_widths(monkeypatch, recording_body):
    monkeypatch.setattr(team, "_forked", True)
    errors = []

    def work(width):
        try:
            for _ in range(20):
                chunks = _launch_recorded(recording_body, 50, width)
                assert chunks[-1][1] == 50 and len(chunks) == team.chunk_count(50, width)
        except BaseException as error:
            errors.append(error)

    workers = [threading.Thread(target=work, args=(w,)) for w in range(2, 9)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_thread_count_follows_torch(layout):
    """Kernels use at most torch.get_num_threads() threads: one when torch has one.
    Contiguous GroupNorm starts its team inside the kernel (``team.team_at``);
    channels_last GroupNorm through ``team.launch``."""
    before = torch.get_num_threads()
    calls = []
    launch, team_at = team.launch, team.team_at

    def launch_spy(body, work, threads):
        calls.append(threads)
        return launch(body, work, threads)

    def team_at_spy(body, items, threads):
        got = team_at(body, items, threads)
        calls.append(got[2])
        return got

    x = torch.randn(*PARALLEL_SHAPE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(team, "launch", launch_spy)
        mp.setattr(team, "team_at", team_at_spy)
        torch.set_num_threads(1)
        try:
            NF.group_norm(x, 2)
        finally:
            torch.set_num_threads(before)
        alone = calls[:]
        NF.group_norm(x, 2)
    launches = 1 if layout == "contiguous" else 2  # (channels_last, 4 samples: statistics, then output)
    assert alone == [1] * launches
    assert calls[launches:] == [before] * launches


def _child_run(queue):
    torch.manual_seed(5)
    x = torch.randn(*PARALLEL_SHAPE)
    y = NF.group_norm(x, 2)
    queue.put(y.numpy().copy())


def test_kernels_run_in_forked_child_after_parent():
    """libgomp's team does not survive fork: the child must fall back to its own threads."""
    torch.manual_seed(5)
    x = torch.randn(*PARALLEL_SHAPE)
    assert x.numel() >= numba_backend.SERIAL_BELOW
    expected = NF.group_norm(x, 2)  # parent runs (and launches) the parallel kernels first
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_run, args=(queue,))
    proc.start()
    got = queue.get(timeout=60)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert_close(torch.from_numpy(got), expected, torch.float32, what="forked child")


def test_dataloader_workers_after_parent():
    torch.manual_seed(6)
    data = torch.randn(4, 3, 16, 64, 64)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return NF.batch_norm(data[i], None, None, training=True)

    expected = torch.stack([NF.batch_norm(d, None, None, training=True) for d in data])
    loader = torch.utils.data.DataLoader(DS(), batch_size=4, num_workers=2,
                                         multiprocessing_context="fork")
    (got,) = list(loader)
    assert_close(got, expected, torch.float32, what="DataLoader workers")


def test_concurrent_calls_from_two_threads():
    torch.manual_seed(7)
    xs = [torch.randn(*PARALLEL_SHAPE) for _ in range(2)]
    expected = [NF.group_norm(x, 4) for x in xs]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def work(i):
        try:
            for _ in range(10):
                results[i].append(NF.group_norm(xs[i], 4))
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        for y in results[i]:
            assert torch.equal(y, expected[i])


def test_enable_compiles_nothing(tmp_path):
    """A fresh interpreter: importing normlab and enabling the backend must not import
    numba (so nothing can compile); the first call does."""
    import subprocess
    import sys

    code = (
        "import sys, normlab\n"
        "from normlab.backends import cpu\n"
        "assert cpu.enable()\n"
        "assert 'numba' not in sys.modules, 'numba imported at enable()'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------ running statistics

@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_mean", [True, False])
def test_fused_running_stats_update_matches_torch_ops(rows, dtype, with_mean):
    """The kernel installed in core.stats gives the torch-op update (to rounding), bumps
    the version counters as an in-place op does, and leaves absent buffers alone."""
    from normlab.core import stats

    gen = torch.Generator().manual_seed(3)
    mean = torch.randn(rows, 6, 1, generator=gen, dtype=dtype)
    var = torch.rand(rows, 6, 1, generator=gen, dtype=dtype) + 0.1
    start_mean = torch.randn(6, generator=gen, dtype=dtype) if with_mean else None
    start_var = torch.rand(6, generator=gen, dtype=dtype) + 0.5

    def updated(kernel):
        rm = start_mean.clone() if with_mean else None
        rv = start_var.clone()
        versions = (rm._version if with_mean else None, rv._version)
        saved = stats._running_stats_kernel
        stats.set_running_stats_kernel(kernel)
        try:
            stats.update_running_stats(rm, rv, mean, var, 40, 0.1)
        finally:
            stats.set_running_stats_kernel(saved)
        return rm, rv, versions

    rm_k, rv_k, (vm, vv) = updated(numba_backend.update_running_stats)
    rm_t, rv_t, _ = updated(None)
    assert rv_k._version > vv
    ulps = dict(rtol=4 * torch.finfo(dtype).eps, atol=4 * torch.finfo(dtype).eps)  # rounding only
    torch.testing.assert_close(rv_k, rv_t, **ulps)
    if with_mean:
        assert rm_k._version > vm
        torch.testing.assert_close(rm_k, rm_t, **ulps)


def test_fused_running_stats_update_declines_what_torch_ops_must_do():
    mean, var = torch.zeros(1, 4, 1), torch.ones(1, 4, 1)
    wide = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    assert not numba_backend.update_running_stats(*wide, mean, var, 8, 0.1)  # not the buffers' compute dtype
    half = torch.zeros(4, dtype=torch.float16), torch.ones(4, dtype=torch.float16)
    assert not numba_backend.update_running_stats(*half, mean.half(), var.half(), 8, 0.1)  # 16-bit statistics
    with torch.inference_mode():
        frozen = torch.zeros(4), torch.ones(4)
    assert not numba_backend.update_running_stats(*frozen, mean, var, 8, 0.1)  # inference tensors
    assert not numba_backend.update_running_stats(None, None, mean, var, 8, 0.1)
    assert torch.equal(frozen[1], torch.ones(4)) and torch.equal(half[1], torch.ones(4, dtype=torch.float16))
    assert torch.equal(wide[1], torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [
    (3, 6),  # rows of channels: cl_forward_at
    (3, 6, 5),  # small, per-channel groups: grouped_forward_at
    (88, 6, 16, 16),  # small planes, in memory order: planes_forward_at (>= 2**17 values: threaded)
    (2, 6, 128, 96),  # large planes: grouped_forward_team_at
], ids=["rows", "small", "small-planes", "large-planes"])
def test_16_bit_running_statistics_match_torch_nn(dtype, momentum, shape, monkeypatch):
    """A 16-bit model's running buffers are updated by a kernel, not by torch ops: in
    the forward kernel itself (fused), or -- where the forward does not take them --
    by the installed running-statistics kernel after it; both give the same bits. Each
    step's update is the float64 one from the batch's statistics (unbiased variance:
    the rows case has 3 values per channel, so a missing correction would show there)
    rounded to the buffers' dtype --
    within half an ulp, plus the float32 statistics' own error -- and the buffers
    follow torch.nn's (the tolerance table's), with momentum and with the cumulative
    average. One input shape for each forward kernel that takes running statistics."""
    from normlab.core import stats

    torch.manual_seed(41)
    layer = "BatchNorm2d" if len(shape) == 4 else "BatchNorm1d"
    fused, theirs = nl_layer(layer, 6, momentum=momentum), getattr(torch.nn, layer)(6, momentum=momentum)
    with torch.no_grad():
        theirs.running_mean.uniform_(-2, 2)
        theirs.running_var.uniform_(0.5, 2)
    fused.load_state_dict(theirs.state_dict())
    after = nl_layer(layer, 6, momentum=momentum)  # its forward leaves them to the installed kernel
    after.load_state_dict(theirs.state_dict())
    fused, after, theirs = fused.to(dtype), after.to(dtype), theirs.to(dtype)
    kernel_calls = []  # what the installed kernel returned: True when it did the update

    def counted(*args):
        kernel_calls.append(numba_backend.update_running_stats(*args))
        return kernel_calls[-1]

    eps = torch.finfo(dtype).eps
    saved = stats._running_stats_kernel
    stats.set_running_stats_kernel(counted)
    fusing = numba_backend._running_at
    try:
        for step in range(4):
            x = (torch.randn(shape) * (step + 1) + step).to(dtype)
            before = (fused.running_mean.double(), fused.running_var.double())
            fused(x)
            assert not kernel_calls, "the forward kernel should have updated them"
            monkeypatch.setattr(numba_backend, "_running_at", lambda *a: None)
            after(x)
            monkeypatch.setattr(numba_backend, "_running_at", fusing)
            assert kernel_calls == [True]
            theirs(x)
            rate = 1.0 / (step + 1) if momentum is None else momentum
            per_channel = x.double().transpose(0, 1).reshape(6, -1)  # (3 values each for (3, 6))
            batch = (per_channel.mean(1), per_channel.var(1, unbiased=True))
            for name, start, stat in zip(("running_mean", "running_var"), before, batch, strict=True):
                exact = (1 - rate) * start + rate * stat
                got = getattr(fused, name)
                assert got.dtype == dtype
                assert torch.equal(got, getattr(after, name)), f"{name} step {step}: fused != installed kernel"
                err = (got.double() - exact).abs()
                assert (err <= (0.5 * eps + 1e-6) * exact.abs()).all(), f"{name} step {step}: {err.max()}"
                # torch.nn's own 16-bit update strays further from the exact one (bfloat16:
                # up to ~10 ulps after four steps), so it is followed with the table's tolerance
                assert_close(got, getattr(theirs, name), dtype, what=f"{name} vs torch.nn, step {step}")
            kernel_calls.clear()
    finally:
        stats.set_running_stats_kernel(saved)
    assert torch.equal(fused.num_batches_tracked, theirs.num_batches_tracked)


def test_running_stats_updated_in_place_keep_autograd_version_checks():
    """Eval-mode BatchNorm saves its running mean for backward; a training step that
    updates it in place through the kernel bumps its version as the torch-op update
    does, so that backward fails loudly instead of using the new values."""
    from normlab import BatchNorm1d

    bn = BatchNorm1d(4).eval()
    x = torch.randn(8, 4, 5, requires_grad=True)
    y = bn(x)
    bn.train()
    bn(torch.randn(8, 4, 5))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_getenv_sees_what_os_environ_sees(monkeypatch):
    from normlab.backends._env import getenv

    monkeypatch.delenv("NORMLAB_TEST_SWITCH", raising=False)
    assert getenv("NORMLAB_TEST_SWITCH") is None
    monkeypatch.setenv("NORMLAB_TEST_SWITCH", "on é")
    assert getenv("NORMLAB_TEST_SWITCH") == "on é" == os.environ.get("NORMLAB_TEST_SWITCH")
    monkeypatch.delenv("NORMLAB_TEST_SWITCH")
    assert getenv("NORMLAB_TEST_SWITCH") is None


@pytest.mark.parametrize("make", [lambda: (nl_layer("LayerNorm", 40), torch.nn.LayerNorm(40)),
                                  lambda: (nl_layer("GroupNorm", 8, 32), torch.nn.GroupNorm(8, 32)),
                                  lambda: (nl_layer("BatchNorm1d", 32), torch.nn.BatchNorm1d(32))])
def test_small_input_gradients_accumulate_over_steps_as_torch(make):
    """The small-input path hands autograd gradients over NumPy arrays (cheaper to make);
    AccumulateGrad keeps the first and adds the next ones into it: three steps give
    torch.nn's accumulated gradients, and the running statistics follow torch.nn's."""
    ours, theirs = make()
    theirs.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 32, 40, generator=gen)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(3):  # the same leaf input each step: x.grad accumulates too
        dy = torch.randn(8, 32, 40, generator=gen)
        ours(x_ours).backward(dy)
        theirs(x_theirs).backward(dy)
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert_close(p_ours.grad, p_theirs.grad, scale=8, what=name)
    assert_close(x_ours.grad, x_theirs.grad, scale=8, what="x")
    for name, buf in theirs.named_buffers():
        mine = dict(ours.named_buffers())[name]
        if buf.is_floating_point():
            assert_close(mine, buf, scale=8, what=name)
        else:
            assert torch.equal(mine, buf), name


SMALL_PATH_LAYERS = {  # name -> (module of normlab or torch.nn -> layer, input dtype)
    "ln_no_bias": (lambda m: m.LayerNorm(40, bias=False), torch.float32),
    "gn_no_affine": (lambda m: m.GroupNorm(8, 32, affine=False), torch.float32),
    "rms": (lambda m: m.RMSNorm(40), torch.float32),
    "bn": (lambda m: m.BatchNorm1d(32), torch.float32),
    "bn_float64": (lambda m: m.BatchNorm1d(32, dtype=torch.float64), torch.float64),
}


@pytest.mark.parametrize("layer,gradient", [
    (layer, gradient) for layer in sorted(SMALL_PATH_LAYERS) for gradient in ("expanded", "x_frozen", "transposed")
    if not (layer == "gn_no_affine" and gradient == "x_frozen")  # nothing would need a gradient
])
def test_small_path_by_address_takes_any_gradient_layout(layer, gradient):
    """The small-input kernels are entered with raw addresses: dy must first be made
    dense in x's order (an expanded dy from ``y.sum()``, a transposed one), dx skipped
    when x needs none, absent weight/bias/mean filled in -- all as torch.nn computes."""
    import normlab

    make, dtype = SMALL_PATH_LAYERS[layer]
    ours, theirs = make(normlab), make(torch.nn)
    theirs.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(8, 32, 40, generator=gen, dtype=dtype) * 3 + 1
    needs_dx = gradient != "x_frozen"
    xs = [x.clone().requires_grad_(needs_dx) for _ in range(2)]
    ys = [ours(xs[0]), theirs(xs[1])]
    if gradient == "expanded":
        for y in ys:
            y.sum().backward()  # dy reaches the Function as ones expanded with stride 0
    else:
        dy = torch.randn(40, 32, 8, generator=gen, dtype=dtype).permute(2, 1, 0)  # dy not contiguous
        for y in ys:
            y.backward(dy)
    assert_close(ys[0], ys[1], scale=8, what="y")
    if needs_dx:
        assert_close(xs[0].grad, xs[1].grad, scale=8, what="dx")
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert_close(p_ours.grad, p_theirs.grad, scale=8, what=name)
    for (name, mine), buf in zip(ours.named_buffers(), theirs.buffers(), strict=True):
        if buf.is_floating_point():
            assert_close(mine, buf, scale=8, what=name)


def test_small_path_refuses_a_weight_of_the_wrong_size():
    """The small-input kernels read ``channels`` values from the weight's address: a
    backend caller that skipped the functional checks gets an error, not a read past
    the tensor."""
    x = torch.randn(4, 6, 5)
    spec = batch_norm_spec(x.shape)
    with pytest.raises(ValueError, match="expected a weight/bias of 6 values, got shape \\(4,\\)"):
        numba_backend.forward_impl(x, torch.ones(4), None, spec, 1e-5)


def test_fused_running_stats_update_declines_strided_buffers():
    """Running statistics that are strided views (not dense) are left to the torch ops,
    which update them correctly in place."""
    from normlab.core import stats

    storage = torch.ones(8)
    running_var = storage[::2]  # 4 channels, stride 2
    mean, var = torch.zeros(1, 4, 1), torch.full((1, 4, 1), 3.0)
    assert not numba_backend.update_running_stats(None, running_var, mean, var, 5, 0.5)
    stats.update_running_stats(None, running_var, mean, var, 5, 0.5)
    expected = 0.5 * 1.0 + 0.5 * 3.0 * 5 / 4
    assert torch.allclose(running_var, torch.full((4,), expected))
    assert torch.equal(storage[1::2], torch.ones(4))  # the other elements are untouched


FUSED_RUNNING_CASES = [
    # (torch.nn layer, normlab layer, input shape, dtype)
    ("BatchNorm1d", (32,), (8, 32, 40), torch.float32),
    ("BatchNorm1d", (32,), (8, 32, 40), torch.float64),
    ("BatchNorm2d", (6,), (4, 6, 5, 5), torch.float32),
    ("InstanceNorm2d", (4,), (3, 4, 6, 6), torch.float32),
]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("case", FUSED_RUNNING_CASES, ids=lambda c: f"{c[0]}-{c[3]}".replace("torch.", ""))
def test_small_forward_kernel_updates_running_statistics(case, grad, momentum, monkeypatch):
    """Small BatchNorm/InstanceNorm training steps update the running statistics inside
    the forward kernel call: three steps (with and without autograd, torch.nn's
    cumulative average for momentum=None) match torch.nn, each buffer's version counter
    moves once per step, and the kernel did the update (not the torch ops after it)."""
    name, args, shape, dtype = case
    kwargs = {"momentum": momentum}
    if name.startswith("Instance"):
        kwargs["track_running_stats"] = True
    ours, theirs = nl_layer(name, *args, **kwargs).to(dtype), getattr(torch.nn, name)(*args, **kwargs).to(dtype)
    fused = []
    running_at = numba_backend._running_at
    monkeypatch.setattr(numba_backend, "_running_at", lambda r, c: fused.append(running_at(r, c)) or fused[-1])
    gen = torch.Generator().manual_seed(13)
    for step in range(3):
        x = (torch.randn(shape, generator=gen) * 2 + 1).to(dtype).requires_grad_(grad)
        versions = ours.running_mean._version, ours.running_var._version
        ours(x), theirs(x)
        assert (ours.running_mean._version, ours.running_var._version) == (versions[0] + 1, versions[1] + 1)
        for buf in ("running_mean", "running_var"):
            assert_close(getattr(ours, buf), getattr(theirs, buf), dtype, what=f"{buf} step {step}")
    assert len(fused) == 3 and all(fused), "the forward kernel did not update the running statistics"


def test_small_forward_kernel_leaves_other_running_buffers_to_torch_ops():
    """Running statistics the kernel cannot write in place (another dtype than the
    compute dtype, a strided view) are updated after it by the torch ops, correctly."""
    x = torch.randn(8, 4, 10, generator=torch.Generator().manual_seed(14))
    storage = torch.ones(8)
    cases = {"float64 buffers": (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)),
             "strided buffers": (torch.zeros(8)[::2], storage[::2])}
    x64 = x.double().transpose(0, 1).reshape(4, -1)
    for what, (rm, rv) in cases.items():
        # (torch.nn refuses float64 buffers for a float32 input: the rule written out)
        rm_ref = 0.7 * rm.double() + 0.3 * x64.mean(1)
        rv_ref = 0.7 * rv.double() + 0.3 * x64.var(1, unbiased=True)
        NF.batch_norm(x, rm, rv, training=True, momentum=0.3)
        assert_close(rm.double(), rm_ref, torch.float32, what=f"{what} mean")
        assert_close(rv.double(), rv_ref, torch.float32, what=f"{what} var")
    assert torch.equal(storage[1::2], torch.ones(4)), "a strided buffer's other elements were written"


def nl_layer(name, *args, **kwargs):
    import normlab

    return getattr(normlab, name)(*args, **kwargs)


@pytest.mark.parametrize("case", ["gn", "bn", "gn_cl", "bn_cl", "ln_long", "ln_short"])
def test_statistics_exact_when_a_groups_first_elements_are_unrepresentative(case):
    """The kernels center a group on the mean of its first 64 elements; when those lie
    far from the rest (a spike, an offset first row), the deviations are summed again
    about the mean found, so the variance keeps float32's precision (no cancellation).
    gn, bn and ln_long fail without that second sum; a short row (<= 256) needs none --
    its first 64 elements are a quarter of it, which bounds the cancellation to 2 bits --
    and is checked for precision all the same, as are the channels-last cases, whose
    float32 lanes hold so few values that their sums stay exact enough without it (the
    overflow test below needs it)."""
    gen = torch.Generator().manual_seed(11)
    if case == "gn":
        x = torch.randn(2, 8, 32, 32, generator=gen) * 0.01
        x[0, 0, :2] = 1e4  # the first 64 elements of sample 0's first group (2048 elements)
        spec = group_norm_spec(x.shape, 4)
    elif case == "bn":
        x = torch.randn(16, 3, 16, 16, generator=gen) * 0.01
        x[0, :, :4] = -1e4  # the first 64 elements of every channel (4096 elements)
        spec = batch_norm_spec(x.shape)
    elif case == "gn_cl":  # channels-last: a group's shift is the mean of its first 64 values
        x = torch.randn(2, 8, 32, 32, generator=gen) * 0.01
        x[0, :2, 0, :] = 1e4  # the first 32 rows of sample 0's first group (2 channels)
        x = x.contiguous(memory_format=CL)
        spec = group_norm_spec(x.shape, 4)
    elif case == "bn_cl":
        x = torch.randn(16, 3, 16, 16, generator=gen) * 0.01
        x[0, :, :4] = -1e4  # the first 64 rows of the first work item
        x = x.contiguous(memory_format=CL)
        spec = batch_norm_spec(x.shape)
    else:
        k = 256 if case == "ln_short" else 4096
        x = torch.randn(16, k, generator=gen) * 0.01
        x[::3, :64] += 1e3
        spec = layer_norm_spec(x.shape, (k,))
    _, mean, var, _ = numba_backend.forward_impl(x, None, None, spec, 1e-5)
    x64 = x.double().reshape(spec.group_shape)
    var64 = x64.var(spec.reduce_dims, unbiased=False, keepdim=True)
    mean64 = x64.mean(spec.reduce_dims, keepdim=True)
    # float32 sums with nothing cancelling: ~1e-7 (without the second sum: 2e-6 to 4e-6)
    torch.testing.assert_close(var.double(), var64, rtol=5e-7, atol=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["gn_cl_per_sample", "gn_cl_row_blocks", "bn_cl", "gn"])
def test_nan_and_inf_inputs_give_nan_statistics(case):
    """A group holding a NaN or an Inf gets a NaN variance, as torch computes it
    (Inf - Inf), and a mean that is not finite (an Inf group's may come out NaN rather
    than Inf: it is summed again about the mean found): never finite statistics that
    would pass into InstanceNorm's running statistics. Channels-last GroupNorm runs per
    sample from 8 samples on, in row blocks below that."""
    n = 2 if case == "gn_cl_row_blocks" else 8
    x = torch.randn(n, 8, 6, 6, generator=torch.Generator().manual_seed(15))
    x[0, 1, 2, 3] = float("nan")
    x[1, 5, 0, 0] = float("inf")
    if case != "gn":
        x = x.contiguous(memory_format=CL)
    spec = batch_norm_spec(x.shape) if case == "bn_cl" else group_norm_spec(x.shape, 4)
    _, mean, var, _ = numba_backend.forward_impl(x, None, None, spec, 1e-5)
    x64 = x.double().reshape(spec.group_shape)
    want_var = x64.var(spec.reduce_dims, unbiased=False, keepdim=True)
    want_mean = x64.mean(spec.reduce_dims, keepdim=True)
    assert want_var.isnan().any()
    assert torch.equal(var.isnan(), want_var.isnan()), "var: NaN where torch's is NaN, nowhere else"
    assert torch.equal(mean.isfinite(), want_mean.isfinite()), "mean: not finite where torch's is not"
    torch.testing.assert_close(var.double().nan_to_num(), want_var.nan_to_num(), rtol=1e-5, atol=1e-6)
    finite = want_mean.isfinite()
    torch.testing.assert_close(mean.double()[finite], want_mean[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["ln", "gn_cl"])
def test_rough_mean_far_off_does_not_overflow_the_deviation_sums(case):
    """A sample mean far from the rest can make the float32 sum of squared deviations
    overflow; that sum is then taken again about the mean found (no inf variance)."""
    if case == "ln":
        x = torch.zeros(2, 256)
        x[:, 64:] = 2e18
        spec = layer_norm_spec(x.shape, (256,))
    else:  # channels-last, one group of 2 channels: its first 32 rows are the sample
        x = torch.zeros(1, 2, 64, 64)
        x[:, :, 1:] = 2e19  # (2e19)^2 overflows float32
        x = x.contiguous(memory_format=CL)
        spec = group_norm_spec(x.shape, 1)
    _, _, var, _ = numba_backend.forward_impl(x, None, None, spec, 1e-5)
    x64 = x.double().reshape(spec.group_shape)
    expected = x64.var(spec.reduce_dims, unbiased=False, keepdim=True)
    torch.testing.assert_close(var.double(), expected, rtol=1e-6, atol=0)


def test_kernel_mode_switch_reaches_cached_configurations(monkeypatch):
    x = torch.randn(8, 32, 40)
    spec = layer_norm_spec(x.shape, (40,))
    monkeypatch.setattr(numba_backend, "SERIAL_BELOW", 0)
    assert not numba_backend._call_of(x, spec).serial
    monkeypatch.setattr(numba_backend, "SERIAL_BELOW", 1 << 62)
    assert numba_backend._call_of(x, spec).serial


def test_fused_running_stats_update_stays_out_of_the_way(monkeypatch):
    """Batched buffers under vmap, a forced reference backend, and no buffers at all go
    to the torch ops (or do nothing), never through NumPy views."""
    import warnings

    from normlab.core.stats import update_running_stats

    x = torch.randn(16, 8, 6, 6)
    with warnings.catch_warnings():  # torch: "no batching rule for lerp_" (a performance note)
        warnings.simplefilter("ignore", UserWarning)
        out = torch.vmap(lambda rm, rv: NF.batch_norm(x, rm, rv, training=True), in_dims=(0, 0))(
            torch.zeros(3, 8), torch.ones(3, 8))
    torch.testing.assert_close(out[1], F.batch_norm(x, None, None, training=True))
    update_running_stats(None, None, torch.zeros(1, 4, 1), torch.ones(1, 4, 1), 8, 0.1)  # no-op
    monkeypatch.setenv("NORMLAB_BACKEND", "reference")
    rm, rv = torch.zeros(4), torch.ones(4)
    assert not numba_backend.update_running_stats(rm, rv, torch.zeros(1, 4, 1), torch.ones(1, 4, 1), 8, 0.1)


def test_pickled_spec_hashes_like_a_fresh_one_in_another_process():
    """NormSpec caches its hash; the cache must not travel in a pickle (string hashes
    differ between processes)."""
    import pickle
    import subprocess

    spec = layer_norm_spec((4, 8), (8,))
    hash(spec)  # cached from here on
    data = pickle.dumps(spec)
    code = ("import pickle, sys; from normlab.core.spec import layer_norm_spec; "
            "s = pickle.loads(sys.stdin.buffer.read()); print(s in {layer_norm_spec((4, 8), (8,))})")
    result = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, check=True)
    assert result.stdout.strip() == b"True"
