"""torch.compile / export friendliness of the cpu-numba kernels (the Triton ones: in
test_triton_kernels.py, interpreted, and test_gpu_cuda.py).

The kernels are custom ops (``torch.ops.normlab.numba_norm_forward/backward``):
``torch.library.opcheck`` checks their schema, fake (meta) kernels, autograd
registration and AOT dispatch; a small model with every normlab layer then runs
under ``torch.compile(fullgraph=True)`` and must match eager, outputs and gradients.
Compilation is slow on 2 cores, so there is one small model per backend.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from conftest import assert_close

pytest.importorskip("numba")

import normlab as nl  # noqa: E402
from normlab.backends import cpu  # noqa: E402
from normlab.backends.cpu import ops  # noqa: E402
from normlab.core.spec import (  # noqa: E402
    batch_norm_spec,
    group_norm_spec,
    instance_norm_spec,
    layer_norm_spec,
    rms_norm_spec,
)

FWD = torch.ops.normlab.numba_norm_forward.default
BWD = torch.ops.normlab.numba_norm_backward.default


def _param(n, grad=True):
    return torch.randn(n, dtype=torch.float64, requires_grad=grad)


CASES = [
    ("bn", batch_norm_spec((3, 4, 5, 6)), False),
    ("bn-cl", batch_norm_spec((3, 4, 5, 6)), True),
    ("in", instance_norm_spec((3, 4, 5, 6)), False),
    ("gn-cl", group_norm_spec((3, 4, 5, 6), 2), True),
    ("ln", layer_norm_spec((3, 4, 5, 6), (6,)), False),
    ("rms", rms_norm_spec((3, 4, 5, 6), (5, 6)), False),
]


@pytest.mark.parametrize("name,spec,channels_last", CASES, ids=[c[0] for c in CASES])
def test_opcheck_forward_and_backward(name, spec, channels_last):
    torch.manual_seed(0)
    x = torch.randn(spec.input_shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    n = spec.param_shape
    w = _param(n)
    b = _param(n) if spec.center else None
    fields = ops._fields(spec)
    result = torch.library.opcheck(FWD, (x, w, b, None, None, *fields, 1e-5))
    assert all(v == "SUCCESS" for v in result.values()), result
    y, mean, var, rstd = FWD(x.detach(), w.detach(), None, None, None, *fields, 1e-5)
    dy = torch.randn_like(y)
    result = torch.library.opcheck(BWD, (dy, x.detach(), w.detach(), mean, rstd, *fields,
                                         True, True, True, True))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_fixed_statistics():
    torch.manual_seed(1)
    spec = batch_norm_spec((3, 4, 5, 6))
    x = torch.randn(spec.input_shape, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(1, 4, 1, 1, dtype=torch.float64), torch.rand(1, 4, 1, 1, dtype=torch.float64)
    result = torch.library.opcheck(FWD, (x, _param(4), _param(4), rm, rv, *ops._fields(spec), 1e-5))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_forward_op_gradients_match_finite_differences():
    """The op's own autograd formula (register_autograd) is the analytic gradient."""
    torch.manual_seed(2)
    spec = group_norm_spec((2, 4, 3, 3), 2)
    x = torch.randn(spec.input_shape, dtype=torch.float64, requires_grad=True)
    w, b = _param(4), _param(4)
    fields = ops._fields(spec)

    def f(x, w, b):
        return FWD(x, w, b, None, None, *fields, 1e-5)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))


class EveryNorm(torch.nn.Module):
    """Every normlab layer once, on feature maps (N, 8, H, W) and rows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nl.BatchNorm2d(8)
        self.inorm = nl.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.gn = nl.GroupNorm(4, 8)
        self.ln = nl.LayerNorm(10)
        self.rms = nl.RMSNorm(10)
        self.bn1 = nl.BatchNorm1d(8)

    def forward(self, x):
        h = self.gn(self.inorm(self.bn(self.conv(x))))
        h = self.rms(self.ln(h))
        return self.bn1(h.mean((2, 3)))


# Deprecation warnings torch 2.13 raises from its own internals while compiling: dynamo
# instantiates autograd.Function when tracing any Function (side_effects.track_object_new),
# and inductor's import path touches torch.jit.script_method.
TORCH_INTERNAL_MESSAGES = ("<class 'torch.autograd.function.Function'> should not be instantiated",
                           "`torch.jit.script_method` is deprecated")


def TORCH_INTERNAL_WARNING(test):
    for message in TORCH_INTERNAL_MESSAGES:
        test = pytest.mark.filterwarnings(f"ignore:{message}:DeprecationWarning")(test)
    return test


def _compare_compiled(backend: str, device: str = "cpu"):
    """EveryNorm compiled with ``backend`` (fullgraph) against eager: two training steps
    (outputs, gradients, running statistics), then eval. Also used by test_gpu_cuda.py."""
    torch.manual_seed(3)
    torch._dynamo.reset()
    eager = EveryNorm().to(device)
    compiled_model = EveryNorm().to(device)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    x = torch.randn(6, 3, 10, 10, device=device)
    # a random projection as the loss: sum(y^2) of a BatchNorm output is nearly constant,
    # so its gradients would be round-off only
    r = torch.randn(6, 8, device=device)
    for step in range(2):  # the second step uses the updated running statistics
        ye, yc = eager(x), compiled(x)
        assert_close(yc, ye, torch.float32, scale=5, what=f"{backend} step {step} output")
        (ye * r).sum().backward()
        (yc * r).sum().backward()
        for (name, pe), pc in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
            assert_close(pc.grad, pe.grad, torch.float32, scale=5, what=f"{backend} grad {name}")
    for (name, be), bc in zip(eager.named_buffers(), compiled_model.buffers(), strict=True):
        assert_close(bc, be, torch.float32, scale=5, what=f"{backend} buffer {name}")
    compiled_model.eval()
    eager.eval()
    assert_close(compiled(x), eager(x), torch.float32, scale=5, what=f"{backend} eval output")


def check_compiled_through(monkeypatch, ops_module, backend: str, device: str = "cpu") -> None:
    """:func:`_compare_compiled`, and every family went through ``ops_module.forward``
    (a backend's custom-op entry, called only while tracing). Also used by
    test_triton_kernels.py and test_gpu_cuda.py."""
    seen = []
    original = ops_module.forward

    def spy(*args, **kwargs):
        seen.append(args[3].family)
        return original(*args, **kwargs)

    monkeypatch.setattr(ops_module, "forward", spy)
    with warnings.catch_warnings():
        for message in TORCH_INTERNAL_MESSAGES:
            warnings.filterwarnings("ignore", message=re.escape(message), category=DeprecationWarning)
        _compare_compiled(backend, device)
    assert {"batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"} <= set(seen), \
        "the compiled graph did not go through the custom ops"


def test_every_layer_compiles_fullgraph_on_numba_kernels(monkeypatch):
    assert cpu.enable()
    monkeypatch.setenv("NORMLAB_BACKEND", "cpu-numba")
    check_compiled_through(monkeypatch, ops, "inductor")


@TORCH_INTERNAL_WARNING
def test_every_layer_compiles_fullgraph_on_reference(monkeypatch):
    monkeypatch.setenv("NORMLAB_BACKEND", "reference")
    _compare_compiled("aot_eager")
