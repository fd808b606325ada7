"""Whole models with torch.nn's norm layers and with normlab's, side by side.

``normlab bench`` times one norm layer at a time. What a user sees is the training step
of a whole model, where the norms share the time with convolutions, matrix products and
the optimizer. This script builds each model with torch.nn's layers, makes a twin with
``normlab.tools.from_torch`` (same parameters and buffers, normlab's layers), and times
both in one process, interleaved round by round in a shuffled order:

* ``train``: ``zero_grad(set_to_none=True)``, forward, cross-entropy, backward, SGD step;
* ``infer``: eval mode under ``torch.inference_mode`` (BatchNorm then uses its running
  statistics).

It prints the median milliseconds per step of each, the speed-up (torch.nn / normlab)
and the minor page faults per step.

**The heap.** Both models run in one process and share glibc's heap, whose dynamic
trimming (memory at the top of the heap returned to the system once more than a
threshold is free, and faulted back in page by page on the next growth) depends on
the order of every allocation before it. In one run it can add ~2,000 faults (a few
ms) to one model's steps and none to the other's -- either one: a deep copy of the very
same torch.nn model took them in one run. Unless ``--glibc-heap`` is given, the script
therefore fixes glibc's thresholds (``mallopt``: no trimming, allocations below 32 MiB
from the heap), so that the comparison measures the models rather than the heap's
history; the faults column shows what remains.

    python benchmarks/cpu/models.py [--threads 2] [--rounds 9] [--model resnet20] [--batch 8]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from normlab.lab.models import build_model
from normlab.tools import from_torch, to_torch

#: glibc's mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def fix_glibc_heap() -> bool:
    """Turn glibc's heap trimming off and serve every allocation below 32 MiB from the
    heap (either setting also stops glibc from moving its thresholds). False where the
    C library has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


class _PreNormEncoder(nn.Module):
    """A pre-norm transformer encoder (``layers`` x [norm -> self-attention, norm -> MLP])
    with a final norm and a linear head on the mean token: input (N, T, d) -> (N, classes)."""

    def __init__(self, norm: str, d: int, heads: int, layers: int, classes: int) -> None:
        super().__init__()
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        if norm == "rms":  # the blocks call self.norm1 / self.norm2: any module will do
            for layer in self.encoder.layers:
                layer.norm1, layer.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.norm = nn.RMSNorm(d) if norm == "rms" else nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(x)).mean(1))


@dataclass(frozen=True)
class Model:
    """A model of the suite: how to build its torch.nn version and its input shape."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # without the batch dim
    about: str


def _resnet(norm: str) -> Callable[[], nn.Module]:
    # the lab's CIFAR ResNet-20 (width 16), built with normlab's layers, then torch.nn's
    return lambda: to_torch(build_model("resnet", norm, 3, 10, (32, 32), width=16, depth=3, groups=8))


MODELS = {
    "resnet20": Model("resnet20", _resnet("bn"), (3, 32, 32), "ResNet-20, BatchNorm2d, 32x32 images"),
    "resnet20-gn": Model("resnet20-gn", _resnet("gn"), (3, 32, 32), "ResNet-20, GroupNorm(8), 32x32 images"),
    "encoder-ln": Model("encoder-ln", lambda: _PreNormEncoder("ln", 256, 4, 4, 10), (64, 256),
                        "pre-norm encoder, LayerNorm, d=256, 4 layers, 64 tokens"),
    "encoder-rms": Model("encoder-rms", lambda: _PreNormEncoder("rms", 256, 4, 4, 10), (64, 256),
                         "pre-norm encoder, RMSNorm, d=256, 4 layers, 64 tokens"),
}
#: (model, batch sizes) of the default run
SUITE = (("resnet20", (8, 64)), ("resnet20-gn", (8, 64)), ("encoder-ln", (4, 16)), ("encoder-rms", (4, 16)))


def train_parts(model: nn.Module, x: torch.Tensor,
                target: torch.Tensor) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """(forward, cross-entropy, backward and an SGD step -- without zeroing the
    gradients --, the optimizer): the training step of this script and of
    ``benchmarks/gpu/models.py``, which captures it in a CUDA graph."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        loss_fn(model(x), target).backward()
        optimizer.step()
    return step, optimizer


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    step, optimizer = train_parts(model, x, target)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        step()
    return run


def infer_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(x)
    return run


def measure(steps: dict[str, Callable[[], None]], rounds: int, calls: int) -> dict[str, tuple[float, float]]:
    """Median seconds per call and median minor page faults per call of each step, over
    ``rounds`` rounds of ``calls`` calls each, in a new shuffled order every round."""
    for run in steps.values():  # compile kernels, fill caches, settle the optimizer state
        for _ in range(3):
            run()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    names = list(steps)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            run = steps[name]
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            for _ in range(calls):
                run()
            seconds = (time.perf_counter() - start) / calls
            samples[name].append((seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls))
    return {name: (statistics.median(s for s, _ in ss), statistics.median(f for _, f in ss))
            for name, ss in samples.items()}


def compare(model: Model, batch: int, mode: str, rounds: int, seed: int = 0) -> dict[str, object]:
    """One row: ``model`` at ``batch`` in ``mode`` (train or infer), torch.nn against normlab.

    torch.nn's transformer layers have an inference "fast path": one fused C++ op that
    reads the norms' weights itself and never calls their forward (and fails on a norm
    without a bias). It is off meanwhile, so that both models run their own norm layers."""
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return _compare(model, batch, mode, rounds, seed)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


def _compare(model: Model, batch: int, mode: str, rounds: int, seed: int) -> dict[str, object]:
    torch.manual_seed(seed)
    reference = model.build()
    twin = from_torch(copy.deepcopy(reference))
    x = torch.randn(batch, *model.input_shape)
    target = torch.randint(0, 10, (batch,))
    steps = {}
    for name, m in (("torch.nn", reference), ("normlab", twin)):
        m.train(mode == "train")
        steps[name] = train_step(m, x, target) if mode == "train" else infer_step(m, x)
    with torch.no_grad():  # the two compute the same function (what is timed is worth comparing)
        expected, got = reference(x), twin(x)
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-4):
        raise AssertionError(f"{model.name}: normlab's twin differs from torch.nn's model by "
                             f"{(got - expected).abs().max().item():.3g}")
    steps["torch.nn"]()  # (the first call of a model builds lazy state)
    # a step costs 5-150 ms: enough calls per sample for ~0.1 s
    start = time.perf_counter()
    steps["torch.nn"]()
    calls = max(1, min(20, int(0.1 / max(time.perf_counter() - start, 1e-4))))
    timed = measure(steps, rounds, calls)
    (t_torch, f_torch), (t_nl, f_nl) = timed["torch.nn"], timed["normlab"]
    return {"model": model.name, "batch": batch, "mode": mode, "torch_ms": 1e3 * t_torch, "normlab_ms": 1e3 * t_nl,
            "speedup": t_torch / t_nl, "torch_faults": f_torch, "normlab_faults": f_nl}


def suite_parser(description: str, rounds: int) -> argparse.ArgumentParser:
    """The options of a model comparison (this script's, ``benchmarks/gpu/models.py``'s):
    --model, --batch, --mode, --rounds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", action="append", choices=sorted(MODELS),
                        help="a model (repeatable; default: the suite)")
    parser.add_argument("--batch", action="append", type=int, help="batch size (repeatable; default: per model)")
    parser.add_argument("--mode", action="append", choices=("train", "infer"), help="default: both")
    parser.add_argument("--rounds", type=int, default=rounds)
    return parser


def selected(args: argparse.Namespace, suite: tuple) -> tuple[list[tuple[str, tuple[int, ...]]], list[str]]:
    """The (model, batch sizes) pairs and the modes a run covers under
    :func:`suite_parser`'s options: ``suite``'s models (or those given with --model, one
    outside ``suite`` at batch 8) with their batch sizes (or --batch's), both modes (or
    --mode's)."""
    runs = [(name, tuple(args.batch) if args.batch else batches) for name, batches in suite
            if not args.model or name in args.model]
    runs += [(name, tuple(args.batch or (8,))) for name in args.model or () if name not in dict(suite)]
    return runs, args.mode or ["train", "infer"]


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser(__doc__.split("\n\n")[0], rounds=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--glibc-heap", action="store_true",
                        help="leave glibc's heap thresholds as they are (see the module docstring)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fixed = not args.glibc_heap and fix_glibc_heap()
    suite, modes = selected(args, SUITE)
    print(f"torch {torch.__version__}, {args.threads} threads, glibc heap {'fixed' if fixed else 'as is'}; "
          f"median of {args.rounds} interleaved rounds")
    for name, _ in suite:
        print(f"  {name}: {MODELS[name].about}")
    print(f"{'model':12s} {'batch':>5s} {'mode':5s} {'torch.nn ms':>11s} {'normlab ms':>10s} {'speed-up':>8s} "
          f"{'faults/step (torch.nn, normlab)':>32s}")
    for name, batches in suite:
        for batch in batches:
            for mode in modes:
                row = compare(MODELS[name], batch, mode, args.rounds)
                print(f"{name:12s} {batch:5d} {mode:5s} {row['torch_ms']:11.2f} {row['normlab_ms']:10.2f} "
                      f"{row['speedup']:7.2f}x {row['torch_faults']:16.0f} {row['normlab_faults']:15.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
