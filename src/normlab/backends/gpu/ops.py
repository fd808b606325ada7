"""The Triton kernels as PyTorch custom ops (``normlab::triton_norm_forward`` /
``normlab::triton_norm_backward``; see :mod:`normlab.backends.custom_ops`): under
``torch.compile`` the backend routes its calls here, so the compiler sees one opaque,
shape-known op per normalization instead of tracing the launch heuristics. The ops run
on CUDA tensors, and on CPU tensors when the backend takes those (Triton's
interpreter, for tests). Importing this module does not import triton."""

from __future__ import annotations

from ..custom_ops import define_norm_ops

__all__ = ["forward", "backward"]


def _forward_impl(x, weight, bias, spec, eps, fixed_mean, fixed_var):
    from . import _ops

    return _ops.forward(x, weight, bias, spec, eps, fixed_mean, fixed_var)


def _backward_impl(dy, x, weight, mean, rstd, spec, batch_statistics, needs_input_grad):
    from . import _ops

    return _ops.backward(dy, x, weight, mean, rstd, spec, batch_statistics, needs_input_grad)


_OPS = define_norm_ops("triton_norm", ("cuda", "cpu"), _forward_impl, _backward_impl)
forward = _OPS.forward
backward = _OPS.backward
