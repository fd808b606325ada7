"""Benchmark cases (norm x shape x layout x dtype) and the providers that run them.

A provider turns a case into a module-like callable ``f(x) -> y`` with the same
parameters as every other provider of that case:

* ``torch``      -- the torch.nn module (the baseline of every speed-up);
* ``reference``  -- normlab's layer on the reference backend (torch ops, analytic backward);
* ``cpu-numba``  -- normlab's layer on the fused numba kernels (forced for every size);
* ``normlab``    -- normlab's layer with its automatic backend choice (what users get);
* ``naive``      -- the tutorial composite: ``(x - x.mean(S)) / sqrt(x.var(S) + eps) * w + b``
  in plain autograd ops.

Every provider allocates its outputs (module-level timing: what a user sees).
The copy floor is measured separately (:mod:`normlab.bench.timing`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Case", "DEFAULT_SUITE", "QUICK_SUITE", "NORMS", "PROVIDERS", "build", "provider_env",
           "parse_case"]

NORMS = ("bn", "in", "gn", "ln", "rms")
PROVIDERS = ("torch", "reference", "cpu-numba", "normlab", "naive")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One benchmark input: ``norm`` in NORMS, ``shape`` (N, C, *spatial) for bn/in/gn or
    (*, D) for ln/rms (normalized over the last dim), ``layout`` "contiguous" or
    "channels_last", ``dtype`` name, ``groups`` for gn."""

    norm: str
    shape: tuple[int, ...]
    layout: str = "contiguous"
    dtype: str = "float32"
    groups: int = 32

    @property
    def label(self) -> str:
        shape = "x".join(map(str, self.shape))
        layout = " CL" if self.layout == "channels_last" else ""
        groups = f" G={self.groups}" if self.norm == "gn" else ""
        return f"{self.norm}{groups} {shape}{layout} {self.dtype}"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=_DTYPES[self.dtype]).element_size()

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


_BIG = (32, 64, 56, 56)
_ROWS = (16384, 768)

#: The issue's cases (the ones torch.nn is far from the floor on), plus small shapes.
DEFAULT_SUITE: tuple[Case, ...] = (
    Case("bn", _BIG),
    Case("bn", _BIG, "channels_last"),
    Case("in", _BIG),
    Case("gn", _BIG, "channels_last"),
    Case("gn", _BIG),
    Case("ln", _ROWS),
    Case("rms", _ROWS),
    Case("bn", (8, 32, 40)),
    Case("ln", (8, 32, 40)),
    Case("gn", (8, 32, 40), groups=8),
    Case("rms", (8, 32, 40)),
)

#: Tiny cases for tests and smoke runs.
QUICK_SUITE: tuple[Case, ...] = (
    Case("bn", (4, 8, 6, 6)),
    Case("gn", (4, 8, 6, 6), "channels_last", groups=4),
    Case("ln", (16, 24)),
    Case("rms", (16, 24)),
    Case("in", (4, 8, 6, 6)),
)


def parse_case(text: str) -> Case:
    """``norm:shape[:layout[:dtype[:groups]]]``, e.g. ``gn:32x64x56x56:channels_last:float32:32``."""
    parts = text.split(":")
    if len(parts) < 2 or parts[0] not in NORMS:
        raise ValueError(f"expected a case like 'bn:32x64x56x56[:channels_last[:float32[:G]]]' "
                         f"with norm in {', '.join(NORMS)}, got {text!r}")
    try:
        shape = tuple(int(s) for s in parts[1].lower().split("x"))
    except ValueError:
        raise ValueError(f"expected a shape like 32x64x56x56 in case {text!r}, got {parts[1]!r}") from None
    layout = parts[2] if len(parts) > 2 and parts[2] else "contiguous"
    dtype = parts[3] if len(parts) > 3 and parts[3] else "float32"
    groups = int(parts[4]) if len(parts) > 4 else 32
    case = Case(parts[0], shape, layout, dtype, groups)
    _validate(case)
    return case


def _validate(case: Case) -> None:
    if case.layout not in ("contiguous", "channels_last"):
        raise ValueError(f"expected layout contiguous or channels_last, got {case.layout!r}")
    if case.dtype not in _DTYPES:
        raise ValueError(f"expected dtype in {', '.join(_DTYPES)}, got {case.dtype!r}")
    if case.layout == "channels_last" and len(case.shape) != 4:
        raise ValueError(f"channels_last needs a 4D shape, got {case.shape}")
    if case.norm in ("bn", "in", "gn") and len(case.shape) < (3 if case.norm == "in" else 2):
        raise ValueError(f"{case.norm} needs (N, C, *spatial), got {case.shape}")
    if case.norm == "gn" and case.shape[1] % case.groups:
        raise ValueError(f"gn: {case.shape[1]} channels not divisible by {case.groups} groups")


def make_input(case: Case, requires_grad: bool = False, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.shape, generator=gen).to(case.torch_dtype)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def _modules(case: Case) -> tuple[nn.Module, nn.Module]:
    """(torch.nn module, normlab module) of the case, same parameters."""
    import normlab as nl

    c = case.shape[1] if case.norm != "ln" and case.norm != "rms" else case.shape[-1]
    spatial = len(case.shape) - 2
    if case.norm == "bn":
        tcls = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[max(spatial, 1) - 1]
        ncls = (nl.BatchNorm1d, nl.BatchNorm2d, nl.BatchNorm3d)[max(spatial, 1) - 1]
        pair = tcls(c), ncls(c)
    elif case.norm == "in":
        tcls = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[spatial - 1]
        ncls = (nl.InstanceNorm1d, nl.InstanceNorm2d, nl.InstanceNorm3d)[spatial - 1]
        pair = tcls(c, affine=True), ncls(c, affine=True)
    elif case.norm == "gn":
        pair = nn.GroupNorm(case.groups, c), nl.GroupNorm(case.groups, c)
    elif case.norm == "ln":
        pair = nn.LayerNorm(c), nl.LayerNorm(c)
    else:
        pair = nn.RMSNorm(c, eps=1e-6), nl.RMSNorm(c, eps=1e-6)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p_t, p_n in zip(pair[0].parameters(), pair[1].parameters(), strict=True):
            p_t.copy_(torch.randn(p_t.shape, generator=gen))
            p_n.copy_(p_t)
    return pair[0].to(case.torch_dtype), pair[1].to(case.torch_dtype)


class Naive(nn.Module):
    """The tutorial composite: statistics with ``mean``/``var``, autograd through it."""

    def __init__(self, case: Case, like: nn.Module) -> None:
        super().__init__()
        self.case = case
        self.weight = nn.Parameter(like.weight.detach().clone())
        self.bias = nn.Parameter(like.bias.detach().clone()) if getattr(like, "bias", None) is not None \
            else None
        self.eps = 1e-6 if case.norm == "rms" else 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, d = self.case.norm, x.dim()
        if norm in ("ln", "rms"):
            dims, view = (-1,), (x.shape[-1],)
        else:
            view = (1, x.shape[1]) + (1,) * (d - 2)
        if norm == "bn":
            dims = (0, *range(2, d))
        elif norm == "in":
            dims = tuple(range(2, d))
        elif norm == "gn":
            n, c = x.shape[:2]
            xg = x.reshape(n, self.case.groups, -1)
            mean = xg.mean(-1, keepdim=True)
            var = xg.var(-1, keepdim=True, unbiased=False)
            xhat = ((xg - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
            return xhat * self.weight.view(view) + self.bias.view(view)
        if norm == "rms":
            return x / torch.sqrt(x.pow(2).mean(dims, keepdim=True) + self.eps) * self.weight
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight.view(view) + self.bias.view(view)


@contextlib.contextmanager
def provider_env(provider: str) -> Iterator[None]:
    """Force normlab's backend for the ``reference`` and ``cpu-numba`` providers."""
    forced = {"reference": "reference", "cpu-numba": "cpu-numba"}.get(provider)
    old = os.environ.get("NORMLAB_BACKEND")
    if forced is not None:
        os.environ["NORMLAB_BACKEND"] = forced
    elif old is not None and provider == "normlab":
        del os.environ["NORMLAB_BACKEND"]
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("NORMLAB_BACKEND", None)
        else:
            os.environ["NORMLAB_BACKEND"] = old


def build(case: Case, providers: tuple[str, ...]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """One callable per provider; all share the case's parameters."""
    torch_mod, nl_mod = _modules(case)
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for name in providers:
        if name == "torch":
            out[name] = torch_mod
        elif name == "naive":
            out[name] = Naive(case, torch_mod).to(case.torch_dtype)
        elif name == "normlab":
            # the automatic choice: called as bare as torch.nn's module (a wrapper costs
            # ~5 us per call, a tenth of a small layer's step); the run clears any
            # NORMLAB_BACKEND around it (see normlab.bench.run.run_case)
            out[name] = nl_mod
        elif name in ("reference", "cpu-numba"):
            out[name] = _with_env(nl_mod, name)
        else:
            raise ValueError(f"unknown provider {name!r}; expected one of {', '.join(PROVIDERS)}")
    return out


def _with_env(module: nn.Module, provider: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def call(x: torch.Tensor) -> torch.Tensor:
        with provider_env(provider):
            return module(x)

    call.module = module  # type: ignore[attr-defined]
    return call
