"""Property tests over random shapes (hypothesis), against the NumPy oracle."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normlab.functional as NF
from conftest import assert_close
from normlab import reference as R

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def nc_star(draw, min_spatial=0, max_spatial=3):
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 6))
    spatial = draw(st.lists(st.integers(1, 5), min_size=min_spatial, max_size=max_spatial))
    seed = draw(st.integers(0, 2**31 - 1))
    return (n, c, *spatial), np.random.default_rng(seed)


def _grads(fn, x, dy):
    xt = torch.tensor(x, requires_grad=True)
    y = fn(xt)
    y.backward(torch.tensor(dy))
    return y.detach(), xt.grad


@SETTINGS
@given(nc_star())
def test_batch_norm_any_shape(case):
    shape, rng = case
    if np.prod(shape) // shape[1] < 2:
        return  # one value per channel: rejected in training, tested in test_bad_input
    x, dy = rng.normal(size=shape) * 3 + 1, rng.normal(size=shape)
    y, dx = _grads(lambda t: NF.batch_norm(t, None, None, training=True), x, dy)
    y_ref, cache = R.batch_norm(x)
    assert_close(y, y_ref, torch.float64, what="y")
    assert_close(dx, R.batch_norm_backward(dy, cache)[0], torch.float64, scale=100, what="dx")


@SETTINGS
@given(nc_star(min_spatial=1), st.integers(1, 6))
def test_group_norm_any_shape(case, groups):
    shape, rng = case
    c = shape[1] * groups  # make the channel count divisible
    shape = (shape[0], c, *shape[2:])
    x, dy = rng.normal(size=shape) - 2, rng.normal(size=shape)
    w, b = rng.normal(size=c), rng.normal(size=c)
    y, dx = _grads(lambda t: NF.group_norm(t, groups, torch.tensor(w), torch.tensor(b)), x, dy)
    y_ref, cache = R.group_norm(x, groups, w, b)
    assert_close(y, y_ref, torch.float64, what="y")
    assert_close(dx, R.group_norm_backward(dy, cache)[0], torch.float64, scale=100, what="dx")


@SETTINGS
@given(nc_star(min_spatial=1), st.integers(1, 3))
def test_layer_and_rms_norm_any_shape(case, k):
    shape, rng = case
    normalized = shape[-min(k, len(shape)):]
    x, dy = rng.normal(size=shape) + 0.5, rng.normal(size=shape)
    y, dx = _grads(lambda t: NF.layer_norm(t, normalized), x, dy)
    y_ref, cache = R.layer_norm(x, normalized)
    assert_close(y, y_ref, torch.float64, what="layer_norm y")
    assert_close(dx, R.layer_norm_backward(dy, cache)[0], torch.float64, scale=100, what="layer_norm dx")
    y, dx = _grads(lambda t: NF.rms_norm(t, normalized, eps=1e-6), x, dy)
    y_ref, cache = R.rms_norm(x, normalized, eps=1e-6)
    assert_close(y, y_ref, torch.float64, what="rms_norm y")
    assert_close(dx, R.rms_norm_backward(dy, cache)[0], torch.float64, scale=100, what="rms_norm dx")


@SETTINGS
@given(nc_star(min_spatial=1))
def test_instance_norm_any_shape(case):
    shape, rng = case
    if np.prod(shape[2:]) < 2:
        return  # one spatial element: rejected, tested in test_bad_input
    x, dy = rng.normal(size=shape), rng.normal(size=shape)
    y, dx = _grads(lambda t: NF.instance_norm(t), x, dy)
    y_ref, cache = R.instance_norm(x)
    assert_close(y, y_ref, torch.float64, what="y")
    assert_close(dx, R.instance_norm_backward(dy, cache)[0], torch.float64, scale=100, what="dx")


@SETTINGS
@given(nc_star(min_spatial=1), st.floats(0.0, 1.0))
def test_normalized_output_has_zero_mean_unit_variance(case, momentum):
    """The defining property, independent of any implementation."""
    shape, rng = case
    if np.prod(shape) // shape[1] < 2:
        return
    x = torch.tensor(rng.normal(size=shape) * 5 + 3)
    y = NF.batch_norm(x, torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64),
                      training=True, momentum=momentum, eps=1e-12)
    dims = [d for d in range(len(shape)) if d != 1]
    var = x.var(dims, unbiased=False)
    ok = var > 1e-8  # a constant channel normalizes to zeros instead
    torch.testing.assert_close(y.mean(dims)[ok], torch.zeros(shape[1], dtype=torch.float64)[ok], atol=1e-9, rtol=0)
    torch.testing.assert_close(y.var(dims, unbiased=False)[ok], torch.ones(shape[1], dtype=torch.float64)[ok],
                               atol=1e-6, rtol=0)
