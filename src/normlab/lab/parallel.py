"""Multi-process comparisons: every run under DistributedDataParallel with N processes.

Two ways in, one code path (:func:`normlab.lab.sweep.execute_runs` on every rank):

* ``normlab compare --nproc N`` on one machine: this process checks the
  configuration, loads the data, writes ``config.yaml`` and the results header
  (:func:`~normlab.lab.sweep.prepare_run`), then spawns N processes with
  :func:`normlab.distributed.launch_local` (gloo on CPU, nccl on GPUs with process r
  on ``cuda:r``), each with ``cores / N`` threads unless ``--threads`` says otherwise.
* ``torchrun [--nnodes M] --nproc-per-node K -m normlab compare ...``: each process
  torchrun started joins the world torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR,
  MASTER_PORT in the environment) instead of spawning, so the number of processes is
  torchrun's M * K. Leave ``--nproc`` out there: torchrun's own argument parser reads
  it as an abbreviation of its ``--nproc-per-node`` and stops with "ambiguous option"
  (a ``nproc`` set in a ``--config`` file, or through the Python API, must equal
  WORLD_SIZE). Global rank 0 prepares and broadcasts
  the plan (or the error every rank then raises); the other ranks load the data
  themselves (so ``--data-dir`` must exist on every node; mnist1d and digits are
  generated or shipped offline) and the run directory is written on rank 0's node.

Per run, every rank builds the same model from the run's seed, wraps it in DDP, and
draws the same global batches; rank r trains on examples ``r, r+N, r+2N, ...`` of each
(:func:`normlab.lab.train.shard`). Rank 0 alone evaluates and appends the row
(atomically, as in a single process), so an interrupted run resumes as before; the
other ranks go on to the next run and wait for rank 0 at its first collective.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import DEFAULT_PG_TIMEOUT, launch_local
from .config import LabConfig
from .data import DataError, Dataset, load_dataset
from .results import ResultsError, ResultsStore
from .sweep import ConfigError, execute_runs, finish, prepare_run, resolve_device
from .train import RunSpec, WrapFn

__all__ = ["backend_for", "external_world", "run_compare_distributed"]

# Data at most this large is sent to the spawned processes; larger data sets are loaded
# by every process itself (cheaper than pickling hundreds of MB through a pipe N times).
_SEND_DATA_BYTES = 256 * 2**20
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def external_world() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` of a world this process already belongs to.

    That is an initialized default process group, or the environment torchrun sets
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; LOCAL_RANK defaults to 0). None when
    the process is on its own. A malformed environment raises :class:`ConfigError`.
    """
    local = os.environ.get("LOCAL_RANK", "0")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(local) if local.isdigit() else 0
    if not all(k in os.environ for k in _TORCHRUN_ENV):
        return None
    try:
        rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(local)
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them), got "
                          f"{os.environ['RANK']!r}, {os.environ['WORLD_SIZE']!r}, {local!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local_rank


def backend_for(device: torch.device) -> str:
    """nccl for CUDA devices, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def _ddp(device: torch.device) -> WrapFn:
    def wrap(model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":
            return DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
        return DistributedDataParallel(model)

    return wrap


def _load(config: LabConfig) -> Dataset:
    return load_dataset(config.dataset, config.data_dir, n_train=config.n_train, n_test=config.n_test,
                        seed=config.data_seed, image_size=config.image_size)


def _console():
    from rich.console import Console

    return Console(stderr=True)


@dataclass
class _Job:
    """What each spawned process needs (pickled to it)."""

    config: dict
    run_dir: str
    todo: list[RunSpec]
    device_type: str
    progress: bool
    data: Dataset | None  # None: each process loads the data itself


def _spawned_rank(rank: int, job: _Job) -> int:
    """Body of one process started by :func:`launch_local` (process group already up)."""
    world_size = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if job.device_type == "cuda" \
        else torch.device("cpu")
    config = LabConfig.from_dict(job.config)
    data = job.data if job.data is not None else _load(config)
    store = ResultsStore(job.run_dir, config.identity_hash()) if rank == 0 else None
    execute_runs(config, store, data, job.todo, device, progress=job.progress, console=_console(),
                 rank=rank, world_size=world_size, wrap=_ddp(device))
    dist.barrier()  # nobody leaves while rank 0 may still evaluate the last run
    sys.stdout.flush()  # launch_local ends the process with os._exit
    sys.stderr.flush()
    return len(job.todo)


def _resolve_device(name: str, local_procs: int, console) -> torch.device:
    """:func:`~normlab.lab.sweep.resolve_device`, except that ``auto`` picks CUDA only when
    every process on this machine can have its own GPU (nccl needs one GPU per process);
    otherwise it runs on the CPU with gloo, and says so."""
    if name == "auto" and torch.cuda.is_available() and torch.cuda.device_count() < local_procs:
        if console is not None:
            console.print(f"[yellow]{local_procs} processes but {torch.cuda.device_count()} GPU(s): running "
                          "on the CPU with gloo[/] (nccl needs one GPU per process)")
        return torch.device("cpu")
    return resolve_device(name)


def _check_cuda(device: torch.device, nproc: int) -> None:
    if device.type != "cuda":
        return
    if device.index is not None:
        raise ConfigError(f"--device {device} with --nproc: each process uses its own GPU (process r on "
                          "cuda:r, or LOCAL_RANK under torchrun); pass --device cuda")
    count = torch.cuda.device_count()
    if nproc > count:
        raise ConfigError(f"--nproc {nproc} on CUDA needs {nproc} GPUs (nccl runs one process per GPU), "
                          f"found {count}; use --nproc <= {count}, or --device cpu for gloo")


def run_compare_distributed(config: LabConfig, run_dir: str | Path, *, device: str = "auto",
                            threads: int | None = None, progress: bool = True, console=None) -> Path:
    """:func:`normlab.lab.sweep.run_compare` under DDP with ``config.nproc`` processes.

    Spawns them on this machine, or, when this process is part of a torchrun world
    (:func:`external_world`), runs as one of them (``config.nproc`` must then equal the
    world size). ``threads``: intra-op threads per process (None: cores / processes on
    this machine). Returns the path of ``report.md`` (on rank 0's machine).

    Raises :class:`ConfigError`, :class:`~normlab.lab.data.DataError` or
    :class:`ResultsError` before anything is trained, on every rank alike, and
    :class:`normlab.distributed.LaunchError` if a spawned process fails.

    The processes are started with ``spawn``: a script that calls this (or
    :func:`~normlab.lab.sweep.run_compare` with ``nproc`` > 1) must do so under
    ``if __name__ == "__main__":``.
    """
    console = console or _console()
    run_dir = Path(run_dir)
    world = external_world()
    local_procs = config.nproc
    if world is not None:
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", world[1]) or world[1])
    dev = _resolve_device(device, local_procs, console if world is None or world[0] == 0 else None)
    if world is not None:
        return _join_world(config, run_dir, dev, world, threads, progress, console)
    nproc = config.nproc
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc must be a positive integer, got {nproc!r}")
    _check_cuda(dev, nproc)
    cores = os.cpu_count() or 1
    if dev.type == "cpu" and nproc > cores:
        console.print(f"[yellow]{nproc} processes on {cores} CPU cores[/]: they share cores (slower; "
                      "the results are the same)")
    store, data, todo = prepare_run(config, run_dir, dev, console)
    del store  # rank 0 re-opens it
    small = sum(t.numel() * t.element_size() for t in (data.x_train, data.x_test)) <= _SEND_DATA_BYTES
    job = _Job(config.to_dict(), str(run_dir), todo, dev.type, progress, data if small else None)
    if todo:
        launch_local(_spawned_rank, nproc, job, backend=backend_for(dev), timeout=None,
                     pg_timeout=DEFAULT_PG_TIMEOUT, num_threads=threads, fail_fast=True)
    return finish(run_dir)


_ERRORS = {cls.__name__: cls for cls in (ConfigError, DataError, ResultsError)}


def _join_world(config: LabConfig, run_dir: Path, dev: torch.device, world: tuple[int, int, int],
                threads: int | None, progress: bool, console) -> Path:
    """Run as rank ``world[0]`` of a world torchrun started (or one already initialized)."""
    rank, world_size, local_rank = world
    if config.nproc != world_size:
        raise ConfigError(f"--nproc {config.nproc} does not match the {world_size} processes torchrun "
                          f"started (WORLD_SIZE={world_size}); pass --nproc {world_size} or leave it out")
    if dev.type == "cuda":
        if dev.index is not None:
            raise ConfigError(f"--device {dev} under torchrun: each process uses cuda:LOCAL_RANK; "
                              "pass --device cuda")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} has no GPU (found {torch.cuda.device_count()}); "
                              "start at most one process per GPU, or use --device cpu")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend_for(dev), timeout=timedelta(seconds=DEFAULT_PG_TIMEOUT))
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        # rank 0 checks and plans; everyone gets its plan (or its error) so all ranks agree
        message: list = [None]
        store = None
        if rank == 0:
            try:
                store, data, todo = prepare_run(config, run_dir, dev, console)
                message = [("ok", config.to_dict(), todo)]
            except tuple(_ERRORS.values()) as error:
                message = [("error", type(error).__name__, str(error))]
        dist.broadcast_object_list(message, src=0)
        if message[0][0] == "error":
            raise _ERRORS[message[0][1]](message[0][2])
        if rank != 0:
            config = LabConfig.from_dict(message[0][1])
            todo = message[0][2]
            data = _load(config)
        execute_runs(config, store, data, todo, dev, progress=progress, console=console, rank=rank,
                     world_size=world_size, wrap=_ddp(dev))
        dist.barrier()
        return finish(run_dir) if rank == 0 else run_dir / "report.md"
    finally:
        torch.set_num_threads(previous_threads)
        if created:
            dist.destroy_process_group()
