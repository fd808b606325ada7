"""Normalizations beyond torch.nn: each against its definition and its degenerate cases."""

from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab as nl
from conftest import assert_close
from normlab.nn import extra as E
from normlab.nn.registry import build_norm, norm_names


@pytest.fixture(autouse=True)
def _deterministic():
    """Module initializations draw from the global RNG: seed it so every run is the same."""
    torch.manual_seed(0)


def _seed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_seed(seed), dtype=dtype)


def _randomize_affine(*modules: nn.Module, seed: int = 1) -> None:
    g = _seed(seed)
    c = modules[0].weight.shape[0]
    w, b = 1 + 0.3 * torch.randn(c, generator=g), 0.2 * torch.randn(c, generator=g)
    with torch.no_grad():
        for m in modules:
            m.weight.copy_(w)
            m.bias.copy_(b)


def _run_steps(module: nn.Module, inputs: list[torch.Tensor], dy: torch.Tensor):
    """Forward/backward over ``inputs``; returns outputs and grads of the last step."""
    outs = []
    for x in inputs:
        x = x.clone().requires_grad_(True)
        module.zero_grad()
        y = module(x)
        (y * dy).sum().backward()
        outs.append((y.detach(), x.grad, module.weight.grad.clone(), module.bias.grad.clone()))
    return outs


def _compare_runs(ours, theirs, what):
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for name, u, v in zip(("y", "dx", "dweight", "dbias"), a, b, strict=True):
            assert_close(u, v, what=f"{what} step {step} {name}")


def _compare_buffers(a: nn.Module, b: nn.Module, what: str) -> None:
    assert_close(a.running_mean, b.running_mean, what=f"{what} running_mean")
    assert_close(a.running_var, b.running_var, what=f"{what} running_var")
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked)


# ---------------------------------------------------------------- BatchRenorm
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_renorm_with_rmax1_dmax0_is_batchnorm(momentum):
    brn = nl.nn.extra.BatchRenorm2d(5, momentum=momentum, r_max=1.0, d_max=0.0)
    bn = nn.BatchNorm2d(5, momentum=momentum)
    _randomize_affine(brn, bn)
    inputs = [3 + 2 * _randn(6, 5, 4, 4, seed=s) for s in range(3)]
    dy = _randn(6, 5, 4, 4, seed=9)
    _compare_runs(_run_steps(brn, inputs, dy), _run_steps(bn, inputs, dy), "brn vs bn (train)")
    _compare_buffers(brn, bn, "brn vs bn")
    brn.eval()
    bn.eval()
    _compare_runs(_run_steps(brn, inputs[:1], dy), _run_steps(bn, inputs[:1], dy), "brn vs bn (eval)")


def _renorm_formula(x, weight, bias, rm, rv, eps, r_max, d_max):
    """The paper's Algorithm 1 in float64 torch ops, r and d stop-gradient."""
    dims = (0, 2, 3)
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    sigma_b = torch.sqrt(var + eps)
    sigma = torch.sqrt(rv.view(1, -1, 1, 1) + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu - rm.view(1, -1, 1, 1)) / sigma).clamp(-d_max, d_max).detach()
    xhat = (x - mu) / sigma_b * r + d
    return xhat * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def test_batch_renorm_matches_its_definition_with_active_clipping():
    x64 = 2 + 3 * _randn(8, 4, 3, 3, dtype=torch.float64)
    brn = nl.nn.extra.BatchRenorm2d(4, r_max=1.5, d_max=0.5, dtype=torch.float64)
    _randomize_affine(brn)
    # running statistics far from the batch's, so both r and d are clipped for some channels
    rm = torch.tensor([0.0, 2.0, 5.0, -1.0], dtype=torch.float64)
    rv = torch.tensor([1.0, 9.0, 0.5, 30.0], dtype=torch.float64)
    brn.running_mean.copy_(rm)
    brn.running_var.copy_(rv)
    w = brn.weight.detach().clone().requires_grad_(True)
    b = brn.bias.detach().clone().requires_grad_(True)
    xa = x64.clone().requires_grad_(True)
    expected = _renorm_formula(xa, w, b, rm, rv, brn.eps, 1.5, 0.5)
    xb = x64.clone().requires_grad_(True)
    y = brn(xb)
    dy = _randn(*x64.shape, seed=3, dtype=torch.float64)
    expected.backward(dy)
    y.backward(dy)
    assert_close(y, expected, what="brn forward")
    assert_close(xb.grad, xa.grad, what="brn dx")
    assert_close(brn.weight.grad, w.grad, what="brn dweight")
    assert_close(brn.bias.grad, b.grad, what="brn dbias")
    # running statistics follow BatchNorm's rule regardless of r and d
    n = x64.numel() // 4
    batch_var = x64.var((0, 2, 3), unbiased=False) * n / (n - 1)
    assert_close(brn.running_mean, 0.9 * rm + 0.1 * x64.mean((0, 2, 3)), what="brn running_mean")
    assert_close(brn.running_var, 0.9 * rv + 0.1 * batch_var, what="brn running_var")


def test_batch_renorm_schedule_and_state_dict():
    ramp = nl.nn.extra.LinearRamp(1.0, 3.0, 2, 6)
    assert [ramp(s) for s in (0, 2, 4, 6, 100)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    brn = nl.nn.extra.BatchRenorm1d(3, r_max=ramp, d_max=nl.nn.extra.LinearRamp(0.0, 5.0, 0, 10))
    assert brn.current_limits() == (1.0, 0.0)
    for _ in range(4):
        brn(_randn(5, 3))
    assert brn.current_limits() == (2.0, 2.0)
    restored = pickle.loads(pickle.dumps(brn))
    assert restored.current_limits() == (2.0, 2.0)
    torch_bn = nn.BatchNorm1d(3)
    torch_bn.load_state_dict(brn.state_dict())  # strict: same keys as BatchNorm
    brn.load_state_dict(torch_bn.state_dict())


def test_batch_renorm_bad_arguments():
    with pytest.raises(ValueError, match="BatchRenorm2d.*track_running_stats"):
        nl.nn.extra.BatchRenorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="BatchRenorm2d.*r_max >= 1"):
        nl.nn.extra.BatchRenorm2d(4, r_max=0.5)
    with pytest.raises(ValueError, match="BatchRenorm2d.*d_max >= 0"):
        nl.nn.extra.BatchRenorm2d(4, d_max=-1.0)
    brn = nl.nn.extra.BatchRenorm2d(4)
    with pytest.raises(ValueError, match="BatchRenorm2d: expected input with 4 channels"):
        brn(torch.randn(2, 3, 4, 4))
    before = brn.running_mean.clone()
    with pytest.raises(ValueError, match="BatchRenorm2d: expected more than 1 value per channel"):
        brn(torch.randn(1, 4, 1, 1))
    assert torch.equal(brn.running_mean, before)


# ---------------------------------------------------------------- GhostBatchNorm
def test_ghost_batch_norm_whole_batch_is_batchnorm():
    gbn = E.GhostBatchNorm2d(5, virtual_batch_size=64)
    bn = nn.BatchNorm2d(5)
    _randomize_affine(gbn, bn)
    inputs = [1 + _randn(8, 5, 3, 3, seed=s) for s in range(3)]
    dy = _randn(8, 5, 3, 3, seed=7)
    _compare_runs(_run_steps(gbn, inputs, dy), _run_steps(bn, inputs, dy), "gbn(vbs>=N) vs bn")
    _compare_buffers(gbn, bn, "gbn vs bn")
    gbn.eval()
    bn.eval()
    _compare_runs(_run_steps(gbn, inputs[:1], dy), _run_steps(bn, inputs[:1], dy), "gbn eval vs bn eval")


@pytest.mark.parametrize("n,vbs,sizes", [(8, 2, [2, 2, 2, 2]), (7, 3, [3, 3, 1])])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ghost_batch_norm_normalizes_each_ghost_batch(n, vbs, sizes, channels_last):
    gbn = E.GhostBatchNorm2d(4, virtual_batch_size=vbs)
    _randomize_affine(gbn)
    x = 2 + _randn(n, 4, 3, 3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = _randn(n, 4, 3, 3, seed=5)
    xg = x.clone().requires_grad_(True)
    y = gbn(xg)
    y.backward(dy)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    # each ghost batch is an independent torch.nn BatchNorm2d in training
    ys, dxs, means, uvars = [], [], [], []
    dw = torch.zeros(4)
    for xc, dyc in zip(torch.split(x, sizes), torch.split(dy, sizes), strict=True):
        ref = nn.BatchNorm2d(4, momentum=1.0)
        _randomize_affine(ref)
        xc = xc.clone().requires_grad_(True)
        out = ref(xc)
        out.backward(dyc)
        ys.append(out.detach())
        dxs.append(xc.grad)
        dw += ref.weight.grad
        means.append(ref.running_mean)
        uvars.append(ref.running_var)
    assert_close(y, torch.cat(ys), what="ghost y")
    assert_close(xg.grad, torch.cat(dxs), what="ghost dx")
    assert_close(gbn.weight.grad, dw, what="ghost dweight")
    w = torch.tensor(sizes, dtype=torch.float32) / n
    assert_close(gbn.running_mean, 0.1 * (w @ torch.stack(means)), what="ghost running_mean")
    assert_close(gbn.running_var, 0.9 + 0.1 * (w @ torch.stack(uvars)), what="ghost running_var")


def test_ghost_batch_norm_bad_arguments():
    with pytest.raises(ValueError, match="GhostBatchNorm2d: expected virtual_batch_size"):
        E.GhostBatchNorm2d(4, virtual_batch_size=0)
    with pytest.raises(ValueError, match="GhostBatchNorm1d: expected more than 1 value"):
        E.GhostBatchNorm1d(4)(torch.randn(1, 4))


# ---------------------------------------------------------------- SwitchableNorm
def _one_hot_sn(sn: nn.Module, k: int) -> None:
    logits = torch.full((3,), -1e4)
    logits[k] = 0.0
    with torch.no_grad():
        sn.mean_weight.copy_(logits)
        sn.var_weight.copy_(logits)


@pytest.mark.parametrize("k,make", [
    (0, lambda c: nl.InstanceNorm2d(c, affine=True)),
    (1, lambda c: nl.GroupNorm(1, c)),
    (2, lambda c: nn.BatchNorm2d(c)),
])
def test_switchable_norm_one_hot_reproduces_in_ln_bn(k, make):
    sn = E.SwitchableNorm2d(4)
    ref = make(4)
    _one_hot_sn(sn, k)
    _randomize_affine(sn, ref)
    inputs = [3 + 2 * _randn(5, 4, 3, 3, seed=s) for s in range(2)]
    dy = _randn(5, 4, 3, 3, seed=8)
    _compare_runs(_run_steps(sn, inputs, dy), _run_steps(ref, inputs, dy), f"sn one-hot {k}")
    if k == 2:
        _compare_buffers(sn, ref, "sn one-hot bn")
        sn.eval()
        ref.eval()
        _compare_runs(_run_steps(sn, inputs[:1], dy), _run_steps(ref, inputs[:1], dy), "sn bn eval")


def test_switchable_norm_mix_matches_definition():
    x = 1 + _randn(4, 6, 5, dtype=torch.float64)
    sn = E.SwitchableNorm1d(6, dtype=torch.float64)
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([0.3, -0.2, 1.0]))
        sn.var_weight.copy_(torch.tensor([-1.0, 0.5, 0.2]))
    y = sn(x)
    # direct definitions (not the law-of-total-variance form the module uses)
    stats = {dims: (x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True))
             for dims in ((2,), (1, 2), (0, 2))}
    wm = torch.softmax(sn.mean_weight.detach(), 0)
    wv = torch.softmax(sn.var_weight.detach(), 0)
    mean = sum(wm[i] * stats[d][0] for i, d in enumerate(stats))
    var = sum(wv[i] * stats[d][1] for i, d in enumerate(stats))
    assert_close(y, (x - mean) / torch.sqrt(var + sn.eps), what="sn mix")
    # the mixing logits receive gradient
    y.square().mean().backward()
    assert sn.mean_weight.grad.abs().sum() > 0 and sn.var_weight.grad.abs().sum() > 0


def test_switchable_norm_gradcheck():
    x = _randn(3, 2, 4, dtype=torch.float64).requires_grad_(True)
    mw = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64, requires_grad=True)
    vw = torch.tensor([0.0, -0.5, 0.4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: E.switchable_norm(a, b, c), (x, mw, vw))


# ---------------------------------------------------------------- FrozenBatchNorm
def _trained_bn(c: int = 4) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    _randomize_affine(bn)
    for s in range(3):
        bn(2 + 3 * _randn(6, c, 3, 3, seed=s))
    return bn.eval()


def test_frozen_batch_norm_state_dict_both_ways_and_output():
    bn = _trained_bn()
    frozen = E.FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())  # strict
    assert list(frozen.state_dict()) == list(bn.state_dict())
    fresh = nn.BatchNorm2d(4)
    fresh.load_state_dict(frozen.state_dict())  # strict, the other way
    for key, value in bn.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = _randn(3, 4, 5, 5, seed=11)
    assert_close(frozen(x), bn(x), what="frozen vs bn eval")
    assert list(frozen.parameters()) == []
    assert_close(E.FrozenBatchNorm2d.from_batch_norm(bn)(x), bn(x), what="from_batch_norm")


def test_frozen_batch_norm_never_updates_and_passes_gradient():
    frozen = E.FrozenBatchNorm2d.from_batch_norm(_trained_bn())
    before = copy.deepcopy(frozen.state_dict())
    frozen.train()
    x = _randn(6, 4, 3, 3).requires_grad_(True)
    y = frozen(x)
    y.sum().backward()
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key]), key
    expected_dx = (frozen.weight / torch.sqrt(frozen.running_var + frozen.eps)).view(1, -1, 1, 1)
    assert_close(x.grad, expected_dx.expand_as(x), what="frozen dx")


def test_frozen_batch_norm_loads_affine_free_checkpoint():
    bn = nn.BatchNorm2d(3, affine=False)
    bn(_randn(4, 3, 2, 2))
    frozen = E.FrozenBatchNorm2d(3)
    frozen.load_state_dict(bn.state_dict())
    assert torch.equal(frozen.weight, torch.ones(3)) and torch.equal(frozen.bias, torch.zeros(3))
    assert torch.equal(frozen.running_mean, bn.running_mean)
    with pytest.raises(ValueError, match="FrozenBatchNorm2d: expected 4D input"):
        frozen(torch.randn(2, 3))


# ---------------------------------------------------------------- FRN + TLU
def test_filter_response_norm_matches_formula_and_gradcheck():
    x = _randn(3, 4, 5, 5, dtype=torch.float64)
    frn = E.FilterResponseNorm2d(4, dtype=torch.float64)
    g = _seed(2)
    with torch.no_grad():
        frn.weight.copy_(1 + torch.randn(4, generator=g))
        frn.bias.copy_(torch.randn(4, generator=g))
        frn.tau.copy_(0.3 * torch.randn(4, generator=g))
    nu2 = x.square().mean((2, 3), keepdim=True)
    expected = torch.maximum(x / torch.sqrt(nu2 + frn.eps) * frn.weight.view(1, -1, 1, 1)
                             + frn.bias.view(1, -1, 1, 1), frn.tau.view(1, -1, 1, 1))
    assert_close(frn(x), expected, what="frn+tlu")
    y = E.filter_response_norm(x.clone().requires_grad_(True), eps=1e-6)
    assert "FilterResponseNorm" in type(y.grad_fn).__name__  # the shared core's named Function
    xs = _randn(2, 3, 3, 3, dtype=torch.float64).requires_grad_(True)
    w = (1 + _randn(3, dtype=torch.float64, seed=4)).requires_grad_(True)
    b = _randn(3, dtype=torch.float64, seed=5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, c, d: E.filter_response_norm(a, c, d, eps=1e-3),
                                    (xs, w, b))
    tlu = E.TLU(4)
    assert_close(tlu(x), torch.relu(x), what="TLU with tau=0 is ReLU")


# ---------------------------------------------------------------- WSConv2d
def test_ws_conv2d_standardizes_weight():
    # float64: the weight gradient of a standardization cancels heavily, so float32 on both
    # sides disagrees at ~1e-4 relative with neither being wrong
    torch.manual_seed(0)
    conv = E.WSConv2d(3, 6, 3, padding=1, groups=1, bias=True, dtype=torch.float64)
    ref = nn.Conv2d(3, 6, 3, padding=1, dtype=torch.float64)
    ref.load_state_dict(conv.state_dict())  # same state dict as nn.Conv2d
    x = _randn(2, 3, 7, 7, dtype=torch.float64)
    w = ref.weight
    mean = w.mean((1, 2, 3), keepdim=True)
    var = w.var((1, 2, 3), unbiased=False, keepdim=True)
    w_hat = (w - mean) / torch.sqrt(var + conv.eps)
    expected = F.conv2d(x, w_hat, ref.bias, padding=1)
    y = conv(x)
    assert_close(y, expected, what="ws conv")
    y.square().sum().backward()
    expected.square().sum().backward()
    assert_close(conv.weight.grad, ref.weight.grad, what="ws conv dweight")
    sw = conv.standardized_weight().detach()
    assert_close(sw.mean((1, 2, 3)), torch.zeros(6, dtype=torch.float64), what="ws mean 0")
    conv32 = E.WSConv2d(3, 6, 3, padding=1)
    assert conv32(x.float()).dtype == torch.float32


# ---------------------------------------------------------------- LayerNorm2d
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm_2d_equals_layer_norm_over_channels(channels_last):
    ln2d = E.LayerNorm2d(6)
    ref = nn.LayerNorm(6)
    ref.load_state_dict({"weight": 1 + _randn(6, seed=3), "bias": _randn(6, seed=4)})
    ln2d.load_state_dict(ref.state_dict())  # same keys as nn.LayerNorm(C)
    x = 5 + _randn(2, 6, 4, 5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = _randn(2, 6, 4, 5, seed=6)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    y = ln2d(xa)
    expected = ref(xb.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    (y * dy).sum().backward()
    (expected * dy).sum().backward()
    assert_close(y, expected, what="ln2d")
    assert_close(xa.grad, xb.grad, what="ln2d dx")
    assert_close(ln2d.weight.grad, ref.weight.grad, what="ln2d dweight")
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)


def test_layer_norm_2d_does_not_permute(monkeypatch):
    # the normalization itself must not call permute (a copy for one of the two layouts)
    def forbidden(*args, **kwargs):
        raise AssertionError("permute called")

    ln2d = E.LayerNorm2d(4)
    monkeypatch.setattr(torch.Tensor, "permute", forbidden)
    ln2d(_randn(2, 4, 3, 3).to(memory_format=torch.channels_last))


# ---------------------------------------------------------------- batch size 1
def test_single_sample_policy_running():
    bn = E.SingleSampleBatchNorm1d(4)
    _randomize_affine(bn)
    for s in range(2):
        bn(_randn(8, 4, seed=s))
    state = copy.deepcopy(bn.state_dict())
    ref = nn.BatchNorm1d(4)
    ref.load_state_dict(state)
    ref.eval()
    x = _randn(1, 4, seed=9)
    assert_close(bn(x), ref(x), what="single sample = eval normalization")
    for key, value in bn.state_dict().items():
        assert torch.equal(value, state[key]), key
    # batches of more than one value are plain BatchNorm
    xb = _randn(1, 4, 3, seed=3)
    ref.train()
    assert_close(bn(xb), ref(xb), what="(1, C, L) is BatchNorm")
    strict = E.SingleSampleBatchNorm1d(4, single_sample="error")
    with pytest.raises(ValueError, match="SingleSampleBatchNorm1d: expected more than 1 value"):
        strict(x)
    with pytest.raises(ValueError, match="single_sample"):
        E.SingleSampleBatchNorm2d(4, single_sample="instance")
    assert isinstance(E.SingleSampleBatchNorm2d(4), nl.BatchNorm2d)


# ---------------------------------------------------------------- registry
def test_registry_names_and_get_norm_layer():
    for name in ("brn", "gbn", "sn", "frn", "ln2d", "frozen_bn", "bn_single"):
        assert name in norm_names()
        assert build_norm(name, 8)(torch.randn(4, 8, 3, 3)).shape == (4, 8, 3, 3)
    assert isinstance(E.get_norm_layer("brn", spatial_dims=0)(5), E.BatchRenorm1d)
    gn = E.get_norm_layer("gn", num_groups=4)(12)
    assert isinstance(gn, nl.GroupNorm) and gn.num_groups == 4
    assert E.get_norm_layer(nl.BatchNorm2d) is nl.BatchNorm2d
    assert E.get_norm_layer(nn.GroupNorm)(48).num_groups == 24  # 32 reduced to a divisor of 48
    assert E.get_norm_layer(functools.partial(nn.GroupNorm, 4))(8).num_groups == 4
    assert E.get_norm_layer(functools.partial(nn.GroupNorm, num_groups=2), eps=1e-3)(8).eps == 1e-3
    assert E.get_norm_layer(functools.partial(E.GhostBatchNorm2d, virtual_batch_size=4))(3) \
        .virtual_batch_size == 4
    assert isinstance(E.get_norm_layer(None)(3), nn.Identity)
    assert E.get_norm_layer("LayerNorm2d")(3).num_channels == 3
    factory = pickle.loads(pickle.dumps(E.get_norm_layer("sn")))
    assert isinstance(factory(3), E.SwitchableNorm2d)
    with pytest.raises(ValueError, match="unknown norm 'nope'"):
        E.get_norm_layer("nope")
    with pytest.raises(TypeError, match="get_norm_layer"):
        E.get_norm_layer(3)
    with pytest.raises(ValueError, match="norm 'frn': expected spatial_dims in \\[2\\]"):
        build_norm("frn", 4, spatial_dims=1)


def test_spatial_dims_table_matches_the_registry():
    shapes = {0: (4, 6), 1: (4, 6, 5), 2: (4, 6, 3, 3), 3: (4, 6, 2, 2, 2)}
    for name, ranks in E.SPATIAL_DIMS.items():
        for spatial_dims, shape in shapes.items():
            if spatial_dims in ranks:
                assert build_norm(name, 6, spatial_dims)(torch.randn(shape)).shape == shape, name
            else:
                with pytest.raises(ValueError, match=f"norm '{name}': expected spatial_dims"):
                    build_norm(name, 6, spatial_dims)
    assert isinstance(build_norm("ln2d", 6, 0), nl.LayerNorm)


@pytest.mark.parametrize("name", ["ghost", "renorm", "ln2d", "frn", "ws"])
def test_shared_core_families_gradcheck_and_gradgradcheck(name):
    g = _seed(12)
    x = torch.randn(4, 3, 2, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    w = (1 + 0.2 * torch.randn(3, generator=g, dtype=torch.float64)).requires_grad_(True)
    b = (0.1 * torch.randn(3, generator=g, dtype=torch.float64)).requires_grad_(True)
    # running statistics far from the batch's: r and d sit at their clip bounds, so they are
    # locally constant and finite differences agree with their stop-gradient definition
    rm = torch.full((3,), 2.0, dtype=torch.float64)
    rv = torch.full((3,), 4.0, dtype=torch.float64)
    fns = {
        "ghost": lambda x, w, b: E.ghost_batch_norm(x, None, None, w, b, True, virtual_batch_size=2),
        "renorm": lambda x, w, b: E.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, r_max=1.2,
                                                 d_max=0.1),
        "ln2d": lambda x, w, b: E.layer_norm_2d(x, w, b),
        "frn": lambda x, w, b: E.filter_response_norm(x, w, b, eps=1e-3),
        "ws": lambda x, w, b: E.standardize_weight(x) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1),
    }
    assert torch.autograd.gradcheck(fns[name], (x, w, b))
    assert torch.autograd.gradgradcheck(fns[name], (x, w, b))


@pytest.mark.parametrize("name", ["frn", "ln2d", "ghost"])
def test_large_channels_last_inputs_match_the_definition(name):
    """Inputs big enough for a fast backend to take them (the cpu-numba backend takes
    >= 2**15 elements), in channels_last: whatever backend runs must match the formula."""
    x = _randn(4, 8, 32, 32, seed=21).to(memory_format=torch.channels_last)
    x64 = x.double()
    if name == "frn":
        y = E.filter_response_norm(x, eps=1e-6)
        expected = x64 / torch.sqrt(x64.square().mean((2, 3), keepdim=True) + 1e-6)
    elif name == "ln2d":
        y = E.layer_norm_2d(x)
        mean = x64.mean(1, keepdim=True)
        expected = (x64 - mean) / torch.sqrt((x64 - mean).square().mean(1, keepdim=True) + 1e-5)
    else:
        y = E.ghost_batch_norm(x, None, None, training=True, virtual_batch_size=2)
        g = x64.reshape(2, 2, 8, 32, 32)
        mean = g.mean((1, 3, 4), keepdim=True)
        var = (g - mean).square().mean((1, 3, 4), keepdim=True)
        expected = ((g - mean) / torch.sqrt(var + 1e-5)).reshape(x.shape)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, expected.float(), what=f"{name} channels_last")
