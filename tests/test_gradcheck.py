"""gradcheck and gradgradcheck in float64 for every function and mode.

gradgradcheck proves the double backward (needed for gradient penalties) is exact:
the backward is itself differentiated through the rebuilt statistics.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import normlab.functional as NF
from normlab.nn import SampleRMSNorm

torch.manual_seed(0)


def _inputs(*shapes):
    return tuple(torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes)


RM = torch.randn(3, dtype=torch.float64)
RV = torch.rand(3, dtype=torch.float64) + 0.5

CASES = {
    "batch_norm train": (lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True),
                         [(4, 3, 2, 3), (3,), (3,)]),
    "batch_norm (N,C)": (lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True),
                         [(5, 3), (3,), (3,)]),
    "batch_norm eval": (lambda x, w, b: NF.batch_norm(x, RM, RV, w, b, training=False),
                        [(4, 3, 2, 3), (3,), (3,)]),
    "instance_norm": (lambda x, w, b: NF.instance_norm(x, weight=w, bias=b), [(2, 3, 5), (3,), (3,)]),
    "instance_norm eval": (lambda x, w, b: NF.instance_norm(x, RM, RV, w, b, use_input_stats=False),
                           [(2, 3, 5), (3,), (3,)]),
    "group_norm": (lambda x, w, b: NF.group_norm(x, 2, w, b), [(2, 4, 3, 2), (4,), (4,)]),
    "layer_norm": (lambda x, w, b: NF.layer_norm(x, (3, 4), w, b), [(2, 3, 4), (3, 4), (3, 4)]),
    "rms_norm": (lambda x, w: NF.rms_norm(x, (5,), w, eps=1e-5), [(3, 5), (5,)]),
    "no affine": (lambda x: NF.group_norm(x, 3), [(2, 6, 4)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck(name):
    fn, shapes = CASES[name]
    assert gradcheck(fn, _inputs(*shapes))


@pytest.mark.parametrize("name", list(CASES))
def test_gradgradcheck(name):
    fn, shapes = CASES[name]
    assert gradgradcheck(fn, _inputs(*shapes))


def test_sample_rms_norm_gradgradcheck():
    m = SampleRMSNorm(3, eps=1e-5).double()
    (x,) = _inputs((2, 3, 4))
    assert gradcheck(m, (x,))
    assert gradgradcheck(m, (x,))


def test_channels_last_gradcheck():
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b = _inputs((3,), (3,))
    assert gradgradcheck(lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True), (x, w, b))


def test_eager_calls_keep_a_functions_own_apply_or_setup_context():
    """Eager calls skip torch's Python Function.apply wrapper for normlab's Functions,
    but a Function that defines its own ``apply`` or ``setup_context`` (one given to
    ``register_function``) is called through its own."""
    from normlab.core.autograd import GroupNormFunction, NormFunction, _eager_apply

    class OwnApply(NormFunction):
        @classmethod
        def apply(cls, *args):
            return super().apply(*args)

    class OwnSetup(NormFunction):
        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

    assert _eager_apply(OwnApply) == OwnApply.apply
    assert _eager_apply(OwnSetup) == OwnSetup.apply
    assert _eager_apply(GroupNormFunction) != GroupNormFunction.apply
