"""The Triton backend's own Python per call, measurable without a GPU: CPU tensors
routed to the backend (``NORMLAB_TRITON_ON_CPU``), every kernel launch replaced by a
no-op, so what is timed is the host-side work around the launches (checks, plans,
allocations, views) -- the part of an eager GPU call that is normlab's, not Triton's
(a launch adds 12-18 us on the H100 machine, whose CPU is ~3-4x slower than this
one's; see benchmarks/results/gpu-h100-eager-v2.txt).

    PYTHONPATH=src python3 benchmarks/gpu/host_overhead.py
"""

from __future__ import annotations

import os

os.environ.update(TRITON_INTERPRET="1", NORMLAB_TRITON_ON_CPU="1", NORMLAB_BACKEND="gpu-triton")

import timeit  # noqa: E402

import torch  # noqa: E402

import normlab.functional as NF  # noqa: E402
from normlab.backends import gpu  # noqa: E402
from normlab.backends.gpu import _channels, _common, _groups, _ops, _rows  # noqa: E402
from normlab.core.spec import batch_norm_spec, group_norm_spec, layer_norm_spec  # noqa: E402


class _NoLaunch:
    """Stands in for a kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    for module in (_rows, _channels, _groups, _common):
        for name in dir(module):
            if name.endswith("_kernel"):
                setattr(module, name, _NoLaunch())
    x, w, b = torch.randn(64, 768), torch.randn(768), torch.randn(768)
    xc, wc, bc = torch.randn(32, 64, 8, 8), torch.randn(64), torch.randn(64)
    ln, bn, gn = layer_norm_spec(x.shape, (768,)), batch_norm_spec(xc.shape), group_norm_spec(xc.shape, 8)
    _, m, _, r = _ops.forward(x, w, b, ln, 1e-5)
    _, mc, _, rc = _ops.forward(xc, wc, bc, bn, 1e-5)
    _, mg, _, rg = _ops.forward(xc, wc, bc, gn, 1e-5)
    calls = {
        "gpu.accepts, LayerNorm": lambda: gpu.accepts(x, ln),
        "_ops.forward, LayerNorm": lambda: _ops.forward(x, w, b, ln, 1e-5),
        "_ops.backward, LayerNorm": lambda: _ops.backward(x, x, w, m, r, ln, True),
        "NF.layer_norm (no grad)": lambda: NF.layer_norm(x, (768,), w, b),
        "gpu.accepts, BatchNorm": lambda: gpu.accepts(xc, bn),
        "_ops.forward, BatchNorm": lambda: _ops.forward(xc, wc, bc, bn, 1e-5),
        "_ops.backward, BatchNorm": lambda: _ops.backward(xc, xc, wc, mc, rc, bn, True),
        "NF.batch_norm (no grad)": lambda: NF.batch_norm(xc, None, None, wc, bc, True),
        "_ops.forward, GroupNorm": lambda: _ops.forward(xc, wc, bc, gn, 1e-5),
        "_ops.backward, GroupNorm": lambda: _ops.backward(xc, xc, wc, mg, rg, gn, True),
        "torch.empty(10), for scale": lambda: torch.empty(10),
    }
    with torch.no_grad():
        for label, fn in calls.items():
            n = 20000
            us = min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6
            print(f"{label:30s} {us:7.2f} us")


if __name__ == "__main__":
    main()
