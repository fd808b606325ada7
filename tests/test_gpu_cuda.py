"""The Triton backend on a real GPU (skipped where torch sees no CUDA device).

CI has no GPU: there the kernels run in Triton's interpreter (``test_triton_kernels.py``)
and are compiled for sm_90 without running. This file is what runs on a GPU machine
(``bash benchmarks/gpu/run.sh``): shapes large enough for the launch heuristics'
real paths (rows in registers and in chunks, BatchNorm's split reduction, GroupNorm's
split spatial range), every dtype, against torch.nn.functional evaluated in float64
on the same device.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, assert_layers_match_torch_nn

pytest.importorskip("triton", reason="triton is not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the Triton kernels are tested in the interpreter instead "
                "(test_triton_kernels.py)", allow_module_level=True)

from normlab import backends  # noqa: E402
from normlab.backends import gpu  # noqa: E402
from normlab.backends.gpu import _ops  # noqa: E402
from normlab.core.spec import (  # noqa: E402
    batch_norm_spec,
    group_norm_spec,
    instance_norm_spec,
    layer_norm_spec,
    rms_norm_spec,
)

CUDA = torch.device("cuda")
EPS = 1e-5
CL = torch.channels_last


def _ln(s):
    return layer_norm_spec(s, s[-1:])


def _rms(s):
    return rms_norm_spec(s, s[-1:])


def _gn(groups):
    return lambda s: group_norm_spec(s, groups)


def _torch64(spec, x, w, b, groups=None):
    """torch.nn.functional of the float64 copies (the ground truth)."""
    x, w = x.double(), (w.double() if w is not None else None)
    b = b.double() if b is not None else None
    family = spec.family
    if family == "batch_norm":
        return F.batch_norm(x, None, None, w, b, True, 0.0, EPS)
    if family == "instance_norm":
        return F.instance_norm(x, weight=w, bias=b, eps=EPS)
    if family == "group_norm":
        return F.group_norm(x, spec.group_shape[1], w, b, EPS)
    if family == "layer_norm":
        return F.layer_norm(x, x.shape[-1:], w, b, EPS)
    return F.rms_norm(x, x.shape[-1:], w, EPS)


# (id, shape, spec builder, layout): sizes chosen to take each launch path at the
# default TUNING on a GPU with ~100+ SMs.
CASES = [
    ("ln-registers", (512, 768), _ln, "nchw"),
    ("ln-chunked", (24, 10000), _ln, "nchw"),  # rows longer than max_row_block
    ("ln-short-rows", (8, 32, 40), _ln, "nchw"),  # several rows per program
    ("rms-registers", (512, 1000), _rms, "nchw"),
    ("rms-chunked", (6, 20000), _rms, "nchw"),
    ("bn-split", (16, 64, 28, 28), batch_norm_spec, "nchw"),
    ("bn-split-cl", (16, 64, 28, 28), batch_norm_spec, "cl"),
    ("bn-fused", (4, 8, 5, 5), batch_norm_spec, "nchw"),
    ("bn-many-channels", (32, 640, 14, 14), batch_norm_spec, "nchw"),  # one launch per phase
    ("bn1d", (256, 100), batch_norm_spec, "nchw"),
    ("in", (8, 32, 28, 28), instance_norm_spec, "nchw"),
    ("in-cl", (8, 32, 28, 28), instance_norm_spec, "cl"),
    ("in-split-spatial", (1, 2, 256, 256), instance_norm_spec, "nchw"),
    ("gn", (8, 64, 28, 28), _gn(32), "nchw"),
    ("gn-cl", (8, 64, 28, 28), _gn(32), "cl"),
    ("gn-split-spatial", (2, 64, 128, 128), _gn(4), "nchw"),
    ("gn-split-spatial-cl", (2, 64, 128, 128), _gn(4), "cl"),
    ("gn-wide-groups-cl", (4, 128, 28, 28), _gn(2), "cl"),  # 64 channels a group: per-group kernels
    ("gn-many-channels-cl", (4, 320, 14, 14), _gn(32), "cl"),  # several channel tiles
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _input(shape, layout, dtype, seed):
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    x = torch.randn(shape, generator=gen, device=CUDA) * 2 + 0.5
    x = x.contiguous(memory_format=CL) if layout == "cl" else x
    return x.to(dtype)


def _assert_sums_close(got, want, what):
    """dW/dB: float32 sums over up to ~10^5 products, in another order than float64's."""
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= 2e-5 * scale + 1e-5, f"{what}: max error {err:.3g} vs max |value| {scale:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("case", "shape", "make_spec", "layout"), CASES, ids=[c[0] for c in CASES])
def test_kernels_match_float64_torch_nn(case, shape, make_spec, layout, dtype):
    spec = make_spec(shape)
    x = _input(shape, layout, dtype, seed=0)
    assert gpu.accepts(x, spec)
    gen = torch.Generator(device=CUDA).manual_seed(1)
    w = torch.randn(spec.param_shape, generator=gen, device=CUDA)
    b = torch.randn(spec.param_shape, generator=gen, device=CUDA) if spec.center else None
    dy = _input(shape, layout, dtype, seed=2)

    y, mean, var, rstd = _ops.forward(x, w, b, spec, EPS)
    dx, dw, db = _ops.backward(dy, x, w, mean, rstd, spec, True, (True, True, True))

    x64 = x.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    b64 = b.double().requires_grad_(True) if b is not None else None
    y64 = _torch64(spec, x64, w64, b64)
    grads = torch.autograd.grad(y64, [x64, w64] + ([b64] if b64 is not None else []), dy.double())

    assert y.dtype == dtype and y.stride() == x.stride()
    # 16-bit outputs: computed in float32, rounded once -- within an ulp of the exact one
    assert_close(y, y64.to(dtype), dtype, what="y")
    assert dx.dtype == dtype and dx.stride() == x.stride()
    assert_close(dx, grads[0].to(dtype), dtype, scale=2.0, what="dx")
    _assert_sums_close(dw, grads[1].view(dw.shape), "dweight")
    if b is not None:
        _assert_sums_close(db, grads[2].view(db.shape), "dbias")
    # statistics: float32, per group
    x_groups = x.double().reshape(spec.group_shape)
    var64 = x_groups.var(dim=spec.reduce_dims, unbiased=False, keepdim=True)
    if spec.family == "rms_norm":
        var64 = x_groups.pow(2).mean(dim=spec.reduce_dims, keepdim=True)
    assert var.dtype == torch.float32
    assert_close(var.reshape(-1), var64.reshape(-1), torch.float32, what="var")
    if mean is not None:
        assert_close(mean.reshape(-1), x_groups.mean(dim=spec.reduce_dims).reshape(-1), torch.float32,
                     scale=5.0, what="mean")


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("family", ["batch_norm", "instance_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fixed_statistics(family, layout, dtype):
    shape = (16, 64, 28, 28)
    x = _input(shape, layout, dtype, seed=3)
    spec = (batch_norm_spec if family == "batch_norm" else instance_norm_spec)(shape)
    gen = torch.Generator(device=CUDA).manual_seed(4)
    w, b = (torch.randn(64, generator=gen, device=CUDA) for _ in range(2))
    rm = torch.randn(64, generator=gen, device=CUDA).view(1, 64, 1, 1)
    rv = (torch.rand(64, generator=gen, device=CUDA) + 0.5).view(1, 64, 1, 1)
    y, _, _, rstd = _ops.forward(x, w, b, spec, EPS, rm, rv)
    expected = F.batch_norm(x.double(), rm.view(-1).double(), rv.view(-1).double(), w.double(), b.double(),
                            False, 0.0, EPS)
    assert_close(y, expected.to(dtype), dtype, what="y")
    dy = _input(shape, layout, dtype, seed=5)
    dx, _, _ = _ops.backward(dy, x, w, rm, rstd, spec, False, (True, False, False))
    assert_close(dx, (dy.double() * (w.double() * rstd.view(-1).double()).view(1, -1, 1, 1)).to(dtype),
                 dtype, what="dx")


def test_large_offset_keeps_the_variance():
    """x + 1e4 in float32 (SPEC §5): no E[x^2] - E[x]^2 anywhere."""
    for spec_of, layout in [(batch_norm_spec, "nchw"), (batch_norm_spec, "cl"), (_gn(8), "cl"), (_ln, "nchw")]:
        shape = (16, 64, 28, 28) if spec_of is not _ln else (64, 3000)
        x = _input(shape, layout, torch.float32, seed=6) + 1e4
        spec = spec_of(shape)
        y = _ops.forward(x, None, None, spec, EPS)[0]
        err = (y.double() - _torch64(spec, x, None, None)).abs().max().item()
        assert err < 2e-3, f"{spec.family} {layout}: {err}"


@pytest.mark.parametrize(("shape", "groups", "layout"), [
    ((8, 64), 64, "nchw"),  # one channel, one element per group: ints specialized to 1
    ((8, 64), 8, "nchw"),
    ((70000, 16, 2, 2), 4, "cl"),  # more samples than a grid axis takes (65535)
    ((70000, 64), 8, "nchw"),
], ids=["2d-cg1", "2d", "cl-70000-samples", "2d-70000-samples"])
def test_group_norm_edge_shapes(shape, groups, layout):
    """GroupNorm on 2D inputs and on more samples than the channel-tile grid can hold."""
    x = _input(shape, layout, torch.float32, seed=30)
    spec = group_norm_spec(shape, groups)
    gen = torch.Generator(device=CUDA).manual_seed(31)
    w, b = (torch.randn(shape[1], generator=gen, device=CUDA) for _ in range(2))
    y, mean, _, rstd = _ops.forward(x, w, b, spec, EPS)
    dy = _input(shape, layout, torch.float32, seed=32)
    dx, dw, db = _ops.backward(dy, x, w, mean, rstd, spec, True, (True, True, True))
    x64, w64, b64 = (t.double().requires_grad_(True) for t in (x, w, b))
    y64 = F.group_norm(x64, groups, w64, b64, EPS)
    gx, gw, gb = torch.autograd.grad(y64, [x64, w64, b64], dy.double())
    assert_close(y, y64.float(), torch.float32, what="y")
    # dx = rstd (g - mean(g) - xhat mean(g xhat)): with one element per group the terms
    # cancel exactly, and float32 rounding of them is amplified by rstd = eps^-1/2 = 316
    err = (dx.double() - gx).abs().max().item()
    bound = 4e-5 + 1e-6 * rstd.max().item() * (dy * w.view(-1, *([1] * (dy.dim() - 2)))).abs().max().item()
    assert err <= bound, f"dx: max error {err:.3g} > {bound:.3g}"
    _assert_sums_close(dw, gw, "dweight")
    _assert_sums_close(db, gb, "dbias")


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_modules_match_torch_nn_and_use_the_kernels(monkeypatch, layout):
    """Every normlab layer on CUDA against its torch.nn twin -- output, gradients,
    running statistics, train then eval -- and the Triton backend computed them."""
    calls = []
    real_forward = _ops.forward
    monkeypatch.setattr(_ops, "forward", lambda *a: calls.append(a[3].family) or real_forward(*a))
    assert any(name == gpu.NAME for name, _, _ in backends._BACKENDS)
    torch.manual_seed(10)
    x4 = torch.randn(8, 32, 14, 14, device=CUDA) * 3 + 1
    assert_layers_match_torch_nn(x4.contiguous(memory_format=CL) if layout == "cl" else x4, groups=8,
                                 scales=(2.0, 5.0, 20.0))
    families = {"batch_norm", "instance_norm", "group_norm"}
    assert set(calls) == (families | {"layer_norm", "rms_norm"} if layout == "nchw" else families)


def test_second_gpu_stream_and_non_default_device_guard():
    """Kernels launch on the current stream: results on a side stream match the default one."""
    x = _input((16, 64, 28, 28), "nchw", torch.float32, seed=11)
    spec = batch_norm_spec(x.shape)
    expected = _ops.forward(x, None, None, spec, EPS)[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = _ops.forward(x, None, None, spec, EPS)[0]
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("case", ["bn", "bn-cl", "gn-cl"])
def test_single_cooperative_launch(case):
    """BatchNorm's and channels_last GroupNorm's forward and backward are each one
    cooperative launch whose programs wait at barriers (per channel tile, per sample):
    every call (many, back to back, on two streams at once, and replayed from a CUDA
    graph) must see all partials."""
    from normlab.backends.gpu import _channels, _common, _groups

    shape = (16, 64, 28, 28)
    layout = "nchw" if case == "bn" else "cl"
    x = _input(shape, layout, torch.float32, seed=40)
    x3 = x.view(16, 64, -1)  # (N, C, S), either layout
    plan = _channels._plan(x3) if case.startswith("bn") else _groups._cl_plan(x3, 32)
    assert _common.cooperative_launch() and plan.sync and plan.splits > 1, plan
    spec = batch_norm_spec(shape) if case.startswith("bn") else group_norm_spec(shape, 32)
    dy = _input(shape, layout, torch.float32, seed=41)
    y0, mean0, var0, rstd0 = _ops.forward(x, None, None, spec, EPS)
    dx0 = _ops.backward(dy, x, None, mean0, rstd0, spec, True, (True, False, False))[0]
    assert_close(y0.double(), _torch64(spec, x, None, None, groups=32), torch.float32, what="y")
    for _ in range(50):  # the counters start at zero on every call
        y, mean, *_ = _ops.forward(x, None, None, spec, EPS)
        assert torch.equal(y, y0) and torch.equal(mean, mean0)
    streams = [torch.cuda.Stream() for _ in range(2)]
    outs = []
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outs.append([_ops.forward(x, None, None, spec, EPS)[0] for _ in range(10)])
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    assert all(torch.equal(y, y0) for ys in outs for y in ys)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _ops.forward(x, None, None, spec, EPS)  # warm up off the capture
        with torch.cuda.graph(graph):
            captured = _ops.forward(x, None, None, spec, EPS)[0]
            captured_dx = _ops.backward(dy, x, None, mean0, rstd0, spec, True, (True, False, False))[0]
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, y0) and torch.equal(captured_dx, dx0)


_OP_CASES = [
    ("bn", (8, 16, 6, 6), batch_norm_spec, "nchw"),
    ("bn-cl", (8, 16, 6, 6), batch_norm_spec, "cl"),
    ("gn-cl", (4, 16, 6, 6), _gn(4), "cl"),
    ("in", (4, 16, 6, 6), instance_norm_spec, "nchw"),
    ("ln", (64, 96), _ln, "nchw"),
    ("rms", (64, 96), _rms, "nchw"),
]


@pytest.mark.parametrize(("case", "shape", "make_spec", "layout"), _OP_CASES, ids=[c[0] for c in _OP_CASES])
def test_custom_ops_pass_opcheck_on_cuda(case, shape, make_spec, layout):
    from normlab.backends.custom_ops import spec_fields

    spec = make_spec(shape)
    fwd, bwd = torch.ops.normlab.triton_norm_forward.default, torch.ops.normlab.triton_norm_backward.default
    x = _input(shape, layout, torch.float32, seed=20).requires_grad_()
    w = torch.randn(spec.param_shape, device=CUDA, requires_grad=True)
    b = torch.randn(spec.param_shape, device=CUDA, requires_grad=True) if spec.center else None
    result = torch.library.opcheck(fwd, (x, w, b, None, None, *spec_fields(spec), EPS))
    assert all(v == "SUCCESS" for v in result.values()), result
    y, mean, _, rstd = fwd(x.detach(), w.detach(), None, None, None, *spec_fields(spec), EPS)
    result = torch.library.opcheck(bwd, (torch.randn_like(y), x.detach(), w.detach(), mean, rstd,
                                         *spec_fields(spec), True, True, True, spec.center))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_every_layer_compiles_fullgraph_with_inductor_on_cuda(monkeypatch):
    """The model of test_compile.py with every normlab layer, on CUDA: compiled
    (inductor, fullgraph) matches eager, and the graph calls the Triton custom ops."""
    test_compile = pytest.importorskip("test_compile")
    from normlab.backends.gpu import ops

    test_compile.check_compiled_through(monkeypatch, ops, "inductor", device="cuda")


def test_normlab_bench_device_cuda_writes_rows(tmp_path, capsys):
    """``normlab bench --device cuda``: the GPU suite through the CLI, CSV and JSON out."""
    import csv
    import json

    from normlab.cli import main

    prefix = tmp_path / "gpu"
    assert main(["bench", "--device", "cuda", "--norm", "ln", "--quick", "--mode", "forward",
                 "--out", str(prefix)]) == 0
    assert "gpu-triton" in capsys.readouterr().out
    with open(f"{prefix}.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == {"torch.nn", "gpu-triton", "normlab", "naive", "copy"}
    assert all(float(r["kernel_ms"]) > 0 and r["torch"] == torch.__version__ for r in rows)
    assert len(json.loads((tmp_path / "gpu.json").read_text())["rows"]) == len(rows)


def test_gpu_bench_autograd_calls_run_on_one_stream():
    """The bench's autograd providers don't make autograd synchronize streams on every
    call: no "AccumulateGrad node's stream does not match" warning in the backward and
    forward+backward modes (it inflated their eager times), and every row gets a kernel
    time. In a fresh process: torch may warn only once per process."""
    import subprocess
    import sys

    code = (
        "from normlab.backends.gpu.bench import BenchCase, run\n"
        "rows = run([BenchCase('batch_norm', (8, 16, 12, 12))], modes=('backward', 'forward+backward'),"
        " repeats=2, target_ms=0.2)\n"
        "print(sum(r['kernel_ms'] is not None for r in rows), len(rows))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "AccumulateGrad" not in result.stderr, result.stderr
    assert result.stdout.split() == ["10", "10"]


_AUTOCAST_LAYERS = [
    ("batch_norm", lambda: torch.nn.BatchNorm2d(8), "BatchNorm2d", (4, 8, 6, 6)),
    ("instance_norm", lambda: torch.nn.InstanceNorm2d(8, affine=True), "InstanceNorm2d", (4, 8, 6, 6)),
    ("group_norm", lambda: torch.nn.GroupNorm(4, 8), "GroupNorm", (4, 8, 6, 6)),
    ("layer_norm", lambda: torch.nn.LayerNorm(8), "LayerNorm", (4, 6, 8)),
    ("rms_norm", lambda: torch.nn.RMSNorm(8), "RMSNorm", (4, 6, 8)),
]


# torch's RMSNorm warns that a low-precision input with float32 weights takes its unfused path
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("name", "make_torch", "class_name", "shape"), _AUTOCAST_LAYERS,
                         ids=[c[0] for c in _AUTOCAST_LAYERS])
def test_layers_under_cuda_autocast_match_torch_nn(name, make_torch, class_name, shape, amp_dtype, in_dtype):
    """Under torch.autocast("cuda"), each layer's output dtype, values and gradients are
    torch.nn's (LayerNorm, GroupNorm, RMSNorm run in float32 there; BatchNorm and
    InstanceNorm in the input's dtype). Not yet run on a GPU when written (session 22)."""
    import normlab as nl
    from normlab.tools import from_torch

    torch.manual_seed(0)
    reference = make_torch().to(CUDA)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p))
    layer = from_torch(copy.deepcopy(reference))
    assert type(layer) is getattr(nl, class_name)
    x = torch.randn(shape, device=CUDA).to(in_dtype)
    x_ref, x_nl = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=amp_dtype):
        expected, got = reference(x_ref), layer(x_nl)
    assert got.dtype == expected.dtype, f"{name}: {got.dtype}, torch.nn {expected.dtype}"
    assert_close(got, expected, dtype=expected.dtype, what=name)
    dy = torch.randn_like(expected)
    expected.backward(dy)
    got.backward(dy)
    assert x_nl.grad.dtype == x_ref.grad.dtype
    # a bfloat16 input or output anywhere bounds the agreement at bfloat16's precision
    low = torch.bfloat16 if torch.bfloat16 in (in_dtype, expected.dtype) else torch.float32
    assert_close(x_nl.grad, x_ref.grad, dtype=low, scale=4.0, what=f"{name} dx")
    for (pname, p_ref), p_nl in zip(reference.named_parameters(), layer.parameters(), strict=True):
        assert p_nl.grad.dtype == p_ref.grad.dtype
        assert_close(p_nl.grad, p_ref.grad, dtype=low, scale=4.0, what=f"{name} d{pname}")


def test_gpu_model_benchmark_keeps_each_captured_step_alive():
    """benchmarks/gpu/models.py: a captured training step keeps its model, optimizer and
    inputs (the graph holds only their addresses). Two steps captured one after the other
    -- the second capture empties the allocator's cache -- then replayed in turn: the
    pattern that faulted while the script let a captured model be freed. Each replay
    trains its model. Not yet run on a GPU when written (session 22)."""
    import gc

    from normlab.tools import from_torch

    models = pytest.importorskip("test_bench")._models_script("gpu")
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32, device=CUDA)
    target = torch.randint(0, 10, (8,), device=CUDA)
    build = models.MODELS["resnet20"].build
    first = models._graphed(from_torch(build()).to(CUDA), x, target, "train")
    second = models._graphed(build().to(CUDA), x, target, "train")
    gc.collect()
    model = first.kept[0]
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        first()
        second()
    torch.cuda.synchronize()
    after = list(model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.isfinite(p).all() for p in after)
    row = models.compare("resnet20-gn", 8, "infer", 1, CUDA, graphs=True)
    assert row["graph_torch_ms"] > 0 and row["graph_normlab_ms"] > 0
