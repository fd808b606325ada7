"""The autograd Functions: one place that decides what is saved for backward.

Forward saves only ``(x, weight, mean, rstd)`` -- the input and the per-group
statistics -- and backward is the analytic one of the backend (no autograd tape
through a chain of elementwise ops).

Double backward: when backward itself runs with grad enabled
(``create_graph=True``), the batch statistics are rebuilt from x with
differentiable ops and the same analytic backward is evaluated on them, so
autograd differentiates the backward exactly. Plain backward reuses the saved
statistics.

There is one Function per family (so ``y.grad_fn`` names the method), all
sharing the body of :class:`NormFunction`. Under ``torch.func`` transforms each family
has a twin with torch's contract for them (:class:`TransformNormFunction`: same saved
tensors and backward, plus a forward-mode tangent).
"""

from __future__ import annotations

import functools

import torch

from ..backends import reference, select_backend
from .spec import NormSpec
from .stats import RunningStats, batch_stats, compute_dtype, fold_running_stats

__all__ = ["NormFunction", "TransformNormFunction", "normalize"]


class NormFunction(torch.autograd.Function):
    """``(x, weight, bias) -> (y, mean, var)`` for any :class:`NormSpec`.

    ``mean`` and ``var`` are the (non-differentiable) statistics used; ``mean`` is None
    for RMSNorm. ``running`` (eager calls): running statistics the backend updates in
    its forward (see :func:`normalize`). Given a ``stats_out`` list (eager calls), the
    Function returns y alone and appends ``(mean, var)`` to the list instead.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, spec: NormSpec, eps: float, fixed_mean, fixed_var, running=None,
                stats_out=None):
        backend = select_backend(x, spec)
        y, mean, var, rstd = backend.forward(x, weight, bias, spec, eps, fixed_mean, fixed_var, running)
        # one attribute (each one set or read costs on every small-input step)
        ctx.norm = (spec, eps, backend, fixed_var is None, bias.dtype if bias is not None else None)
        ctx.save_for_backward(x, weight, mean, rstd)
        if stats_out is not None:
            # eager calls: y is the only output and the statistics leave through this
            # list (each extra Function output costs ~3 us per step on a small input)
            stats_out += (mean, var)
            return y
        if mean is None:
            # torch.compile cannot trace a Function output that is None: return an
            # empty tensor instead; normalize() maps it back to None.
            mean = var.new_empty(0)
        ctx.mark_non_differentiable(mean, var)
        # mean/var never get a gradient: don't let autograd build zero tensors for them
        # on every backward (measured: 14 us of a 130 us small-input step)
        ctx.set_materialize_grads(False)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, *_stat_grads):
        if dy is None:  # y was not used (grads are not materialized, see forward)
            return None, None, None, None, None, None, None, None, None
        return (*_gradients(ctx, dy), None, None, None, None, None, None)


def _gradients(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dweight, dbias)`` of a norm Function's backward from what its forward
    saved: ``(x, weight, mean, rstd)`` and ``ctx.norm``."""
    x, weight, mean, rstd = ctx.saved_tensors
    spec, eps, backend, batch_statistics, bias_dtype = ctx.norm
    if torch.is_grad_enabled():
        # create_graph=True: the reference backward is differentiable; with batch
        # statistics, rebuild them as functions of x so the second derivative
        # sees how they depend on x.
        backend = reference
        if batch_statistics:
            mean, var = batch_stats(x.to(compute_dtype(x.dtype)).reshape(spec.group_shape), spec)
            rstd = torch.rsqrt(var + eps)
    dx, dweight, dbias = backend.backward(dy, x, weight, mean, rstd, spec, batch_statistics,
                                          ctx.needs_input_grad[:3])
    if dweight is not None and dweight.dtype != weight.dtype:
        dweight = dweight.to(weight.dtype)
    if dbias is not None and dbias.dtype != bias_dtype:
        dbias = dbias.to(bias_dtype)
    return dx, dweight, dbias


class TransformNormFunction(torch.autograd.Function):
    """:class:`NormFunction` under ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``,
    ``functional_call`` + ``grad``, ...), which require torch's newer Function contract:
    a forward without ctx, :meth:`setup_context`, and a vmap rule -- generated, as the
    forward and backward run the reference backend's torch ops (a transform's wrapped
    tensors have no memory a kernel could read).

    ``(x, weight, bias, spec, eps, fixed_mean, fixed_var, running) -> (y, mean, var,
    rstd)``; rstd is an output so that setup_context can save it, mean an empty tensor
    for RMSNorm. ``running`` is updated inside the forward, below the transform, with
    the plain statistics (as torch.nn's batch_norm updates its buffers inside its op).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, spec: NormSpec, eps: float, fixed_mean, fixed_var, running=None):
        y, mean, var, rstd = reference.forward(x, weight, bias, spec, eps, fixed_mean, fixed_var, running)
        if mean is None:
            mean = var.new_empty(0)
        elif mean is fixed_mean:  # an input returned as an output may not be saved: a view may
            mean = mean.view_as(mean)
        return y, mean, var, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, spec, eps, _, fixed_var, _ = inputs
        _, mean, var, rstd = output
        ctx.norm = (spec, eps, reference, fixed_var is None, bias.dtype if bias is not None else None)
        saved = (x, weight, mean if spec.center else None, rstd)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.mark_non_differentiable(mean, var, rstd)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dy, *_stat_grads):
        if dy is None:
            return None, None, None, None, None, None, None, None
        return (*_gradients(ctx, dy), None, None, None, None, None)

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, *_):
        """Forward mode (``torch.func.jvp``, ``jacfwd``, ``hessian``): y's tangent
        (:func:`normlab.backends.reference.forward_tangent`); the statistics get none."""
        x, weight, mean, rstd = ctx.saved_tensors
        spec, _, _, batch_statistics, _ = ctx.norm
        return reference.forward_tangent(x_t, weight_t, bias_t, x, weight, mean, rstd, spec,
                                         batch_statistics), None, None, None


class BatchNormFunction(NormFunction):
    pass


class InstanceNormFunction(NormFunction):
    pass


class GroupNormFunction(NormFunction):
    pass


class LayerNormFunction(NormFunction):
    pass


class RMSNormFunction(NormFunction):
    pass


_FUNCTIONS: dict[str, type[NormFunction]] = {
    "batch_norm": BatchNormFunction,
    "instance_norm": InstanceNormFunction,
    "group_norm": GroupNormFunction,
    "layer_norm": LayerNormFunction,
    "rms_norm": RMSNormFunction,
}


def register_function(family: str, function: type[NormFunction]) -> None:
    """Give a new family (see ``normlab.nn`` extensions) its own named Function."""
    _FUNCTIONS[family] = function


def normalize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    spec: NormSpec,
    eps: float,
    fixed_mean: torch.Tensor | None = None,
    fixed_var: torch.Tensor | None = None,
    running: RunningStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Apply the normalization ``spec`` describes; returns ``(y, mean, var)``.

    ``fixed_mean``/``fixed_var``: statistics to normalize with instead of the batch's,
    broadcastable to x's group view -- or, for a spec whose affine is on dim 1, one value
    per channel as a (C,) tensor (see :meth:`NormSpec.channel_view`). Returned as the
    backend used them. ``running``: ``(running_mean, running_var, momentum)`` to update
    in place from this call's batch statistics (SPEC §2), once they are computed: inside
    the backend's forward in eager calls (the CPU kernels fuse it), after the op when
    traced. Inputs are assumed validated (see ``normlab.functional``).

    Under ``torch.autocast``, a family that torch's autocast runs in float32 on x's
    device (LayerNorm, GroupNorm, RMSNorm on CUDA) gets x, weight and bias in float32,
    as torch.nn's op does, and returns float32; the others run in x's dtype.
    """
    if _autocasts_to_float32(x, spec.family):
        x, weight, bias = _float32(x), _float32(weight), _float32(bias)
    function = _FUNCTIONS.get(spec.family, NormFunction)
    traced = torch.compiler.is_compiling()
    graph = not traced and _needs_graph(x, weight, bias)
    # inference: nothing to differentiate, so the backend is called without the autograd
    # Function's own cost (~8 us of a ~35 us call on a small input)
    backend = None if traced or graph else select_backend(x, spec)
    if fixed_var is not None and not getattr(backend, "takes_channel_stats", False):
        # broadcastable for the Functions (they save them for every backend's backward) and
        # for backends that do not read (C,) statistics as they are (the CPU kernels do:
        # that spares two views, ~2.3 us of a small eval-mode BatchNorm's ~16)
        fixed_mean, fixed_var = spec.channel_view(fixed_mean), spec.channel_view(fixed_var)
    if traced:  # the compiler sees the Function as one op
        y, mean, var = function.apply(x, weight, bias, spec, eps, fixed_mean, fixed_var)
        fold_running_stats(running, mean, var, spec.count)
    elif graph and torch._C._are_functorch_transforms_active():  # vmap, grad, ...: their own Function
        y, mean, var, _ = _transform_function(function).apply(x, weight, bias, spec, eps, fixed_mean, fixed_var,
                                                              running)
    elif graph:
        stats: list[torch.Tensor | None] = []
        y = _eager_apply(function)(
            _live(x), weight if weight is None else _live(weight), bias if bias is None else _live(bias),
            spec, eps, fixed_mean if fixed_mean is None else _live(fixed_mean),
            fixed_var if fixed_var is None else _live(fixed_var), running, stats)
        mean, var = stats
    else:
        y, mean, var, _ = backend.forward(x, weight, bias, spec, eps, fixed_mean, fixed_var, running)
    return y, (mean if spec.center else None), var


#: The aten op a family stands for, whose autocast rule it follows (LayerNorm2d is a
#: layer_norm over the channel dim, as timm's calls it).
_TORCH_OPS = {"batch_norm": "aten::batch_norm", "instance_norm": "aten::instance_norm",
              "group_norm": "aten::group_norm", "layer_norm": "aten::layer_norm",
              "layer_norm_2d": "aten::layer_norm", "rms_norm": "aten::rms_norm"}
#: device type -> the families torch's autocast runs in float32 there (read at import for
#: the device types of ``_AUTOCAST_KEYS``, empty for others on first use)
_AUTOCAST_FLOAT32: dict[str, frozenset[str]] = {}
_LOWER_PRECISION = (torch.float16, torch.bfloat16)


#: the dispatch keys of the autocast rules read below (other device types: no cast; on
#: MPS torch 2.13 also autocasts batch_norm, which normlab does not follow)
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA", "xpu": "AutocastXPU"}


def autocast_float32_families(device_type: str) -> frozenset[str]:
    """The families whose torch op has an autocast kernel for ``device_type`` in this
    torch (read from the dispatcher; on CPU, CUDA and XPU torch's autocast kernels of
    these ops run them in float32). torch 2.13: layer_norm, group_norm and rms_norm on
    CUDA and XPU, none on CPU; empty for device types outside ``_AUTOCAST_KEYS``."""
    families = _AUTOCAST_FLOAT32.get(device_type)
    if families is None:
        key = _AUTOCAST_KEYS.get(device_type)
        families = frozenset() if key is None else frozenset(
            family for family, op in _TORCH_OPS.items() if _has_kernel(op, key))
        _AUTOCAST_FLOAT32[device_type] = families
    return families


def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    except RuntimeError:  # an op this torch does not have (aten::rms_norm before 2.4)
        return False


# read now, for every device type that has a rule, rather than on a first call that
# torch.compile might be tracing (the dispatcher query cannot be traced)
for _device_type in _AUTOCAST_KEYS:
    autocast_float32_families(_device_type)


def _autocasts_to_float32(x: torch.Tensor, family: str) -> bool:
    device_type = "cpu" if x.is_cpu else x.device.type
    return family in autocast_float32_families(device_type) and torch.is_autocast_enabled(device_type)


def _float32(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` in float32 if it is float16/bfloat16 (autocast leaves float64 as it is)."""
    return t.float() if t is not None and t.dtype in _LOWER_PRECISION else t


#: functorch's unwrapping of a tensor left over from a finished transform (what torch's
#: ``Function.apply`` does to every argument before the C++ apply).
_live = torch._C._functorch.unwrap_if_dead

#: The C++ ``apply`` under torch's Python ``Function.apply``, if this torch has it there.
_C_APPLY = torch._C._FunctionBase.__dict__.get("apply")


@functools.cache
def _eager_apply(function: type[torch.autograd.Function]):
    """``function.apply`` for eager calls outside functorch transforms.

    torch's ``Function.apply`` is a Python wrapper around the C++ apply: it binds
    arguments for a ``setup_context`` (these Functions have none), routes calls under
    functorch transforms elsewhere (the caller checks that) and unwraps dead functorch
    wrappers (the caller does that with :data:`_live`). Calling the C++ apply directly
    saves ~2.4 us of a ~75 us small-input training step. Falls back to ``function.apply``
    where the Function defines its own ``setup_context`` or ``apply`` (e.g. one given to
    :func:`register_function`), or torch has no such C++ method."""
    own_setup = function.setup_context is not torch.autograd.function._SingleLevelFunction.setup_context
    own_apply = function.apply.__func__ is not torch.autograd.Function.apply.__func__
    if _C_APPLY is None or own_setup or own_apply:
        return function.apply
    return _C_APPLY.__get__(None, function)


@functools.cache
def _transform_function(function: type[NormFunction]) -> type[TransformNormFunction]:
    """The :class:`TransformNormFunction` of ``function``'s family, named after it."""
    return type(f"{function.__name__}ForTransforms", (TransformNormFunction,), {"__module__": __name__})


def _needs_graph(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether an eager call must go through the autograd Function: grad mode is on and
    an input requires grad."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or (weight is not None and weight.requires_grad) or \
        (bias is not None and bias.requires_grad)
