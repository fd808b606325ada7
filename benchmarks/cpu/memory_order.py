"""BatchNorm on NCHW in channel order and in memory order, side by side.

A BatchNorm channel's values lie in N planes (one per sample) of H*W elements, C*H*W
apart. The grouped kernels visit a channel's planes before the next channel's; the
``planes_*`` kernels visit x sample by sample, all channels, in memory order (see
``normlab.backends.cpu._kernels``, "small planes, in order"). The backend takes memory
order with fixed statistics always and with batch statistics for planes of at most
``backend.SMALL_PLANE_BYTES``. This script times BatchNorm2d with each order forced, in
one process, interleaved round by round in a shuffled order, and prints the medians and
their ratio: forward (training), training step (forward + backward) and eval forward.

    python benchmarks/cpu/memory_order.py [--threads 2] [--rounds 15]
"""

from __future__ import annotations

import _ab
import torch

import normlab as nl
from normlab.backends.cpu import backend
from normlab.core.spec import batch_norm_spec

#: ResNet-50's BatchNorm planes at batch 32 (float32: 25.7 MB per input at most).
_SHAPES = ((32, 2048, 7, 7), (32, 1024, 14, 14), (32, 512, 16, 16), (32, 256, 28, 28), (32, 64, 56, 56))

_chosen = backend._memory_order


def _order(memory: bool) -> None:
    if memory:  # every plane size, batch statistics too
        backend._memory_order = lambda plan, itemsize, fixed=False: _chosen(plan, itemsize, True)
    else:
        backend._memory_order = lambda plan, itemsize, fixed=False: False
    backend.call_for.cache_clear()  # (each configuration's call records its order)


def main() -> None:
    args = _ab.arguments(__doc__, rounds=15)
    print(f"threads {args.threads}, rounds {args.rounds}, SMALL_PLANE_BYTES here {backend.SMALL_PLANE_BYTES}")
    print(f"{'shape':22s} {'mode':17s} {'channel ms':>11s} {'memory ms':>10s} {'speed-up':>9s} {'default':>8s}")
    try:
        for shape in _SHAPES:
            x = torch.randn(shape)
            plan = backend.call_for(batch_norm_spec(shape), "contiguous", x.dtype).plan
            module = nl.BatchNorm2d(shape[1])
            evaluated = nl.BatchNorm2d(shape[1]).eval()
            runs = (("forward", _ab.forward(module, x)), ("forward+backward", _ab.step(module, x, torch.randn_like(x))),
                    ("eval forward", _ab.forward(evaluated, x)))
            for mode, run in runs:
                medians = _ab.compare(run, {"channel": lambda: _order(False), "memory": lambda: _order(True)},
                                      args.rounds)
                channel, memory = medians["channel"], medians["memory"]
                default = "memory" if _chosen(plan, x.element_size(), mode == "eval forward") else "channel"
                print(f"{str(shape):22s} {mode:17s} {channel * 1e3:11.3f} {memory * 1e3:10.3f} "
                      f"{channel / memory:8.2f}x {default:>8s}")
    finally:
        backend._memory_order = _chosen
        backend.call_for.cache_clear()


if __name__ == "__main__":
    main()
