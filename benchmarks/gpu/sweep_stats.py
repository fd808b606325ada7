"""Sweep the statistics-pass launch choices of the per-channel kernels on a GPU:
``_channels.STATS_LAUNCH`` (per-lane Welford or per-tile two-pass, warps) and
``TUNING.tile``, timing the kernels alone (CUDA-graph replay) on BatchNorm and
channels_last GroupNorm forward and forward+backward.

    PYTHONPATH=src python3 benchmarks/gpu/sweep_stats.py
"""

from __future__ import annotations

import itertools
import statistics

import torch

from normlab.backends.gpu import _channels, _ops
from normlab.backends.gpu._common import TUNING
from normlab.backends.gpu.bench import _graphed, _time_calls
from normlab.core.spec import batch_norm_spec, group_norm_spec

CASES = [("bn", (32, 64, 56, 56), False), ("bn", (32, 64, 56, 56), True), ("bn", (128, 256, 56, 56), False),
         ("bn", (128, 256, 56, 56), True), ("gn", (32, 64, 56, 56), True), ("gn", (128, 256, 56, 56), True)]


def kernel_ms(fn, calls=20, repeats=7):
    replay = _graphed(fn, calls)
    return statistics.median(_time_calls(replay, 1, True) / calls for _ in range(repeats))


def sweep_case(norm, shape, cl):
    dev = torch.device("cuda")
    x = torch.randn(shape, device=dev)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    dy = torch.randn_like(x)
    spec = batch_norm_spec(shape) if norm == "bn" else group_norm_spec(shape, 32)
    w, b = torch.randn(shape[1], device=dev), torch.randn(shape[1], device=dev)
    dst = torch.empty_like(x)
    copy = kernel_ms(lambda: dst.copy_(x))
    print(f"{norm} {shape} {'CL' if cl else 'NCHW'}: copy {copy * 1e3:.1f} us", flush=True)

    def fwd():
        return _ops.forward(x, w, b, spec, 1e-5)

    def both():
        _, m, _, r = fwd()
        return _ops.backward(dy, x, w, m, r, spec, True)

    for per_lane, warps, tile in itertools.product((True, False), (4, 8, 16), (2048, 4096, 8192)):
        _channels.STATS_LAUNCH = {True: (per_lane, warps), False: (per_lane, warps)}
        TUNING.tile = tile
        f, fb = kernel_ms(fwd), kernel_ms(both)
        print(f"  per_lane={per_lane!s:5} warps={warps:2} tile={tile:5}: fwd {f * 1e3:7.1f} us "
              f"({100 * copy / f:4.0f}% of copy)  fwd+bwd {fb * 1e3:7.1f} us ({250 * copy / fb:4.0f}%)",
              flush=True)


def main():
    for case in CASES:
        sweep_case(*case)


if __name__ == "__main__":
    main()
