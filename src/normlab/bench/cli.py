"""``normlab bench``: time normalization providers against torch.nn and the copy floor.

Examples::

    normlab bench                          # the default suite, all providers
    normlab bench --quick                  # tiny cases, few repeats (smoke test)
    normlab bench --case gn:32x64x56x56:channels_last --mode forward+backward
    normlab bench --out benchmarks/results/cpu --plot
    normlab bench --cache cold --processes 3  # every sample from a flushed cache
    normlab bench --device cuda --dtype bfloat16 --out gpu   # on a GPU machine
"""

from __future__ import annotations

import argparse
import math
import sys

__all__ = ["add_parser", "handler", "build_parser"]


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--case", action="append", default=None, metavar="NORM:SHAPE[:LAYOUT[:DTYPE[:G]]]",
                        help="a case, e.g. bn:32x64x56x56 or gn:8x32x40:contiguous:float32:8 "
                             "(repeatable; default: the built-in suite)")
    parser.add_argument("--norm", action="append", default=None,
                        help="keep only suite cases of this norm (bn, in, gn, ln, rms; repeatable)")
    parser.add_argument("--dtype", default=None,
                        help="run the suite cases in this dtype (float32, float64, bfloat16, float16)")
    parser.add_argument("--mode", action="append", default=None,
                        help="forward, backward, forward+backward, or eval (inference with the running "
                             "statistics; BatchNorm cases, CPU suite only) (repeatable; default: all)")
    parser.add_argument("--provider", action="append", default=None,
                        help="torch, reference, cpu-numba, normlab, naive (repeatable; default: all "
                             "available). torch is always included as the baseline")
    parser.add_argument("--repeats", type=int, default=None, help="samples per provider (default 9)")
    parser.add_argument("--cache", choices=("warm", "cold"), default="warm",
                        help="warm: each sample is back-to-back calls (what the caches hold stays there); "
                             "cold: each sample is one call after a read of twice the last-level cache has "
                             "evicted everything, for every provider and for the copy that sets the floor "
                             "(memory-bound cases; CPU suite only; default: warm)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    parser.add_argument("--quick", action="store_true", help="tiny cases and 3 repeats (for tests)")
    parser.add_argument("--out", default=None, metavar="PREFIX",
                        help="write PREFIX.csv and PREFIX.json (and PREFIX.png with --plot)")
    parser.add_argument("--plot", action="store_true", help="draw a PNG (needs --out or writes bench.png)")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    parser.add_argument("--processes", type=int, default=1,
                        help="run the suite in this many fresh processes, one after another, and report "
                             "the median speed-up of each case with its range (CPU suite; small and "
                             "mid-size cases vary from process to process)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the GPU suite (torch.nn vs the Triton kernels vs a copy, eager and "
                             "CUDA-graph times; see normlab.backends.gpu.bench). Takes --norm, --dtype, "
                             "--mode, --repeats, --quick, --out, --note")


def add_parser(subparsers) -> None:
    """Register ``normlab bench``."""
    parser = subparsers.add_parser("bench", help="benchmark normalization kernels against torch.nn",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(parser)
    parser.set_defaults(func=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m normlab.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(parser)
    return parser


def _usage_error(msg: str) -> Exception:
    from ..cli import UsageError

    return UsageError(msg)


_GPU_NORMS = {"bn": "batch_norm", "in": "instance_norm", "gn": "group_norm", "ln": "layer_norm", "rms": "rms_norm"}


def _gpu_handler(args: argparse.Namespace) -> int:
    """``normlab bench --device cuda``: the GPU suite of :mod:`normlab.backends.gpu.bench`."""
    import json

    import torch

    from ..backends import gpu

    for option in ("case", "provider", "threads"):
        if getattr(args, option) is not None:
            raise _usage_error(f"--{option} is not supported with --device cuda (the GPU suite compares "
                               "torch.nn, gpu-triton and a copy on its own cases; pick them with --norm)")
    if args.plot or args.processes != 1:
        raise _usage_error(f"--{'plot' if args.plot else 'processes'} is not supported with --device cuda")
    if args.cache != "warm":
        raise _usage_error("--cache cold is for the CPU suite; the GPU suite times its own cases (the large "
                           "ones, 200-400 MB, several times an H100's L2 cache)")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = args.dtype or "float32"
    if dtype not in dtypes:
        raise _usage_error(f"--dtype with --device cuda: expected one of {', '.join(dtypes)}, got {dtype!r}")
    bad = [n for n in args.norm or () if n not in _GPU_NORMS]
    if bad:
        raise _usage_error(f"--norm: expected one of {', '.join(_GPU_NORMS)}, got {', '.join(bad)}")
    if not torch.cuda.is_available():
        raise _usage_error("--device cuda: expected a CUDA GPU, but torch.cuda.is_available() is False")
    if not gpu.available():
        raise _usage_error("--device cuda needs triton (pip install triton)")
    from ..backends.gpu import bench as gpu_bench

    norms = {_GPU_NORMS[n] for n in args.norm} if args.norm else None
    cases = [c for c in gpu_bench.DEFAULT_CASES if norms is None or c.norm in norms]
    if args.quick:
        cases = [c for c in cases if math.prod(c.shape) < 2**20]
    modes = args.mode or list(gpu_bench.MODES)
    bad = [m for m in modes if m not in gpu_bench.MODES]
    if bad:
        raise _usage_error(f"--mode: expected one of {', '.join(gpu_bench.MODES)}, got {', '.join(bad)}")
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 15)
    if repeats < 1:
        raise _usage_error(f"--repeats: expected a positive count, got {repeats}")
    rows = gpu_bench.run(cases, dtype=dtypes[dtype], modes=modes, repeats=repeats)
    print(gpu_bench.format_rows(rows))
    if args.out:
        from pathlib import Path

        from . import report

        report.write_csv(rows, f"{args.out}.csv")
        Path(f"{args.out}.json").write_text(json.dumps(
            {"note": args.note, "summary": gpu_bench.summary(rows), "rows": rows}, indent=1))
        print(f"wrote {args.out}.csv and {args.out}.json", file=sys.stderr)
    return 0


def _child_argv(args: argparse.Namespace) -> list[str]:
    """The ``normlab bench`` arguments of one process of ``--processes``: the suite's
    options as given, without the output ones."""
    argv = ["bench"]
    for option in ("case", "norm", "mode", "provider"):
        for value in getattr(args, option) or ():
            argv += [f"--{option}", value]
    for option in ("dtype", "repeats", "threads"):
        if getattr(args, option) is not None:
            argv += [f"--{option}", str(getattr(args, option))]
    if args.cache != "warm":
        argv += ["--cache", args.cache]
    return argv + (["--quick"] if args.quick else [])


def _across_processes(args: argparse.Namespace) -> int:
    """``--processes N``: the suite in N fresh processes in turn (each writes its rows to
    a temporary JSON), then one table of the medians over the processes and the range
    of each speed-up; ``--out`` gets the merged rows and, in the JSON, every process's."""
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    from . import report

    if args.processes < 1:
        raise _usage_error(f"--processes: expected a positive count, got {args.processes}")
    if args.plot:
        raise _usage_error("--plot is not supported with --processes")
    runs, environment = [], {}
    with tempfile.TemporaryDirectory(prefix="normlab-bench-") as tmp:
        for i in range(args.processes):
            prefix = Path(tmp) / f"process{i}"
            print(f"process {i + 1}/{args.processes}", file=sys.stderr, flush=True)
            done = subprocess.run([sys.executable, "-m", "normlab", *_child_argv(args), "--out", str(prefix)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{done.stderr}\nnormlab bench: process {i + 1} of {args.processes} failed "
                      f"(exit code {done.returncode})", file=sys.stderr)
                return 1
            data = json.loads(prefix.with_suffix(".json").read_text())
            environment = data["environment"]
            runs.append(data["rows"])
    merged = report.merge_processes(runs)
    print(report.format_table(merged))
    print(f"\nspeed-up over torch.nn, median [range] of {args.processes} processes ({args.cache} cache):")
    for r in merged:
        if r["provider"] != "torch" and r["speedup_vs_torch"] is not None:
            some = f" (in {r['processes']} of them)" if r["processes"] != args.processes else ""
            print(f"  {r['case']} -- {r['mode']}, {r['provider']}: {r['speedup_vs_torch']:.2f}x "
                  f"[{r['speedup_min']:.2f}-{r['speedup_max']:.2f}]{some}")
    if args.out:
        rows = [{**environment, **r} for r in merged]
        report.write_csv(rows, f"{args.out}.csv")
        report.write_json(rows, f"{args.out}.json", note=args.note, processes=runs)
        print(f"wrote {args.out}.csv and {args.out}.json", file=sys.stderr)
    return 0


def handler(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; print the table; write files."""
    import dataclasses

    import torch

    from . import cases as C
    from . import report
    from .run import MODES, available_providers, run_suite

    if args.device == "cuda":
        return _gpu_handler(args)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise _usage_error("--plot needs matplotlib (pip install 'normlab[lab]')") from None
    if args.threads is not None:
        if args.threads < 1:
            raise _usage_error(f"--threads: expected a positive count, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        if args.case:
            suite = [C.parse_case(text) for text in args.case]
        else:
            suite = list(C.QUICK_SUITE if args.quick else C.DEFAULT_SUITE)
            if args.norm:
                bad = [n for n in args.norm if n not in C.NORMS]
                if bad:
                    raise ValueError(f"--norm: expected one of {', '.join(C.NORMS)}, got {', '.join(bad)}")
                suite = [c for c in suite if c.norm in args.norm]
            if args.dtype:
                suite = [dataclasses.replace(c, dtype=args.dtype) for c in suite]
                for c in suite:
                    C._validate(c)
    except ValueError as error:
        raise _usage_error(str(error)) from None
    modes = args.mode or list(MODES)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise _usage_error(f"--mode: expected one of {', '.join(MODES)}, got {', '.join(bad)}")
    available = available_providers()
    providers = args.provider or list(available)
    bad = [p for p in providers if p not in C.PROVIDERS]
    if bad:
        raise _usage_error(f"--provider: expected one of {', '.join(C.PROVIDERS)}, got {', '.join(bad)}")
    missing = [p for p in providers if p not in available]
    if missing:
        raise _usage_error(f"--provider {', '.join(missing)} is not available here (is numba installed?)")
    if "torch" not in providers:
        providers = ["torch", *providers]
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 9)
    if repeats < 1:
        raise _usage_error(f"--repeats: expected a positive count, got {repeats}")
    if args.processes != 1:
        return _across_processes(args)

    rows = run_suite(suite, modes, providers, repeats, min_time=0.002 if args.quick else 0.02,
                     progress=lambda msg: print(msg, file=sys.stderr, flush=True), cache=args.cache)
    print(report.format_table(rows))
    summ = report.summary(rows) if "cpu-numba" in providers else {}
    if summ:
        print(f"\ncpu-numba vs torch.nn (cases >= 1 MB, {args.cache} cache):")
        for mode, entry in summ.items():
            if "geomean_speedup" in entry:
                print(f"  {mode:<17} geomean {entry['geomean_speedup']:.2f}x, worst "
                      f"{entry['min_speedup']:.2f}x ({entry['min_speedup_case']}), worst % of floor "
                      f"{entry['min_pct_floor']:.0f}% ({entry['min_pct_floor_case']})")
            if "small_cases_speedup" in entry:
                small = ", ".join(f"{k}: {v:.2f}x" for k, v in entry["small_cases_speedup"].items())
                caveat = " (cold: one call from a flushed cache, not a training loop)" if args.cache == "cold" else ""
                print(f"  {mode:<17} small cases{caveat}: {small}")
    if args.out:
        report.write_csv(rows, f"{args.out}.csv")
        report.write_json(rows, f"{args.out}.json", note=args.note)
        print(f"wrote {args.out}.csv and {args.out}.json", file=sys.stderr)
    if args.plot:
        target = f"{args.out}.png" if args.out else "bench.png"
        report.plot(rows, target)
        print(f"wrote {target}", file=sys.stderr)
    return 0
