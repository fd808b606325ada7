"""Run benchmark cases and turn the timings into result rows.

Per case: the machine's copy bandwidth on the case's own tensor is measured in the
same interleaved round as the providers (``copy``: ``y.copy_(x)`` into a preallocated
tensor; ``alloc+copy``: ``x.clone()``, which pays for fresh pages like every
provider does). The floor of a mode is its byte count (see
:func:`normlab.bench.timing.floor_bytes`) at the ``copy`` bandwidth.

Modes: ``forward`` (training mode under ``torch.no_grad``: batch statistics),
``backward`` and ``forward+backward`` (a training step), and ``eval`` (eval mode under
``torch.no_grad``: inference with the running statistics; only norms that keep them,
BatchNorm, and not the ``naive`` provider, which has none).

``cache``: ``"warm"`` (samples of back-to-back calls) or ``"cold"`` (each sample one
call after the caches were flushed; see :mod:`normlab.bench.timing`) -- the same
policy for every provider and for the copy.

A row: case fields, mode, provider, median/min milliseconds, effective GB/s (floor
bytes / time), % of the floor, speed-up vs torch.nn, bytes saved for backward, the
copy bandwidth, the cache policy, plus the run's machine/versions/date
(:func:`environment`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
from collections.abc import Callable, Iterator, Sequence

import torch

from .cases import PROVIDERS, Case, build, make_input, provider_env
from .timing import cache_flusher, floor_bytes, interleaved, median, saved_bytes

__all__ = ["MODES", "CACHE_POLICIES", "EVAL_NORMS", "environment", "run_case", "run_suite", "available_providers"]

MODES = ("forward", "backward", "forward+backward", "eval")
CACHE_POLICIES = ("warm", "cold")
#: Norms whose modules keep running statistics, so that eval mode computes something else.
EVAL_NORMS = ("bn",)


def available_providers() -> tuple[str, ...]:
    """The providers this installation can run (cpu-numba needs numba)."""
    from ..backends.cpu import enable

    return tuple(p for p in PROVIDERS if p != "cpu-numba" or enable())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, object]:
    """Machine, versions and date recorded with every result."""
    try:
        import numba

        numba_version = numba.__version__
    except ImportError:
        numba_version = None
    import numpy

    from .. import __version__

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{_cpu_model()}, {os.cpu_count()} cpus",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "numba": numba_version,
        "normlab": __version__,
        "threads": torch.get_num_threads(),
    }


def _zero_grads(x: torch.Tensor, module: object) -> None:
    x.grad = None
    params = getattr(getattr(module, "module", module), "parameters", None)
    if params is not None:
        for p in params():
            p.grad = None


def _mode_fns(mode: str, fns: dict[str, Callable], case: Case) -> dict[str, Callable[[], object]]:
    out: dict[str, Callable[[], object]] = {}
    x = make_input(case)
    dy = make_input(case, seed=2)
    for name, f in fns.items():
        if mode in ("forward", "eval"):
            def run(f=f):
                with torch.no_grad():
                    return f(x)
        elif mode == "backward":
            xg = make_input(case, requires_grad=True)
            y = f(xg)

            def run(f=f, xg=xg, y=y):
                _zero_grads(xg, f)
                y.backward(dy, retain_graph=True)
        else:
            xg = make_input(case, requires_grad=True)

            def run(f=f, xg=xg):
                _zero_grads(xg, f)
                f(xg).backward(dy)
        out[name] = run
    return out


def run_case(case: Case, modes: Sequence[str], providers: Sequence[str], repeats: int,
             min_time: float = 0.02, cache: str = "warm") -> list[dict[str, object]]:
    """Rows for one case: every mode x provider, plus the copy floor, timed under the
    ``cache`` policy (see the module docstring)."""
    if cache not in CACHE_POLICIES:
        raise ValueError(f"cache: expected one of {', '.join(CACHE_POLICIES)}, got {cache!r}")
    with provider_env("normlab"):  # no NORMLAB_BACKEND from the caller's environment
        return _run_case(case, modes, providers, repeats, min_time, cache)


def _run_case(case: Case, modes: Sequence[str], providers: Sequence[str], repeats: int,
              min_time: float, cache: str) -> list[dict[str, object]]:
    flush = cache_flusher() if cache == "cold" else None
    fns = build(case, tuple(providers))
    x = make_input(case)
    dst = torch.empty_like(x)
    nbytes = case.numel * case.itemsize
    saved = {}
    for name, f in fns.items():
        saved[name] = saved_bytes(f, make_input(case, requires_grad=True))
    rows = []
    for mode in modes:
        if mode == "eval" and case.norm not in EVAL_NORMS:
            continue
        timed = {"copy": lambda: dst.copy_(x), "alloc+copy": lambda: x.clone()}
        fns_now = {name: f for name, f in fns.items() if mode != "eval" or name != "naive"}
        timed.update(_mode_fns(mode, fns_now, case))
        with _eval_mode(fns_now, mode == "eval"):
            samples = interleaved(timed, repeats, min_time=min_time, same_calls=list(fns_now), flush=flush)
        copy_s = median(samples["copy"])
        copy_gbps = 2 * nbytes / copy_s / 1e9
        floor_s = floor_bytes(case.numel, case.itemsize, mode) / (copy_gbps * 1e9)
        torch_s = median(samples["torch"]) if "torch" in samples else None
        for name, ts in samples.items():
            t = median(ts)
            is_copy = name in ("copy", "alloc+copy")
            moved = 2 * nbytes if is_copy else floor_bytes(case.numel, case.itemsize, mode)
            rows.append({
                "case": case.label, "norm": case.norm, "shape": "x".join(map(str, case.shape)),
                "layout": case.layout, "dtype": case.dtype,
                "groups": case.groups if case.norm == "gn" else None,
                "mode": mode, "provider": name,
                "median_ms": t * 1e3, "min_ms": min(ts) * 1e3,
                "gbps": moved / t / 1e9,
                "pct_floor": None if is_copy else 100 * floor_s / t,
                "speedup_vs_torch": None if is_copy or torch_s is None else torch_s / t,
                "saved_mb": None if is_copy or mode == "eval" else saved[name] / 2**20,
                "copy_gbps": copy_gbps, "repeats": repeats, "cache": cache,
            })
    return rows


@contextlib.contextmanager
def _eval_mode(fns: dict[str, Callable], on: bool) -> Iterator[None]:
    """The providers' modules in eval mode while ``on``, with torch.nn's running
    statistics (each provider's own were updated by its own training-mode calls), back
    in the mode each was in after."""
    modules = {name: getattr(f, "module", f) for name, f in fns.items()} if on else {}
    training = {name: m.training for name, m in modules.items()}
    try:
        for name, m in modules.items():
            if name != "torch" and "torch" in modules:
                m.load_state_dict(modules["torch"].state_dict())
            m.eval()
        yield
    finally:
        for name, m in modules.items():
            m.train(training[name])


def run_suite(cases: Sequence[Case], modes: Sequence[str], providers: Sequence[str], repeats: int,
              min_time: float = 0.02, progress: Callable[[str], None] | None = None, cache: str = "warm"
              ) -> list[dict[str, object]]:
    """Rows of every case under the ``cache`` policy, each row carrying :func:`environment`."""
    env = environment()
    rows = []
    for i, case in enumerate(cases):
        if progress:
            progress(f"[{i + 1}/{len(cases)}] {case.label}")
        for row in run_case(case, modes, providers, repeats, min_time, cache):
            rows.append({**row, **env})
    return rows
