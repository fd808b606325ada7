"""Compute backends.

A backend is a module with ``forward`` and ``backward`` of the same signatures as
:mod:`normlab.backends.reference` (torch ops, analytic backward), which is the
definition every other backend must agree with and the fallback for whatever they
don't cover. :func:`select_backend` picks one per call; faster backends register
themselves with :func:`register_backend` and decline inputs they don't handle.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from ..core.spec import NormSpec
from . import reference
from ._env import getenv

__all__ = ["reference", "register_backend", "select_backend"]

# (name, predicate, backend), tried in order; the first whose predicate accepts wins
# (a predicate returns a false value, True, or a specialized backend: see register_backend).
_BACKENDS: list[tuple[str, Callable[[torch.Tensor, NormSpec], object], ModuleType]] = []


def register_backend(name: str, accepts: Callable[[torch.Tensor, NormSpec], object],
                     backend: ModuleType) -> None:
    """Put ``backend`` before the reference for inputs where ``accepts(x, spec)``.

    ``accepts`` returns a false value (declined), True (``backend`` computes it), or an
    object with ``backend``'s ``forward`` and ``backward`` already specialized to that
    input's configuration, which is then used in its place (the CPU backend does this:
    its predicate finds the per-configuration kernel call anyway, and the call need not
    be looked up again)."""
    _BACKENDS[:] = [entry for entry in _BACKENDS if entry[0] != name]
    _BACKENDS.append((name, accepts, backend))


def select_backend(x: torch.Tensor, spec: NormSpec) -> ModuleType | object:
    """The backend that computes ``spec`` on ``x``: the first registered one that accepts
    it (or what its predicate returned, see :func:`register_backend`), else the
    reference. ``NORMLAB_BACKEND=reference`` (or a registered name) limits the choice to
    that backend, e.g. to compare them or to rule one out while debugging."""
    forced = getenv("NORMLAB_BACKEND")
    for name, accepts, backend in _BACKENDS:
        if forced and name != forced:
            continue
        accepted = accepts(x, spec)
        if accepted:
            return backend if accepted is True else accepted
    return reference
