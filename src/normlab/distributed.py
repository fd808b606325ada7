"""Small helpers for running normlab under torch.distributed.

Two things live here:

* :func:`sync_world` -- the process group a synchronized layer
  (:class:`normlab.SyncBatchNorm`) should talk to, or None when there is nothing
  to synchronize with (torch.distributed unavailable or not initialized, or a
  group of one process).
* :func:`launch_local` -- run a function in N local processes, each with an
  initialized process group (gloo on 127.0.0.1 by default), and collect what
  each returned. It is what ``torchrun --nproc-per-node N`` does, in-process
  and with a hard deadline, for tests and for the lab's multi-process runs::

      def step(rank, scale):                   # runs in every process
          x = torch.full((2,), float(rank))
          torch.distributed.all_reduce(x)
          return x * scale

      launch_local(step, 3, 10.0)              # -> [tensor([30., 30.])] * 3

  The function must be picklable (defined at module top level) because the
  processes are started with the ``spawn`` method; its return value must be
  picklable too (it is pickled by value, so tensors come back as copies).

Each process ends with ``os._exit`` right after sending its answer (interpreter
finalization after DDP's imports takes seconds), so ``fn`` must finish its own
side effects -- close files, flush logs -- before returning.

A failed run raises :class:`LaunchError`, whose ``outcomes`` say, rank by rank,
what came back: a value, an exception (type, message, traceback), a process
that died without answering (its exit code), or one that did not finish in
time. Survivors are never left running: every process is joined or killed
before :func:`launch_local` returns or raises.
"""

from __future__ import annotations

import math
import os
import pickle
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_PG_TIMEOUT",
    "FAIL_FAST_GRACE",
    "LaunchError",
    "RankOutcome",
    "free_port",
    "launch_local",
    "sync_world",
]


# Seconds a collective waits for its peers when launch_local has no deadline (torch's default).
DEFAULT_PG_TIMEOUT = 1800.0
# With fail_fast: seconds the surviving ranks get to report after a rank failed.
FAIL_FAST_GRACE = 10.0


def sync_world(process_group: Any = None) -> tuple[Any, int, int] | None:
    """``(group, rank, world_size)`` to synchronize over, or None if there is none.

    ``process_group`` None means the default (world) group. None is returned when
    torch.distributed is unavailable or not initialized, or the group has a single
    process -- the cases where a synchronized layer behaves as its local version.
    A process that is not a member of ``process_group`` gets a ValueError: it has
    no one to synchronize with, and silently normalizing alone would hide the bug.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if process_group is None else process_group
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the given process_group"
        )
    if world_size <= 1:
        return None
    return group, rank, world_size


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it).

    Another program could take it before the rendezvous binds it; that race is
    the usual price of ``MASTER_PORT`` and is negligible on a test machine.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RankOutcome:
    """What one rank of :func:`launch_local` came back with.

    ``status`` is ``"ok"`` (``value`` holds the return value), ``"error"`` (the
    function raised: ``error_type``, ``error_message``, ``traceback``), ``"died"``
    (the process ended without answering: ``exitcode``), ``"timeout"`` (it was
    still running at the deadline and was killed) or ``"stopped"`` (killed with
    ``fail_fast`` because another rank had failed). ``elapsed`` is seconds from
    the launch until the answer (or the deadline).
    """

    rank: int
    status: str
    value: Any = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    exitcode: int | None = None
    elapsed: float = 0.0

    def describe(self) -> str:
        if self.status == "ok":
            return f"rank {self.rank}: ok"
        if self.status == "error":
            return f"rank {self.rank}: raised {self.error_type}: {self.error_message}"
        if self.status == "died":
            return f"rank {self.rank}: process died without an answer (exit code {self.exitcode})"
        if self.status == "stopped":
            return f"rank {self.rank}: stopped (killed) because another rank failed"
        return f"rank {self.rank}: did not finish within the deadline ({self.elapsed:.1f} s), killed"


class LaunchError(RuntimeError):
    """Some rank of :func:`launch_local` did not return a value; see ``outcomes``."""

    def __init__(self, outcomes: list[RankOutcome]) -> None:
        self.outcomes = outcomes
        failed = [o for o in outcomes if o.status != "ok"]
        lines = "\n  ".join(o.describe() for o in failed)
        first_tb = next((o.traceback for o in failed if o.traceback), None)
        msg = f"{len(failed)} of {len(outcomes)} processes failed:\n  {lines}"
        if first_tb:
            msg += f"\n\nfirst traceback:\n{first_tb}"
        super().__init__(msg)


def _child(fn: Callable[..., Any], rank: int, nprocs: int, args: tuple, backend: str,
           port: int, pg_timeout: float, num_threads: int | None, conn: Connection) -> None:
    """Body of one spawned process: set the torchrun environment, join the
    process group, run ``fn(rank, *args)`` and send back a pickled outcome."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
           "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nprocs)}
    os.environ.update(env)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    try:
        dist.init_process_group(backend, rank=rank, world_size=nprocs,
                                timeout=timedelta(seconds=pg_timeout))
        try:
            message = ("ok", fn(rank, *args))
        finally:
            # release sockets (and NCCL communicators) before the process ends; a group
            # broken by a dead peer may fail to close, which must not mask fn's outcome
            try:
                dist.destroy_process_group()
            except Exception:
                pass
    except BaseException as exc:  # report everything, including KeyboardInterrupt/SystemExit
        message = ("error", type(exc).__name__, str(exc), traceback.format_exc())
    try:
        payload = pickle.dumps(message)
    except Exception as exc:  # an unpicklable return value is the function's error
        payload = pickle.dumps(("error", type(exc).__name__,
                                f"return value of rank {rank} could not be pickled: {exc}",
                                traceback.format_exc()))
    conn.send_bytes(payload)
    conn.close()
    # The answer is out; skip interpreter finalization, which after DDP has imported
    # its ~900 modules takes seconds and would only delay the parent's join.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch_local(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float | None = 300.0,
    pg_timeout: float | None = None,
    num_threads: int | None = None,
    fail_fast: bool = False,
) -> list[Any]:
    """Run ``fn(rank, *args)`` in ``nprocs`` fresh local processes; return the
    ``nprocs`` return values in rank order.

    Each process has ``torch.distributed`` initialized before ``fn`` runs
    (``backend`` "gloo", or "nccl" with process ``r`` on GPU ``r % device_count``),
    the torchrun environment variables set (MASTER_ADDR=127.0.0.1, a free
    MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), and the process
    group destroyed after ``fn`` returns. As with any spawn-based launcher, a script
    that calls this must do so under ``if __name__ == "__main__":``.

    Args:
        fn: a picklable (module-level) function ``fn(rank, *args)``.
        nprocs: number of processes (>= 1).
        *args: picklable arguments passed to every rank.
        backend: torch.distributed backend. Default "gloo".
        timeout: seconds the whole launch may take, start-up included; processes
            still running then are killed. None: no deadline (long jobs such as
            ``normlab compare --nproc N``). Default 300.
        pg_timeout: the process group's timeout (seconds a collective may wait for
            its peers before raising). Default: ``timeout``, or 1800 s (torch's
            default) when ``timeout`` is None.
        num_threads: intra-op threads per process. Default: the CPU count divided
            by ``nprocs`` (at least 1), so the processes do not oversubscribe.
        fail_fast: when a rank raises or dies, give the others
            :data:`FAIL_FAST_GRACE` seconds to report (they usually fail too, with
            the process group's error) and then kill them, instead of letting them
            wait in a collective until ``pg_timeout``. Default False.

    Raises:
        LaunchError: some rank raised, died or ran out of time; ``.outcomes``
            holds one :class:`RankOutcome` per rank.
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"launch_local: expected nprocs to be a positive int, got {nprocs!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"launch_local: expected a positive timeout or None, got {timeout!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("launch_local: backend 'nccl' needs CUDA, which is not available")
    if num_threads is None:
        num_threads = max(1, (os.cpu_count() or 1) // nprocs)
    if pg_timeout is None:
        pg_timeout = DEFAULT_PG_TIMEOUT if timeout is None else timeout
    port = free_port()
    ctx = torch.multiprocessing.get_context("spawn")
    start = time.monotonic()
    deadline = math.inf if timeout is None else start + timeout
    stop_at = math.inf  # fail_fast: when the survivors of a failed launch are killed
    procs, readers = [], []
    try:
        for rank in range(nprocs):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, name=f"normlab-rank{rank}", daemon=True,
                               args=(fn, rank, nprocs, args, backend, port, pg_timeout,
                                     num_threads, writer))
            proc.start()
            # the child holds the only write end now, so its death reads as EOF here
            writer.close()
            procs.append(proc)
            readers.append(reader)

        outcomes: dict[int, RankOutcome] = {}
        pending = {reader: rank for rank, reader in enumerate(readers)}
        while pending:
            remaining = min(deadline, stop_at) - time.monotonic()
            if remaining <= 0:
                break
            for reader in wait(list(pending), None if math.isinf(remaining) else remaining):
                rank = pending.pop(reader)
                elapsed = time.monotonic() - start
                try:
                    message = pickle.loads(reader.recv_bytes())
                except EOFError:
                    procs[rank].join(5.0)
                    outcomes[rank] = RankOutcome(rank, "died", exitcode=procs[rank].exitcode,
                                                 elapsed=elapsed)
                    if fail_fast:
                        stop_at = min(stop_at, time.monotonic() + FAIL_FAST_GRACE)
                    continue
                if message[0] == "ok":
                    outcomes[rank] = RankOutcome(rank, "ok", value=message[1], elapsed=elapsed)
                else:
                    _, etype, emsg, tb = message
                    outcomes[rank] = RankOutcome(rank, "error", error_type=etype, error_message=emsg,
                                                 traceback=tb, elapsed=elapsed)
                    if fail_fast:
                        stop_at = min(stop_at, time.monotonic() + FAIL_FAST_GRACE)
        late = "stopped" if time.monotonic() < deadline else "timeout"
        for rank in pending.values():
            outcomes[rank] = RankOutcome(rank, late, elapsed=time.monotonic() - start)
    finally:
        for proc in procs:
            proc.join(max(0.0, min(5.0, min(deadline, stop_at) - time.monotonic())))
            if proc.is_alive():
                proc.kill()
                proc.join()
        for reader in readers:
            reader.close()

    ordered = [outcomes[r] for r in range(nprocs)]
    if any(o.status != "ok" for o in ordered):
        raise LaunchError(ordered)
    return [o.value for o in ordered]
