"""Validate the NumPy oracle (normlab/reference.py) against torch.nn.

The rest of the test suite trusts ``normlab.reference`` as ground truth, so
here the oracle itself is checked, in float64, against torch.nn.functional
(forward) and torch.autograd (backward). The oracle is loaded by file path so
these tests do not depend on the rest of normlab.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REFERENCE_PATH = Path(__file__).parents[1] / "src" / "normlab" / "reference.py"


def _load_reference():
    spec = importlib.util.spec_from_file_location(
        "_normlab_reference_oracle", REFERENCE_PATH
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_reference()

TOL = {"rtol": 1e-10, "atol": 1e-10}

CHANNEL_SHAPES = [(3, 6), (3, 6, 5), (3, 6, 4, 3), (3, 6, 2, 3, 2)]
SPATIAL_SHAPES = [s for s in CHANNEL_SHAPES if len(s) > 2]
# Which affine parameters are given: both, neither, weight only.
AFFINES = ["both", "none", "weight"]


def _rng(*key: object) -> np.random.Generator:
    # Deterministic across runs (str hash is randomized per process).
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _params(rng: np.random.Generator, shape: tuple[int, ...], affine: str):
    weight = rng.normal(1.0, 0.5, size=shape) if affine in ("both", "weight") else None
    bias = rng.normal(0.0, 0.5, size=shape) if affine == "both" else None
    return weight, bias


def _torch_forward_backward(fn, x, params, dy):
    """Run ``fn(x_t, *params_t)`` in float64 torch; return y and the grads."""
    x_t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    params_t = [
        None if p is None else torch.tensor(p, dtype=torch.float64, requires_grad=True)
        for p in params
    ]
    y_t = fn(x_t, *params_t)
    y_t.backward(torch.tensor(dy, dtype=torch.float64))
    grads = [None if p is None else p.grad.numpy() for p in params_t]
    return y_t.detach().numpy(), x_t.grad.numpy(), grads


def _assert_close(actual, expected):
    if expected is None:
        assert actual is None
        return
    assert actual is not None
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, **TOL)


def _data(rng, shape):
    # Non-zero mean and non-unit scale so that centering/scaling matter.
    x = rng.normal(0.7, 2.0, size=shape)
    dy = rng.normal(0.0, 1.0, size=shape)
    return x, dy


# ---------------------------------------------------------------------------
# BatchNorm (training)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", CHANNEL_SHAPES)
@pytest.mark.parametrize("affine", AFFINES)
def test_batch_norm_matches_torch(shape, affine):
    rng = _rng("bn", shape, affine)
    x, dy = _data(rng, shape)
    weight, bias = _params(rng, (shape[1],), affine)
    eps = 1e-3

    y, cache = ref.batch_norm(x, weight, bias, eps=eps)
    dx, dw, db = ref.batch_norm_backward(dy, cache)

    def fn(x_t, w_t, b_t):
        return F.batch_norm(x_t, None, None, w_t, b_t, training=True, eps=eps)

    y_t, dx_t, (dw_t, db_t) = _torch_forward_backward(fn, x, [weight, bias], dy)
    _assert_close(y, y_t)
    _assert_close(dx, dx_t)
    _assert_close(dw, dw_t)
    _assert_close(db, db_t)

    axes = (0,) + tuple(range(2, len(shape)))
    assert cache["mean"].shape == (shape[1],)
    np.testing.assert_allclose(cache["mean"], x.mean(axis=axes), **TOL)
    np.testing.assert_allclose(cache["var"], x.var(axis=axes), **TOL)


# ---------------------------------------------------------------------------
# InstanceNorm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SPATIAL_SHAPES)
@pytest.mark.parametrize("affine", AFFINES)
def test_instance_norm_matches_torch(shape, affine):
    rng = _rng("in", shape, affine)
    x, dy = _data(rng, shape)
    weight, bias = _params(rng, (shape[1],), affine)
    eps = 1e-3

    y, cache = ref.instance_norm(x, weight, bias, eps=eps)
    dx, dw, db = ref.instance_norm_backward(dy, cache)

    def fn(x_t, w_t, b_t):
        return F.instance_norm(x_t, weight=w_t, bias=b_t, eps=eps)

    y_t, dx_t, (dw_t, db_t) = _torch_forward_backward(fn, x, [weight, bias], dy)
    _assert_close(y, y_t)
    _assert_close(dx, dx_t)
    _assert_close(dw, dw_t)
    _assert_close(db, db_t)

    axes = tuple(range(2, len(shape)))
    assert cache["mean"].shape == shape[:2]
    np.testing.assert_allclose(cache["mean"], x.mean(axis=axes), **TOL)
    np.testing.assert_allclose(cache["var"], x.var(axis=axes), **TOL)


# ---------------------------------------------------------------------------
# GroupNorm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", CHANNEL_SHAPES)
@pytest.mark.parametrize("num_groups", [1, 2, 3, 6])
@pytest.mark.parametrize("affine", AFFINES)
def test_group_norm_matches_torch(shape, num_groups, affine):
    rng = _rng("gn", shape, num_groups, affine)
    x, dy = _data(rng, shape)
    weight, bias = _params(rng, (shape[1],), affine)
    eps = 1e-3

    y, cache = ref.group_norm(x, num_groups, weight, bias, eps=eps)
    dx, dw, db = ref.group_norm_backward(dy, cache)

    def fn(x_t, w_t, b_t):
        return F.group_norm(x_t, num_groups, w_t, b_t, eps=eps)

    y_t, dx_t, (dw_t, db_t) = _torch_forward_backward(fn, x, [weight, bias], dy)
    _assert_close(y, y_t)
    _assert_close(dx, dx_t)
    _assert_close(dw, dw_t)
    _assert_close(db, db_t)

    grouped = x.reshape(shape[0], num_groups, -1)
    assert cache["mean"].shape == (shape[0], num_groups)
    np.testing.assert_allclose(cache["mean"], grouped.mean(axis=2), **TOL)
    np.testing.assert_allclose(cache["var"], grouped.var(axis=2), **TOL)


def test_group_norm_rejects_indivisible_groups():
    with pytest.raises(ValueError, match="divisible"):
        ref.group_norm(np.zeros((2, 6, 3)), 4)


# ---------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------

LN_CASES = [
    ((3, 4, 5), (5,)),
    ((3, 4, 5), (4, 5)),
    ((2, 3, 4, 5), (4, 5)),
    ((7, 6), (6,)),
    ((5,), (5,)),
]


@pytest.mark.parametrize(("shape", "normalized_shape"), LN_CASES)
@pytest.mark.parametrize("affine", AFFINES)
def test_layer_norm_matches_torch(shape, normalized_shape, affine):
    rng = _rng("ln", shape, normalized_shape, affine)
    x, dy = _data(rng, shape)
    weight, bias = _params(rng, normalized_shape, affine)
    eps = 1e-3

    y, cache = ref.layer_norm(x, normalized_shape, weight, bias, eps=eps)
    dx, dw, db = ref.layer_norm_backward(dy, cache)

    def fn(x_t, w_t, b_t):
        return F.layer_norm(x_t, normalized_shape, w_t, b_t, eps=eps)

    y_t, dx_t, (dw_t, db_t) = _torch_forward_backward(fn, x, [weight, bias], dy)
    _assert_close(y, y_t)
    _assert_close(dx, dx_t)
    _assert_close(dw, dw_t)
    _assert_close(db, db_t)

    lead = shape[: len(shape) - len(normalized_shape)]
    axes = tuple(range(len(lead), len(shape)))
    assert cache["mean"].shape == lead
    np.testing.assert_allclose(cache["mean"], x.mean(axis=axes), **TOL)
    np.testing.assert_allclose(cache["var"], x.var(axis=axes), **TOL)


def test_layer_norm_accepts_int_normalized_shape():
    rng = _rng("ln-int")
    x, _ = _data(rng, (3, 5))
    y_int, _ = ref.layer_norm(x, 5)
    y_tuple, _ = ref.layer_norm(x, (5,))
    np.testing.assert_array_equal(y_int, y_tuple)


def test_layer_norm_rejects_mismatched_shape():
    with pytest.raises(ValueError, match="trailing"):
        ref.layer_norm(np.zeros((3, 4, 5)), (4,))


# ---------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "normalized_shape"), LN_CASES)
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("eps", [1e-3, None])
def test_rms_norm_matches_torch(shape, normalized_shape, with_weight, eps):
    rng = _rng("rms", shape, normalized_shape, with_weight, eps)
    x, dy = _data(rng, shape)
    weight = rng.normal(1.0, 0.5, size=normalized_shape) if with_weight else None

    y, cache = ref.rms_norm(x, normalized_shape, weight, eps=eps)
    dx, dw = ref.rms_norm_backward(dy, cache)

    # The oracle's default eps is float32's; torch's default follows the
    # input dtype (float64 here), so pass the oracle's default explicitly.
    torch_eps = float(np.finfo(np.float32).eps) if eps is None else eps

    def fn(x_t, w_t):
        return F.rms_norm(x_t, normalized_shape, w_t, eps=torch_eps)

    y_t, dx_t, (dw_t,) = _torch_forward_backward(fn, x, [weight], dy)
    _assert_close(y, y_t)
    _assert_close(dx, dx_t)
    _assert_close(dw, dw_t)

    lead = shape[: len(shape) - len(normalized_shape)]
    axes = tuple(range(len(lead), len(shape)))
    assert cache["mean_square"].shape == lead
    np.testing.assert_allclose(cache["mean_square"], (x**2).mean(axis=axes), **TOL)
    assert cache["eps"] == torch_eps


# ---------------------------------------------------------------------------
# BatchNorm in eval mode and running statistics
# ---------------------------------------------------------------------------


def _random_bn2d(rng, num_channels, momentum, affine=True):
    bn = torch.nn.BatchNorm2d(num_channels, momentum=momentum, affine=affine).double()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor(rng.normal(0.0, 1.0, num_channels)))
        bn.running_var.copy_(torch.tensor(rng.uniform(0.5, 2.0, num_channels)))
        if affine:
            bn.weight.copy_(torch.tensor(rng.normal(1.0, 0.5, num_channels)))
            bn.bias.copy_(torch.tensor(rng.normal(0.0, 0.5, num_channels)))
    return bn


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_update_running_stats_matches_batchnorm2d(momentum):
    rng = _rng("running", momentum)
    shape = (3, 6, 4, 3)
    x, _ = _data(rng, shape)
    bn = _random_bn2d(rng, shape[1], momentum)
    old_mean = bn.running_mean.numpy().copy()
    old_var = bn.running_var.numpy().copy()
    old_mean_arg, old_var_arg = old_mean.copy(), old_var.copy()

    bn.train()
    with torch.no_grad():
        bn(torch.tensor(x))

    _, cache = ref.batch_norm(x, eps=bn.eps)
    count = shape[0] * shape[2] * shape[3]
    new_mean, new_var = ref.update_running_stats(
        old_mean_arg, old_var_arg, cache["mean"], cache["var"], count, momentum
    )
    np.testing.assert_allclose(new_mean, bn.running_mean.numpy(), **TOL)
    np.testing.assert_allclose(new_var, bn.running_var.numpy(), **TOL)
    # Inputs are not modified.
    np.testing.assert_array_equal(old_mean_arg, old_mean)
    np.testing.assert_array_equal(old_var_arg, old_var)


def test_cumulative_momentum_matches_batchnorm2d():
    rng = _rng("cumulative")
    shape = (3, 6, 4, 3)
    bn = _random_bn2d(rng, shape[1], momentum=None)
    bn.train()
    running_mean = bn.running_mean.numpy().copy()
    running_var = bn.running_var.numpy().copy()
    count = shape[0] * shape[2] * shape[3]
    for step in range(1, 4):
        x, _ = _data(rng, shape)
        with torch.no_grad():
            bn(torch.tensor(x))
        assert int(bn.num_batches_tracked) == step
        momentum = ref.cumulative_momentum(step)
        assert momentum == 1.0 / step
        _, cache = ref.batch_norm(x)
        running_mean, running_var = ref.update_running_stats(
            running_mean, running_var, cache["mean"], cache["var"], count, momentum
        )
        np.testing.assert_allclose(running_mean, bn.running_mean.numpy(), **TOL)
        np.testing.assert_allclose(running_var, bn.running_var.numpy(), **TOL)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_inference_matches_batchnorm2d_eval(affine):
    rng = _rng("inference", affine)
    shape = (3, 6, 4, 3)
    x, dy = _data(rng, shape)
    bn = _random_bn2d(rng, shape[1], momentum=0.1, affine=affine)
    bn.eval()
    running_mean = bn.running_mean.numpy().copy()
    running_var = bn.running_var.numpy().copy()

    x_t = torch.tensor(x, requires_grad=True)
    y_t = bn(x_t)
    y_t.backward(torch.tensor(dy))

    weight = bn.weight.detach().numpy() if affine else None
    bias = bn.bias.detach().numpy() if affine else None
    y, cache = ref.batch_norm_inference(
        x, running_mean, running_var, weight, bias, eps=bn.eps
    )
    dx, dw, db = ref.batch_norm_inference_backward(dy, cache)

    _assert_close(y, y_t.detach().numpy())
    _assert_close(dx, x_t.grad.numpy())
    _assert_close(dw, bn.weight.grad.numpy() if affine else None)
    _assert_close(db, bn.bias.grad.numpy() if affine else None)
    # Eval mode leaves the running statistics alone.
    np.testing.assert_array_equal(bn.running_mean.numpy(), running_mean)
    np.testing.assert_array_equal(bn.running_var.numpy(), running_var)


# ---------------------------------------------------------------------------
# Numerics and independence
# ---------------------------------------------------------------------------


def test_large_offset_is_stable():
    """Two-pass variance: shifting the input by 1e4 changes nothing."""
    rng = _rng("offset")
    x, _ = _data(rng, (3, 6, 4, 3))
    for forward in (
        lambda a: ref.batch_norm(a)[0],
        lambda a: ref.instance_norm(a)[0],
        lambda a: ref.group_norm(a, 3)[0],
        lambda a: ref.layer_norm(a, (4, 3))[0],
    ):
        np.testing.assert_allclose(forward(x + 1e4), forward(x), rtol=1e-9, atol=1e-9)


def test_inputs_are_cast_to_float64():
    rng = _rng("float32")
    x = rng.normal(size=(3, 6, 5)).astype(np.float32)
    y, cache = ref.batch_norm(x)
    dx, _, _ = ref.batch_norm_backward(np.ones_like(x), cache)
    assert y.dtype == np.float64
    assert dx.dtype == np.float64


def test_reference_does_not_import_torch():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ref', {str(REFERENCE_PATH)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == "False"
