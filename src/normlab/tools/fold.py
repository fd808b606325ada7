"""Fold eval-mode BatchNorm into the preceding convolution or linear layer.

For a BatchNorm after ``z = W x + b`` (one output channel o per BN channel), eval mode
computes ``y = (z - running_mean) * s + beta`` with ``s = gamma / sqrt(running_var + eps)``,
which is the layer ``W' = s * W`` (row o scaled by s_o), ``b' = s * (b - running_mean) + beta``.
The arithmetic is done in float64 and cast back, so the folded model matches the
original to float32 rounding (about 1e-6 relative).

Which pairs fold: a Conv1d/2d/3d or Linear (exactly those classes: a subclass such
as WSConv2d may transform its weight in forward) whose output feeds only the BatchNorm,
each called once. They are found by tracing the model with ``torch.fx`` (norm
layers kept as leaves); a model that cannot be traced (data-dependent control flow)
falls back to pairs adjacent in an ``nn.Sequential``, whose order is the call order.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn

from ..nn.frozen import _FrozenBatchNorm
from ._walk import ALL_NORMS, KINDS, has_running_stats

__all__ = ["fold_bn", "foldable_pairs"]

_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _is_plain_linear(module: nn.Module) -> bool:
    # exact types: a subclass may transform its weight in forward (WSConv2d standardizes
    # it, which would undo the folded scale), so scaling its stored weight is not folding
    return type(module) in _LINEAR


def _is_foldable_bn(module: nn.Module) -> bool:
    return isinstance(module, (*KINDS["bn"], _FrozenBatchNorm)) and has_running_stats(module)


class _NormLeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*ALL_NORMS, *_LINEAR)) or super().is_leaf_module(m, qualname)


def _pairs_by_tracing(model: nn.Module) -> list[tuple[str, str]]:
    graph = _NormLeafTracer().trace(model)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_foldable_bn(modules[node.target]):
            continue
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        prev = node.args[0]
        if (prev.op == "call_module" and _is_plain_linear(modules[prev.target])
                and len(prev.users) == 1 and calls[prev.target] == 1 and calls[node.target] == 1):
            pairs.append((prev.target, node.target))
    return pairs


def _pairs_in_sequentials(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for a, b in zip(names, names[1:], strict=False):
                if _is_plain_linear(module._modules[a]) and _is_foldable_bn(module._modules[b]):
                    pre = f"{prefix}." if prefix else ""
                    pairs.append((pre + a, pre + b))
    return pairs


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Qualified names ``(layer, batchnorm)`` that :func:`fold_bn` would fold."""
    try:
        return _pairs_by_tracing(model)
    except Exception:  # noqa: BLE001 -- any tracing failure means: use the safe fallback
        return _pairs_in_sequentials(model)


def _channels_match(layer: nn.Module, bn: nn.Module) -> bool:
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return out == bn.num_features


@torch.no_grad()
def _fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    w = layer.weight
    rm, rv = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if getattr(bn, "weight", None) is not None else torch.ones_like(rm)
    beta = bn.bias.double() if getattr(bn, "bias", None) is not None else torch.zeros_like(rm)
    scale = gamma / torch.sqrt(rv + bn.eps)
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(rm)
    new_w = w.double() * scale.view((-1,) + (1,) * (w.dim() - 1))
    new_b = (b - rm) * scale + beta
    layer.weight.copy_(new_w.to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b.to(device=w.device, dtype=w.dtype))
    else:
        layer.bias.copy_(new_b.to(layer.bias.dtype))


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fold_bn(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every eval-mode BatchNorm (torch.nn or normlab, incl. FrozenBatchNorm) into
    the Conv/Linear before it (see :mod:`normlab.tools.fold`); each folded BatchNorm
    becomes ``nn.Identity``. BatchNorms without running statistics, or not directly
    after a single-use Conv/Linear, are left as they are.

    Raises ValueError if the model or any BatchNorm in it is in training mode (folding
    uses the running statistics, which training mode does not). Returns a folded copy
    (``inplace=True``: folds ``model`` itself). Outputs equal the original's to
    float32 rounding. Example::

        >>> deployed = fold_bn(model.eval())
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_bn: expected an nn.Module, got {type(model).__name__}")
    training = [name or "model" for name, m in model.named_modules()
                if m.training and (m is model or _is_foldable_bn(m))]
    if training:
        raise ValueError(f"fold_bn: expected a model in eval mode (call model.eval() first); "
                         f"in training mode: {', '.join(training[:5])}")
    model = model if inplace else copy.deepcopy(model)
    for layer_name, bn_name in foldable_pairs(model):
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        if not _channels_match(layer, bn):
            continue
        _fold_pair(layer, bn)
        _set_module(model, bn_name, nn.Identity())
    return model
