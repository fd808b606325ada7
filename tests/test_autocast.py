"""normlab's layers under ``torch.autocast`` follow torch.nn's dtype rules.

torch's autocast runs LayerNorm, GroupNorm and RMSNorm in float32 on CUDA (their inputs
cast, a float32 output) and every norm in its input's dtype on CPU. normlab reads the
rule from torch's dispatcher (``autocast_float32_families``). CPU autocast is compared
with torch.nn directly; CUDA's rule, which needs a GPU to run (``test_gpu_cuda.py``), is
exercised here by giving the CPU the CUDA rule and comparing with what torch does under
it: the op on float32 copies of its inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab as nl
from conftest import assert_close
from normlab.core import autograd

# (name, torch.nn layer, normlab layer, input shape)
LAYERS = [
    ("batch_norm", lambda: nn.BatchNorm2d(6), lambda: nl.BatchNorm2d(6), (4, 6, 5, 5)),
    ("instance_norm", lambda: nn.InstanceNorm2d(6, affine=True), lambda: nl.InstanceNorm2d(6, affine=True),
     (4, 6, 5, 5)),
    ("group_norm", lambda: nn.GroupNorm(3, 6), lambda: nl.GroupNorm(3, 6), (4, 6, 5, 5)),
    ("layer_norm", lambda: nn.LayerNorm(6), lambda: nl.LayerNorm(6), (4, 5, 6)),
    ("rms_norm", lambda: nn.RMSNorm(6), lambda: nl.RMSNorm(6), (4, 5, 6)),
]


def _randomized(layer: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    return layer


def test_the_rule_is_read_from_torch():
    """torch (>= 2.4) autocasts layer_norm and group_norm to float32 on CUDA; this torch
    autocasts no norm on CPU (else the CPU test below would see it)."""
    assert {"layer_norm", "group_norm"} <= autograd.autocast_float32_families("cuda")
    assert "batch_norm" not in autograd.autocast_float32_families("cuda")
    assert autograd.autocast_float32_families("cpu") == frozenset()
    assert autograd.autocast_float32_families("meta") == frozenset()  # no rule read there
    # read at import for every device type with a rule (the dispatcher query can't be traced)
    assert set(autograd._AUTOCAST_KEYS) <= set(autograd._AUTOCAST_FLOAT32)
    assert not autograd._has_kernel("aten::no_such_op", "AutocastCUDA")  # an op this torch lacks


# torch's RMSNorm warns that a bfloat16 input with float32 weights takes its unfused path
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("name, make_torch, make_normlab, shape", LAYERS, ids=[c[0] for c in LAYERS])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_cpu_autocast_gives_torch_nn_dtype_and_values(name, make_torch, make_normlab, shape, in_dtype):
    torch.manual_seed(0)
    x = torch.randn(shape).to(in_dtype)
    reference, layer = _randomized(make_torch()), _randomized(make_normlab())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = reference(x), layer(x)
    assert got.dtype == expected.dtype, f"{name}: {got.dtype} under CPU autocast, torch.nn gives {expected.dtype}"
    assert_close(got, expected, dtype=expected.dtype, what=name)


@pytest.fixture
def cuda_rule_on_cpu(monkeypatch):
    """The CPU takes the families torch autocasts to float32 on CUDA."""
    monkeypatch.setitem(autograd._AUTOCAST_FLOAT32, "cpu", autograd.autocast_float32_families("cuda"))


def _torch_under_float32_rule(name: str, x, weight, bias):
    """What torch's autocast does for a float32-rule op: the op on float32 inputs."""
    x32 = x.float()
    w32 = weight.float() if weight is not None else None
    b32 = bias.float() if bias is not None else None
    if name == "group_norm":
        return F.group_norm(x32, 3, w32, b32, 1e-5)
    if name == "layer_norm":
        return F.layer_norm(x32, x.shape[-1:], w32, b32, 1e-5)
    return F.rms_norm(x32, x.shape[-1:], w32, None)


@pytest.mark.parametrize("name, make_torch, make_normlab, shape", LAYERS, ids=[c[0] for c in LAYERS])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_float32_rule_casts_inputs_and_returns_float32(cuda_rule_on_cpu, name, make_torch, make_normlab, shape,
                                                       param_dtype):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    layer = _randomized(make_normlab()).to(param_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    if name in ("batch_norm", "instance_norm"):  # no autocast rule: x's dtype, as torch.nn
        assert y.dtype == torch.bfloat16
        return
    assert y.dtype == torch.float32, f"{name}: {y.dtype}"
    bias = getattr(layer, "bias", None)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = layer.weight.detach().clone().requires_grad_(True)
    b_ref = bias.detach().clone().requires_grad_(True) if bias is not None else None
    expected = _torch_under_float32_rule(name, x_ref, w_ref, b_ref)
    assert_close(y, expected, dtype=torch.float32, what=name)
    # the cast is part of the graph: gradients come back in the inputs' own dtypes
    dy = torch.randn_like(expected)
    y.backward(dy)
    expected.backward(dy)
    assert x.grad.dtype == torch.bfloat16 and layer.weight.grad.dtype == param_dtype
    assert_close(x.grad, x_ref.grad, dtype=torch.bfloat16, what=f"{name} dx")
    assert_close(layer.weight.grad, w_ref.grad, dtype=param_dtype, what=f"{name} dweight")


def test_float32_rule_leaves_float64_alone(cuda_rule_on_cpu):
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nl.LayerNorm(4, dtype=torch.float64)(x)
    assert y.dtype == torch.float64


def test_outside_autocast_nothing_is_cast(cuda_rule_on_cpu):
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    assert nl.LayerNorm(4)(x).dtype == torch.bfloat16
