"""Shared pieces of the in-process A/B scripts in this folder: the timed runs of a layer
and an interleaved comparison of two settings of a backend switch."""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch


def arguments(doc: str, rounds: int) -> argparse.Namespace:
    """``--threads`` (applied with ``torch.set_num_threads``) and ``--rounds`` (default
    ``rounds``), with the script's docstring as the description."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=rounds)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def forward(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """The layer's forward without autograd."""
    def run() -> None:
        with torch.no_grad():
            module(x)
    return run


def step(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    """A training step: forward and backward, gradients set to None first (as
    ``zero_grad()`` does)."""
    xg = x.detach().requires_grad_()

    def run() -> None:
        xg.grad = None
        for p in module.parameters():
            p.grad = None
        module(xg).backward(dy)
    return run


def compare(run: Callable[[], None], settings: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds of ``run`` under each setting (a function that applies it), over
    ``rounds`` rounds in a shuffled order after one untimed call per setting (compiling
    kernels, filling the output cache)."""
    samples: dict[str, list[float]] = {name: [] for name in settings}
    for apply in settings.values():
        apply()
        run()
    names = list(settings)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            settings[name]()
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}
