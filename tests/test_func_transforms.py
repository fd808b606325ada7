"""``torch.func`` transforms over normlab layers, against torch.nn's own.

Under ``grad``, ``vmap``, ``jacrev``, ``jvp``/``jacfwd`` and ``functional_call`` the
layers go through :class:`normlab.core.autograd.TransformNormFunction` (torch's Function
contract for transforms, the reference backend's torch ops, an analytic forward-mode
tangent): the derivatives must be torch.nn's, in training and eval mode.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import normlab as nl
import normlab.functional as NF
from conftest import assert_close

# torch's forward-mode AD scripts its decompositions with torch.jit on first use
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.* is deprecated:DeprecationWarning")

LAYERS = {
    "batch_norm": (lambda m: m.BatchNorm2d(4), (3, 4, 5, 5)),
    "batch_norm_untracked": (lambda m: m.BatchNorm2d(4, track_running_stats=False), (3, 4, 5, 5)),
    "batch_norm_1d": (lambda m: m.BatchNorm1d(4), (6, 4)),
    "instance_norm": (lambda m: m.InstanceNorm1d(4, affine=True, track_running_stats=True), (3, 4, 7)),
    "group_norm": (lambda m: m.GroupNorm(2, 4), (3, 4, 5, 5)),
    "layer_norm": (lambda m: m.LayerNorm([4, 5]), (3, 4, 5)),
    "rms_norm": (lambda m: m.RMSNorm(5), (3, 4, 5)),
}


def _pair(name: str, training: bool) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    make, shape = LAYERS[name]
    ours, theirs = make(nl), make(torch.nn)
    gen = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            q.copy_(torch.randn(q.shape, generator=gen) * 0.5 + 1)
            p.copy_(q)
        for p, q in zip(ours.buffers(), theirs.buffers(), strict=True):
            if q.dtype.is_floating_point:
                q.copy_(torch.rand(q.shape, generator=gen) + 0.5)
                p.copy_(q)
    ours.train(training)
    theirs.train(training)
    return ours, theirs, torch.randn(shape, generator=gen) * 2 + 0.5


def _modes(name: str) -> list[bool]:
    # torch.nn's own BatchNorm cannot train with running statistics under a grad
    # transform (it mutates num_batches_tracked, a captured tensor): eval only there
    return [False] if name in ("batch_norm", "batch_norm_1d", "instance_norm") else [True, False]


CASES = [(name, training) for name in LAYERS for training in _modes(name)]


@pytest.mark.parametrize("name,training", CASES)
def test_grad_matches_torch_nn(name, training):
    """``grad`` of a loss with respect to the input and, through ``functional_call``,
    to the parameters."""
    ours, theirs, x = _pair(name, training)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    def loss(module):
        return lambda params, x: (functional_call(module, params, (x,)) * w).square().sum()

    got = grad(loss(ours), argnums=(0, 1))(dict(ours.named_parameters()), x)
    want = grad(loss(theirs), argnums=(0, 1))(dict(theirs.named_parameters()), x)
    assert_close(got[1], want[1], torch.float32, scale=4, what="input gradient")
    assert got[1].abs().max() > 0
    for key in want[0]:
        assert_close(got[0][key], want[0][key], torch.float32, scale=4, what=f"{key} gradient")


@pytest.mark.parametrize("name", ["instance_norm", "group_norm", "layer_norm", "rms_norm", "batch_norm"])
def test_per_sample_gradients_match_torch_nn(name):
    """``vmap(grad(...))`` over the batch: one parameter gradient per sample (as for
    differentially private training); BatchNorm in eval mode."""
    ours, theirs, x = _pair(name, name != "batch_norm" and name != "instance_norm")

    def per_sample(module):
        def loss(params, sample):
            y = functional_call(module, params, (sample.unsqueeze(0),))
            return (y.square() * 0.5 + y).sum()
        return vmap(grad(loss), in_dims=(None, 0))(dict(module.named_parameters()), x)

    got, want = per_sample(ours), per_sample(theirs)
    for key in want:
        assert got[key].shape == (x.shape[0], *dict(ours.named_parameters())[key].shape)
        assert_close(got[key], want[key], torch.float32, scale=4, what=f"per-sample {key} gradient")


@pytest.mark.parametrize("name,training", CASES)
def test_forward_mode_matches_torch_nn(name, training):
    """``jvp`` with tangents for the input and the parameters, and ``jacfwd``."""
    ours, theirs, x = _pair(name, training)
    gen = torch.Generator().manual_seed(2)
    x_t = torch.randn(x.shape, generator=gen)
    p_t = {k: torch.randn(p.shape, generator=gen) for k, p in ours.named_parameters()}

    def tangent(module):
        params = dict(module.named_parameters())
        return jvp(lambda p, x: functional_call(module, p, (x,)), (params, x), (p_t, x_t))

    (y_ours, t_ours), (y_theirs, t_theirs) = tangent(ours), tangent(theirs)
    assert_close(y_ours, y_theirs, torch.float32, what="output")
    assert_close(t_ours, t_theirs, torch.float32, scale=4, what="output tangent")
    row = x[:2]
    assert_close(jacfwd(ours)(row), jacfwd(theirs)(row), torch.float32, scale=4, what="jacfwd")


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "group_norm", "batch_norm_untracked"])
def test_second_derivatives_match_torch_nn(name):
    """``hessian`` (forward over reverse) and ``jacrev(jacrev)`` (reverse over reverse)."""
    ours, theirs, x = _pair(name, True)
    x = x[:2, :, :2, :2] if x.dim() == 4 else x[:1]  # a few dozen elements: the Hessian is square in them

    def f(module):
        return lambda x: (module(x) ** 3).sum()

    assert_close(hessian(f(ours))(x), hessian(f(theirs))(x), torch.float32, scale=16, what="hessian")
    assert_close(jacrev(jacrev(f(ours)))(x), jacrev(jacrev(f(theirs)))(x), torch.float32, scale=16,
                 what="jacrev(jacrev)")


def test_functional_batch_norm_updates_running_statistics_under_grad():
    """``batch_norm`` in training with running statistics under ``grad``: the buffers
    are updated once, as torch.nn.functional's are."""
    x = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(3))
    buffers = {"ours": (torch.zeros(3), torch.ones(3)), "theirs": (torch.zeros(3), torch.ones(3))}
    fns = {"ours": NF.batch_norm, "theirs": torch.nn.functional.batch_norm}
    grads = {k: grad(lambda x, k=k: fns[k](x, *buffers[k], training=True).pow(3).sum())(x) for k in fns}
    assert_close(grads["ours"], grads["theirs"], torch.float32, scale=4, what="input gradient")
    for a, b in zip(buffers["ours"], buffers["theirs"], strict=True):
        assert_close(a, b, torch.float32, what="running statistic")
    assert not torch.equal(buffers["ours"][0], torch.zeros(3))
