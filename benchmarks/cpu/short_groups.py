"""The tile-phased kernels on and off, side by side: where phasing short groups pays.

normlab's CPU kernels visit short statistic groups -- LayerNorm/RMSNorm rows of at most
``backend.SHORT_GROUP`` elements, GroupNorm/InstanceNorm groups of planes of at most
``backend.SHORT_PLANES`` -- a tile at a time (statistics of every group of the tile,
then its output; see ``normlab.backends.cpu._kernels``, "short groups"), and the rows'
backward likewise up to ``backend.SHORT_ROW_BACKWARD`` elements while x, dy and dx fit
in the last-level cache. This script times the same layers in one process under three
settings, interleaved round by round in a shuffled order:

- ``shipped``: the thresholds as they are;
- ``per group``: never phased;
- ``phased``: every group the phased kernels can take, whatever its size.

and prints the medians of the forward (no grad) and of a training step (forward +
backward) and each setting's time over the per-group one's. The settings swap the
backend's two predicates and rebuild its per-configuration calls (untimed) before each
sample.

    python benchmarks/cpu/short_groups.py [--threads 2] [--rounds 11]
"""

from __future__ import annotations

import time
from collections.abc import Callable

import _ab
import torch

import normlab as nl
from normlab.backends.cpu import backend

_SHIPPED = (backend._short_groups, backend._short_rows_backward)


def _every_group(plan) -> bool:  # what the phased forward can take (see backend._short_groups)
    if plan.kind != "grouped":
        return False
    a, _, _, s, g = plan.dims
    return a == 1 and (s > 1 or g == 1)


def _every_row(plan, nbytes: int) -> bool:  # what the phased backward can take
    return plan.kind == "grouped" and plan.dims[0] == plan.dims[3] == plan.dims[4] == 1


_SETTINGS = {
    "shipped": _SHIPPED,
    "per group": (lambda plan: False, lambda plan, nbytes: False),
    "phased": (_every_group, _every_row),
}


def _cases() -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    def planes(*shape: int) -> torch.Tensor:
        return torch.randn(shape)

    return [
        ("GroupNorm(8) (8, 32, 40)", nl.GroupNorm(8, 32), planes(8, 32, 40)),
        ("InstanceNorm2d (8, 256, 7, 7)", nl.InstanceNorm2d(256, affine=True), planes(8, 256, 7, 7)),
        ("InstanceNorm2d (64, 2048, 7, 7)", nl.InstanceNorm2d(2048, affine=True), planes(64, 2048, 7, 7)),
        ("InstanceNorm2d (32, 256, 12, 12)", nl.InstanceNorm2d(256, affine=True), planes(32, 256, 12, 12)),
        ("InstanceNorm2d (32, 256, 14, 14)", nl.InstanceNorm2d(256, affine=True), planes(32, 256, 14, 14)),
        ("LayerNorm(40) (256, 40)", nl.LayerNorm(40), planes(256, 40)),
        ("LayerNorm(64) (4096, 64)", nl.LayerNorm(64), planes(4096, 64)),
        ("LayerNorm(64) (65536, 64)", nl.LayerNorm(64), planes(65536, 64)),
        ("LayerNorm(128) (32768, 128)", nl.LayerNorm(128), planes(32768, 128)),
        ("LayerNorm(256) (32768, 256)", nl.LayerNorm(256), planes(32768, 256)),
        ("LayerNorm(768) (16384, 768)", nl.LayerNorm(768), planes(16384, 768)),
    ]


def _apply(predicates: tuple[Callable, Callable], prime: Callable[[], None] | None = None) -> Callable[[], None]:
    """Install the two predicates and rebuild the backend's per-configuration calls, by
    one untimed call of ``prime`` (a rebuild is not what a sample should time)."""
    def apply() -> None:
        backend._short_groups, backend._short_rows_backward = predicates
        backend.call_for.cache_clear()
        if prime is not None:
            prime()
    return apply


def _repeated(run: Callable[[], None]) -> tuple[Callable[[], None], int]:
    """``run`` called often enough that a sample lasts ~5 ms (small layers take ~10 us),
    and how many times."""
    run()
    start = time.perf_counter()
    run()
    calls = max(1, int(5e-3 / max(time.perf_counter() - start, 1e-7)))

    def many() -> None:
        for _ in range(calls):
            run()
    return many, calls


def main() -> None:
    args = _ab.arguments(__doc__, rounds=11)
    print(f"threads {args.threads}, rounds {args.rounds}; times per call; ratios: the setting's time over "
          "'per group''s")
    print(f"{'layer':34s} {'mode':17s} " + " ".join(f"{name + ' us':>12s}" for name in _SETTINGS)
          + f" {'shipped':>8s} {'phased':>7s}")
    try:
        for name, module, x in _cases():
            dy = torch.randn_like(x)
            for mode, run in (("forward", _ab.forward(module, x)), ("forward+backward", _ab.step(module, x, dy))):
                many, calls = _repeated(run)
                medians = _ab.compare(many, {s: _apply(p, run) for s, p in _SETTINGS.items()}, args.rounds)
                base = medians["per group"]
                cells = " ".join(f"{medians[s] / calls * 1e6:12.1f}" for s in _SETTINGS)
                print(f"{name:34s} {mode:17s} {cells} {medians['shipped'] / base:7.2f}x "
                      f"{medians['phased'] / base:6.2f}x", flush=True)
    finally:
        _apply(_SHIPPED)()


if __name__ == "__main__":
    main()
