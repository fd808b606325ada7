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
