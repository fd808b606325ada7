"""Parity with torch.nn: forward, input/weight/bias gradients and buffers, step by step.

Each case builds the normlab module and its torch.nn namesake with the same
arguments, gives both the same random parameters and running statistics (through
``load_state_dict`` from torch.nn into normlab, which is itself under test), then
runs the sequence train -> train -> eval -> train, comparing at every step.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import normlab as nl
from conftest import assert_close

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
            if t.dtype == torch.long:
                t.fill_(3)
            elif "var" in name:
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen))


def _run_sequence(nl_mod: nn.Module, th_mod: nn.Module, shape: tuple[int, ...], dtype: torch.dtype,
                  channels_last: bool = False, steps: str = "TTET") -> None:
    gen = torch.Generator().manual_seed(0)
    _randomize(th_mod, gen)
    nl_mod.load_state_dict(th_mod.state_dict())
    # low precision: parameters in float32 (as in mixed precision) unless both run in half
    for step, mode in enumerate(steps):
        nl_mod.train(mode == "T")
        th_mod.train(mode == "T")
        x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        dy = torch.randn(shape, generator=gen).to(dtype)
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        ya, yb = nl_mod(xa), th_mod(xb)
        where = f"step {step} ({mode})"
        assert ya.dtype == yb.dtype, where
        assert_close(ya, yb, dtype, what=f"{where} output")
        if channels_last:
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            assert ya.is_contiguous(memory_format=fmt), f"{where}: output lost channels_last"
        (ya * dy).sum().backward()
        (yb * dy).sum().backward()
        # gradients sum over many elements: allow a few units of the output tolerance
        assert_close(xa.grad, xb.grad, dtype, scale=4, what=f"{where} input grad")
        for (name, pa), (_, pb) in zip(nl_mod.named_parameters(), th_mod.named_parameters(), strict=True):
            grad_dtype = dtype if pa.dtype != torch.float32 else torch.float32
            scale = 4 if pa.dtype == dtype else 4 * _lowp_param_scale(dtype)
            assert_close(pa.grad, pb.grad, grad_dtype, scale=scale, what=f"{where} {name}.grad")
            pa.grad = pb.grad = None
        for (name, ba), (_, bb) in zip(nl_mod.named_buffers(), th_mod.named_buffers(), strict=True):
            if ba.dtype == torch.long:
                assert int(ba) == int(bb), f"{where} {name}: {int(ba)} != {int(bb)}"
            else:
                assert_close(ba, bb, ba.dtype if ba.dtype != torch.float32 else torch.float32,
                             scale=_lowp_param_scale(dtype), what=f"{where} {name}")
    assert nl_mod.state_dict().keys() == th_mod.state_dict().keys()
    # and back: torch.nn loads normlab's state
    th_mod.load_state_dict(nl_mod.state_dict())


def _lowp_param_scale(dtype: torch.dtype) -> float:
    """float32 quantities computed from a low-precision input inherit its noise."""
    return {torch.bfloat16: 1000.0, torch.float16: 100.0}.get(dtype, 1.0)


def _module_dtype(dtype: torch.dtype) -> torch.dtype:
    # low-precision inputs with float32 parameters, the mixed-precision setup
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- BatchNorm
BN_SHAPES = [
    ("BatchNorm1d", (7, 5)),
    ("BatchNorm1d", (4, 5, 9)),
    ("BatchNorm2d", (3, 5, 7, 6)),
    ("BatchNorm3d", (2, 5, 3, 4, 3)),
]


@pytest.mark.parametrize("cls_name,shape", BN_SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False), (False, False)])
def test_batchnorm_float32(cls_name, shape, momentum, affine, track):
    kw = dict(momentum=momentum, affine=affine, track_running_stats=track)
    _run_sequence(getattr(nl, cls_name)(shape[1], **kw), getattr(nn, cls_name)(shape[1], **kw),
                  shape, torch.float32)


@pytest.mark.parametrize("cls_name,shape", BN_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_dtypes(cls_name, shape, dtype):
    mdt = _module_dtype(dtype)
    _run_sequence(getattr(nl, cls_name)(shape[1], dtype=mdt), getattr(nn, cls_name)(shape[1], dtype=mdt),
                  shape, dtype)


@pytest.mark.parametrize("cls_name,shape", [("BatchNorm2d", (3, 6, 5, 4)), ("BatchNorm3d", (2, 6, 3, 2, 3))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batchnorm_channels_last(cls_name, shape, dtype):
    _run_sequence(getattr(nl, cls_name)(shape[1], dtype=dtype), getattr(nn, cls_name)(shape[1], dtype=dtype),
                  shape, dtype, channels_last=True)


def test_batchnorm_no_bias():
    _run_sequence(nl.BatchNorm2d(4, bias=False), nn.BatchNorm2d(4, bias=False), (3, 4, 5, 5), torch.float32)


def test_batchnorm_many_cumulative_steps():
    """momentum=None averages every batch seen so far; check over a long sequence."""
    kw = dict(momentum=None, dtype=torch.float64)
    _run_sequence(nl.BatchNorm1d(3, **kw), nn.BatchNorm1d(3, **kw), (6, 3, 4),
                  torch.float64, steps="TTTTETTTTTE")


# ---------------------------------------------------------------- InstanceNorm
IN_SHAPES = [("InstanceNorm1d", (3, 4, 9)), ("InstanceNorm2d", (2, 4, 5, 7)), ("InstanceNorm3d", (2, 4, 3, 4, 3))]


@pytest.mark.parametrize("cls_name,shape", IN_SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 0.5])
@pytest.mark.parametrize("affine,track", [(False, False), (True, False), (False, True), (True, True)])
def test_instancenorm_float32(cls_name, shape, momentum, affine, track):
    kw = dict(momentum=momentum, affine=affine, track_running_stats=track)
    _run_sequence(getattr(nl, cls_name)(shape[1], **kw), getattr(nn, cls_name)(shape[1], **kw),
                  shape, torch.float32)


@pytest.mark.parametrize("cls_name,shape", IN_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_instancenorm_dtypes(cls_name, shape, dtype):
    mdt = _module_dtype(dtype)
    kw = dict(affine=True, track_running_stats=True, dtype=mdt)
    _run_sequence(getattr(nl, cls_name)(shape[1], **kw), getattr(nn, cls_name)(shape[1], **kw), shape, dtype)


@pytest.mark.parametrize("cls_name,shape", [("InstanceNorm1d", (4, 9)), ("InstanceNorm2d", (4, 5, 7))])
def test_instancenorm_unbatched(cls_name, shape):
    kw = dict(affine=True, track_running_stats=True)
    _run_sequence(getattr(nl, cls_name)(shape[0], **kw), getattr(nn, cls_name)(shape[0], **kw),
                  shape, torch.float32)


def test_instancenorm_channels_last():
    _run_sequence(nl.InstanceNorm2d(6, affine=True), nn.InstanceNorm2d(6, affine=True), (2, 6, 5, 3),
                  torch.float32, channels_last=True)


@pytest.mark.parametrize("backend", ["automatic", "reference"])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("make,shape,strided", [
    (lambda m: m.BatchNorm1d(5), (7, 5), False),
    (lambda m: m.BatchNorm1d(5), (4, 5, 9), False),
    (lambda m: m.BatchNorm2d(5), (3, 5, 7, 6), False),
    (lambda m: m.BatchNorm2d(5), (3, 5, 7, 6), True),  # no kernel for a strided input: the reference
    (lambda m: m.InstanceNorm2d(5, affine=True, track_running_stats=True), (2, 5, 4, 6), False),
    (lambda m: m.InstanceNorm1d(5, track_running_stats=True), (5, 9), False),  # unbatched
], ids=["bn1d-2d", "bn1d", "bn2d", "bn2d-strided", "in2d", "in1d-unbatched"])
def test_eval_mode_matches_torch_nn_on_every_path(make, shape, strided, grad, backend, monkeypatch):
    """Eval mode normalizes with the running statistics, which the modules hand to the
    core as their (C,) buffers (viewed only where a path needs them broadcastable):
    under ``torch.no_grad`` and through autograd, on the kernels and on the reference,
    the output and input gradient are torch.nn's and the buffers stay as they were."""
    if backend == "reference":
        monkeypatch.setenv("NORMLAB_BACKEND", "reference")
    ours, theirs = make(nl).eval(), make(nn).eval()
    gen = torch.Generator().manual_seed(5)
    _randomize(theirs, gen)
    ours.load_state_dict(theirs.state_dict())
    before = {name: b.clone() for name, b in ours.named_buffers()}
    big = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen) * 2 + 0.5
    x = big[..., ::2] if strided else big[..., :shape[-1]].contiguous()
    assert x.is_contiguous() != strided
    xa, xb = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        ya, yb = ours(xa), theirs(xb)
    assert_close(ya, yb, torch.float32, what="eval output")
    if grad:
        dy = torch.randn(ya.shape, generator=gen)
        ya.backward(dy)
        yb.backward(dy)
        assert_close(xa.grad, xb.grad, torch.float32, scale=4, what="eval input grad")
    for name, b in ours.named_buffers():
        assert torch.equal(b, before[name]), f"{name} changed in eval mode"


# ---------------------------------------------------------------- GroupNorm
# (3, 6) with 3 or 6 groups leaves 1-2 elements per group, where torch.nn's own float32
# gradient is ill-conditioned: test_groupnorm_tiny_groups_float32_gradients covers it.
GN_CASES = [((3, 6), 1), ((3, 6), 2)] + [
    (shape, groups) for shape in [(3, 6, 7), (2, 6, 5, 3), (2, 6, 3, 2, 3)] for groups in (1, 2, 3, 6)
]


@pytest.mark.parametrize("shape,groups", GN_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_groupnorm_float32(shape, groups, affine):
    _run_sequence(nl.GroupNorm(groups, shape[1], affine=affine), nn.GroupNorm(groups, shape[1], affine=affine),
                  shape, torch.float32)


def test_groupnorm_tiny_groups_float32_gradients():
    """With 2 elements per group the terms of dx cancel almost exactly (the true dx is
    ~0 up to eps), so float32 results are dominated by rounding of terms of size
    rstd * |dy * w|. torch.nn's float32 GroupNorm gradient is off by far more than that
    scale on such inputs; normlab's error stays a small fraction of it."""
    gen = torch.Generator().manual_seed(0)
    worst = {"normlab": 0.0, "torch": 0.0}
    for _ in range(50):
        x = torch.randn(3, 6, generator=gen) * 2 + 0.5
        dy, w, b = torch.randn(3, 6, generator=gen), torch.randn(6, generator=gen), torch.randn(6, generator=gen)

        def grad(fn, dtype, x=x, dy=dy, w=w, b=b):
            xx = x.to(dtype, copy=True).requires_grad_()
            (fn(xx, 3, w.to(dtype), b.to(dtype)) * dy.to(dtype)).sum().backward()
            return xx.grad.double()

        truth = grad(nn.functional.group_norm, torch.float64)
        xd = x.double().view(3, 3, 2)
        rstd = (xd.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt()
        scale = (rstd * (dy * w).double().view(3, 3, 2).abs()).max().item()
        for name, fn in (("normlab", nl.functional.group_norm), ("torch", nn.functional.group_norm)):
            worst[name] = max(worst[name], (grad(fn, torch.float32) - truth).abs().max().item() / scale)
    assert worst["normlab"] < 1e-5, worst
    assert worst["normlab"] < worst["torch"], worst


@pytest.mark.parametrize("dtype", DTYPES)
def test_groupnorm_dtypes(dtype):
    mdt = dtype  # torch.nn's CPU GroupNorm wants parameters in the input dtype
    _run_sequence(nl.GroupNorm(2, 6, dtype=mdt), nn.GroupNorm(2, 6, dtype=mdt), (3, 6, 5, 4), dtype)


@pytest.mark.parametrize("shape", [(2, 6, 5, 3), (2, 6, 3, 2, 3)])
def test_groupnorm_channels_last(shape):
    _run_sequence(nl.GroupNorm(3, 6), nn.GroupNorm(3, 6), shape, torch.float32, channels_last=True)


def test_groupnorm_no_bias():
    _run_sequence(nl.GroupNorm(2, 4, bias=False), nn.GroupNorm(2, 4, bias=False), (3, 4, 5), torch.float32)


# ---------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize("shape,normalized", [((5, 7), 7), ((3, 4, 9), [9]), ((2, 3, 4, 5), (4, 5)),
                                              ((2, 3, 4, 5), (3, 4, 5))])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)])
def test_layernorm_float32(shape, normalized, affine, bias):
    kw = dict(elementwise_affine=affine, bias=bias)
    _run_sequence(nl.LayerNorm(normalized, **kw), nn.LayerNorm(normalized, **kw), shape, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_dtypes(dtype):
    _run_sequence(nl.LayerNorm(33, dtype=dtype), nn.LayerNorm(33, dtype=dtype), (4, 5, 33), dtype)


# ---------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("shape,normalized", [((5, 7), 7), ((2, 3, 4, 5), (4, 5))])
@pytest.mark.parametrize("eps", [None, 1e-6, 0.1])
@pytest.mark.parametrize("affine", [True, False])
def test_rmsnorm_float32(shape, normalized, eps, affine):
    kw = dict(eps=eps, elementwise_affine=affine)
    _run_sequence(nl.RMSNorm(normalized, **kw), nn.RMSNorm(normalized, **kw), shape, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_dtypes(dtype):
    _run_sequence(nl.RMSNorm(33, dtype=dtype), nn.RMSNorm(33, dtype=dtype), (4, 5, 33), dtype)


def test_rmsnorm_default_eps_matters_for_tiny_half_inputs():
    """eps=None is float32's epsilon for half inputs, as torch.nn computes it."""
    x = torch.full((2, 4), 1e-2, dtype=torch.float16)
    assert_close(nl.RMSNorm(4)(x), nn.RMSNorm(4, dtype=torch.float16)(x), torch.float16)


# ---------------------------------------------------------------- surface
@pytest.mark.parametrize("make", [
    lambda m: m.BatchNorm2d(3, momentum=None, affine=False),
    lambda m: m.BatchNorm1d(4, eps=1e-3, bias=False),
    lambda m: m.InstanceNorm3d(3, affine=True, track_running_stats=True),
    lambda m: m.GroupNorm(2, 4, eps=1e-6, affine=False),
    lambda m: m.LayerNorm([3, 4], bias=False),
    lambda m: m.RMSNorm(8, eps=1e-4, elementwise_affine=False),
])
def test_repr_and_state_dict_keys_match(make):
    ours, theirs = make(nl), make(nn)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (na, a), (nb, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert (na, a.dtype, a.shape) == (nb, b.dtype, b.shape)
        assert torch.equal(a, b), na


def test_load_old_checkpoint_without_num_batches_tracked():
    state = nn.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}
    bn = nl.BatchNorm2d(3)
    bn.load_state_dict(state)
    assert int(bn.num_batches_tracked) == 0


def test_modules_move_with_to_and_buffers_follow():
    bn = nl.BatchNorm2d(3).to(torch.float64)
    assert bn.running_mean.dtype == torch.float64 and bn.weight.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.long
    bn(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("make,shape", [
    (lambda m: m.BatchNorm2d(3), (0, 3, 4, 4)),
    (lambda m: m.BatchNorm1d(3, momentum=None), (0, 3)),
    (lambda m: m.GroupNorm(1, 3), (0, 3, 4)),
    (lambda m: m.LayerNorm(3), (0, 3)),
])
def test_empty_batch_passes_through_like_torch(make, shape):
    ours, theirs = make(nl), make(nn)
    x = torch.randn(shape, requires_grad=True)
    y = ours(x)
    assert y.shape == theirs(x).shape == x.shape
    y.sum().backward()
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for p in ours.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p)), "an empty batch contributes no gradient"


def test_empty_batch_instance_norm():
    """torch.nn's InstanceNorm raises IndexError on an empty batch; normlab passes it through."""
    norm = nl.InstanceNorm1d(3, affine=True, track_running_stats=True)
    x = torch.randn(0, 3, 4, requires_grad=True)
    y = norm(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(norm.running_mean, torch.zeros(3)) and torch.equal(norm.running_var, torch.ones(3))


_SWAPPABLE = [
    (lambda m: m.BatchNorm2d(4), (3, 4, 5, 5)),
    (lambda m: m.InstanceNorm1d(4, affine=True, track_running_stats=True), (3, 4, 7)),
    (lambda m: m.GroupNorm(2, 4), (3, 4, 5, 5)),
    (lambda m: m.LayerNorm([4, 5]), (3, 4, 5)),
    (lambda m: m.RMSNorm(5), (3, 4, 5)),
]


class _Softplus(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(w)


@pytest.mark.parametrize("make,shape", _SWAPPABLE)
def test_parametrized_and_functionally_called_parameters_are_the_ones_used(make, shape):
    """The layers read their parameters and buffers from the module's tables where they
    are registered there; what torch puts in their place must be what is used: a
    parametrization's computed tensor, and the tensors of ``torch.func.functional_call``
    (outside any transform), in training and eval."""
    from torch.nn.utils import parametrize

    ours, theirs = make(nl), make(nn)
    _randomize(theirs, torch.Generator().manual_seed(3))
    ours.load_state_dict(theirs.state_dict())
    for module in (ours, theirs):
        for name in ("weight", "bias"):
            if getattr(module, name, None) is not None:
                parametrize.register_parametrization(module, name, _Softplus())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert_close(ya, yb, torch.float32, what=f"parametrized, training={training}")
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert_close(xa.grad, xb.grad, torch.float32, what="input gradient")
        for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
            assert_close(p.grad, q.grad, torch.float32, what=f"{name} gradient")
        for (name, b), (_, c) in zip(ours.named_buffers(), theirs.named_buffers(), strict=True):
            assert_close(b, c, torch.float32, what=name)

    plain_ours, plain_theirs = make(nl), make(nn)
    swapped = {name: torch.rand(t.shape, generator=torch.Generator().manual_seed(5)) + 0.5
               for name, t in plain_theirs.named_parameters()}
    for training in (True, False):
        plain_ours.train(training)
        plain_theirs.train(training)
        assert_close(torch.func.functional_call(plain_ours, swapped, (x,)),
                     torch.func.functional_call(plain_theirs, swapped, (x,)), torch.float32,
                     what=f"functional_call, training={training}")


@pytest.mark.parametrize("make,shape", _SWAPPABLE[:4])
def test_pruned_weight_is_the_one_used(make, shape):
    """``torch.nn.utils.prune`` moves the weight out of ``_parameters`` and recomputes it
    into the instance dict before each forward: the layers must read that one."""
    from torch.nn.utils import prune

    ours, theirs = make(nl), make(nn)
    _randomize(theirs, torch.Generator().manual_seed(6))
    ours.load_state_dict(theirs.state_dict())
    for module in (ours, theirs):
        torch.manual_seed(7)
        prune.random_unstructured(module, "weight", amount=0.5)
    assert "weight" not in ours._parameters and (ours.weight == 0).any()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    assert_close(ours(x), theirs(x), torch.float32, what="pruned")


def test_group_norm_with_one_value_per_group_gives_the_bias():
    """One value per group (C == G, no spatial extent): every such group normalizes to 0,
    so y = bias. torch.nn agrees (to rounding) with two samples, but raises for a single
    sample -- a BatchNorm check ("more than 1 value per channel") that F.group_norm
    applies to (N * C / G, G, *spatial). normlab does not copy that quirk (README: where
    normlab differs)."""
    torch.manual_seed(0)
    reference, layer = nn.GroupNorm(4, 4), nl.GroupNorm(4, 4)
    with torch.no_grad():
        for m in (reference, layer):
            m.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
            m.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    pair = torch.randn(2, 4)
    assert_close(layer(pair), reference(pair), scale=10.0)
    assert torch.equal(layer(pair), layer.bias.detach().expand(2, 4))
    single = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        reference(single)
    assert torch.equal(layer(single), layer.bias.detach().view(1, 4, 1, 1))
