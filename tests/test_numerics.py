"""Stable numerics (SPEC §5): large offsets, constant inputs, low precision."""

from __future__ import annotations

import pytest
import torch

import normlab as nl
import normlab.functional as NF

FUNCTIONS = {
    "batch_norm": lambda x: NF.batch_norm(x, None, None, training=True),
    "instance_norm": lambda x: NF.instance_norm(x),
    "group_norm": lambda x: NF.group_norm(x, 2),
    "layer_norm": lambda x: NF.layer_norm(x, x.shape[1:]),
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_large_offset_normalizes_like_no_offset(name, offset):
    """E[x^2] - E[x]^2 would lose every digit here; two-pass statistics don't.
    The remaining error is the input's own rounding: ulp(1e4) = 2^-10 in float32."""
    x = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    fn = FUNCTIONS[name]
    shifted = fn(x + offset)
    plain = fn(x)
    assert (shifted - plain).abs().max().item() < 1e-3


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_large_offset_in_float64_is_exact(name):
    x = torch.randn(4, 4, 5, 5, dtype=torch.float64)
    fn = FUNCTIONS[name]
    torch.testing.assert_close(fn(x + 1e6), fn(x), atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_constant_input_gives_zeros_not_nan(name, dtype):
    x = torch.full((4, 4, 3, 3), 7.25, dtype=dtype, requires_grad=True)
    y = FUNCTIONS[name](x)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_rms_norm_zero_input_gives_zeros():
    x = torch.zeros(3, 8, requires_grad=True)
    y = NF.rms_norm(x, 8)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_statistics_are_float32(dtype):
    """Summing 2^16 half values in half would saturate/round badly; float32 statistics don't."""
    x = torch.randn(1, 1, 256, 256) * 0.1 + 3.0
    y = NF.batch_norm(x.to(dtype), None, None, training=True)
    reference = NF.batch_norm(x.to(dtype).float(), None, None, training=True)
    assert y.dtype == dtype
    # the float32 computation on the upcast input, rounded once to the input dtype
    assert torch.equal(y, reference.to(dtype))


def test_nan_propagates_only_to_its_channel():
    """A NaN poisons its own channel's statistics (as in torch.nn), not the others'."""
    x = torch.randn(4, 3, 5)
    x[0, 1, 2] = float("nan")
    rm, rv = torch.zeros(3), torch.ones(3)
    y = NF.batch_norm(x, rm, rv, training=True)
    assert torch.isnan(y[:, 1]).all()
    assert torch.isfinite(y[:, [0, 2]]).all()
    assert torch.isnan(rm[1]) and torch.isfinite(rm[[0, 2]]).all()


@pytest.mark.parametrize("make", [lambda: nl.BatchNorm2d(6), lambda: nl.GroupNorm(3, 6), lambda: nl.LayerNorm(5),
                                  lambda: nl.RMSNorm(5), lambda: nl.InstanceNorm2d(6, affine=True,
                                                                                   track_running_stats=True)])
def test_inference_path_without_the_autograd_function_equals_the_graph_path(make):
    """Without grad, normalize() calls the backend directly: same outputs and the same
    running-statistics updates as through the autograd Function."""
    torch.manual_seed(3)
    x = torch.randn(4, 6, 7, 5)
    graph, direct = make(), make()
    direct.load_state_dict(graph.state_dict())
    y_graph = graph(x.clone().requires_grad_())
    with torch.no_grad():
        y_direct = direct(x)
    assert y_graph.grad_fn is not None and y_direct.grad_fn is None
    assert torch.equal(y_graph.detach(), y_direct)
    for (name, a), (_, b) in zip(graph.state_dict().items(), direct.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def _random_layer(rnd, family: str, nd: int, channels: int):
    """(normlab layer, torch.nn layer, torch.nn float64 layer) of ``family`` with the same
    random configuration; the caller copies the parameters across."""
    if family == "bn":
        kind = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[nd]
        kw = {"affine": rnd.random() < 0.8, "momentum": rnd.choice([0.1, None])}
    elif family == "in":
        kind = {3: "InstanceNorm1d", 4: "InstanceNorm2d", 5: "InstanceNorm3d"}[nd]
        kw = {"affine": rnd.random() < 0.8, "track_running_stats": rnd.random() < 0.5}
    elif family == "gn":
        kind, groups = "GroupNorm", rnd.choice([g for g in range(1, channels + 1) if channels % g == 0])
        affine = rnd.random() < 0.8
        return tuple(getattr(m, kind)(groups, channels, affine=affine) for m in (nl, torch.nn, torch.nn))
    else:
        kind = "LayerNorm" if family == "ln" else "RMSNorm"
        kw = {"elementwise_affine": rnd.random() < 0.8}
    return tuple(getattr(m, kind)(channels, **kw) for m in (nl, torch.nn, torch.nn))


def _check_as_accurate(what: str, got: torch.Tensor, torch_got: torch.Tensor, want: torch.Tensor,
                       ulp: float) -> None:
    """``got`` is at most 2x as far from ``want`` as torch.nn's ``torch_got``, plus ``ulp``
    relative to want's largest magnitude."""
    want = want.double()
    ours_error = (got.double() - want).abs().max().item()
    torch_error = (torch_got.double() - want).abs().max().item()
    allowed = 2 * torch_error + ulp * max(1.0, want.abs().max().item())
    assert ours_error <= allowed, f"{what} error {ours_error:.3g}, torch.nn's {torch_error:.3g} (allowed {allowed:.3g})"


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch.nn's 16-bit RMSNorm
@pytest.mark.parametrize("seed", range(8))
def test_random_configurations_are_as_accurate_as_torch_nn(seed):
    """Random family x shape x layout x dtype x mode x offset: against torch.nn run in
    float64 on the same (rounded) input, normlab's output, gradients and running
    statistics are never much less accurate than torch.nn's own in the input's dtype
    (at most 2x its error, plus a few ulps of the dtype) -- on every path (small and
    threaded, short rows, channels_last), including inputs with a large offset where the
    statistics' stability matters."""
    import random

    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    ulps = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}
    for case in range(12):
        family = rnd.choice(["bn", "in", "gn", "ln", "rms"])
        dtype = rnd.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
        nd = {"bn": rnd.choice([2, 3, 4, 5]), "gn": rnd.choice([2, 3, 4, 5]), "in": rnd.choice([3, 4, 5])}.get(
            family, rnd.choice([2, 3, 4]))
        shape = [rnd.choice([2, 3, 5, 8, 16, 33]) for _ in range(nd)]
        if rnd.random() < 0.2:  # large enough for the threaded kernels
            shape[0], shape[-1] = 64, rnd.choice([64, 300])
        channels_last = nd >= 4 and rnd.random() < 0.4
        training, grad = rnd.random() < 0.7, rnd.random() < 0.7
        offset, spread = rnd.choice([0.0, 3.0, 100.0]), rnd.choice([1.0, 0.01, 10.0])
        channels = shape[1] if family in ("bn", "in", "gn") else shape[-1]
        layers = _random_layer(rnd, family, nd, channels)
        ours, theirs, exact = layers[0], layers[1], layers[2].double()
        with torch.no_grad():
            for p, q, r in zip(*(m.parameters() for m in layers), strict=True):
                q.copy_(torch.randn(q.shape, generator=gen) * 0.5 + 1)
                p.copy_(q)
                r.copy_(q)
            for (name, p), q, r in zip(ours.named_buffers(), theirs.buffers(), exact.buffers(), strict=True):
                if p.dtype.is_floating_point:
                    q.copy_(torch.rand(q.shape, generator=gen) + 0.5 if "var" in name else torch.randn(q.shape,
                                                                                               generator=gen))
                    p.copy_(q)
                    r.copy_(q)
        for m in layers:
            m.train(training)
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * spread + offset).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last if nd == 4 else torch.channels_last_3d)
        dy = torch.randn(shape, generator=gen).to(dtype)
        where = (f"case {case}: {type(ours).__name__} {tuple(shape)} {dtype} channels_last={channels_last} "
                 f"training={training} offset={offset} spread={spread}")

        def check(what, got, torch_got, want, where=where, ulp=ulps[dtype]):
            _check_as_accurate(f"{where}: {what}", got, torch_got, want, ulp)

        xs = [x.clone().requires_grad_(grad), x.clone().requires_grad_(grad), x.double().requires_grad_(grad)]
        with torch.set_grad_enabled(grad):
            ys = [m(t) for m, t in zip(layers[:2] + (exact,), xs, strict=True)]
        check("output", *ys)
        if grad:
            for y, g in zip(ys, (dy, dy, dy.double()), strict=True):
                y.backward(g)
            check("input gradient", *(t.grad for t in xs))
            for (name, p), q, r in zip(ours.named_parameters(), theirs.parameters(), exact.parameters(), strict=True):
                check(f"{name} gradient", p.grad, q.grad, r.grad)
        for (name, p), q, r in zip(ours.named_buffers(), theirs.buffers(), exact.buffers(), strict=True):
            if p.dtype.is_floating_point:
                check(name, p, q, r)
