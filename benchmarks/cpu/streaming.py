"""Streaming stores on and off, side by side: what writing large outputs as whole cache
lines straight to memory buys each normalization.

normlab's CPU kernels write outputs (y, dx) of at least ``backend.STREAM_FROM`` bytes
with non-temporal stores (see ``normlab.backends.cpu._kernels``, "streaming stores").
The choice is made per call from that threshold, so this script times the same layers in
one process with the threshold at 0 (every parallel call streams) and out of reach (none
does), interleaved round by round in a shuffled order, and prints the medians and their
ratio -- per layer, for the forward (no grad) and a training step (forward + backward).

    python benchmarks/cpu/streaming.py [--threads 2] [--rounds 21]
"""

from __future__ import annotations

import _ab
import torch

import normlab as nl
from normlab.backends.cpu import backend

_SHAPE = (32, 64, 56, 56)
_ROWS = (16384, 768)


def _cases() -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    cl = torch.channels_last
    image = torch.randn(_SHAPE)
    return [
        ("BatchNorm2d NCHW", nl.BatchNorm2d(64), image),
        ("BatchNorm2d channels_last", nl.BatchNorm2d(64), image.contiguous(memory_format=cl)),
        ("InstanceNorm2d NCHW", nl.InstanceNorm2d(64, affine=True), image),
        ("GroupNorm(32) NCHW", nl.GroupNorm(32, 64), image),
        ("GroupNorm(32) channels_last", nl.GroupNorm(32, 64), image.contiguous(memory_format=cl)),
        ("LayerNorm(768) rows", nl.LayerNorm(768), torch.randn(_ROWS)),
        ("RMSNorm(768) rows", nl.RMSNorm(768), torch.randn(_ROWS)),
    ]


def _set(threshold: int) -> None:
    backend.STREAM_FROM = threshold


def main() -> None:
    args = _ab.arguments(__doc__, rounds=21)
    default = backend.STREAM_FROM
    print(f"threads {args.threads}, rounds {args.rounds}, STREAM_FROM here {default / 2**20:.0f} MiB "
          f"(the cases' outputs: 25.7 MB and 50.3 MB float32)")
    print(f"{'layer':30s} {'mode':18s} {'ordinary ms':>12s} {'streaming ms':>13s} {'speed-up':>9s}")
    try:
        for name, module, x in _cases():
            dy = torch.randn_like(x)
            for mode, run in (("forward", _ab.forward(module, x)), ("forward+backward", _ab.step(module, x, dy))):
                medians = _ab.compare(run, {"ordinary": lambda: _set(1 << 62), "streaming": lambda: _set(0)},
                                      args.rounds)
                plain, streamed = medians["ordinary"], medians["streaming"]
                print(f"{name:30s} {mode:18s} {plain * 1e3:12.3f} {streamed * 1e3:13.3f} {plain / streamed:8.2f}x")
    finally:
        backend.STREAM_FROM = default


if __name__ == "__main__":
    main()
