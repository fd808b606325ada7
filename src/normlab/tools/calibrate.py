"""Re-estimate BatchNorm running statistics on data (precise BN / AdaBN).

Running statistics drift from the statistics of the final weights (they are an
exponential average over a moving model), and they do not match a new test domain.
:func:`recalibrate_bn` recomputes them: every layer with running statistics is reset
and fed ``num_batches`` batches, with momentum ``1 / k`` on the k-th batch, so each
running statistic ends as the plain average of the per-batch statistics (the
"precise BN" of Wu & Johnson 2021; on target-domain data this is AdaBN, Li et al. 2016).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..nn.frozen import _FrozenBatchNorm
from ._walk import has_running_stats

__all__ = ["recalibrate_bn", "default_forward"]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Feed a batch to the model: a tensor, the first item of a tuple/list (``(x, y)``),
    or ``batch["x"]`` / ``batch["input"]`` of a dict; moved to the model's device."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    elif isinstance(batch, dict):
        key = next((k for k in ("x", "input", "inputs", "image", "images") if k in batch), None)
        if key is None:
            raise ValueError(f"cannot find the input in a batch dict with keys {sorted(batch)}; "
                             "pass forward=")
        batch = batch[key]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"expected a batch tensor, got {type(batch).__name__}; pass forward=")
    param = next(model.parameters(), None)
    if param is not None:
        batch = batch.to(param.device)
    return model(batch)


def _progress(iterable: Iterable, total: int | None, enabled: bool, description: str) -> Iterator:
    """Wrap ``iterable`` in a rich (or tqdm) progress bar when available and enabled."""
    if enabled:
        try:
            from rich.progress import track
        except ImportError:
            try:
                from tqdm import tqdm
            except ImportError:
                yield from iterable
                return
            yield from tqdm(iterable, total=total, desc=description, leave=False)
            return
        yield from track(iterable, total=total, description=description, transient=True)
        return
    yield from iterable


def _limited(loader: Iterable, num_batches: int | None) -> Iterator:
    for i, batch in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            return
        yield batch


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, num_batches: int | None = None, *,
                   progress: bool = True, forward: Callable[[nn.Module, Any], Any] | None = None
                   ) -> nn.Module:
    """Recompute the running statistics of every layer that has them (BatchNorm and
    its variants, InstanceNorm with ``track_running_stats``, SwitchableNorm; torch.nn
    or normlab) from ``num_batches`` batches of ``loader`` (all of it if None).

    In place, by nature: returns ``model`` itself. Only the running statistics change:
    every module's training mode, each layer's ``momentum`` and ``num_batches_tracked``
    are restored afterwards. Other layers run in eval mode meanwhile (dropout off).
    FrozenBatchNorm layers are skipped. If anything fails midway, the old statistics
    are put back. ``progress`` shows a bar (rich, else tqdm, if installed).
    ``forward(model, batch)`` customizes how a batch is fed (default
    :func:`default_forward`). Example::

        >>> recalibrate_bn(model, target_domain_loader, num_batches=50)
    """
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches <= 0):
        raise ValueError(f"recalibrate_bn: expected num_batches to be a positive int or None, "
                         f"got {num_batches!r}")
    forward = forward or default_forward
    layers = [m for m in model.modules()
              if has_running_stats(m) and hasattr(m, "momentum") and not isinstance(m, _FrozenBatchNorm)]
    modes = {m: m.training for m in model.modules()}
    saved = [(m, m.momentum, m.running_mean.clone(), m.running_var.clone(),
              getattr(m, "num_batches_tracked", None)) for m in layers]
    saved = [(m, mom, rm, rv, nbt.clone() if isinstance(nbt, torch.Tensor) else None)
             for m, mom, rm, rv, nbt in saved]
    total = num_batches if num_batches is not None else (len(loader) if hasattr(loader, "__len__") else None)
    seen = 0
    try:
        model.eval()
        for m in layers:
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            m.train()
        for batch in _progress(_limited(loader, num_batches), total, progress, "recalibrating BN"):
            for m in layers:
                m.momentum = 1.0 / (seen + 1)  # running = mean of the batches seen so far
            forward(model, batch)
            seen += 1
        if seen == 0:
            raise ValueError("recalibrate_bn: the loader gave no batches")
    except BaseException:
        for m, _, rm, rv, _ in saved:
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
        raise
    finally:
        for m, momentum, _, _, nbt in saved:
            m.momentum = momentum
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)
        for m, mode in modes.items():
            m.training = mode
    return model
