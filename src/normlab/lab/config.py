"""The declared configuration of a comparison run, its presets and the learning-rate rule.

A :class:`LabConfig` is everything that decides what is trained and measured. It is
saved (resolved, as YAML) next to the results, and its *identity* -- the fields that
change what one run computes -- guards a run directory against being resumed with a
different setup. The run *set* (norms, batch sizes, seeds) is not part of the
identity: a directory can be extended with more norms or seeds and the finished runs
are reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LabConfig", "PRESETS", "IDENTITY_FIELDS", "LATER_IDENTITY_FIELDS", "lr_for_batch",
           "steps_for_batch"]

DATASETS = ("mnist1d", "digits", "cifar10", "imagefolder")


@dataclass
class LabConfig:
    """What ``normlab compare`` trains and measures.

    Training budget: a run with batch size B takes
    ``steps = max(min_steps, ceil(epochs * n_train / B))`` SGD steps, so every run sees
    at least ``epochs`` passes over the data (the Group Normalization paper compares
    batch sizes at a fixed number of epochs) and at least ``min_steps`` updates.

    Learning rate (linear scaling rule, Goyal et al. 2017): ``lr * B / lr_ref_batch``,
    decayed to 0 with a cosine schedule over the run; SGD with momentum and weight
    decay, the same for every norm.

    Processes (``nproc`` N > 1): every run trains under DistributedDataParallel with N
    processes; B is the *global* batch (same steps and learning rate as one process),
    process r gets the examples ``r, r + N, r + 2N, ...`` of each batch (sizes differ
    by at most one when N does not divide B). Batch sizes below N are skipped. The
    *per-process batch* scenario trains ``ppb_norms`` with ``b`` examples per process
    (global batch N * b) for each b in ``per_process_batches`` (None: 1, 2, 4, 8 --
    2, 8 with the quick preset -- when N > 1, none when N = 1).
    """

    dataset: str = "mnist1d"
    data_dir: str | None = None
    n_train: int | None = None  # None: the whole training split
    n_test: int | None = None
    data_seed: int = 42  # seed of the MNIST-1D generator / of the train-test split
    image_size: int = 32  # imagefolder images are resized to this (square)
    model: str = "auto"  # auto | cnn1d | cnn2d | resnet
    width: int = 32
    depth: int = 1  # residual blocks per stage (resnet); 3 gives ResNet-20
    groups: int = 8  # GroupNorm's group count (largest divisor of C that is <= groups)
    norms: list[str] = field(default_factory=list)  # empty: bn,ln,in,gn,rms,none; ["all"]: all registered
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    seed: int = 0
    seeds: int = 3
    epochs: float = 1.0
    min_steps: int = 300
    lr: float = 0.1
    lr_ref_batch: int = 32
    lr_rule: str = "linear"  # linear: lr * B / ref; sqrt: lr * sqrt(B / ref)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    ref_batch: int = 32  # batch size of the curves, shift, non-i.i.d. and cost scenarios
    eval_batch: int = 500
    recal_batch: int = 256  # batch size for re-estimating BatchNorm statistics
    shift_offset: float = 1.0  # in units of the input's standard deviation
    shift_scale: float = 2.0
    shift_noise: float = 0.5
    noniid_classes: int = 2  # classes per batch in the non-i.i.d. scenario
    cost_steps: int = 30
    curve_points: int = 60
    nproc: int = 1  # processes (DistributedDataParallel world size); 1: a single process, no DDP
    per_process_batches: list[int] | None = None  # per-process batch scenario; None: auto (see above)
    ppb_norms: list[str] = field(default_factory=lambda: ["bn", "syncbn", "gn"])
    preset: str = "default"

    # ----------------------------------------------------------------- helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**data)

    def identity(self) -> dict[str, Any]:
        """The fields that change what a single run computes.

        Fields added after the first release (:data:`LATER_IDENTITY_FIELDS`) count only
        when they differ from their default, so run directories written before they
        existed keep their identity and still resume.
        """
        out = {name: getattr(self, name) for name in IDENTITY_FIELDS}
        out.update({name: getattr(self, name) for name, default in LATER_IDENTITY_FIELDS.items()
                    if getattr(self, name) != default})
        return out

    def identity_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]


# Everything except the run set (norms, batch_sizes, seed/seeds) and cosmetic fields.
IDENTITY_FIELDS: tuple[str, ...] = (
    "dataset", "data_dir", "n_train", "n_test", "data_seed", "image_size", "model", "width",
    "depth", "groups", "epochs", "min_steps", "lr", "lr_ref_batch", "lr_rule", "momentum", "weight_decay",
    "ref_batch", "eval_batch", "recal_batch", "shift_offset", "shift_scale", "shift_noise",
    "noniid_classes", "cost_steps", "curve_points",
)
# Identity fields added later, with the default at which they are left out of the identity.
# nproc changes what a run computes (BatchNorm's statistics cover B / nproc examples).
LATER_IDENTITY_FIELDS: dict[str, Any] = {"nproc": 1}

# Named presets: overrides of the defaults above. "quick" is the smoke test (< 1 minute).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "quick": {
        "n_train": 1000, "n_test": 500, "batch_sizes": [2, 16], "seeds": 2, "epochs": 0.3,
        "min_steps": 100, "ref_batch": 16, "width": 16, "cost_steps": 10, "curve_points": 20,
        "preset": "quick",
    },
}


def lr_for_batch(config: LabConfig, batch_size: int) -> float:
    """``lr * B / lr_ref_batch`` (linear rule, Goyal et al. 2017) or ``lr * sqrt(B / lr_ref_batch)``
    (square-root rule, Krizhevsky 2014; Hoffer et al. 2017), by ``config.lr_rule``."""
    ratio = batch_size / config.lr_ref_batch
    if config.lr_rule == "linear":
        return config.lr * ratio
    if config.lr_rule == "sqrt":
        return config.lr * ratio ** 0.5
    raise ValueError(f"unknown lr_rule {config.lr_rule!r}; expected linear or sqrt")


def steps_for_batch(config: LabConfig, batch_size: int, n_train: int) -> int:
    """``max(min_steps, ceil(epochs * n_train / batch_size))``."""
    per_epochs = -(-int(round(config.epochs * n_train)) // batch_size)
    return max(config.min_steps, per_epochs)
