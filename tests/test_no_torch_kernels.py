"""normlab computes every normalization itself: torch's normalization kernels are never called."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import normlab as nl

BANNED = {
    F: ["batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm", "local_response_norm"],
    torch: ["batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm", "native_batch_norm",
            "native_layer_norm", "native_group_norm", "_native_batch_norm_legit",
            "_native_batch_norm_legit_no_training", "_batch_norm_impl_index", "_fused_rms_norm"],
}


@pytest.fixture
def banned_kernels(monkeypatch):
    def forbid(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"torch normalization kernel {name} was called")
        return raiser

    for owner, names in BANNED.items():
        for name in names:
            if hasattr(owner, name):
                monkeypatch.setattr(owner, name, forbid(name))
    for name in ("native_batch_norm", "native_layer_norm", "native_group_norm", "batch_norm",
                 "layer_norm", "group_norm", "instance_norm", "rms_norm"):
        if hasattr(torch.ops.aten, name):
            monkeypatch.setattr(torch.ops.aten, name, forbid(f"aten.{name}"))


def test_the_ban_works(banned_kernels):
    with pytest.raises(AssertionError, match="was called"):
        torch.nn.BatchNorm2d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(AssertionError, match="was called"):
        torch.nn.LayerNorm(4)(torch.randn(2, 4))


@pytest.mark.parametrize("make,shape", [
    (lambda: nl.BatchNorm1d(3), (4, 3)),
    (lambda: nl.BatchNorm2d(3), (2, 3, 4, 4)),
    (lambda: nl.BatchNorm3d(3), (2, 3, 2, 2, 2)),
    (lambda: nl.InstanceNorm2d(3, affine=True, track_running_stats=True), (2, 3, 4, 4)),
    (lambda: nl.GroupNorm(3, 6), (2, 6, 4)),
    (lambda: nl.LayerNorm([4, 4]), (2, 3, 4, 4)),
    (lambda: nl.RMSNorm(4), (2, 3, 4)),
])
def test_normlab_never_calls_torch_norm_kernels(banned_kernels, make, shape):
    module = make()
    for training in (True, False):
        module.train(training)
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        module.double()
        y = module(x)
        (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        grad.sum().backward()  # double backward too
