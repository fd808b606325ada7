"""Sweep the launch choices of the (rows x channels) tile kernels on a GPU --
``TUNING.channel_tile`` (elements a tile), ``TUNING.tile_warps`` and
``TUNING.resident_per_sm`` (programs per SM of BatchNorm's single cooperative launch; 0:
one launch per phase) -- timing the kernels alone (CUDA-graph replay) on BatchNorm and
channels_last GroupNorm, forward and forward+backward, float32 and bfloat16, next to
torch.nn's.

    PYTHONPATH=src python3 benchmarks/gpu/sweep_tiles.py [--only bn] [--dtypes fp32]
        [--warps 4,8] [--tiles 2048,4096,8192,16384] [--resident 2,4] [--set programs_per_sm=2,4]

``--set FIELD=V1,V2`` sweeps any other integer/boolean TUNING field as well.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from normlab.backends.gpu import _ops
from normlab.backends.gpu._common import TUNING
from normlab.backends.gpu.bench import _DTYPES, _graphed, _time_calls
from normlab.core.spec import batch_norm_spec, group_norm_spec

CASES = [(norm, shape, cl, dtype) for dtype in (torch.float32, torch.bfloat16)
         for norm, shape, cl in [("bn", (32, 64, 56, 56), False), ("bn", (32, 64, 56, 56), True),
                                 ("bn", (128, 256, 56, 56), True), ("gn", (32, 64, 56, 56), True),
                                 ("gn", (128, 256, 56, 56), True)]]


def kernel_ms(fn, calls=20, repeats=7):
    replay = _graphed(fn, calls)
    return statistics.median(_time_calls(replay, 1, True) / calls for _ in range(repeats))


def sweep_case(norm, shape, cl, dtype, choices):
    dev = torch.device("cuda")
    x = torch.randn(shape, device=dev).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    dy = torch.randn_like(x)
    spec = batch_norm_spec(shape) if norm == "bn" else group_norm_spec(shape, 32)
    w, b = torch.randn(shape[1], device=dev), torch.randn(shape[1], device=dev)
    dst = torch.empty_like(x)
    copy = kernel_ms(lambda: dst.copy_(x))
    xg, wg, bg = (t.detach().requires_grad_(True) for t in (x, w, b))
    if norm == "bn":
        torch_fn = lambda: torch.nn.functional.batch_norm(xg, None, None, wg, bg, True, 0.0, 1e-5)  # noqa: E731
    else:
        torch_fn = lambda: torch.nn.functional.group_norm(xg, 32, wg, bg, 1e-5)  # noqa: E731
    def torch_ms(fn):
        try:
            return kernel_ms(fn)
        except (RuntimeError, TypeError) as err:  # no graph capture (the bench helper returned None)
            print(f"  (torch.nn not timed: {err})")
            return float("nan")

    t_f = torch_ms(torch_fn)
    t_fb = torch_ms(lambda: torch.autograd.grad(torch_fn(), (xg, wg, bg), dy))
    print(f"{norm} {shape} {'CL' if cl else 'NCHW'} {dtype}: copy {copy * 1e3:.1f} us; torch.nn fwd "
          f"{t_f * 1e3:.1f} us ({100 * copy / t_f:.0f}%), fwd+bwd {t_fb * 1e3:.1f} us ({250 * copy / t_fb:.0f}%)",
          flush=True)

    def fwd():
        return _ops.forward(x, w, b, spec, 1e-5)

    def both():
        _, m, _, r = fwd()
        return _ops.backward(dy, x, w, m, r, spec, True)

    for choice in choices:
        for field, value in choice.items():
            setattr(TUNING, field, type(getattr(TUNING, field))(value))
        f, fb = kernel_ms(fwd), kernel_ms(both)
        label = " ".join(f"{field}={value}" for field, value in choice.items())
        print(f"  {label}: fwd {f * 1e3:7.1f} us "
              f"({100 * copy / f:4.0f}% of copy, {t_f / f:.2f}x torch)  fwd+bwd {fb * 1e3:7.1f} us "
              f"({250 * copy / fb:4.0f}%, {t_fb / fb:.2f}x)", flush=True)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["bn", "gn"])
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--warps", type=_ints, default=[4, 8])
    parser.add_argument("--tiles", type=_ints, default=[2048, 4096, 8192, 16384])
    parser.add_argument("--resident", type=_ints, default=[TUNING.resident_per_sm])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=V1,V2")
    args = parser.parse_args()
    dtypes = [_DTYPES[d] for d in args.dtypes.split(",")]
    axes = {"tile_warps": args.warps, "channel_tile": args.tiles, "resident_per_sm": args.resident}
    for item in args.set:
        field, values = item.split("=")
        axes[field] = _ints(values)
    choices = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    for norm, shape, cl, dtype in CASES:
        if (args.only in (None, norm)) and dtype in dtypes:
            sweep_case(norm, shape, cl, dtype, choices)


if __name__ == "__main__":
    main()
