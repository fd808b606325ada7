"""Plan, run and resume a comparison; then render the report from the saved rows.

A run directory holds::

    config.yaml      the resolved LabConfig (what was asked for)
    results.jsonl    one row per finished run (see results.py)
    plots/           PNG + SVG per scenario
    report.md, report.html

Runs are executed in a fixed order (seed-major, so that an interrupted sweep already
covers every norm); a run whose key is in ``results.jsonl`` is skipped, so re-running
the same command resumes and loses at most the run that was in progress.

With ``config.nproc`` > 1 the same plan runs under DistributedDataParallel
(:mod:`normlab.lab.parallel`): :func:`prepare_run` and :func:`execute_runs` are shared,
and only rank 0 writes.
"""

from __future__ import annotations

import datetime as _dt
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ..nn import norm_names
from .config import LabConfig, steps_for_batch
from .data import Dataset, load_dataset
from .results import ResultsError, ResultsStore, atomic_write
from .train import LAB_NORMS, RunSpec, WrapFn, run_one

__all__ = ["ConfigError", "execute_runs", "load_config", "plan_runs", "prepare_run", "resolve_device",
           "run_compare", "save_config"]

CONFIG_NAME = "config.yaml"


class ConfigError(ValueError):
    """Arguments that cannot describe a run (unknown norm, batch too large, ...)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; expected auto, cpu or cuda[:i]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available to PyTorch")
    return device


def versions() -> dict[str, str]:
    from .. import __version__

    return {"normlab": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(terse=True)}


# What an empty --norm means: the methods of the Group Normalization paper's comparison plus
# RMSNorm and no normalization. Everything registered is reachable by name or with "all".
DEFAULT_NORMS = ("bn", "ln", "in", "gn", "rms", "none")


def resolve_norms(config: LabConfig) -> list[str]:
    """The norm names to run: ``config.norms``, ``["all"]`` = every registered norm, empty =
    :data:`DEFAULT_NORMS`. Unknown names raise :class:`ConfigError` listing the choices.
    Besides the registry's names, the lab's own :data:`~normlab.lab.train.LAB_NORMS`
    (``syncbn``) are accepted."""
    registered = norm_names()
    known = registered + [n for n in LAB_NORMS if n not in registered]
    if list(config.norms) == ["all"]:
        norms = registered
    else:
        norms = list(config.norms) or [n for n in DEFAULT_NORMS if n in known]
    bad = [n for n in norms if n not in known]
    if bad:
        raise ConfigError(f"unknown norm {', '.join(map(repr, bad))}; expected names from "
                          f"{', '.join(known)}")
    if len(set(norms)) != len(norms):
        raise ConfigError(f"norm listed twice in {','.join(norms)}")
    return norms


def check_settings(config: LabConfig) -> None:
    """Reject settings that are wrong whatever the data."""
    for b in list(config.batch_sizes) + [config.ref_batch]:
        if b < 1:
            raise ConfigError(f"batch sizes must be >= 1, got {b}")
    if config.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {config.seeds}")
    if config.groups < 1:
        raise ConfigError(f"--groups must be >= 1, got {config.groups}")
    if config.epochs <= 0 or config.min_steps < 1:
        raise ConfigError("--epochs must be > 0 and --min-steps >= 1")
    if config.noniid_classes < 1:
        raise ConfigError(f"noniid_classes must be >= 1, got {config.noniid_classes}")
    for b in config.per_process_batches or []:
        if b < 1:
            raise ConfigError(f"per-process batch sizes must be >= 1, got {b}")


def resolve_processes(config: LabConfig, console=None) -> None:
    """Fit the run set to ``config.nproc`` processes, in place.

    * nproc < 1 is an error.
    * Batch sizes smaller than nproc cannot give every process an example: they are
      skipped with a message (an error if none is left, or if ``ref_batch`` < nproc).
    * ``per_process_batches`` None (auto) becomes 1, 2, 4, 8 (quick preset: 2, 8) with
      nproc > 1 and nothing with one process; asking for it explicitly with one
      process is an error (with one process SyncBatchNorm *is* BatchNorm).
    * ``ppb_norms`` must be known names.
    """
    n = config.nproc
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--nproc must be a positive integer, got {n!r}")
    if n > 1:
        small = [b for b in config.batch_sizes if b < n]
        kept = [b for b in config.batch_sizes if b >= n]
        if not kept:
            raise ConfigError(f"every batch size ({', '.join(map(str, config.batch_sizes))}) is smaller than "
                              f"--nproc {n}: each process needs at least one example; choose "
                              f"--batch-sizes >= {n}")
        if small and console is not None:
            console.print(f"[yellow]skipping batch size(s) {', '.join(map(str, small))}[/]: smaller than "
                          f"the {n} processes (each process needs at least one example)")
        config.batch_sizes = kept
        if config.ref_batch < n:
            raise ConfigError(f"--ref-batch {config.ref_batch} is smaller than --nproc {n}: each process "
                              f"needs at least one example; choose --ref-batch >= {n}")
    if config.per_process_batches is None:
        config.per_process_batches = [] if n == 1 else ([2, 8] if config.preset == "quick" else [1, 2, 4, 8])
    elif config.per_process_batches and n == 1:
        raise ConfigError("the per-process batch scenario compares BatchNorm's per-process statistics with "
                          "SyncBatchNorm across processes; it needs --nproc >= 2 (got 1)")
    if config.per_process_batches:
        registered = norm_names()
        known = registered + [m for m in LAB_NORMS if m not in registered]
        bad = [m for m in config.ppb_norms if m not in known]
        if bad or not config.ppb_norms:
            raise ConfigError(f"per-process batch norms: unknown or empty {bad or config.ppb_norms}; "
                              f"expected names from {', '.join(known)}")


def check_config(config: LabConfig, data: Dataset) -> None:
    """Reject settings the data cannot support, before any training."""
    check_settings(config)
    n = len(data.y_train)
    for b in list(config.batch_sizes) + [config.ref_batch]:
        if b > n:
            raise ConfigError(f"batch size {b} is larger than the training set ({n} examples of "
                              f"{data.name}); choose --batch-sizes <= {n}")
    for b in config.per_process_batches or []:
        if b * config.nproc > n:
            raise ConfigError(f"per-process batch {b} x {config.nproc} processes = {b * config.nproc} is "
                              f"larger than the training set ({n} examples of {data.name})")
    from .train import make_model

    ppb_norms = config.ppb_norms if config.per_process_batches else []
    for norm in dict.fromkeys(list(config.norms) + list(ppb_norms)):  # all must build before training
        try:
            make_model(config, data, norm, config.seed)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"norm {norm!r} cannot be used with {data.name} "
                              f"({data.spatial_dims}-D inputs): {error}") from None


def plan_runs(config: LabConfig, norms: list[str]) -> list[RunSpec]:
    """All runs of a comparison, seed-major. ``ppb`` runs (per-process batch b, global
    batch ``nproc * b``) come after each seed's other runs; one that would repeat a sweep
    run (same norm and global batch: the same computation) is left out, and the report
    takes the sweep's row instead."""
    plan = []
    for seed in config.seed_list():
        for bs in config.batch_sizes:
            plan += [RunSpec("sweep", norm, bs, seed) for norm in norms]
        plan += [RunSpec("noniid", norm, config.ref_batch, seed) for norm in norms]
        plan += [RunSpec("cost", norm, config.ref_batch, seed) for norm in norms]
        for b in config.per_process_batches or []:
            g = b * config.nproc
            plan += [RunSpec("ppb", norm, g, seed) for norm in config.ppb_norms
                     if not (norm in norms and g in config.batch_sizes)]
    return plan


def save_config(config: LabConfig, run_dir: Path) -> None:
    import yaml

    text = ("# normlab compare: resolved configuration (normlab report re-renders from this + "
            "results.jsonl)\n" + yaml.safe_dump(config.to_dict(), sort_keys=False))
    atomic_write(run_dir / CONFIG_NAME, text)


def load_config(run_dir: Path) -> LabConfig:
    import yaml

    path = run_dir / CONFIG_NAME
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{run_dir} has no {CONFIG_NAME}; "
                           "is it a normlab compare run directory?") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ResultsError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path} is not a normlab compare configuration")
    try:
        return LabConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise ResultsError(f"{path} is not a normlab compare configuration ({error})") from None


def _weight(spec: RunSpec, config: LabConfig, n_train: int) -> int:
    """Progress units of a run: its training steps (cost runs: their timed steps)."""
    if spec.scenario == "cost":
        return config.cost_steps * 2
    return steps_for_batch(config, spec.batch_size, n_train)


def run_compare(config: LabConfig, run_dir: str | Path, *, device: str = "auto",
                threads: int | None = None, progress: bool = True, console=None) -> Path:
    """Run (or resume) the comparison described by ``config`` in ``run_dir``; render the report.

    Returns the path of ``report.md``. Raises :class:`ConfigError`,
    :class:`~normlab.lab.data.DataError` or :class:`ResultsError` for inputs the user
    must fix, before anything is trained or written.

    ``config.nproc`` > 1, or a process started by torchrun (RANK, WORLD_SIZE, ... set),
    runs every configuration under DistributedDataParallel
    (:func:`normlab.lab.parallel.run_compare_distributed`); ``threads`` is then per process.
    """
    from rich.console import Console

    from .parallel import external_world, run_compare_distributed

    console = console or Console(stderr=True)
    if config.nproc != 1 or external_world() is not None:
        return run_compare_distributed(config, run_dir, device=device, threads=threads,
                                       progress=progress, console=console)
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        store, data, todo = prepare_run(config, run_dir, dev, console)
        execute_runs(config, store, data, todo, dev, progress=progress, console=console)
    finally:
        torch.set_num_threads(previous_threads)  # the caller's process keeps its setting
    return finish(run_dir)


def prepare_run(config: LabConfig, run_dir: Path, dev: torch.device, console) -> tuple[
        ResultsStore, Dataset, list[RunSpec]]:
    """Check everything, load the data, write ``config.yaml`` and the results header.

    Resolves ``config`` in place (norm names, batch sizes for ``nproc``, per-process
    batches). Returns the results store, the data and the runs still to do. Raises
    :class:`ConfigError`, :class:`~normlab.lab.data.DataError` or :class:`ResultsError`
    before anything is written.
    """
    run_dir = Path(run_dir)
    norms = resolve_norms(config)
    config.norms = norms
    resolve_processes(config, console)
    check_settings(config)  # cheap checks first, then the data
    data = load_dataset(config.dataset, config.data_dir, n_train=config.n_train, n_test=config.n_test,
                        seed=config.data_seed, image_size=config.image_size)
    check_config(config, data)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {str(run_dir)!r} exists and is not a directory")
    if (run_dir / CONFIG_NAME).exists():
        old = load_config(run_dir)
        diff = [k for k, v in config.identity().items() if old.identity().get(k) != v]
        diff += [k for k in old.identity() if k not in config.identity()]
        if diff:
            raise ResultsError(f"{run_dir} holds a comparison with different settings ({', '.join(diff)}); "
                               "resume with the same settings, or choose another --out")
    store = ResultsStore(run_dir, config.identity_hash())  # validates an existing file first
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir)
    if not store.path.exists():
        store.flush()  # header only: marks the directory as ours from the start
    plan = plan_runs(config, norms)
    done = store.keys()
    todo = [s for s in plan if s.key not in done]
    procs = f" x {config.nproc} processes (DDP)" if config.nproc > 1 else ""
    console.print(f"[bold]normlab compare[/]: {data.describe()}; {len(norms)} norms x "
                  f"{len(config.batch_sizes)} batch sizes x {config.seeds} seeds on {dev}{procs} "
                  f"({len(plan) - len(todo)} of {len(plan)} runs already done) -> {run_dir}")
    return store, data, todo


def execute_runs(config: LabConfig, store: ResultsStore | None, data: Dataset, todo: list[RunSpec],
                 dev: torch.device, *, progress: bool, console, rank: int = 0, world_size: int = 1,
                 wrap: WrapFn | None = None) -> None:
    """Run ``todo`` in order; rank 0 appends one row per finished run to ``store``.

    Under DDP every rank calls this with the same ``todo``; ranks other than 0 pass
    ``store=None`` and show no progress.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    lead = rank == 0
    n_train = len(data.y_train)
    info = versions()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    total = sum(_weight(s, config, n_train) for s in todo)
    with Progress(*columns, console=console, disable=not (progress and lead), transient=False) as bar:
        overall = bar.add_task("all runs (steps)", total=max(total, 1))
        current = bar.add_task("", total=1, visible=False)
        for i, spec in enumerate(todo, start=1):
            weight = _weight(spec, config, n_train)
            bar.update(current, description=f"run {i}/{len(todo)} {spec.key}", total=weight,
                       completed=0, visible=True)
            base = bar.tasks[overall].completed

            def on_step(step: int, steps: int, _base: float = base) -> None:
                bar.update(current, completed=step)
                bar.update(overall, completed=_base + step)

            t0 = time.perf_counter()
            if world_size == 1:
                out = run_one(spec, config, data, dev, on_step=on_step)
            else:
                out = run_one(spec, config, data, dev, on_step=on_step if lead else None, rank=rank,
                              world_size=world_size, wrap=wrap)
            if lead:
                assert store is not None and out is not None
                store.append({
                    "key": spec.key, "scenario": spec.scenario, "norm": spec.norm,
                    "batch_size": spec.batch_size, "seed": spec.seed, "metrics": out["metrics"],
                    "curve": out["curve"], "time_s": time.perf_counter() - t0, "device": str(dev),
                    "threads": torch.get_num_threads(), "nproc": world_size, "versions": info,
                    "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                })
            bar.update(overall, completed=base + weight)
        bar.update(current, visible=False)


def finish(run_dir: Path) -> Path:
    """Render the report from the saved rows and print the summary table."""
    from .report import print_summary, render_report

    report = render_report(run_dir)
    print_summary(run_dir)
    return report
