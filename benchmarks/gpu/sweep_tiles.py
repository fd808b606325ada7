"""Sweep the launch choices of the (rows x channels) tile kernels on a GPU --
``TUNING.channel_tile`` (elements a tile) and ``TUNING.tile_warps`` -- timing the kernels
alone (CUDA-graph replay) on BatchNorm and channels_last GroupNorm, forward and
forward+backward, float32 and bfloat16.

    PYTHONPATH=src python3 benchmarks/gpu/sweep_tiles.py
"""

from __future__ import annotations

import itertools
import statistics

import torch

from normlab.backends.gpu import _ops
from normlab.backends.gpu._common import TUNING
from normlab.backends.gpu.bench import _graphed, _time_calls
from normlab.core.spec import batch_norm_spec, group_norm_spec

CASES = [(norm, shape, cl, dtype) for dtype in (torch.float32, torch.bfloat16)
         for norm, shape, cl in [("bn", (32, 64, 56, 56), False), ("bn", (32, 64, 56, 56), True),
                                 ("bn", (128, 256, 56, 56), True), ("gn", (32, 64, 56, 56), True),
                                 ("gn", (128, 256, 56, 56), True)]]


def kernel_ms(fn, calls=20, repeats=7):
    replay = _graphed(fn, calls)
    return statistics.median(_time_calls(replay, 1, True) / calls for _ in range(repeats))


def sweep_case(norm, shape, cl, dtype):
    dev = torch.device("cuda")
    x = torch.randn(shape, device=dev).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    dy = torch.randn_like(x)
    spec = batch_norm_spec(shape) if norm == "bn" else group_norm_spec(shape, 32)
    w, b = torch.randn(shape[1], device=dev), torch.randn(shape[1], device=dev)
    dst = torch.empty_like(x)
    copy = kernel_ms(lambda: dst.copy_(x))
    print(f"{norm} {shape} {'CL' if cl else 'NCHW'} {dtype}: copy {copy * 1e3:.1f} us", flush=True)

    def fwd():
        return _ops.forward(x, w, b, spec, 1e-5)

    def both():
        _, m, _, r = fwd()
        return _ops.backward(dy, x, w, m, r, spec, True)

    for warps, tile in itertools.product((4, 8), (2048, 4096, 8192, 16384)):
        TUNING.tile_warps, TUNING.channel_tile = warps, tile
        f, fb = kernel_ms(fwd), kernel_ms(both)
        print(f"  warps={warps:2} tile={tile:5}: fwd {f * 1e3:7.1f} us "
              f"({100 * copy / f:4.0f}% of copy)  fwd+bwd {fb * 1e3:7.1f} us ({250 * copy / fb:4.0f}%)",
              flush=True)


def main():
    for case in CASES:
        sweep_case(*case)


if __name__ == "__main__":
    main()
