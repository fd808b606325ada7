"""The numba kernels as PyTorch custom ops (``normlab::numba_norm_forward`` /
``normlab::numba_norm_backward``; see :mod:`normlab.backends.custom_ops`), so
``torch.compile`` and ``torch.export`` see them as opaque, shape-known calls instead of
breaking the graph at numba. The backend routes traced calls here."""

from __future__ import annotations

from ..custom_ops import define_norm_ops, spec_fields
from . import backend

__all__ = ["forward", "backward"]

_OPS = define_norm_ops("numba_norm", "cpu", backend.forward_impl, backend.backward_impl)
forward = _OPS.forward
backward = _OPS.backward
_fields = spec_fields  # the spec as the ops' plain arguments (tests build op calls with it)
