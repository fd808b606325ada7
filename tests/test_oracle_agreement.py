"""normlab against the independent NumPy oracle (normlab.reference), forward and backward.

Inputs are float64 so the comparison is exact to ~1e-10; statistics are compared too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import normlab.functional as NF
from conftest import assert_close
from normlab import reference as R

SHAPES = [(3, 6), (4, 6, 5), (2, 6, 3, 4), (2, 6, 2, 3, 2)]


def _run(fn, x: np.ndarray, params: list[np.ndarray | None], dy: np.ndarray):
    """Forward and gradients of a normlab function on float64 copies of numpy arrays."""
    xt = torch.tensor(x, requires_grad=True)
    pt = [None if p is None else torch.tensor(p, requires_grad=True) for p in params]
    y = fn(xt, *pt)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), xt.grad.numpy(), [None if p is None else p.grad.numpy() for p in pt]


def _compare(ours, oracle_y, oracle_grads):
    y, dx, dparams = ours
    assert_close(y, oracle_y, torch.float64, what="output")
    assert_close(dx, oracle_grads[0], torch.float64, what="dx")
    for i, (d, o) in enumerate(zip(dparams, oracle_grads[1:], strict=False)):
        if d is not None:
            assert_close(d, o, torch.float64, what=f"dparam{i}")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_matches_oracle(shape, affine, rng):
    x = rng.normal(2.0, 3.0, shape)
    dy = rng.normal(size=shape)
    w, b = (rng.normal(size=shape[1]), rng.normal(size=shape[1])) if affine else (None, None)
    rm, rv = np.zeros(shape[1]), np.ones(shape[1])
    rm_t, rv_t = torch.tensor(rm), torch.tensor(rv)
    ours = _run(lambda x, w, b: NF.batch_norm(x, rm_t, rv_t, w, b, training=True, momentum=0.3), x, [w, b], dy)
    y, cache = R.batch_norm(x, w, b)
    _compare(ours, y, R.batch_norm_backward(dy, cache))
    count = x.size // shape[1]
    new_mean, new_var = R.update_running_stats(rm, rv, cache["mean"], cache["var"], count, 0.3)
    assert_close(rm_t, new_mean, torch.float64, what="running_mean")
    assert_close(rv_t, new_var, torch.float64, what="running_var")


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_batch_norm_eval_matches_oracle(shape, rng):
    x, dy = rng.normal(size=shape), rng.normal(size=shape)
    w, b = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    rm, rv = rng.normal(size=shape[1]), rng.uniform(0.5, 2.0, shape[1])
    ours = _run(lambda x, w, b: NF.batch_norm(x, torch.tensor(rm), torch.tensor(rv), w, b, training=False),
                x, [w, b], dy)
    y, cache = R.batch_norm_inference(x, rm, rv, w, b)
    _compare(ours, y, R.batch_norm_inference_backward(dy, cache))


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_matches_oracle(shape, affine, rng):
    x, dy = rng.normal(-1.0, 2.0, shape), rng.normal(size=shape)
    w, b = (rng.normal(size=shape[1]), rng.normal(size=shape[1])) if affine else (None, None)
    ours = _run(lambda x, w, b: NF.instance_norm(x, weight=w, bias=b), x, [w, b], dy)
    y, cache = R.instance_norm(x, w, b)
    _compare(ours, y, R.instance_norm_backward(dy, cache))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_group_norm_matches_oracle(shape, groups, rng):
    x, dy = rng.normal(0.5, 2.0, shape), rng.normal(size=shape)
    w, b = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    ours = _run(lambda x, w, b: NF.group_norm(x, groups, w, b), x, [w, b], dy)
    y, cache = R.group_norm(x, groups, w, b)
    _compare(ours, y, R.group_norm_backward(dy, cache))


@pytest.mark.parametrize("shape,normalized", [((5, 7), (7,)), ((2, 3, 4, 5), (4, 5)), ((2, 3, 4), (2, 3, 4))])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_oracle(shape, normalized, affine, rng):
    x, dy = rng.normal(3.0, 2.0, shape), rng.normal(size=shape)
    w, b = (rng.normal(size=normalized), rng.normal(size=normalized)) if affine else (None, None)
    ours = _run(lambda x, w, b: NF.layer_norm(x, normalized, w, b), x, [w, b], dy)
    y, cache = R.layer_norm(x, normalized, w, b)
    _compare(ours, y, R.layer_norm_backward(dy, cache))


@pytest.mark.parametrize("shape,normalized", [((5, 7), (7,)), ((2, 3, 4, 5), (4, 5))])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_matches_oracle(shape, normalized, affine, rng):
    x, dy = rng.normal(1.0, 2.0, shape), rng.normal(size=shape)
    w = rng.normal(size=normalized) if affine else None
    ours = _run(lambda x, w: NF.rms_norm(x, normalized, w, eps=1e-6), x, [w], dy)
    y, cache = R.rms_norm(x, normalized, w, eps=1e-6)
    _compare(ours, y, R.rms_norm_backward(dy, cache))


def test_instance_norm_running_stats_match_oracle(rng):
    """Running statistics of InstanceNorm: per-instance statistics averaged over the batch."""
    shape = (4, 3, 5, 6)
    x = rng.normal(1.0, 2.0, shape)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    NF.instance_norm(torch.tensor(x), rm, rv, momentum=0.25)
    _, cache = R.instance_norm(x)
    expected_mean, expected_var = R.update_running_stats(
        np.zeros(3), np.ones(3), cache["mean"].mean(0), cache["var"].mean(0), 30, 0.25)
    assert_close(rm, expected_mean, torch.float64, what="running_mean")
    assert_close(rv, expected_var, torch.float64, what="running_var")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_matches_oracle(dtype, rng):
    """Low-precision inputs: statistics in float32, output rounded once to the input dtype."""
    x = torch.tensor(rng.normal(1.0, 2.0, (4, 8, 6, 5))).to(dtype)
    w, b = torch.tensor(rng.normal(size=8), dtype=torch.float32), torch.tensor(rng.normal(size=8), dtype=torch.float32)
    expected, _ = R.group_norm(x.double().numpy(), 4, w.double().numpy(), b.double().numpy())
    assert_close(NF.group_norm(x, 4, w, b), expected, dtype, what=f"group_norm {dtype}")
