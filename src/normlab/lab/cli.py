"""Subcommands ``compare``, ``report`` and ``explain`` of the ``normlab`` command.

Only argparse and stdlib at import time: torch-heavy and plotting modules are
imported inside the handlers so ``normlab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

__all__ = ["add_parser"]

SMALL_DATASETS = ("mnist1d", "digits")


def _usage_error(message: str) -> Exception:
    from ..cli import UsageError

    return UsageError(message)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise _usage_error(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not values:
        raise _usage_error(f"{flag} is empty")
    return values


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _usage_error(f"{flag} expects a positive integer, got {text!r}") from None
    if value < 1:
        raise _usage_error(f"{flag} expects a positive integer, got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``compare``, ``report`` and ``explain``."""
    p = subparsers.add_parser(
        "compare", help="train one model per normalization across batch sizes and write a report",
        description="Train the same model with each normalization across batch sizes and seeds, "
                    "offline, and write a run directory with results, plots and report.md/.html. "
                    "Re-running the same command resumes an interrupted run.")
    p.add_argument("--quick", action="store_true", help="small smoke-test preset (< 1 minute)")
    p.add_argument("--config", metavar="FILE", help="YAML file of LabConfig fields; flags override it")
    p.add_argument("--dataset", choices=["mnist1d", "digits", "cifar10", "imagefolder"],
                   help="data (default mnist1d, generated offline); cifar10/imagefolder need --data-dir")
    p.add_argument("--data-dir", metavar="PATH", help="local data for cifar10 (cifar-10-batches-py) or "
                   "imagefolder (one folder per class)")
    p.add_argument("--norm", metavar="LIST", help="comma-separated norm names from the registry "
                   "(normlab.norm_names(); names added with normlab.register_norm work too), or 'all'; "
                   "default bn,ln,in,gn,rms,none")
    p.add_argument("--batch-sizes", metavar="LIST", help="comma-separated (default 1,2,4,8,16,32,64)")
    p.add_argument("--seeds", type=int, metavar="K", help="seeds per setting (default 3)")
    p.add_argument("--seed", type=int, metavar="S", help="first seed (default 0): runs use S..S+K-1")
    p.add_argument("--epochs", type=float, help="passes over the training set per run (default 1)")
    p.add_argument("--min-steps", type=int, help="minimum SGD steps per run (default 300)")
    p.add_argument("--lr", type=float, help="learning rate at --lr-ref-batch (default 0.1 at 32; "
                   "scaled linearly with batch size)")
    p.add_argument("--lr-ref-batch", type=int, help="batch size at which --lr applies (default 32)")
    p.add_argument("--ref-batch", type=int, help="batch size of the curves/shift/non-i.i.d./cost "
                   "scenarios (default 32)")
    p.add_argument("--groups", type=int, help="GroupNorm groups (default 8)")
    p.add_argument("--model", choices=["auto", "cnn1d", "cnn2d", "resnet"], help="default auto")
    p.add_argument("--width", type=int, help="channels of the first stage (default 32)")
    p.add_argument("--depth", type=int, help="residual blocks per stage for resnet (3 = ResNet-20)")
    p.add_argument("--n-train", type=int, help="use at most this many training examples")
    p.add_argument("--n-test", type=int, help="use at most this many test examples")
    p.add_argument("--image-size", type=int, help="imagefolder images are resized to this (default 32)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default 1 for "
                   "mnist1d/digits, else all cores divided by the processes on this machine)")
    p.add_argument("--nproc", metavar="N", help="train every run under DistributedDataParallel with N "
                   "processes (gloo on CPU, nccl with one GPU per process); the batch sizes are global "
                   "batches split across them (batch sizes < N are skipped). Under torchrun leave it "
                   "out: the processes torchrun started are used (WORLD_SIZE). Default 1")
    p.add_argument("--per-process-batches", metavar="LIST", help="per-process batch sizes of the "
                   "'per-process batch' scenario (BN with local statistics vs SyncBN vs GN; needs "
                   "--nproc >= 2), or 'off'; default 1,2,4,8 (quick: 2,8) when --nproc >= 2")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/compare-DATASET[-quick])")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_compare)

    r = subparsers.add_parser("report", help="re-render report.md/.html and plots from a run directory",
                              description="Re-render plots, report.md and report.html from a run "
                                          "directory's saved results, without training.")
    r.add_argument("run_dir", metavar="DIR")
    r.set_defaults(func=_report)

    e = subparsers.add_parser(
        "explain", help="which axes a normalization shares statistics over, with a cube picture",
        description="Print which axes share one mean/variance for METHOD and an input shape, how "
                    "many statistics there are and how many elements each averages; draw the "
                    "Group Normalization paper's cube picture as a PNG.")
    e.add_argument("method", metavar="METHOD", help="bn, ln, in, gn, rms, or all")
    e.add_argument("--shape", default="6,6,4,4", help="N,C,H,W (or N,C,L / N,C,D,H,W); default 6,6,4,4")
    e.add_argument("--groups", type=int, default=2, help="GroupNorm groups (default 2)")
    e.add_argument("--out", metavar="PNG", help="picture path (default normlab-explain-METHOD.png)")
    e.set_defaults(func=_explain)


# ------------------------------------------------------------------------------ handlers
_FLAG_FIELDS = {
    "dataset": "dataset", "data_dir": "data_dir", "seeds": "seeds", "seed": "seed", "epochs": "epochs",
    "min_steps": "min_steps", "lr": "lr", "lr_ref_batch": "lr_ref_batch", "ref_batch": "ref_batch",
    "groups": "groups", "model": "model", "width": "width", "depth": "depth", "n_train": "n_train",
    "n_test": "n_test", "image_size": "image_size",
}


def build_config(args: argparse.Namespace):
    """LabConfig from: defaults <- preset (--quick) <- --config file <- flags."""
    from .config import PRESETS, LabConfig

    values = dataclasses.asdict(LabConfig())
    values.update(PRESETS["quick" if args.quick else "default"])
    if args.config:
        import yaml

        try:
            loaded = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise _usage_error(f"cannot read --config {args.config}: {error}") from None
        if not isinstance(loaded, dict):
            raise _usage_error(f"--config {args.config} must hold a mapping of LabConfig fields")
        values.update(loaded)
    for flag, name in _FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            values[name] = value
    if args.norm is not None:
        values["norms"] = [n.strip().lower() for n in args.norm.split(",") if n.strip()]
        if not values["norms"]:
            raise _usage_error("--norm is empty")
    if args.batch_sizes is not None:
        values["batch_sizes"] = _int_list(args.batch_sizes, "--batch-sizes")
    if args.per_process_batches is not None:
        off = args.per_process_batches.strip().lower() in ("off", "none", "0")
        values["per_process_batches"] = [] if off else _int_list(args.per_process_batches,
                                                                 "--per-process-batches")
    if args.nproc is not None:
        values["nproc"] = _positive_int(args.nproc, "--nproc")
    try:
        return LabConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise _usage_error(f"bad configuration: {error}") from None


def _compare(args: argparse.Namespace) -> int:
    import sys

    from ..distributed import LaunchError
    from .data import DataError
    from .parallel import external_world
    from .results import ResultsError
    from .sweep import ConfigError, run_compare

    config = build_config(args)
    out = Path(args.out or f"runs/compare-{config.dataset}" + ("-quick" if args.quick else ""))
    try:
        world = external_world()
    except ConfigError as error:
        raise _usage_error(str(error)) from None
    local_procs = 1
    if world is not None:  # started by torchrun: join its world (see normlab.lab.parallel)
        rank, world_size, _ = world
        if args.nproc is None and "nproc" not in _config_file_keys(args):
            config.nproc = world_size
        elif config.nproc != world_size:
            raise _usage_error(f"--nproc {config.nproc} does not match the {world_size} processes torchrun "
                               f"started (WORLD_SIZE={world_size}); pass --nproc {world_size} or leave it out")
        local_procs = _positive_int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)), "LOCAL_WORLD_SIZE")
    else:
        rank = 0
        local_procs = config.nproc
    threads = args.threads
    if threads is None:
        # single process: 1 thread for the tiny models (faster than several), else all cores;
        # N processes on this machine share those cores
        threads = 1 if config.dataset in SMALL_DATASETS else max(1, (os.cpu_count() or 1) // local_procs)
    if threads < 1:
        raise _usage_error(f"--threads must be >= 1, got {threads}")
    try:
        report = run_compare(config, out, device=args.device, threads=threads,
                             progress=not args.no_progress)
    except (ConfigError, DataError, ResultsError) as error:
        raise _usage_error(str(error)) from None
    except LaunchError as error:
        print(f"normlab compare: a training process failed; finished runs are saved in {out}.\n{error}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; finished runs are saved in {out}. Run the same command again to resume.")
        raise
    if rank == 0:
        print(f"report: {report}  (and {report.with_suffix('.html')})")
    return 0


def _config_file_keys(args: argparse.Namespace) -> set[str]:
    """The LabConfig fields the --config file sets (already validated by build_config)."""
    if not args.config:
        return set()
    import yaml

    return set(yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {})


def _report(args: argparse.Namespace) -> int:
    from .report import print_summary, render_report
    from .results import ResultsError

    try:
        report = render_report(args.run_dir)
    except ResultsError as error:
        raise _usage_error(str(error)) from None
    print_summary(args.run_dir)
    print(f"report: {report}  (and {report.with_suffix('.html')})")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from .explain import METHODS, canonical, describe, draw_cubes, parse_shape

    try:
        shape = parse_shape(args.shape)
        methods = list(METHODS) if args.method.lower() == "all" else [canonical(args.method)]
        for m in methods:
            print(describe(m, shape, args.groups))
            print()
        out = Path(args.out or f"normlab-explain-{args.method.lower()}.png")
        draw_cubes(methods, shape, out, args.groups)
    except ValueError as error:
        raise _usage_error(str(error)) from None
    print(f"picture: {out}")
    return 0
