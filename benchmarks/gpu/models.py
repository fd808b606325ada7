"""Whole models on a GPU with torch.nn's norm layers and with normlab's, side by side.

The GPU twin of ``benchmarks/cpu/models.py`` (same models, same twin made with
``normlab.tools.from_torch``, same check that both compute the same function), timed
two ways in one process, interleaved round by round in a shuffled order:

* ``eager``: the step called from Python, as a plain training loop runs it. On a GPU
  the host's Python (and autograd's hand-offs between threads) runs ahead of the GPU
  only while the GPU work of each call outlasts its host work; the time per step is the
  slower of the two.
* ``graph``: the same step captured once in a CUDA graph and replayed (what
  ``torch.cuda.graphs`` or ``torch.compile(mode="reduce-overhead")`` give a user): the
  GPU's time alone, with no host work per call.

The train step is forward, cross-entropy, backward and an SGD step (gradients zeroed
once before capture: the replays overwrite them, as torch's whole-network capture
recipe does); the infer step is the eval-mode forward under ``torch.inference_mode``
(``torch.no_grad`` in the graph). It prints the median milliseconds per step of each
and the speed-up (torch.nn / normlab).

    PYTHONPATH=src python3 benchmarks/gpu/models.py [--rounds 7] [--model resnet20] [--batch 256]
"""

from __future__ import annotations

import copy
import importlib.util
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from normlab.tools import from_torch

_CPU_MODELS = Path(__file__).resolve().parent.parent / "cpu" / "models.py"
_spec = importlib.util.spec_from_file_location("normlab_cpu_models", _CPU_MODELS)
cpu_models = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # (its dataclass looks itself up)
_spec.loader.exec_module(cpu_models)
MODELS = cpu_models.MODELS

#: (model, batch sizes) of the default run: batches a GPU is used with
SUITE = (("resnet20", (128, 512)), ("resnet20-gn", (128, 512)), ("encoder-ln", (64, 256)),
         ("encoder-rms", (64, 256)))


class _Replay:
    """A captured step, with everything its kernels read and write: the model, its
    optimizer (and so the momentum buffers) and the static inputs. The graph holds only
    their addresses; were they freed, the replays would run on memory the allocator hands
    to other tensors, or -- after a later capture empties its cache -- on unmapped memory
    (an illegal memory access: what this script's first version did)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, *kept: object) -> None:
        self.graph, self.kept = graph, kept

    def __call__(self) -> None:
        self.graph.replay()


def _graphed(model: nn.Module, x: torch.Tensor, target: torch.Tensor, mode: str) -> Callable[[], None]:
    """The step captured in a CUDA graph (warmed up on a side stream first, as capture
    requires); returns the replay."""
    optimizer = None
    if mode == "infer":
        def body() -> None:
            with torch.no_grad():
                model(x)
        warm = body
    else:
        body, optimizer = cpu_models.train_parts(model, x, target)

        def warm() -> None:
            optimizer.zero_grad(set_to_none=True)
            body()
    # warm-up and capture on one side stream: autograd runs a parameter's gradient
    # accumulation on the stream its accumulator node was made on, and a node made in
    # the warm-up and still alive would otherwise fork the capture onto a second stream
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            warm()
        if mode == "train":
            optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    return _Replay(graph, model, optimizer, x, target)


def measure(steps: dict[str, Callable[[], None]], rounds: int, calls: int, sync: Callable[[], None]) -> dict:
    """Median seconds per call of each step over ``rounds`` rounds of ``calls`` calls,
    in a new shuffled order every round (the device synchronized around each sample)."""
    for run in steps.values():
        for _ in range(3):
            run()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            run = steps[name]
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                run()
            sync()
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def compare(model_name: str, batch: int, mode: str, rounds: int, device: torch.device,
            graphs: bool, seed: int = 0) -> dict[str, object]:
    """One row: torch.nn's model and normlab's twin, eager (and graphed on CUDA)."""
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # see benchmarks/cpu/models.py compare()
    try:
        return _compare(MODELS[model_name], batch, mode, rounds, device, graphs, seed)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


def _compare(model, batch: int, mode: str, rounds: int, device: torch.device, graphs: bool,
             seed: int) -> dict[str, object]:
    torch.manual_seed(seed)
    reference = model.build().to(device)
    twin = from_torch(copy.deepcopy(reference))
    x = torch.randn(batch, *model.input_shape, device=device)
    target = torch.randint(0, 10, (batch,), device=device)
    for m in (reference, twin):
        m.train(mode == "train")
    with torch.no_grad():
        expected, got = reference(x), twin(x)
    # cuDNN and cuBLAS may pick other algorithms for the two models: a looser check than
    # on CPU, still far below any difference of function
    if not torch.allclose(got, expected, rtol=1e-2, atol=1e-3):
        raise AssertionError(f"{model.name}: normlab's twin differs from torch.nn's model by "
                             f"{(got - expected).abs().max().item():.3g}")
    steps = {}
    for name, m in (("torch.nn", reference), ("normlab", twin)):
        steps[f"{name} eager"] = cpu_models.train_step(m, x, target) if mode == "train" else \
            cpu_models.infer_step(m, x)
    if graphs:
        # separate copies: a captured graph owns its model's gradient and state tensors
        for name, m in (("torch.nn", copy.deepcopy(reference)), ("normlab", copy.deepcopy(twin))):
            try:
                steps[f"{name} graph"] = _graphed(m, x, target, mode)
            except Exception as err:  # noqa: BLE001 -- report, time the rest
                print(f"  {model.name} b{batch} {mode}: {name} could not be captured: {type(err).__name__}: {err}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first = steps["torch.nn eager"]
    first()
    sync()
    start = time.perf_counter()
    first()
    sync()
    calls = max(1, min(50, int(0.1 / max(time.perf_counter() - start, 1e-5))))
    timed = measure(steps, rounds, calls, sync)
    row: dict[str, object] = {"model": model.name, "batch": batch, "mode": mode}
    for how in ("eager", "graph"):
        t_torch, t_nl = timed.get(f"torch.nn {how}"), timed.get(f"normlab {how}")
        row[f"{how}_torch_ms"] = 1e3 * t_torch if t_torch else float("nan")
        row[f"{how}_normlab_ms"] = 1e3 * t_nl if t_nl else float("nan")
        row[f"{how}_speedup"] = t_torch / t_nl if t_torch and t_nl else float("nan")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = cpu_models.suite_parser(__doc__.split("\n\n")[0], rounds=7)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (eager only: a check of the script)")
    parser.add_argument("--no-graphs", action="store_true", help="time the eager steps only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    graphs = device.type == "cuda" and not args.no_graphs
    suite, modes = cpu_models.selected(args, SUITE)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}; median of {args.rounds} interleaved rounds; ms per step")
    print(f"{'model':12s} {'batch':>5s} {'mode':5s} | {'eager: torch.nn':>15s} {'normlab':>8s} {'speed-up':>8s} | "
          f"{'graph: torch.nn':>15s} {'normlab':>8s} {'speed-up':>8s}")
    for model_name, batches in suite:
        for batch in batches:
            for mode in modes:
                r = compare(model_name, batch, mode, args.rounds, device, graphs)
                print(f"{model_name:12s} {batch:5d} {mode:5s} | {r['eager_torch_ms']:15.3f} "
                      f"{r['eager_normlab_ms']:8.3f} {r['eager_speedup']:7.2f}x | {r['graph_torch_ms']:15.3f} "
                      f"{r['graph_normlab_ms']:8.3f} {r['graph_speedup']:7.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
