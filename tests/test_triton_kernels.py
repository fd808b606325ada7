"""The Triton backend (normlab.backends.gpu), run on CPU tensors in Triton's interpreter.

``TRITON_INTERPRET=1`` must be set when triton decorates the kernels, so the kernel
modules are imported under it here (and the variable restored afterwards); the
kernels use Triton builtins only, so this works even when triton itself was imported
earlier without it (torch.compile imports triton). The interpreter is ~1000x slower
than a GPU kernel: the shapes are tiny, and :data:`TUNING` is shrunk so that tiny shapes
still take the looped paths (rows longer than a block, several tiles per group) and
split every reduction over several programs (partial buffers, Chan merges).

Ground truth: torch.nn.functional (float32, float64 for the large-offset test) and,
for every path and dtype, the reference backend on the same input. The last test runs
Triton's real compiler (for sm_90, no GPU needed), which the interpreter does not.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, assert_layers_match_torch_nn

pytest.importorskip("triton", reason="triton is not installed (pip install triton==3.9.0): "
                    "the GPU backend's kernels cannot be run in the interpreter")

import normlab as nl  # noqa: E402
from normlab import backends  # noqa: E402
from normlab.backends import gpu, reference  # noqa: E402
from normlab.core.spec import (  # noqa: E402
    batch_norm_spec,
    group_norm_spec,
    instance_norm_spec,
    layer_norm_spec,
    rms_norm_spec,
)

_KERNEL_MODULES = ("_common", "_rows", "_channels", "_groups", "_ops")


def _import_interpreted():
    """Import the kernel modules with TRITON_INTERPRET=1 (read when @triton.jit
    decorates), re-importing them if something imported them before without it; the
    variable is restored afterwards so nothing else in the session sees it."""
    import importlib

    from triton.runtime.interpreter import InterpretedFunction

    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in _KERNEL_MODULES:
            sys.modules.pop(f"normlab.backends.gpu.{name}", None)
        modules = [importlib.import_module(f"normlab.backends.gpu.{name}") for name in _KERNEL_MODULES]
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    assert isinstance(modules[1]._rows_fwd_kernel, InterpretedFunction)
    return modules


_common, _rows, _channels, _groups, _ops = _import_interpreted()
TUNING = _common.TUNING
EPS = 1e-5
CL = torch.channels_last


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 8 row elements / 16-element tiles and 6 programs per reduction; passes
    over per-split partials in steps of 8 partials, 2 columns a program (so their loops
    over splits and channels take several steps)."""
    monkeypatch.setattr(TUNING, "max_row_block", 8)
    monkeypatch.setattr(TUNING, "row_tile", 32)
    monkeypatch.setattr(TUNING, "tile", 16)
    monkeypatch.setattr(TUNING, "channel_tile", 16)
    monkeypatch.setattr(TUNING, "interpreter_programs", 6)
    monkeypatch.setattr(TUNING, "split_tile", 8)
    monkeypatch.setattr(TUNING, "split_columns", 2)


@pytest.fixture
def on_cpu(monkeypatch):
    """Route CPU tensors through the Triton backend (interpreter) for this test only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("NORMLAB_TRITON_ON_CPU", "1")
    monkeypatch.setattr(backends, "_BACKENDS", [(gpu.NAME, gpu.accepts, gpu), *backends._BACKENDS])


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=CL) if layout == "cl" else x


# (id, input shape, spec builder, layout); shapes are odd so blocks are partly masked.
CASES = [
    ("ln-2d", (11, 13), lambda s: layer_norm_spec(s, s[-1:]), "nchw"),
    ("ln-3d-two-dims", (3, 2, 7), lambda s: layer_norm_spec(s, s[-2:]), "nchw"),
    ("rms-2d", (9, 11), lambda s: rms_norm_spec(s, s[-1:]), "nchw"),
    ("rms-3d", (2, 3, 9), lambda s: rms_norm_spec(s, s[-1:]), "nchw"),
    ("ln-short-rows", (5, 7, 5), lambda s: layer_norm_spec(s, s[-1:]), "nchw"),  # 4 rows per tile
    ("bn1d-nc", (7, 5), batch_norm_spec, "nchw"),
    ("bn1d-ncl", (2, 3, 11), batch_norm_spec, "nchw"),
    ("bn2d", (3, 5, 3, 3), batch_norm_spec, "nchw"),
    ("bn2d-cl", (3, 5, 3, 3), batch_norm_spec, "cl"),
    ("in1d", (2, 3, 11), instance_norm_spec, "nchw"),
    ("in2d", (2, 5, 3, 7), instance_norm_spec, "nchw"),
    ("in2d-cl", (2, 5, 3, 7), instance_norm_spec, "cl"),
    ("gn1d", (2, 4, 7), lambda s: group_norm_spec(s, 2), "nchw"),
    ("gn2d", (2, 6, 3, 5), lambda s: group_norm_spec(s, 3), "nchw"),
    ("gn2d-cl", (2, 6, 3, 5), lambda s: group_norm_spec(s, 2), "cl"),
    ("gn2d-one-group", (2, 6, 3, 5), lambda s: group_norm_spec(s, 1), "nchw"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _params(spec, affine: str, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    shape = spec.param_shape
    w = torch.randn(shape, generator=gen, dtype=dtype) if affine in ("wb", "w") else None
    b = torch.randn(shape, generator=gen, dtype=dtype) if affine == "wb" and spec.center else None
    return w, b


def _run_both(x, w, b, spec, needs=(True, True, True), fixed=None):
    """Forward and backward of the Triton kernels and of the reference backend."""
    fixed_mean, fixed_var = fixed if fixed is not None else (None, None)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.dtype)
    out = _ops.forward(x, w, b, spec, EPS, fixed_mean, fixed_var)
    ref = reference.forward(x, w, b, spec, EPS, fixed_mean, fixed_var)
    batch = fixed is None
    grads = _ops.backward(dy, x, w, out[1], out[3], spec, batch, needs)
    ref_grads = reference.backward(dy, x, w, ref[1], ref[3], spec, batch, needs)
    return out, ref, grads, ref_grads


def _compare(x, spec, out, ref, grads, ref_grads):
    (y, mean, var, rstd), (ry, rmean, rvar, rrstd) = out, ref
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    assert_close(y, ry, x.dtype, what="y")
    for name, got, want in (("mean", mean, rmean), ("var", var, rvar), ("rstd", rstd, rrstd)):
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert_close(got, want, torch.float32, what=name)
    dx, dw, db = grads
    rdx, rdw, rdb = ref_grads
    if rdx is None:
        assert dx is None
    else:
        assert dx.dtype == x.dtype and dx.stride() == x.stride(), "dx dtype/memory format"
        assert_close(dx, rdx, x.dtype, scale=2.0, what="dx")
    for name, got, want in (("dweight", dw, rdw), ("dbias", db, rdb)):
        if want is None:
            assert got is None, name
        else:
            # float32 sums of the same float32 products: only the summation order differs.
            assert got.dtype == torch.float32 and got.shape == want.shape, name
            assert_close(got, want, torch.float32, scale=5.0, what=name)


_SUBSET = (0, 2, 4, 8, 10, 14)  # ln, rms, ln short rows, bn channels_last, in, gn channels_last
# float16 takes the same 16-bit load/store paths as bfloat16: a subset suffices.
_GRID = [(*case, dtype) for i, case in enumerate(CASES) for dtype in DTYPES
         if dtype != torch.float16 or i in _SUBSET]


@pytest.mark.parametrize(("case", "shape", "make_spec", "layout", "dtype"), _GRID,
                         ids=[f"{g[0]}-{str(g[-1]).replace('torch.', '')}" for g in _GRID])
def test_kernels_match_reference_backend(case, shape, make_spec, layout, dtype):
    x = _layout(torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2 + 0.5, layout).to(dtype)
    spec = make_spec(shape)
    assert gpu.accepts(x, spec) is False  # CPU tensors only with NORMLAB_TRITON_ON_CPU=1
    w, b = _params(spec, "wb")
    _compare(x, spec, *_run_both(x, w, b, spec))


@pytest.mark.parametrize(("affine", "needs"), [
    ("w", (True, False, False)), ("w", (False, True, False)), ("none", (True, False, False)),
    ("wb", (False, False, True))], ids=["w-dx", "w-dweight", "none-dx", "wb-dbias"])
@pytest.mark.parametrize(("case", "shape", "make_spec", "layout"),
                         [CASES[i] for i in _SUBSET], ids=[CASES[i][0] for i in _SUBSET])
def test_without_affine_and_partial_grads(case, shape, make_spec, layout, affine, needs):
    """No bias / no weight, and single gradients (the kernels skip the others)."""
    x = _layout(torch.randn(shape, generator=torch.Generator().manual_seed(3)), layout)
    spec = make_spec(shape)
    w, b = _params(spec, affine)
    _compare(x, spec, *_run_both(x, w, b, spec, needs=needs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("builder", [layer_norm_spec, rms_norm_spec], ids=["ln", "rms"])
@pytest.mark.parametrize("max_row_block", [8, 64])
def test_rows_in_registers_and_in_chunks(monkeypatch, max_row_block, builder, dtype):
    """Rows held in registers (block 16 >= 13, one read of x, two rows per program
    tile) and rows read in chunks of 8 (Chan-merged statistics, partial dW/dB
    accumulated in place)."""
    monkeypatch.setattr(TUNING, "max_row_block", max_row_block)
    assert _rows._row_block(13) == ((8, False) if max_row_block == 8 else (16, True))
    x = torch.randn(7, 13, generator=torch.Generator().manual_seed(4)).to(dtype)
    spec = builder(x.shape, (13,))
    w, b = _params(spec, "wb")
    _compare(x, spec, *_run_both(x, w, b, spec))
    _compare(x, spec, *_run_both(x, w, b, spec, needs=(False, True, True)))


def test_tiny_shapes_split_every_reduction():
    """The shapes above do exercise the partial buffers, the merges and the loops."""
    # LayerNorm backward, 11 rows of 13 (chunked: 1 row per tile): 6 programs (the fixture's) of 2 rows.
    assert _rows._rows_per_tile(*_rows._row_block(13)) == 1
    assert _rows._row_programs(11, 1, 6) == (6, 2)
    # Rows of 5 (in registers, block 8): 4 rows per tile; 35 rows -> 5 programs of 2 tiles.
    assert _rows._row_block(5) == (8, True) and _rows._rows_per_tile(8, True) == 4
    assert _rows._row_programs(35, 4, 6) == (5, 8)
    # BatchNorm (3, 5, 3, 3) NCHW: 4x4 tiles, 2 channel blocks x 3 splits of 12 rows.
    nchw = torch.empty(3, 5, 3, 3)
    assert _channels._tile(5, nchw.stride(1)) == (4, 4)
    assert _channels._splits(27, 2, 4, 6) == (12, 3)  # 6 programs (a single split takes the fused path)
    plan = _channels._plan(nchw.view(3, 5, 9))
    assert (plan.block_r, plan.block_c, plan.c_blocks, plan.rows_per_split, plan.splits) == (4, 4, 2, 12, 3)
    # channels_last: 8 channels (the contiguous axis) x 2 rows per tile.
    assert _channels._tile(5, nchw.contiguous(memory_format=CL).stride(1)) == (2, 8)
    # GroupNorm (2, 6, 3, 5), G=3 NCHW: tiles of 1 channel x 16; G=2 channels_last: 4 x 4.
    assert _groups._tile(2, 15, 15) == (1, 16)
    assert _groups._tile(3, 15, 1) == (4, 4)
    # InstanceNorm (2, 5, 3, 7): 21 spatial values in two chunks of 16.
    assert _groups._tile(1, 21, 21) == (1, 16)


def test_batch_norm_plans_one_cooperative_launch_when_the_grid_is_resident(monkeypatch):
    """A GPU runs BatchNorm's phases in one launch when every program of the grid can be
    resident at once (at least two splits per channel tile), else one launch per phase."""
    for field in dataclasses.fields(TUNING):  # the default blocks
        monkeypatch.setattr(TUNING, field.name, field.default)
    # (32, 64, 56, 56) float32 on 132 SMs: 528 programs wanted, 264 resident.
    nchw = _channels._cached_plan(32, 64, 3136, False, 4, 528, 264, (4096, 8192))
    # 16 tiles of 4 channels, 264 // 16 = 16 splits wanted: 100352 rows / 16 = 6272,
    # rounded up to whole 1024-row tiles = 7168 rows a split -> 14 splits
    assert (nchw.c_blocks, nchw.splits, nchw.sync) == (16, 14, True)
    assert _common.phase_launches(nchw.sync, nchw.splits == 1, (1, 2, 4)) == ((7, True),)
    cl = _channels._cached_plan(32, 64, 3136, True, 4, 528, 264, (4096, 8192))
    # one tile of 64 channels, 264 splits wanted: ceil(100352 / 264) = 381 -> 384 (64-row tiles) -> 262
    assert (cl.c_blocks, cl.splits, cl.sync) == (1, 262, True)
    assert (cl.merge_c, cl.block_k) == (1, 512)  # one channel a program, its 262 splits in one step
    # 640 channels, 4 a tile: 160 tiles cannot have two resident programs each
    wide = _channels._cached_plan(32, 640, 196, False, 4, 528, 264, (4096, 8192))
    assert (wide.splits, wide.sync) == (3, False)
    assert _common.phase_launches(wide.sync, False, (1, 2, 4)) == ((1, False), (2, False), (4, False))
    # the interpreter (nothing resident together) and one split per tile
    interp = _channels._cached_plan(3, 5, 1000, False, 4, 6, 0, (4096, 8192))
    assert (interp.splits, interp.sync) == (3, False)
    single = _channels._cached_plan(3, 5, 9, False, 4, 1, 0, (4096, 8192))
    assert single.splits == 1 and _common.phase_launches(False, True, (1, 2, 4)) == ((7, False),)


def test_layer_norm_backward_programs_follow_the_rows(monkeypatch):
    """On a GPU the LayerNorm/RMSNorm backward takes up to 4 programs per SM but at least
    32 rows a program (each writes a row of dW/dB partials), and never fewer than one
    program per SM; the interpreter takes its own count."""
    for field in dataclasses.fields(TUNING):  # the default blocks
        monkeypatch.setattr(TUNING, field.name, field.default)
    monkeypatch.setattr(_common, "_multiprocessors", lambda index: 132)
    gpu_device = torch.device("cuda", 0)
    assert _common.partial_programs(gpu_device, 4096) == 132  # (4096, 8192): one program per SM
    assert _common.partial_programs(gpu_device, 16384) == 512  # 32 rows each
    assert _common.partial_programs(gpu_device, 65536) == 528  # 4 per SM
    assert _common.partial_programs(gpu_device, 100) == 132
    assert _common.partial_programs(torch.device("cpu"), 65536) == TUNING.interpreter_programs
    # the plan it feeds: a target of 132 programs gives 128 of 32 rows each (whole row tiles)
    programs, rows, _single, _options = _rows._backward_plan(4096, 8192, 132, (8192, 2048))
    assert (programs, rows) == (128, 32)
    # ... and the backward asks it for its rows
    asked = []
    monkeypatch.setattr(_rows, "partial_programs", lambda device, rows: asked.append(rows) or 2)
    x, w = torch.randn(6, 8), torch.randn(8)
    _y, mean, _var, rstd = _rows.rows_forward(x, w, None, 8, True, EPS)
    _rows.rows_backward(torch.randn(6, 8), x, w, mean, rstd, 8, (True, True, False))
    assert asked == [6]


def test_channels_last_group_norm_plans_one_cooperative_launch(monkeypatch):
    """channels_last GroupNorm's barriers hold a sample's programs (a group may span
    channel tiles): one launch when the whole grid can be resident, two splits a sample
    at least; the merging programs share out the sample's groups."""
    for field in dataclasses.fields(TUNING):
        monkeypatch.setattr(TUNING, field.name, field.default)
    small = _groups._cached_cl_plan(32, 64, 3136, 32, 528, 264, (4096, 8192))
    # 264 // 32 samples = 8 splits wanted: 3136 / 8 = 392 -> 448 (64-row tiles) -> 7 splits
    assert (small.c_blocks, small.splits, small.sync) == (1, 7, True)
    assert small.merge_g == 8 and small.splits * small.merge_g >= 32  # 7 programs x 8 groups
    large = _groups._cached_cl_plan(128, 256, 3136, 32, 528, 264, (4096, 8192))
    assert (large.c_blocks, large.sync) == (4, False)
    interp = _groups._cached_cl_plan(3, 20, 15, 4, 6, 0, (4096, 8192))
    assert not interp.sync


@pytest.mark.parametrize("case", ["bn-nchw", "bn-cl", "gn-cl"])
def test_barrier_code_runs(monkeypatch, case):
    """The cooperative launch's barrier code (atomics, the waiting loop) under the
    interpreter, with one program per barrier so that none waits for one that runs
    after it."""
    monkeypatch.setattr(TUNING, "interpreter_programs", 1)
    layout = "nchw" if case == "bn-nchw" else "cl"
    if case.startswith("bn"):
        real_plan = _channels._plan
        monkeypatch.setattr(_channels, "_plan", lambda x3: real_plan(x3)._replace(sync=True))
        shape, spec_of = (3, 5, 3, 3), batch_norm_spec
    else:
        real_cl_plan = _groups._cl_plan
        monkeypatch.setattr(_groups, "_cl_plan", lambda x3, g: real_cl_plan(x3, g)._replace(sync=True))
        shape, spec_of = (3, 8, 3, 3), lambda s: group_norm_spec(s, 4)
    x = _layout(torch.randn(shape, generator=torch.Generator().manual_seed(14)), layout)
    spec = spec_of(x.shape)
    if case == "gn-cl":
        plan = real_cl_plan(x.view(3, 8, 9), 4)
        assert plan.c_blocks * plan.splits == 1
    w, b = _params(spec, "wb")
    _compare(x, spec, *_run_both(x, w, b, spec))


@pytest.mark.parametrize("batch_statistics", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_backward_with_nothing_asked_writes_nothing(layout, batch_statistics):
    """No dx and no dweight/dbias: the kernels do not run (a FINISH phase alone would
    store into the placeholder passed for dx -- x itself)."""
    x = _layout(torch.randn((3, 8, 3, 3), generator=torch.Generator().manual_seed(16)), layout)
    x3, dy3 = x.view(3, 8, 9), torch.ones_like(x).view(3, 8, 9)
    before = x.clone()
    mean, rstd = torch.zeros(8), torch.ones(8)
    assert _channels.channel_backward(dy3, x3, None, None, mean, rstd, batch_statistics, False) == (None, None)
    if layout == "cl":
        gmean, grstd = torch.zeros(3 * 4), torch.ones(3 * 4)
        assert _groups.group_backward(dy3, x3, None, None, gmean, grstd, 4, False) == (None, None)
    assert torch.equal(x, before)


def test_refused_cooperative_launch_falls_back_to_one_launch_per_phase(monkeypatch):
    """A cooperative launch the driver refuses (fewer programs resident than planned)
    reruns as one launch per phase, and the device is planned without one since."""
    monkeypatch.setattr(_common, "_REFUSED", set())
    calls = []

    def launch(phases, sync):
        calls.append((phases, sync))
        if sync:
            raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")

    _common.run_phases(launch, torch.device("cuda", 1), True, False, (1, 2, 4))
    assert calls == [(7, True), (1, False), (2, False), (4, False)]
    assert _common._REFUSED == {1}
    assert _common.resident_programs(torch.device("cuda", 1)) == 0

    def failing(phases, sync):
        raise RuntimeError("an unrelated CUDA error")

    with pytest.raises(RuntimeError, match="unrelated"):
        _common.run_phases(failing, torch.device("cuda", 0), True, False, (1, 2, 4))


_BN_CASES = [c for c in CASES if c[0].startswith("bn")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("case", "shape", "make_spec", "layout"), _BN_CASES, ids=[c[0] for c in _BN_CASES])
def test_batch_norm_single_launch_path(monkeypatch, case, shape, make_spec, layout, dtype):
    """With one program per channel tile enough (small inputs), forward and backward
    each run as one fused launch instead of partials + merge + elementwise."""
    monkeypatch.setattr(TUNING, "interpreter_programs", 1)
    x = _layout(torch.randn(shape, generator=torch.Generator().manual_seed(13)), layout).to(dtype)
    assert _channels._plan(x.view(shape[0], shape[1], -1)).splits == 1
    spec = make_spec(shape)
    w, b = _params(spec, "wb")
    _compare(x, spec, *_run_both(x, w, b, spec))
    _compare(x, spec, *_run_both(x, w, b, spec, needs=(False, True, True)))  # no dx
    fixed = (torch.randn(shape[1]).view(spec.affine_shape), (torch.rand(shape[1]) + 0.5).view(spec.affine_shape))
    _compare(x, spec, *_run_both(x, w, b, spec, fixed=fixed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize(("shape", "groups"), [((2, 4, 5, 7), 2), ((2, 3, 5, 7), 3)], ids=["gn", "in"])
def test_few_groups_split_the_spatial_range(monkeypatch, shape, groups, layout, dtype):
    """Few (sample, group) pairs for the device: each group's spatial range is split
    over several programs (partials, merge, apply; partial sums, dx)."""
    monkeypatch.setattr(TUNING, "interpreter_programs", 64)
    x = _layout(torch.randn(shape, generator=torch.Generator().manual_seed(14)) * 3 - 1, layout).to(dtype)
    cg = shape[1] // groups
    _, block_s = _groups._tile(cg, 35, x.view(2, shape[1], 35).stride(1))
    assert _groups._splits(2 * groups, 35, block_s, 64)[1] >= 3
    spec = group_norm_spec(shape, groups) if cg > 1 else instance_norm_spec(shape)
    settings = [("wb", (True, True, True), torch.float32), ("none", (True, False, False), torch.float32)]
    if dtype == torch.bfloat16:  # 16-bit weights, read by the group-means kernel
        settings.append(("wb", (True, True, True), torch.bfloat16))
    for affine, needs, param_dtype in settings:
        w, b = _params(spec, affine, param_dtype)
        _compare(x, spec, *_run_both(x, w, b, spec, needs=needs))


# 24 programs: 4 spatial splits of 4 rows (the last one short), merge_g 1, 2 and 4 over
# the three group widths -- the paths 64 programs took, at half the interpreted programs
_TILE_CASES = [(groups, programs, torch.float32) for groups in (4, 10, 20) for programs in (1, 24)]
_TILE_CASES.append((10, 24, torch.bfloat16))


@pytest.mark.parametrize(("groups", "programs", "dtype"), _TILE_CASES,
                         ids=[f"G{g}-{p}prog-{str(d)[6:]}" for g, p, d in _TILE_CASES])
def test_channels_last_channel_tiles(monkeypatch, groups, programs, dtype):
    """channels_last with narrow groups: (rows x channels) tiles of one sample, per-channel
    partials folded into groups -- two channel tiles, one or several spatial splits."""
    monkeypatch.setattr(TUNING, "interpreter_programs", programs)
    shape = (3, 20, 3, 5)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(15)) * 3 - 1).contiguous(memory_format=CL)
    x = x.to(dtype)
    x3 = x.view(3, 20, 15)
    assert _groups._channel_tiles(x3, 20 // groups)
    plan = _groups._cl_plan(x3, groups)
    assert plan.c_blocks == 2 and (plan.splits > 1) == (programs > 1)
    spec = group_norm_spec(shape, groups) if groups < 20 else instance_norm_spec(shape)
    settings = [("wb", (True, True, True), torch.float32)]
    if programs > 1 and dtype == torch.float32:
        settings += [("w", (True, False, False), torch.float32), ("none", (True, False, False), torch.float32)]
    if dtype == torch.bfloat16:  # 16-bit weights, read by the group-means kernel
        settings.append(("wb", (True, True, True), torch.bfloat16))
    for affine, needs, param_dtype in settings:
        w, b = _params(spec, affine, param_dtype)
        _compare(x, spec, *_run_both(x, w, b, spec, needs=needs))


def test_channel_tiles_hold_at_most_65535_samples():
    """The channel-tile kernels put samples on the grid's third axis (CUDA: <= 65535)."""
    cl = torch.empty(65535, 8, 2, 2).contiguous(memory_format=CL)
    assert _groups._channel_tiles(cl.view(65535, 8, 4), 2)
    cl = torch.empty(65536, 8, 2, 2).contiguous(memory_format=CL)
    assert not _groups._channel_tiles(cl.view(65536, 8, 4), 2)


def test_channels_last_wide_groups_walk_one_group_at_a_time(monkeypatch):
    """Groups of >= CL_TILE_BELOW channels keep the per-group kernels (runs of adjacent
    channels are long enough to read whole)."""
    monkeypatch.setattr(_groups, "CL_TILE_BELOW", 2)
    shape = (2, 6, 3, 5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(16)).contiguous(memory_format=CL)
    assert not _groups._channel_tiles(x.view(2, 6, 15), 3)
    spec = group_norm_spec(shape, 2)
    w, b = _params(spec, "wb")
    _compare(x, spec, *_run_both(x, w, b, spec))


@pytest.mark.parametrize("family", ["batch_norm", "instance_norm"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fixed_statistics(family, layout, dtype):
    """Eval with running statistics: y = (x - rm) rsqrt(rv + eps) w + b, dx = dy w rstd."""
    shape = (3, 5, 3, 3)
    x = _layout(torch.randn(shape, generator=torch.Generator().manual_seed(5)), layout).to(dtype)
    spec = (batch_norm_spec if family == "batch_norm" else instance_norm_spec)(shape)
    w, b = _params(spec, "wb")
    gen = torch.Generator().manual_seed(6)
    fixed = (torch.randn(5, generator=gen).view(1, 5, 1, 1),
             (torch.rand(5, generator=gen) + 0.5).view(1, 5, 1, 1))
    _compare(x, spec, *_run_both(x, w, b, spec, fixed=fixed))


def test_uncovered_fixed_statistics_fall_back_to_reference():
    x = torch.randn(4, 6)
    spec = layer_norm_spec(x.shape, (6,))
    fixed = (torch.randn(4, 1), torch.rand(4, 1) + 0.5)  # per-row fixed statistics: not a kernel path
    w, b = _params(spec, "wb")
    out, ref, grads, ref_grads = _run_both(x, w, b, spec, fixed=fixed)
    for got, want in zip([*out, *grads], [*ref, *ref_grads], strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("make_spec", [batch_norm_spec, lambda s: group_norm_spec(s, 3)], ids=["bn", "gn"])
def test_channel_slices_are_read_through_strides(make_spec, layout):
    """x[:, :3] of a larger tensor: not dense, but its spatial dims collapse."""
    x = _layout(torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(11)), layout)[:, 2:8]
    spec = make_spec(x.shape)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL)
    w, b = _params(spec, "wb")
    out, ref, grads, ref_grads = _run_both(x, w, b, spec)
    assert out[0].stride() == ref[0].stride() and grads[0].stride() == ref_grads[0].stride()
    x_dense = x.contiguous()  # _compare wants y's strides equal to its input's
    _compare(x_dense, spec, (out[0].contiguous(), *out[1:]), ref,
             (grads[0].contiguous(), *grads[1:]), ref_grads)


@pytest.mark.parametrize(("make_spec", "torch_fn", "bad"), [
    (batch_norm_spec, lambda t: F.batch_norm(t, None, None, training=True), (0, 1, 1, 1)),
    (lambda s: group_norm_spec(s, 2), lambda t: F.group_norm(t, 2), (1, 3, 0, 2)),
    (lambda s: layer_norm_spec(s, s[-1:]), lambda t: F.layer_norm(t, t.shape[-1:]), (1, 2, 2, 4)),
], ids=["bn", "gn", "ln"])
def test_nan_stays_in_its_group(make_spec, torch_fn, bad):
    """A NaN poisons its own statistic group, as in torch.nn, and nothing else."""
    x = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(12))
    x[bad] = float("nan")
    y = _ops.forward(x, None, None, make_spec(x.shape), EPS)[0]
    expected = torch_fn(x)
    assert torch.equal(y.isnan(), expected.isnan()) and 0 < int(y.isnan().sum()) < y.numel()
    assert_close(y.nan_to_num(0.0), expected.nan_to_num(0.0), what="finite part")


def test_bfloat16_weights():
    x = torch.randn(3, 4, 5, 2).bfloat16()
    spec = group_norm_spec(x.shape, 2)
    w, b = _params(spec, "wb", torch.bfloat16)
    _compare(x, spec, *_run_both(x, w, b, spec))


_OFFSET_CASES = {
    "batch_norm": lambda x: (batch_norm_spec(x.shape), lambda t: F.batch_norm(t, None, None, training=True)),
    "group_norm": lambda x: (group_norm_spec(x.shape, 2), lambda t: F.group_norm(t, 2)),
    "instance_norm": lambda x: (instance_norm_spec(x.shape), lambda t: F.instance_norm(t)),
    "layer_norm": lambda x: (layer_norm_spec(x.shape, x.shape[-1:]), lambda t: F.layer_norm(t, t.shape[-1:])),
}


# LayerNorm takes contiguous rows only, so it has no channels_last case.
@pytest.mark.parametrize(("name", "layout"), [(n, lay) for n in _OFFSET_CASES for lay in ("nchw", "cl")
                                              if (n, lay) != ("layer_norm", "cl")])
def test_large_offset_is_as_accurate(name, layout):
    """x + 1e4 in float32 (SPEC §5): Chan-merged statistics keep the variance; the
    result matches float64 torch.nn up to the float32 rounding of the mean (~1e4 * 2^-24)."""
    x = _layout(torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(7)) + 1e4, layout)
    spec, torch_fn = _OFFSET_CASES[name](x)
    y = _ops.forward(x, None, None, spec, EPS)[0]
    expected = torch_fn(x.double())
    assert (y.double() - expected).abs().max().item() < 2e-3


def test_layer_norm_long_rows_large_offset():
    x = torch.randn(3, 37, generator=torch.Generator().manual_seed(8)) + 1e4
    spec = layer_norm_spec(x.shape, (37,))
    y = _ops.forward(x, None, None, spec, EPS)[0]
    assert (y.double() - F.layer_norm(x.double(), (37,))).abs().max().item() < 2e-3


# ---- through the public API (autograd Function -> select_backend -> Triton) -------------------


def test_accepts_and_declines(on_cpu):
    x = torch.randn(2, 6, 3, 5)
    assert gpu.accepts(x, group_norm_spec(x.shape, 3))
    assert gpu.accepts(x.contiguous(memory_format=CL), batch_norm_spec(x.shape))
    assert not gpu.accepts(x.double(), batch_norm_spec(x.shape))  # float64: reference
    assert not gpu.accepts(x[..., ::2], instance_norm_spec(x[..., ::2].shape))  # odd strides
    assert not gpu.accepts(x.transpose(2, 3), layer_norm_spec((2, 6, 5, 3), (3,)))  # rows not contiguous
    assert not gpu.accepts(x, batch_norm_spec((2, 6, 3, 4)))  # spec of another shape
    custom = dataclasses.replace(layer_norm_spec(x.shape, (5,)), family="my_norm")
    assert not gpu.accepts(x, custom)  # a family the kernels don't know
    assert gpu._extent(torch.empty(0, device="meta").as_strided((2, 3), (2**31, 1))) == 2**31 + 3


def test_declines_slices_reaching_past_32_bit_offsets(on_cpu, monkeypatch):
    """The kernels' offsets are 32-bit: a slice is judged by how far it reaches, not by
    its numel (here with the limit lowered to 64 elements)."""
    monkeypatch.setattr(gpu, "_MAX_NUMEL", 64)
    big = torch.randn(4, 10, 3)
    near, far = big[:2, :2], big[::3, :2]  # 12 elements each, reaching 36 and 96 elements
    assert gpu._extent(near) == 36 and gpu._extent(far) == 96
    assert gpu.accepts(near, batch_norm_spec(near.shape))
    assert not gpu.accepts(far, batch_norm_spec(far.shape))


def test_extent_of_dense_layouts_is_their_numel():
    """``_extent``'s shortcut for dense layouts agrees with the strided formula."""
    def by_strides(t):
        return 1 + sum((size - 1) * abs(step) for size, step in zip(t.shape, t.stride(), strict=True))

    x4, x5 = torch.randn(2, 6, 3, 5), torch.randn(2, 3, 4, 2, 3)
    for t in (x4, x4.contiguous(memory_format=CL), x5, x5.contiguous(memory_format=torch.channels_last_3d),
              torch.randn(7), x4[:, 2:4], x4.transpose(2, 3)):
        assert gpu._extent(t) == by_strides(t), t.shape


@pytest.mark.parametrize("make_spec", [batch_norm_spec, lambda s: group_norm_spec(s, 3)], ids=["bn", "gn"])
def test_gradients_that_need_a_copy(monkeypatch, make_spec):
    """A gradient whose spatial dims don't collapse into one stride, or that reaches past
    the 32-bit offsets (limit lowered to 200 elements here), is copied into x's layout
    first; the result is the same as for a dense gradient."""
    x = torch.randn(2, 6, 3, 5, generator=torch.Generator().manual_seed(16))
    spec = make_spec(x.shape)
    w, _ = _params(spec, "w")
    _, mean, _, rstd = _ops.forward(x, w, None, spec, EPS)
    dy = torch.randn(2, 6, 5, 3, generator=torch.Generator().manual_seed(17)).transpose(2, 3)
    want = _ops.backward(dy.contiguous(), x, w, mean, rstd, spec, True, (True, True, False))
    got = _ops.backward(dy, x, w, mean, rstd, spec, True, (True, True, False))  # odd strides
    for a, b in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(a, b)
    monkeypatch.setattr(_ops, "_MAX_NUMEL", 200)
    seen = []
    for name in ("channel_backward", "group_backward"):  # record the (N, C, S) gradient passed on
        kernel_call = getattr(_ops, name)
        monkeypatch.setattr(_ops, name, lambda dy3, *a, _call=kernel_call: seen.append(dy3) or _call(dy3, *a))
    every_other = torch.zeros(4, 6, 3, 5)
    every_other[::2] = dy
    far = every_other[::2]  # 180 elements (spatial dims collapse) reaching 270
    got = _ops.backward(far, x, w, mean, rstd, spec, True, (True, True, False))
    assert gpu._extent(seen[-1]) == 180  # a dense copy, not the far-reaching view
    for a, b in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(a, b)


def test_cpu_needs_both_variables(monkeypatch):
    x = torch.randn(2, 3)
    spec = layer_norm_spec(x.shape, (3,))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("NORMLAB_TRITON_ON_CPU", "1")
    assert not gpu.accepts(x, spec)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gpu.accepts(x, spec)
    monkeypatch.setenv("NORMLAB_TRITON_ON_CPU", "0")
    assert not gpu.accepts(x, spec)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_modules_match_torch_nn(on_cpu, monkeypatch, layout):
    """Every normlab layer with the Triton backend against its torch.nn twin: output,
    input/parameter gradients and BatchNorm's running statistics (train, then eval)."""
    calls = []
    real_forward = _ops.forward
    monkeypatch.setattr(_ops, "forward", lambda *a: calls.append(a[3].family) or real_forward(*a))
    torch.manual_seed(10)
    assert_layers_match_torch_nn(_layout(torch.randn(3, 6, 3, 5) * 3 + 1, layout), groups=3)
    families = {"batch_norm", "instance_norm", "group_norm"}
    assert set(calls) == (families | {"layer_norm", "rms_norm"} if layout == "nchw" else families)


def test_functional_half_precision_matches_torch_nn(on_cpu):
    """bfloat16 through normlab.functional vs torch.nn.functional computing in float32."""
    x = torch.randn(2, 6, 3, 5).bfloat16().contiguous(memory_format=CL)
    w, b = torch.randn(6), torch.randn(6)
    y = nl.functional.group_norm(x, 3, w, b)
    expected = F.group_norm(x.float(), 3, w, b).bfloat16()
    assert y.is_contiguous(memory_format=CL)
    assert_close(y, expected, torch.bfloat16)


def test_autocast_float32_rule_through_the_kernels(on_cpu, monkeypatch):
    """CUDA's autocast rule (imposed on CPU) through the Triton backend: GroupNorm and
    LayerNorm of a bfloat16 input come out float32, as torch's op on float32 copies;
    BatchNorm stays bfloat16 with float32 parameters and statistics (mixed dtypes in
    the kernels), as torch.nn's; the kernels ran for all three."""
    from normlab.core import autograd

    monkeypatch.setitem(autograd._AUTOCAST_FLOAT32, "cpu", autograd.autocast_float32_families("cuda"))
    calls = []
    real_forward = _ops.forward
    monkeypatch.setattr(_ops, "forward", lambda *a: calls.append((a[3].family, a[0].dtype)) or real_forward(*a))
    torch.manual_seed(3)
    x = torch.randn(2, 6, 3, 5).bfloat16()
    w, b = torch.randn(6), torch.randn(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gn = nl.functional.group_norm(x, 3, w, b)
        ln = nl.functional.layer_norm(x, (5,))
        bn = nl.functional.batch_norm(x, None, None, w, b, training=True)
    assert (gn.dtype, ln.dtype, bn.dtype) == (torch.float32, torch.float32, torch.bfloat16)
    assert_close(gn, F.group_norm(x.float(), 3, w, b), torch.float32)
    assert_close(ln, F.layer_norm(x.float(), (5,)), torch.float32)
    assert_close(bn, F.batch_norm(x.float(), None, None, w, b, training=True).bfloat16(), torch.bfloat16)
    assert calls == [("group_norm", torch.float32), ("layer_norm", torch.float32), ("batch_norm", torch.bfloat16)]


_OP_CASES = [
    ("bn-cl", batch_norm_spec((2, 3, 2, 3)), True),
    ("gn-cl", group_norm_spec((2, 4, 2, 3), 2), True),
    ("in", instance_norm_spec((2, 3, 2, 3)), False),
    ("ln", layer_norm_spec((2, 3, 2, 3), (3,)), False),
    ("rms", rms_norm_spec((2, 3, 2, 3), (2, 3)), False),
]


@pytest.mark.parametrize(("name", "spec", "channels_last"), _OP_CASES, ids=[c[0] for c in _OP_CASES])
def test_custom_ops_pass_opcheck(on_cpu, name, spec, channels_last):
    """normlab::triton_norm_forward/backward (what torch.compile sees): schema, fake
    kernels, autograd registration, AOT dispatch -- run on the interpreter here, on CUDA
    in test_gpu_cuda.py."""
    from normlab.backends.custom_ops import spec_fields

    fwd, bwd = torch.ops.normlab.triton_norm_forward.default, torch.ops.normlab.triton_norm_backward.default
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(spec.input_shape, generator=gen)
    x = (x.contiguous(memory_format=CL) if channels_last else x).requires_grad_()
    w = torch.randn(spec.param_shape, generator=gen, requires_grad=True)
    b = torch.randn(spec.param_shape, generator=gen, requires_grad=True) if spec.center else None
    args = (x, w, b, None, None, *spec_fields(spec), EPS)
    result = torch.library.opcheck(fwd, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    y, mean, _, rstd = fwd(x.detach(), w.detach(), b, None, None, *spec_fields(spec), EPS)
    ref = reference.forward(x.detach(), w.detach(), b.detach() if b is not None else None, spec, EPS)
    assert_close(y, ref[0], what="op y")
    dy = torch.randn(y.shape, generator=gen)
    result = torch.library.opcheck(bwd, (dy, x.detach(), w.detach(), mean, rstd, *spec_fields(spec),
                                         True, True, True, spec.center))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_every_layer_compiles_fullgraph_through_the_custom_ops(on_cpu, monkeypatch):
    """A model with every normlab layer under torch.compile(fullgraph=True) on the
    Triton backend matches eager (outputs, gradients, running statistics) and its graph
    calls the custom ops. aot_eager: inductor's compile time buys nothing here."""
    test_compile = pytest.importorskip("test_compile")
    from normlab.backends.gpu import ops

    monkeypatch.setenv("NORMLAB_BACKEND", gpu.NAME)
    for field in dataclasses.fields(TUNING):  # default blocks: fewer interpreted programs
        monkeypatch.setattr(TUNING, field.name, field.default)
    test_compile.check_compiled_through(monkeypatch, ops, "aot_eager")


def test_register_does_not_import_triton():
    code = ("import sys\nimport normlab\nfrom normlab.backends import gpu\n"
            "assert gpu.register() is True\nassert 'triton' not in sys.modules\n"
            "from normlab.backends import _BACKENDS\nassert _BACKENDS[-1][0] == 'gpu-triton'\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NORMLAB_TRITON_ON_CPU")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_every_kernel_compiles_for_sm90(tmp_path):
    """The real Triton compiler (down to a cubin; ptxas ships in the wheel, no GPU
    needed) accepts every kernel and flag setting -- the interpreter doesn't check
    that. Warnings are errors, as on a GPU machine's test run."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NORMLAB_TRITON_ON_CPU")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-W", "error", "-m", "normlab.backends.gpu.compile_check", "--dtypes", "bf16"],
        capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    kernels = {name for module in (_common, _rows, _channels, _groups) for name in dir(module)
               if name.endswith("_kernel")}
    assert len(kernels) == 15
    compiled = {line.split()[3] for line in result.stdout.splitlines() if line.startswith("ok  sm_90 bf16")}
    assert compiled == kernels, result.stdout


def test_bench_stub_runs_under_the_interpreter(capsys):
    """The GPU benchmark's plumbing (providers, interleaving, rows); the times mean
    nothing here. Without CUDA its CLI says so and exits 2."""
    from normlab.backends.gpu import bench

    cases = [bench.BenchCase("batch_norm", (2, 3, 5), "nchw"), bench.BenchCase("rms_norm", (3, 6))]
    rows = bench.run(cases, modes=bench.MODES, repeats=1, warmup=0, device="cpu")
    assert len(rows) == 2 * 3 * len(bench.PROVIDERS)
    assert {r["provider"] for r in rows} == {"torch.nn", "gpu-triton", "normlab", "naive", "copy"}
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in rows)
    # the autograd-level providers compute the same normalization
    for case in [*cases, bench.BenchCase("group_norm", (2, 4, 3, 3), "channels_last", groups=2),
                 bench.BenchCase("layer_norm", (3, 7)), bench.BenchCase("instance_norm", (2, 3, 5))]:
        spec, calls = bench._functions(case)
        x = _layout(torch.randn(case.shape, generator=torch.Generator().manual_seed(18)),
                    "cl" if case.layout == "channels_last" else "nchw")
        w = torch.randn(spec.param_shape, generator=torch.Generator().manual_seed(19))
        b = w.flip(0) if spec.center else None
        expected = calls["torch.nn"](x, w, b)
        for name in ("normlab", "naive"):
            assert_close(calls[name](x, w, b), expected, what=f"{case.name} {name}")
    if not torch.cuda.is_available():
        assert bench.main(["--repeats", "1"]) == 2
        assert "expected a CUDA device" in capsys.readouterr().err
