"""A backend's kernels as PyTorch custom ops, so ``torch.compile`` and ``torch.export``
see them as opaque, shape-known calls instead of tracing into (or breaking the graph at)
numba or Triton launches.

:func:`define_norm_ops` registers, for a backend named ``name``:

* ``normlab::{name}_forward(x, weight?, bias?, fixed_mean?, fixed_var?, family,
  group_shape, reduce_dims, feature_dims, center, eps) -> (y, mean, var, rstd)``
* ``normlab::{name}_backward(dy, x, weight?, mean?, rstd, family, group_shape,
  reduce_dims, feature_dims, center, batch_statistics, need_dx, need_dweight,
  need_dbias) -> (dx, dweight, dbias)``

with fake (meta) kernels and an autograd formula (the backward op), and returns
:class:`NormOps`, whose ``forward`` / ``backward`` have the contract of
:mod:`normlab.backends.reference`. The :class:`~normlab.core.spec.NormSpec` travels as
its fields (custom ops take only tensors and plain values). An absent output (RMSNorm's
mean, a gradient that was not asked for) is an empty tensor, mapped back to None.
``torch.library.opcheck`` passes on both ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.spec import NormSpec
from ..core.stats import compute_dtype

__all__ = ["NormOps", "define_norm_ops", "spec_fields"]


def spec_fields(spec: NormSpec) -> tuple:
    """The spec as the ops' plain arguments (family, group_shape, reduce_dims, feature_dims, center)."""
    return (spec.family, list(spec.group_shape), list(spec.reduce_dims), list(spec.feature_dims),
            spec.center)


def _spec(x: Tensor, family: str, group_shape: Sequence[int], reduce_dims: Sequence[int],
          feature_dims: Sequence[int], center: bool) -> NormSpec:
    return NormSpec(family, tuple(x.shape), tuple(group_shape), tuple(reduce_dims),
                    tuple(feature_dims), center)


@dataclass(frozen=True)
class NormOps:
    """The registered pair of ops and their backend-contract wrappers."""

    forward_op: Callable
    backward_op: Callable

    def forward(self, x, weight, bias, spec: NormSpec, eps: float, fixed_mean=None, fixed_var=None):
        """:func:`normlab.backends.reference.forward` through the custom op."""
        y, mean, var, rstd = self.forward_op(x, weight, bias, fixed_mean, fixed_var, *spec_fields(spec),
                                             float(eps))
        if fixed_var is None and not spec.center:
            mean = None
        if fixed_var is not None and fixed_mean is None:
            mean = None
        return y, mean, var, rstd

    def backward(self, dy, x, weight, mean, rstd, spec: NormSpec, batch_statistics: bool,
                 needs_input_grad=(True, True, True)):
        """:func:`normlab.backends.reference.backward` through the custom op."""
        need_dx, need_dw, need_db = (bool(n) for n in needs_input_grad)
        need_dw = need_dw and weight is not None
        dx, dw, db = self.backward_op(dy, x, weight, mean, rstd, *spec_fields(spec), batch_statistics,
                                      need_dx, need_dw, need_db)
        return (dx if need_dx else None, dw if need_dw else None, db if need_db else None)


def define_norm_ops(name: str, device_types: str | Sequence[str], forward_impl: Callable,
                    backward_impl: Callable) -> NormOps:
    """Register ``normlab::{name}_forward`` / ``_backward`` for ``device_types`` around a
    backend's ``forward_impl`` / ``backward_impl`` (the reference backend's contract)."""

    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, fixed_mean: Tensor | None,
                fixed_var: Tensor | None, family: str, group_shape: list[int],
                reduce_dims: list[int], feature_dims: list[int], center: bool,
                eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        spec = _spec(x, family, group_shape, reduce_dims, feature_dims, center)
        y, mean, var, rstd = forward_impl(x, weight, bias, spec, eps, fixed_mean, fixed_var)
        if mean is None:
            mean = rstd.new_empty(0)
        # an op's outputs may not alias its inputs (fixed statistics may be returned as
        # given) or each other (the kernels' statistics are views of one buffer): copy them
        return y, mean.clone(), var.clone(), rstd.clone()

    def forward_fake(x, weight, bias, fixed_mean, fixed_var, family, group_shape, reduce_dims,
                     feature_dims, center, eps):
        cdt = compute_dtype(x.dtype)
        y = torch.empty_like(x)
        if fixed_var is not None:
            var = fixed_var.new_empty(fixed_var.shape, dtype=cdt)
            mean = fixed_mean.new_empty(fixed_mean.shape, dtype=cdt) if fixed_mean is not None \
                else x.new_empty(0, dtype=cdt)
            return y, mean, var, torch.empty_like(var)
        spec = _spec(x, family, group_shape, reduce_dims, feature_dims, center)
        var = x.new_empty(spec.stat_shape, dtype=cdt)
        mean = torch.empty_like(var) if center else x.new_empty(0, dtype=cdt)
        return y, mean, var, torch.empty_like(var)

    def backward(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor | None, rstd: Tensor,
                 family: str, group_shape: list[int], reduce_dims: list[int],
                 feature_dims: list[int], center: bool, batch_statistics: bool, need_dx: bool,
                 need_dweight: bool, need_dbias: bool) -> tuple[Tensor, Tensor, Tensor]:
        spec = _spec(x, family, group_shape, reduce_dims, feature_dims, center)
        if mean is not None and mean.numel() == 0:
            mean = None
        dx, dw, db = backward_impl(dy, x, weight, mean, rstd, spec, batch_statistics,
                                   (need_dx, need_dweight, need_dbias))
        empty = x.new_empty(0, dtype=compute_dtype(x.dtype))
        # dw and db may be views of one buffer: copies, as an op's outputs may not alias
        return (dx if dx is not None else x.new_empty(0),
                dw.clone() if dw is not None else empty, db.clone() if db is not None else empty.clone())

    def backward_fake(dy, x, weight, mean, rstd, family, group_shape, reduce_dims, feature_dims,
                      center, batch_statistics, need_dx, need_dweight, need_dbias):
        spec = _spec(x, family, group_shape, reduce_dims, feature_dims, center)
        cdt = compute_dtype(x.dtype)
        dx = torch.empty_like(x) if need_dx else x.new_empty(0)
        dw = x.new_empty(spec.param_shape, dtype=cdt) if need_dweight else x.new_empty(0, dtype=cdt)
        db = x.new_empty(spec.param_shape, dtype=cdt) if need_dbias else x.new_empty(0, dtype=cdt)
        return dx, dw, db

    forward_op = torch.library.custom_op(f"normlab::{name}_forward", mutates_args=(),
                                         device_types=device_types)(forward)
    forward_op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(f"normlab::{name}_backward", mutates_args=(),
                                          device_types=device_types)(backward)
    backward_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        x, weight, bias, _fixed_mean, fixed_var, family, group_shape, reduce_dims, feature_dims, \
            center, _eps = inputs
        _y, mean, var, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.args = (family, group_shape, reduce_dims, feature_dims, center, fixed_var is None)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var, rstd)

    def op_backward(ctx, dy, _dmean, _dvar, _drstd):
        x, weight, mean, rstd = ctx.saved_tensors
        family, group_shape, reduce_dims, feature_dims, center, batch = ctx.args
        need = ctx.needs_input_grad
        dx, dw, db = backward_op(dy, x, weight, mean, rstd, family, group_shape, reduce_dims,
                                 feature_dims, center, batch, need[0],
                                 weight is not None and need[1], ctx.has_bias and need[2])
        return (dx if need[0] else None,
                dw.to(weight.dtype) if weight is not None and need[1] else None,
                db if ctx.has_bias and need[2] else None,
                None, None, None, None, None, None, None, None)

    forward_op.register_autograd(op_backward, setup_context=setup_context)
    return NormOps(forward_op, backward_op)
