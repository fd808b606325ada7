"""Bad input: a clear exception naming the layer, what was expected and what came;
running statistics untouched by a failed call."""

from __future__ import annotations

import math

import pytest
import torch

import normlab as nl
import normlab.functional as NF


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module, before):
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed call"


@pytest.mark.parametrize("make,bad_input,match", [
    (lambda: nl.BatchNorm2d(4), torch.randn(2, 3, 5, 5), r"BatchNorm2d: expected input with 4 channels at dim 1, got 3"),
    (lambda: nl.BatchNorm2d(4), torch.randn(2, 4, 5), r"BatchNorm2d: expected 4D input \(got 3D input\)"),
    (lambda: nl.BatchNorm1d(4), torch.randn(2, 4, 5, 5), r"BatchNorm1d: expected 2D or 3D input \(got 4D input\)"),
    (lambda: nl.BatchNorm3d(4), torch.randn(2, 4, 5, 5), r"BatchNorm3d: expected 5D input \(got 4D input\)"),
    (lambda: nl.BatchNorm1d(4), torch.randn(1, 4), r"BatchNorm1d: expected more than 1 value per channel when training, got input of shape \(1, 4\)"),
    (lambda: nl.BatchNorm2d(4), torch.randn(1, 4, 1, 1), r"more than 1 value per channel"),
    (lambda: nl.InstanceNorm2d(4, affine=True), torch.randn(2, 3, 5, 5), r"InstanceNorm2d: expected input with 4 channels"),
    (lambda: nl.InstanceNorm2d(4, track_running_stats=True), torch.randn(2, 4, 1, 1), r"more than 1 spatial element"),
    (lambda: nl.InstanceNorm1d(4), torch.randn(4), r"InstanceNorm1d: expected 2D or 3D input \(got 1D input\)"),
    (lambda: nl.GroupNorm(2, 4), torch.randn(2, 6, 3), r"GroupNorm: expected input with 4 channels at dim 1, got 6"),
    (lambda: nl.GroupNorm(2, 4), torch.randn(4), r"GroupNorm: expected input of shape \(N, C, \*spatial\)"),
    (lambda: nl.LayerNorm([3, 4]), torch.randn(2, 4, 3), r"LayerNorm: expected input with shape \(\*, 3, 4\) for normalized_shape=\(3, 4\), got shape \(2, 4, 3\)"),
    (lambda: nl.LayerNorm(5), torch.randn(5, 4), r"LayerNorm: expected input with shape \(\*, 5\)"),
    (lambda: nl.RMSNorm(8), torch.randn(2, 7), r"RMSNorm: expected input with shape \(\*, 8\)"),
])
def test_shape_errors_are_clear_and_leave_state_untouched(make, bad_input, match):
    module = make()
    before = _snapshot(module)
    with pytest.raises(ValueError, match=match):
        module(bad_input)
    _assert_unchanged(module, before)


@pytest.mark.parametrize("make,shape", [
    (lambda: nl.BatchNorm2d(3), (2, 3, 4, 4)),
    (lambda: nl.InstanceNorm1d(3), (2, 3, 4)),
    (lambda: nl.GroupNorm(1, 3), (2, 3, 4)),
    (lambda: nl.LayerNorm(4), (2, 4)),
    (lambda: nl.RMSNorm(4), (2, 4)),
])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input_is_a_type_error(make, shape, dtype):
    module = make()
    before = _snapshot(module)
    with pytest.raises(TypeError, match=r"expected a floating-point input, got dtype torch\.(int|bool)"):
        module(torch.zeros(shape, dtype=dtype))
    _assert_unchanged(module, before)


def test_non_tensor_input_is_a_type_error():
    with pytest.raises(TypeError, match="BatchNorm1d: expected a torch.Tensor input, got list"):
        nl.BatchNorm1d(2)([[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize("make,match", [
    (lambda: nl.GroupNorm(3, 4), r"GroupNorm: expected num_channels to be divisible by num_groups, got num_channels=4, num_groups=3"),
    (lambda: nl.GroupNorm(0, 4), r"GroupNorm: expected num_groups to be a positive int, got 0"),
    (lambda: nl.BatchNorm2d(0), r"BatchNorm2d: expected num_features to be a positive int, got 0"),
    (lambda: nl.BatchNorm2d(3, eps=-1e-5), r"BatchNorm2d: expected a finite eps >= 0, got -1e-05"),
    (lambda: nl.BatchNorm2d(3, eps=math.nan), r"expected a finite eps >= 0, got nan"),
    (lambda: nl.LayerNorm(3, eps=math.inf), r"LayerNorm: expected a finite eps >= 0, got inf"),
    (lambda: nl.RMSNorm(3, eps=-1.0), r"RMSNorm: expected a finite eps >= 0"),
    (lambda: nl.BatchNorm1d(3, momentum=-0.1), r"BatchNorm1d: expected momentum in \[0, 1\], got -0.1"),
    (lambda: nl.BatchNorm1d(3, momentum=math.inf), r"expected momentum in \[0, 1\], got inf"),
    (lambda: nl.InstanceNorm2d(3, momentum=2.0), r"InstanceNorm2d: expected momentum in \[0, 1\], got 2.0"),
    (lambda: nl.LayerNorm([3, 0]), r"LayerNorm: expected a non-empty normalized_shape of positive sizes"),
])
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_eps_type():
    with pytest.raises(TypeError, match="GroupNorm: expected eps to be a real number, got '1e-5'"):
        nl.GroupNorm(1, 2, eps="1e-5")


@pytest.mark.parametrize("call,match", [
    (lambda: NF.batch_norm(torch.randn(2, 3), torch.zeros(4), torch.ones(4), training=True),
     r"batch_norm: expected running_mean of shape \(3,\) to match the input, got shape \(4,\)"),
    (lambda: NF.batch_norm(torch.randn(2, 3), torch.zeros(3), None),
     r"batch_norm: expected running_mean and running_var both given or both None"),
    (lambda: NF.batch_norm(torch.randn(2, 3), None, None, training=False),
     r"batch_norm: expected running_mean and running_var to normalize with, got None"),
    (lambda: NF.batch_norm(torch.randn(2, 3), None, None, torch.ones(2), training=True),
     r"batch_norm: expected weight of shape \(3,\)"),
    (lambda: NF.batch_norm(torch.randn(4, 3), None, None, training=True, momentum=1.5),
     r"batch_norm: expected momentum in \[0, 1\], got 1.5"),
    (lambda: NF.batch_norm(torch.randn(4, 3), None, None, training=True, eps=0.0),
     r"batch_norm: expected eps > 0 when normalizing with batch statistics, got 0.0"),
    (lambda: NF.layer_norm(torch.randn(2, 3), 3, bias=torch.zeros(2)), r"layer_norm: expected bias of shape \(3,\)"),
    (lambda: NF.group_norm(torch.randn(2, 6, 3), 4), r"group_norm: expected the number of channels to be divisible by num_groups=4, got 6 channels"),
    (lambda: NF.instance_norm(torch.randn(2, 3)), r"instance_norm: expected input of shape \(N, C, \*spatial\) with at least 3 dims, got shape \(2, 3\)"),
    (lambda: NF.rms_norm(torch.randn(2, 3), "3"), r"rms_norm: expected normalized_shape to be an int or a sequence of ints"),
])
def test_functional_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_failed_functional_call_leaves_running_stats_untouched():
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError):
        NF.batch_norm(torch.randn(2, 3), rm, rv, torch.ones(4), training=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_failed_training_step_does_not_count_a_batch():
    """torch.nn increments num_batches_tracked before checking the input; normlab doesn't."""
    bn = nl.BatchNorm1d(3, momentum=None)
    with pytest.raises(ValueError):
        bn(torch.randn(1, 3))
    assert int(bn.num_batches_tracked) == 0


def test_instance_norm_mismatch_without_affine_warns_like_torch():
    with pytest.warns(UserWarning, match="num_features is unused"):
        nl.InstanceNorm1d(4)(torch.randn(2, 3, 5))
