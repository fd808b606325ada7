"""Find BatchNorm trouble before it bites: :func:`inspect_bn` and ``normlab doctor``.

Per layer with running statistics (BatchNorm and its variants, FrozenBatchNorm,
SwitchableNorm, tracked InstanceNorm; torch.nn or normlab) it reports:

* non-finite values (NaN/Inf) in the running statistics or the affine;
* near-zero running variance (``running_var < eps``: the channel is scaled by up to
  ``1/sqrt(eps)`` in eval, amplifying noise) and zero ``weight`` (a channel switched off);
* running statistics still at initialization (mean 0, var 1, no batches tracked);
* with data: the train/eval gap -- per channel, how far the data's mean is from the
  running mean in running-std units, ``|mu_data - running_mean| / sqrt(running_var + eps)``,
  and the variance ratio ``max(v, r) / min(v, r)`` of ``v = var_data + eps`` and
  ``r = running_var + eps``; channels whose input is constant over the data (dead);
  non-finite activations reaching the layer.

Data statistics are gathered by hooks on the layers' inputs while the model runs in
eval mode under ``torch.no_grad()``; the model's modes and buffers are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..nn.frozen import _FrozenBatchNorm
from ._walk import has_running_stats
from .calibrate import _limited, default_forward

__all__ = ["inspect_bn", "BNReport", "LayerReport"]


@dataclass
class LayerReport:
    """Findings for one layer; ``problems`` lists human-readable issues."""

    name: str
    kind: str
    channels: int
    nonfinite_buffers: int = 0
    near_zero_var: int = 0
    zero_weight: int = 0
    untouched: bool = False
    mean_shift: float | None = None
    var_ratio: float | None = None
    dead_channels: int | None = None
    nonfinite_inputs: int | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class BNReport:
    """Per-layer table from :func:`inspect_bn`; ``str(report)`` renders it."""

    layers: list[LayerReport]
    num_batches: int
    num_samples: int
    mean_shift_limit: float
    var_ratio_limit: float

    @property
    def problems(self) -> list[tuple[str, str]]:
        """All ``(layer, problem)`` pairs."""
        return [(layer.name, p) for layer in self.layers for p in layer.problems]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"num_batches": self.num_batches, "num_samples": self.num_samples,
                "layers": [vars(layer) for layer in self.layers]}

    def __str__(self) -> str:
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.3g}"

        header = ("layer", "kind", "C", "nonfinite", "var<eps", "w=0", "mean shift", "var ratio",
                  "dead", "status")
        rows = [header]
        for r in self.layers:
            rows.append((r.name, r.kind, str(r.channels), str(r.nonfinite_buffers), str(r.near_zero_var),
                         str(r.zero_weight), fmt(r.mean_shift), fmt(r.var_ratio),
                         "-" if r.dead_channels is None else str(r.dead_channels),
                         "ok" if not r.problems else "PROBLEM"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                 for row in rows]
        data = (f"{self.num_batches} batches, {self.num_samples} samples" if self.num_batches
                else "buffers only (no data)")
        lines.insert(0, f"BatchNorm inspection: {len(self.layers)} layers, {data}")
        if self.problems:
            lines.append("")
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  {name}: {p}" for name, p in self.problems]
        else:
            lines.append("no problems found")
        return "\n".join(lines)


class _Moments:
    """Per-channel count, mean and M2 merged batch by batch (Chan et al.), in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.nonfinite = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        c = x.shape[1]
        flat = x.transpose(0, 1).reshape(c, -1)
        finite = torch.isfinite(flat)
        self.nonfinite += int((~finite).sum())
        flat = torch.where(finite, flat, torch.zeros_like(flat))
        n_b = flat.shape[1]
        if n_b == 0:
            return
        mean_b = flat.mean(1)
        m2_b = ((flat - mean_b[:, None]) ** 2).sum(1)
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.n * n_b / n)
        self.n = n

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.n


def _inspected_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name or "model", m) for name, m in model.named_modules() if has_running_stats(m)]


def _buffer_findings(name: str, m: nn.Module) -> LayerReport:
    rm, rv = m.running_mean.detach().double(), m.running_var.detach().double()
    weight = getattr(m, "weight", None)
    bias = getattr(m, "bias", None)
    report = LayerReport(name, type(m).__name__, rm.numel())
    tensors = [rm, rv] + [t.detach().double() for t in (weight, bias) if isinstance(t, torch.Tensor)]
    report.nonfinite_buffers = int(sum((~torch.isfinite(t)).sum() for t in tensors))
    if report.nonfinite_buffers:
        report.problems.append(f"{report.nonfinite_buffers} non-finite value(s) in running statistics "
                               "or affine")
    report.near_zero_var = int((rv < m.eps).sum())
    if report.near_zero_var:
        report.problems.append(f"{report.near_zero_var} channel(s) with running_var < eps={m.eps:g}")
    if isinstance(weight, torch.Tensor):
        report.zero_weight = int((weight.detach() == 0).sum())
        if report.zero_weight:
            report.problems.append(f"{report.zero_weight} channel(s) with weight exactly 0")
    nbt = getattr(m, "num_batches_tracked", None)
    if (isinstance(nbt, torch.Tensor) and int(nbt) == 0 and not isinstance(m, _FrozenBatchNorm)
            and torch.all(rm == 0) and torch.all(rv == 1)):
        report.untouched = True
        report.problems.append("running statistics never updated (still mean 0, var 1)")
    return report


@torch.no_grad()
def inspect_bn(model: nn.Module, loader: Iterable | None = None, num_batches: int | None = 8, *,
               forward: Callable[[nn.Module, Any], Any] | None = None, mean_shift_limit: float = 0.5,
               var_ratio_limit: float = 2.0) -> BNReport:
    """Per-layer diagnosis of running statistics (see :mod:`normlab.tools.diagnose`).

    Args:
        model: any module; every layer with ``running_mean``/``running_var`` is inspected.
        loader: optional iterable of batches (tensor, ``(x, y)``, or dict); without it
            only the buffers are checked.
        num_batches: batches to use (None: all). Default 8.
        forward: ``forward(model, batch)``; default feeds the input tensor.
        mean_shift_limit: flag a layer whose largest per-channel mean shift (in running
            std units) exceeds this. Default 0.5.
        var_ratio_limit: flag a layer whose largest per-channel variance ratio exceeds
            this. Default 2.

    Returns a :class:`BNReport`; the model's modes and buffers are unchanged. Example::

        >>> report = inspect_bn(model, val_loader)
        >>> print(report); report.ok
    """
    layers = _inspected_layers(model)
    reports = {name: _buffer_findings(name, m) for name, m in layers}
    batches = samples = 0
    if loader is not None:
        moments = {name: _Moments() for name, _ in layers}
        handles = []
        for name, m in layers:
            def hook(module, args, _name=name):
                if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
                    moments[_name].add(args[0])
            handles.append(m.register_forward_pre_hook(hook))
        modes = {m: m.training for m in model.modules()}
        forward = forward or default_forward
        try:
            model.eval()
            for batch in _limited(loader, num_batches):
                first = batch[0] if isinstance(batch, (tuple, list)) else batch
                samples += int(first.shape[0]) if isinstance(first, torch.Tensor) else 0
                forward(model, batch)
                batches += 1
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode
        for name, m in layers:
            mom, r = moments[name], reports[name]
            if mom.mean is None:
                continue
            r.nonfinite_inputs = mom.nonfinite
            if mom.nonfinite:
                r.problems.append(f"{mom.nonfinite} non-finite input value(s) reach this layer")
            rm, rv = m.running_mean.double().cpu(), m.running_var.double().cpu()
            mean, var = mom.mean.cpu(), mom.var.cpu()
            shift = (mean - rm).abs() / torch.sqrt(rv.clamp_min(0) + m.eps)
            v, rr = var + m.eps, rv.clamp_min(0) + m.eps
            ratio = torch.maximum(v, rr) / torch.minimum(v, rr)
            r.mean_shift = float(shift.max()) if torch.isfinite(shift).all() else math.inf
            r.var_ratio = float(ratio.max()) if torch.isfinite(ratio).all() else math.inf
            r.dead_channels = int((var <= 1e-12 * (1 + mean.abs() ** 2)).sum())
            if r.mean_shift > mean_shift_limit or r.var_ratio > var_ratio_limit:
                worst = int(shift.argmax())
                r.problems.append(
                    f"train/eval gap: data mean is {r.mean_shift:.3g} running-std from running_mean "
                    f"(worst channel {worst}), variance ratio up to {r.var_ratio:.3g}; "
                    "consider recalibrate_bn on representative data")
            if r.dead_channels:
                r.problems.append(f"{r.dead_channels} dead channel(s): input constant over the data")
    return BNReport([reports[name] for name, _ in layers], batches, samples, mean_shift_limit,
                    var_ratio_limit)
