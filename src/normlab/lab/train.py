"""One run: train a model with one norm at one batch size and seed, then measure it.

The pieces are separate functions so that other drivers can reuse them;
:func:`run_one` is the composition the sweep calls. Under DistributedDataParallel
(``world_size`` > 1, see :mod:`normlab.lab.parallel`) every rank calls :func:`run_one`
with the same arguments plus its rank and a ``wrap`` that makes the DDP module: the
global batches are the same on every rank and each rank trains on its
:func:`shard`; rank 0 alone evaluates and returns the metrics.

Everything a run does is seeded by its seed: the convolution weights (so every norm
starts from the same weights), the order of the batches, the noise of the shift
scenario.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..bench.timing import saved_bytes
from ..tools.calibrate import recalibrate_bn
from .config import LabConfig, lr_for_batch, steps_for_batch
from .data import Dataset
from .models import build_model, default_arch

__all__ = [
    "LAB_NORMS", "RunSpec", "batch_indices", "evaluate", "make_model", "measure_cost",
    "recalibrate_batchnorm", "run_one", "shard", "train_model",
]

ProgressFn = Callable[[int, int], None]
WrapFn = Callable[[nn.Module], nn.Module]

# Norm names the lab builds itself, on top of the registry (normlab.norm_names()):
# "syncbn" is the "bn" model with every BatchNorm converted by
# nl.SyncBatchNorm.convert_sync_batchnorm -- statistics over all processes under DDP,
# plain BatchNorm in a single process.
LAB_NORMS = ("syncbn",)


@dataclass(frozen=True)
class RunSpec:
    """Identifies one run. ``scenario`` is ``sweep`` (i.i.d. batches), ``noniid``, ``cost`` or
    ``ppb`` (per-process batch, multi-process only). ``batch_size`` is the global batch."""

    scenario: str
    norm: str
    batch_size: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.scenario}/{self.norm}/bs{self.batch_size}/seed{self.seed}"


def make_model(config: LabConfig, data: Dataset, norm: str, seed: int) -> nn.Module:
    """The model for ``norm``, its non-norm weights drawn from ``torch.manual_seed(seed)``.

    ``syncbn`` is the ``bn`` model (same initial weights) with its BatchNorm layers
    converted to :class:`normlab.SyncBatchNorm`.
    """
    from ..nn.syncbn import SyncBatchNorm

    torch.manual_seed(seed)
    arch = default_arch(data.name, data.spatial_dims) if config.model == "auto" else config.model
    model = build_model(arch, "bn" if norm == "syncbn" else norm, data.in_channels, data.num_classes,
                        data.spatial_shape, width=config.width, depth=config.depth, groups=config.groups)
    return SyncBatchNorm.convert_sync_batchnorm(model) if norm == "syncbn" else model


def shard(idx: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s part of a global batch: ``idx[rank::world_size]``.

    Strided rather than contiguous so that each part is a sample of the whole batch
    (a non-i.i.d. batch is laid out class by class). For B examples and N ranks the
    sizes are ``ceil(B / N)`` for the first ``B % N`` ranks and ``floor(B / N)`` for the
    rest; B < N would leave a rank empty, which the drivers reject before training.
    """
    return idx[rank::world_size]


def batch_indices(labels: torch.Tensor, batch_size: int, steps: int, seed: int,
                  classes_per_batch: int | None = None) -> Iterator[torch.Tensor]:
    """Index batches of exactly ``batch_size`` for ``steps`` steps.

    i.i.d. (``classes_per_batch=None``): reshuffled epochs, the incomplete tail of an
    epoch dropped so that every step normalizes over the same batch size.
    Non-i.i.d.: each batch draws ``classes_per_batch`` classes at random and fills the
    batch from them in equal shares (each class cycles through its own shuffled pool).
    """
    gen = torch.Generator().manual_seed(10_000 + seed)
    n = len(labels)
    if classes_per_batch is None:
        perm, pos = torch.randperm(n, generator=gen), 0
        for _ in range(steps):
            if pos + batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            yield perm[pos:pos + batch_size]
            pos += batch_size
        return
    classes = torch.unique(labels)
    pools = {int(c): torch.nonzero(labels == c).flatten() for c in classes}
    order = {c: p[torch.randperm(len(p), generator=gen)] for c, p in pools.items()}
    cursor = dict.fromkeys(pools, 0)
    k = min(classes_per_batch, len(classes))

    def take(c: int, m: int) -> torch.Tensor:
        out = []
        while m > 0:
            if cursor[c] >= len(order[c]):
                order[c] = pools[c][torch.randperm(len(pools[c]), generator=gen)]
                cursor[c] = 0
            chunk = order[c][cursor[c]:cursor[c] + m]
            cursor[c] += len(chunk)
            m -= len(chunk)
            out.append(chunk)
        return torch.cat(out)

    for _ in range(steps):
        chosen = classes[torch.randperm(len(classes), generator=gen)[:k]].tolist()
        shares = [batch_size // k + (1 if i < batch_size % k else 0) for i in range(k)]
        yield torch.cat([take(c, m) for c, m in zip(chosen, shares, strict=True) if m > 0])


@dataclass
class TrainLog:
    """What training produced: the loss curve (step, mean loss, training seconds) and timing."""

    steps: int
    curve: list[tuple[int, float, float]]
    final_loss: float
    train_seconds: float
    ms_per_step: float
    diverged: bool


def train_model(model: nn.Module, config: LabConfig, data: Dataset, batch_size: int, seed: int,
                device: torch.device, *, classes_per_batch: int | None = None,
                on_step: ProgressFn | None = None, rank: int = 0, world_size: int = 1) -> TrainLog:
    """SGD + momentum, linear-scaling LR (:func:`lr_for_batch`), cosine decay to 0.

    The loss curve keeps ``config.curve_points`` points, each the mean training loss
    since the previous point, with the training time spent so far (evaluation and
    logging excluded).

    With ``world_size`` > 1, ``model`` is a DistributedDataParallel module and this
    rank trains on :func:`shard` of each global batch of ``batch_size``. Its loss is
    ``(N / B) * sum of its examples' losses``: DDP averages the N ranks' gradients, so
    the update is the gradient of the mean loss over the global batch even when the
    parts differ in size. The logged loss is that global mean (one scalar all_reduce
    per step), identical on every rank, so all ranks stop together if it diverges.
    """
    steps = steps_for_batch(config, batch_size, len(data.y_train))
    base_lr = lr_for_batch(config, batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    model.train()
    every = max(1, steps // max(1, config.curve_points))
    curve: list[tuple[int, float, float]] = []
    step_times: list[float] = []
    chunk, chunk_n, last_losses = 0.0, 0, []
    elapsed, diverged = 0.0, False
    x_all, y_all = data.x_train, data.y_train
    batches = batch_indices(y_all, batch_size, steps, seed, classes_per_batch)
    step = 0
    for step, idx in enumerate(batches, start=1):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = base_lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / steps))
        if world_size > 1:
            part = shard(idx, rank, world_size)
            x, y = x_all[part].to(device), y_all[part].to(device)
            loss = nn.functional.cross_entropy(model(x), y, reduction="sum") * (world_size / len(idx))
        else:
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if world_size > 1:
            total = loss.detach().clone()
            dist.all_reduce(total)
            value = total.item() / world_size
        else:
            value = loss.item()  # synchronizes the device, so the step time is real
        dt = time.perf_counter() - t0
        elapsed += dt
        step_times.append(dt)
        chunk += value
        chunk_n += 1
        if step > steps - max(1, steps // 10):
            last_losses.append(value)
        if not math.isfinite(value):
            diverged = True
            curve.append((step, value, elapsed))
            break
        if step % every == 0 or step == steps:
            curve.append((step, chunk / chunk_n, elapsed))
            chunk, chunk_n = 0.0, 0
        if on_step is not None and (step % 10 == 0 or step == steps):
            on_step(step, steps)
    timed = sorted(step_times[5:] or step_times)
    return TrainLog(steps=step, curve=curve,
                    final_loss=(sum(last_losses) / len(last_losses)) if last_losses else float("nan"),
                    train_seconds=elapsed, ms_per_step=1e3 * timed[len(timed) // 2], diverged=diverged)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             device: torch.device, *, train_mode: bool = False) -> float:
    """Classification error in percent. ``train_mode`` normalizes with each batch's own
    statistics (on a copy, so running statistics stay untouched)."""
    if train_mode:
        model = copy.deepcopy(model).train()
    else:
        model.eval()
    wrong = 0
    for start in range(0, len(y), batch_size):
        xb = x[start:start + batch_size].to(device)
        pred = model(xb).argmax(1).cpu()
        wrong += int((pred != y[start:start + batch_size]).sum())
    return 100.0 * wrong / len(y)


def _running_stat_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if getattr(m, "track_running_stats", False) and getattr(m, "running_mean", None) is not None]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int,
                          device: torch.device) -> nn.Module:
    """A copy of ``model`` whose running statistics are re-estimated on ``x``
    (:func:`normlab.tools.recalibrate_bn`: the cumulative average of the statistics of
    batches of ``batch_size`` from ``x``, without gradients), in eval mode."""
    model = copy.deepcopy(model)
    # a 1-sample tail would add a noisy estimate (and cannot train BatchNorm1d)
    batches = [x[start:start + batch_size].to(device) for start in range(0, len(x), batch_size)
               if start == 0 or len(x) - start >= 2]
    recalibrate_bn(model, batches, progress=False)
    return model.eval()


def _shifted_errors(model: nn.Module, config: LabConfig, data: Dataset, seed: int,
                    device: torch.device) -> dict[str, float]:
    x = data.x_test  # standardized: offsets and noise are in units of the input std
    gen = torch.Generator().manual_seed(20_000 + seed)
    noise = torch.randn(x.shape, generator=gen) * config.shift_noise
    b = config.eval_batch
    return {
        "err_shift_offset": evaluate(model, x + config.shift_offset, data.y_test, b, device),
        "err_shift_scale": evaluate(model, x * config.shift_scale, data.y_test, b, device),
        "err_shift_noise": evaluate(model, x + noise, data.y_test, b, device),
    }


def _local_model(model: nn.Module, norm: str, config: LabConfig, data: Dataset, seed: int,
                 device: torch.device) -> nn.Module:
    """``model`` for evaluation in this process alone.

    A SyncBatchNorm model in train mode would start collectives the other ranks are
    not part of, so rank 0 evaluates a plain-BatchNorm twin holding the same state
    (the state_dicts of SyncBatchNorm and BatchNorm are the same).
    """
    if norm != "syncbn" or not (dist.is_available() and dist.is_initialized()):
        return model
    twin = make_model(config, data, "bn", seed).to(device)
    twin.load_state_dict(model.state_dict())
    return twin


def _norm_batch(norm: str, batch_size: int, world_size: int) -> int:
    """How many examples a training step's statistics covered: the global batch for
    SyncBatchNorm (or one process), else the largest per-process part."""
    return batch_size if (world_size == 1 or norm == "syncbn") else -(-batch_size // world_size)


def run_one(spec: RunSpec, config: LabConfig, data: Dataset, device: torch.device,
            on_step: ProgressFn | None = None, *, rank: int = 0, world_size: int = 1,
            wrap: WrapFn | None = None) -> dict | None:
    """Train and measure one run; returns the row's ``metrics`` and ``curve``.

    metrics: ``err_test`` (eval mode, %), ``final_loss``, ``steps``, ``epochs``, ``lr``,
    ``train_seconds``, ``ms_per_step``, ``diverged``; for the sweep also the shifted
    errors and, for models with running statistics, ``err_batch_stats`` (test batches
    as large as a training step's normalization batch -- the global batch, or one
    process's part of it under DDP without SyncBatchNorm -- normalized with their own
    statistics) and ``err_recal`` (running statistics re-estimated on the training set).
    ``ppb`` runs add ``per_process_batch``.

    Multi-process: every rank calls this with its ``rank``, the ``world_size`` and
    ``wrap`` (model -> DistributedDataParallel model); ranks other than 0 return None
    after training, rank 0 evaluates alone and returns the metrics.
    """
    if spec.scenario == "cost":
        metrics = measure_cost(spec, config, data, device, rank=rank, world_size=world_size, wrap=wrap)
        return {"metrics": metrics, "curve": []} if rank == 0 else None
    model = make_model(config, data, spec.norm, spec.seed).to(device)
    cpb = config.noniid_classes if spec.scenario == "noniid" else None
    trained = wrap(model) if wrap is not None else model
    log = train_model(trained, config, data, spec.batch_size, spec.seed, device,
                      classes_per_batch=cpb, on_step=on_step, rank=rank, world_size=world_size)
    if rank != 0:
        return None
    model = _local_model(model, spec.norm, config, data, spec.seed, device)
    metrics: dict = {
        "err_test": evaluate(model, data.x_test, data.y_test, config.eval_batch, device),
        "final_loss": log.final_loss, "steps": log.steps, "lr": lr_for_batch(config, spec.batch_size),
        "epochs": log.steps * spec.batch_size / len(data.y_train),
        "train_seconds": log.train_seconds, "ms_per_step": log.ms_per_step, "diverged": log.diverged,
    }
    if spec.scenario == "ppb":
        metrics["per_process_batch"] = spec.batch_size // world_size
    if spec.scenario == "sweep":
        metrics.update(_shifted_errors(model, config, data, spec.seed, device))
        if _running_stat_modules(model):
            metrics["err_batch_stats"] = evaluate(
                model, data.x_test, data.y_test, _norm_batch(spec.norm, spec.batch_size, world_size),
                device, train_mode=True)
            recal = recalibrate_batchnorm(model, data.x_train, config.recal_batch, device)
            metrics["err_recal"] = evaluate(recal, data.x_test, data.y_test, config.eval_batch, device)
    return {"metrics": metrics, "curve": [list(p) for p in log.curve]}


def measure_cost(spec: RunSpec, config: LabConfig, data: Dataset, device: torch.device, *,
                 rank: int = 0, world_size: int = 1, wrap: WrapFn | None = None) -> dict:
    """Time per training step and memory for one norm at ``spec.batch_size``.

    ``ms_step``: median wall time of forward+backward+SGD step over ``cost_steps`` steps
    (after 3 warm-up steps); ``ms_forward``: median eval-mode forward. ``saved_mb``: bytes
    autograd keeps for the backward of one step (unique storages, a device-independent
    proxy for activation memory); ``peak_mb``: the allocator's peak on CUDA (None on CPU).

    Multi-process (``wrap`` makes the DDP module): the step is a DDP step on this
    rank's :func:`shard` of the batch (gradient all_reduce included); the forward time
    and memory are those of one process's part. Rank 0's numbers are reported.
    """
    base = make_model(config, data, spec.norm, spec.seed).to(device)
    model = wrap(base) if wrap is not None else base
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=config.momentum)
    idx = shard(torch.arange(spec.batch_size) % len(data.y_train), rank, world_size)
    x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for _ in range(3):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(config.cost_steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None

    # the unwrapped module: a DDP forward without its backward would leave DDP waiting for
    # gradients (a SyncBatchNorm forward still synchronizes, on every rank alike)
    saved = saved_bytes(lambda inputs: nn.functional.cross_entropy(base(inputs), y), x)
    base.eval()
    fwd = []
    with torch.no_grad():
        for _ in range(max(3, config.cost_steps // 2)):
            sync()
            t0 = time.perf_counter()
            base(x)
            sync()
            fwd.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    return {
        "ms_step": 1e3 * med, "ms_forward": 1e3 * sorted(fwd)[len(fwd) // 2],
        "saved_mb": saved / 2**20, "peak_mb": peak,
        "params": sum(p.numel() for p in base.parameters()),
    }
