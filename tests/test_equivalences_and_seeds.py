"""Equivalences between methods, and the worked numbers of the seed article.

The seed article (shared/seeds/002_...) prints torch.nn outputs and hand-computed
means/variances for small tensors; they are reproduced here to 1e-4.
"""

from __future__ import annotations

import numpy as np
import torch

import normlab as nl
import normlab.functional as NF
from conftest import assert_close

FEATURES = np.array(
    [[[[1, 0], [0, 2]], [[3, 4], [1, 2]], [[-2, 9], [7, 5]], [[2, 3], [4, 2]]],
     [[[1, 2], [-1, 0]], [[1, 2], [3, 5]], [[4, 7], [-6, 4]], [[1, 4], [1, 5]]]], dtype=np.float32)


def test_groupnorm_one_group_is_layernorm_over_chw():
    x = torch.randn(3, 6, 4, 5)
    assert_close(NF.group_norm(x, 1), NF.layer_norm(x, (6, 4, 5)), torch.float32)


def test_groupnorm_c_groups_is_instancenorm():
    x = torch.randn(3, 6, 4, 5)
    assert_close(NF.group_norm(x, 6), NF.instance_norm(x), torch.float32)


def test_batchnorm_on_transposed_is_instancenorm_of_batch():
    """BN of (1, N*C, HW) shares statistics exactly like IN of (N, C, HW)."""
    x = torch.randn(3, 4, 7)
    bn = NF.batch_norm(x.reshape(1, 12, 7), None, None, training=True).reshape(3, 4, 7)
    assert_close(bn, NF.instance_norm(x), torch.float32)


def test_seed_batchnorm2d_numbers():
    bn = nl.BatchNorm2d(4, eps=1e-5)
    out = bn(torch.tensor(FEATURES))
    printed_first_sample = torch.tensor(
        [[[0.3780, -0.6299], [-0.6299, 1.3859]], [[0.2847, 1.0441], [-1.2339, -0.4746]],
         [[-1.1660, 1.1660], [0.7420, 0.3180]], [[-0.5388, 0.1796], [0.8980, -0.5388]]])
    printed_second_sample = torch.tensor(
        [[[0.3780, 1.3859], [-1.6378, -0.6299]], [[-1.2339, -0.4746], [0.2847, 1.8034]],
         [[0.1060, 0.7420], [-2.0140, 0.1060]], [[-1.2572, 0.8980], [-1.2572, 1.6164]]])
    torch.testing.assert_close(out[0], printed_first_sample, atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], printed_second_sample, atol=1e-4, rtol=0)
    # the per-channel means and (biased) variances the article prints
    expected_mean = torch.tensor([0.625, 2.625, 3.5, 2.75])
    expected_var = torch.tensor([0.984375, 1.734375, 22.25, 1.9375])
    # running stats after one step: 0.9 * init + 0.1 * stat (variance unbiased, n = 8)
    torch.testing.assert_close(bn.running_mean, 0.1 * expected_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * expected_var * 8 / 7, atol=1e-6, rtol=0)


def test_seed_layernorm_numbers():
    features = np.array(
        [[[[1, 0], [0, 2]], [[3, 4], [1, 2]], [[2, 3], [4, 2]]],
         [[[1, 2], [-1, 0]], [[1, 2], [3, 5]], [[1, 4], [1, 5]]]], dtype=np.float32)
    x = torch.tensor(features.reshape(2, 3, -1).transpose(0, 2, 1).copy())
    out = nl.LayerNorm(3)(x)
    printed = torch.tensor(
        [[[-1.2247, 1.2247, 0.0000], [-1.3728, 0.9806, 0.3922], [-0.9806, -0.3922, 1.3728], [0.0, 0.0, 0.0]],
         [[0.0, 0.0, 0.0], [-0.7071, -0.7071, 1.4142], [-1.2247, 1.2247, 0.0], [-1.4142, 0.7071, 0.7071]]])
    torch.testing.assert_close(out, printed, atol=1e-4, rtol=0)


def test_seed_groupnorm_numbers():
    out = nl.GroupNorm(num_groups=2, num_channels=4)(torch.tensor(FEATURES))
    printed = torch.tensor(
        [[[[-0.4746, -1.2339], [-1.2339, 0.2847]], [[1.0441, 1.8034], [-0.4746, 0.2847]],
          [[-1.8240, 1.6654], [1.0310, 0.3965]], [[-0.5551, -0.2379], [0.0793, -0.5551]]],
         [[[-0.3618, 0.2171], [-1.5195, -0.9406]], [[-0.3618, 0.2171], [0.7959, 1.9536]],
          [[0.4045, 1.2136], [-2.2923, 0.4045]], [[-0.4045, 0.4045], [-0.4045, 0.6742]]]])
    torch.testing.assert_close(out, printed, atol=1e-4, rtol=0)
