"""`normlab bench`: the harness runs, its arithmetic is right, its files are complete."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from normlab.bench import cases as C
from normlab.bench import report
from normlab.bench.run import environment, run_case
from normlab.bench.timing import floor_bytes, interleaved, saved_bytes
from normlab.cli import main


def test_floor_bytes():
    assert floor_bytes(10, 4, "forward") == 80
    assert floor_bytes(10, 4, "backward") == 120
    assert floor_bytes(10, 2, "forward+backward") == 100


def test_interleaved_runs_round_robin():
    order = []
    samples = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                          repeats=3, warmup=0, min_time=0.0)
    assert len(samples["a"]) == len(samples["b"]) == 3
    # after the calibration calls (one each), every round runs each function once
    rounds = [sorted(order[i:i + 2]) for i in range(2, len(order), 2)]
    assert rounds == [["a", "b"]] * 3


def test_interleaved_gives_every_function_the_same_calls_per_sample():
    import time

    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        time.sleep(0.002)

    interleaved({"fast": fast, "slow": slow}, repeats=2, warmup=0, min_time=0.01)
    assert calls["fast"] == calls["slow"] > 2


def test_interleaved_cold_flushes_before_every_single_call_sample():
    """The cold policy: each sample is one call, right after a flush (never timed with
    it), whatever ``min_time`` asks for."""
    import time

    events = []

    def flush():
        events.append("flush")
        time.sleep(0.05)

    samples = interleaved({"a": lambda: events.append("a"), "b": lambda: events.append("b")}, repeats=3,
                          warmup=1, min_time=1.0, flush=flush)
    assert len(samples["a"]) == len(samples["b"]) == 3
    assert max(samples["a"] + samples["b"]) < 0.025  # the 50 ms flushes are outside the samples
    timed = events[4:]  # after the warm-up and calibration calls (two each, unflushed)
    assert len(timed) == 12
    assert timed[0::2] == ["flush"] * 6 and sorted(timed[1::2]) == ["a"] * 3 + ["b"] * 3


def test_cache_flusher_reads_twice_the_last_level_cache(monkeypatch):
    from normlab.backends import _env
    from normlab.bench import timing

    monkeypatch.setattr(_env, "last_level_cache_bytes", lambda: 3 << 20)
    flush = timing.cache_flusher()
    assert flush.__self__.numel() * 4 == 6 << 20 and flush().item() == (6 << 20) // 4
    assert timing.cache_flusher(4096).__self__.numel() == 1024


def test_saved_bytes_counts_what_backward_keeps():
    x = torch.randn(16, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    # x * w saves both x and w: 16*32*4 + 32*4 bytes
    assert saved_bytes(lambda t: t * w, x) == 16 * 32 * 4 + 32 * 4
    assert saved_bytes(lambda t: t + 1, x) == 0


def test_parse_case_and_errors():
    case = C.parse_case("gn:8x32x40:contiguous:float32:8")
    assert case == C.Case("gn", (8, 32, 40), "contiguous", "float32", 8)
    assert C.parse_case("bn:2x3x4x4:channels_last").layout == "channels_last"
    for bad in ("xx:2x3", "bn", "bn:2xa", "gn:2x6x4:contiguous:float32:4", "bn:2x3:channels_last",
                "ln:4x5:contiguous:int8"):
        with pytest.raises(ValueError):
            C.parse_case(bad)


def test_providers_agree_on_the_output():
    """Every provider computes the same function (same parameters) -- else the timing
    comparison is meaningless."""
    for case in C.QUICK_SUITE:
        fns = C.build(case, C.PROVIDERS)
        x = C.make_input(case)
        outs = {name: f(x) for name, f in fns.items()}
        for name, y in outs.items():
            torch.testing.assert_close(y, outs["torch"], atol=1e-4, rtol=1e-4, msg=f"{case.label} {name}")


def test_run_case_rows():
    case = C.Case("ln", (16, 24))
    rows = run_case(case, ["forward", "forward+backward"], ["torch", "reference", "naive"], repeats=2,
                    min_time=0.0)
    providers = {r["provider"] for r in rows}
    assert providers == {"copy", "alloc+copy", "torch", "reference", "naive"}
    for r in rows:
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"]
        if r["provider"] == "torch":
            assert r["speedup_vs_torch"] == pytest.approx(1.0)
        if r["provider"] not in ("copy", "alloc+copy"):
            floor_ms = floor_bytes(case.numel, case.itemsize, r["mode"]) / (r["copy_gbps"] * 1e9) * 1e3
            assert r["pct_floor"] == pytest.approx(100 * floor_ms / r["median_ms"])
    assert {r["cache"] for r in rows} == {"warm"}
    env = environment()
    assert {"date", "machine", "torch", "numba", "threads"} <= set(env)


def test_run_case_cold_flushes_for_every_provider_and_the_copy(monkeypatch):
    """``cache="cold"``: the rows say so, and every sample of every timed function (the
    copy's included) had a flush before it; an unknown policy is refused by name."""
    from normlab.bench import run as bench_run

    flushes = []
    monkeypatch.setattr(bench_run, "cache_flusher", lambda: lambda: flushes.append(1))
    case = C.Case("ln", (16, 24))
    rows = run_case(case, ["forward"], ["torch", "reference"], repeats=3, min_time=0.0, cache="cold")
    assert {r["cache"] for r in rows} == {"cold"}
    assert {r["provider"] for r in rows} == {"copy", "alloc+copy", "torch", "reference"}
    assert len(flushes) == 4 * 3  # four timed functions, three samples each
    with pytest.raises(ValueError, match="cache: expected one of warm, cold, got 'hot'"):
        run_case(case, ["forward"], ["torch"], repeats=1, cache="hot")


def test_eval_mode_times_inference_with_running_statistics():
    """``eval``: BatchNorm in eval mode under no_grad, every provider with torch.nn's
    running statistics (so they compute the same function) and none of the naive
    composite (which has none); modules go back to training mode; norms without running
    statistics give no eval rows."""
    case = C.Case("bn", (4, 8, 6, 6))
    fns = C.build(case, C.PROVIDERS)
    x = C.make_input(case)
    rows = run_case(case, ["eval"], list(C.PROVIDERS), repeats=2, min_time=0.0)
    assert {r["provider"] for r in rows} == {"copy", "alloc+copy", *C.PROVIDERS} - {"naive"}
    assert all(r["mode"] == "eval" and r["saved_mb"] is None for r in rows)
    for r in rows:
        if r["provider"] not in ("copy", "alloc+copy"):
            floor_ms = floor_bytes(case.numel, case.itemsize, "forward") / (r["copy_gbps"] * 1e9) * 1e3
            assert r["pct_floor"] == pytest.approx(100 * floor_ms / r["median_ms"])
    assert run_case(C.Case("ln", (16, 24)), ["eval"], ["torch", "reference"], repeats=2, min_time=0.0) == []

    # what the mode runs: the modules in eval mode with torch.nn's statistics, then back
    from normlab.bench.run import _eval_mode

    del fns["naive"]
    torch_module = fns["torch"]
    with torch.no_grad():
        torch_module.running_mean.uniform_(-1, 1)
        torch_module.running_var.uniform_(0.5, 2)
    with _eval_mode(fns, True), torch.no_grad():
        want = torch_module(x)
        assert not torch_module.training
        for name, f in fns.items():
            torch.testing.assert_close(f(x), want, atol=1e-5, rtol=1e-5, msg=name)
    assert all(getattr(f, "module", f).training for f in fns.values())
    torch_module.eval()  # each module leaves in the mode it came in
    with _eval_mode(fns, True):
        pass
    assert not torch_module.training and fns["reference"].module.training


def test_cli_quick_writes_csv_json_png(tmp_path, capsys):
    prefix = tmp_path / "res"
    code = main(["bench", "--quick", "--case", "rms:16x24", "--case", "bn:4x8x6x6:channels_last",
                 "--mode", "forward+backward", "--repeats", "2", "--out", str(prefix), "--plot"])
    assert code == 0
    out = capsys.readouterr().out
    assert "rms 16x24 float32 -- forward+backward" in out and "vs torch" in out
    with open(f"{prefix}.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} >= {"torch", "reference", "naive", "copy"}
    assert all(r["torch"] == torch.__version__ and r["date"] for r in rows)
    data = json.loads((tmp_path / "res.json").read_text())
    assert data["environment"]["torch"] == torch.__version__
    assert len(data["rows"]) == len(rows)
    assert (tmp_path / "res.png").stat().st_size > 1000


def test_merge_processes_takes_medians_and_ranges():
    def row(speedup, ms, provider="normlab"):
        return {"case": "c", "mode": "forward", "provider": provider, "median_ms": ms, "min_ms": ms / 2,
                "gbps": 1.0, "pct_floor": None, "copy_gbps": 10 * ms, "speedup_vs_torch": speedup}

    runs = [[row(1.0, 3.0), row(None, 9.0, "copy")], [row(4.0, 1.0), row(None, 7.0, "copy")],
            [row(2.0, 2.0), row(None, 8.0, "copy")]]
    merged = {r["provider"]: r for r in report.merge_processes(runs)}
    assert (merged["normlab"]["speedup_vs_torch"], merged["normlab"]["speedup_min"],
            merged["normlab"]["speedup_max"], merged["normlab"]["median_ms"]) == (2.0, 1.0, 4.0, 2.0)
    assert merged["normlab"]["processes"] == 3 and merged["normlab"]["pct_floor"] is None
    assert (merged["normlab"]["min_ms"], merged["normlab"]["copy_gbps"]) == (0.5, 20.0)
    assert merged["copy"]["speedup_vs_torch"] is None and merged["copy"]["median_ms"] == 8.0


def test_processes_pass_the_suite_options_to_each_process():
    from normlab.bench import cli as bench_cli

    args = bench_cli.build_parser().parse_args(
        ["--case", "rms:16x24", "--case", "bn:2x3", "--norm", "gn", "--mode", "forward", "--provider", "normlab",
         "--dtype", "float64", "--repeats", "4", "--threads", "1", "--quick", "--processes", "3", "--out", "x",
         "--note", "n"])
    assert bench_cli._child_argv(args) == [
        "bench", "--case", "rms:16x24", "--case", "bn:2x3", "--norm", "gn", "--mode", "forward", "--provider",
        "normlab", "--dtype", "float64", "--repeats", "4", "--threads", "1", "--quick"]
    cold = bench_cli.build_parser().parse_args(["--norm", "bn", "--cache", "cold", "--processes", "2"])
    assert bench_cli._child_argv(cold) == ["bench", "--norm", "bn", "--cache", "cold"]


def test_cli_processes_runs_the_suite_in_fresh_processes(tmp_path, capsys):
    """--processes 2: two child processes, one table of medians, the range of each
    speed-up, and every process's rows in the JSON."""
    prefix = tmp_path / "pp"
    assert main(["bench", "--quick", "--case", "rms:16x24", "--mode", "forward", "--provider", "normlab",
                 "--repeats", "2", "--processes", "2", "--out", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert "median [range] of 2 processes" in out and "rms 16x24 float32 -- forward, normlab:" in out
    data = json.loads((tmp_path / "pp.json").read_text())
    assert len(data["processes"]) == 2 and data["environment"]["torch"] == torch.__version__
    normlab_rows = [r for r in data["rows"] if r["provider"] == "normlab"]
    assert len(normlab_rows) == 1 and normlab_rows[0]["processes"] == 2
    low, mid, high = (normlab_rows[0][k] for k in ("speedup_min", "speedup_vs_torch", "speedup_max"))
    assert low <= mid <= high
    per_process = sorted(r["speedup_vs_torch"] for rows in data["processes"] for r in rows
                         if r["provider"] == "normlab")
    assert (low, high) == (per_process[0], per_process[-1])
    with open(f"{prefix}.csv") as f:
        assert {r["provider"] for r in csv.DictReader(f)} >= {"torch", "normlab"}


def test_cli_cache_cold_says_so_in_the_table_the_summary_and_the_rows(tmp_path, capsys):
    """The tables, the summary (whose small cases then time one call from a flushed
    cache, and say so) and every written row name the cold policy."""
    pytest.importorskip("numba")
    prefix = tmp_path / "cold"
    assert main(["bench", "--case", "ln:16x24", "--mode", "forward", "--provider", "cpu-numba", "--repeats", "1",
                 "--cache", "cold", "--out", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert "ln 16x24 float32 -- forward (copy" in out and "GB/s, cold cache)" in out
    assert "cpu-numba vs torch.nn (cases >= 1 MB, cold cache):" in out
    assert "small cases (cold: one call from a flushed cache, not a training loop): ln 16x24" in out
    assert {r["cache"] for r in json.loads((tmp_path / "cold.json").read_text())["rows"]} == {"cold"}


def test_cli_usage_errors(capsys):
    assert main(["bench", "--case", "bogus:1x2"]) == 2
    assert "expected a case like" in capsys.readouterr().err
    assert main(["bench", "--quick", "--mode", "sideways"]) == 2
    assert main(["bench", "--quick", "--provider", "tpu"]) == 2
    assert main(["bench", "--quick", "--repeats", "0"]) == 2
    assert main(["bench", "--quick", "--processes", "0"]) == 2
    assert "--processes: expected a positive count" in capsys.readouterr().err
    assert main(["bench", "--quick", "--processes", "2", "--plot"]) == 2
    assert "--plot is not supported with --processes" in capsys.readouterr().err


def test_cli_device_cuda_usage_errors(capsys):
    """--device cuda takes the GPU suite's options only, and says so; without a GPU it
    says that instead of running."""
    assert main(["bench", "--device", "cuda", "--case", "bn:2x3"]) == 2
    assert "--case is not supported with --device cuda" in capsys.readouterr().err
    assert main(["bench", "--device", "cuda", "--dtype", "float64"]) == 2
    assert "expected one of float32, bfloat16, float16, got 'float64'" in capsys.readouterr().err
    assert main(["bench", "--device", "cuda", "--norm", "xn"]) == 2
    assert main(["bench", "--device", "cuda", "--processes", "3"]) == 2
    assert "--processes is not supported with --device cuda" in capsys.readouterr().err
    assert main(["bench", "--device", "cuda", "--cache", "cold"]) == 2
    assert "--cache cold is for the CPU suite" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--quick"]) == 2
        assert "expected a CUDA GPU" in capsys.readouterr().err


def test_summary_geomean():
    rows = [
        {"mode": "forward", "provider": "cpu-numba", "speedup_vs_torch": s, "pct_floor": p,
         "shape": "1024x1024", "dtype": "float32", "case": f"c{i}"}
        for i, (s, p) in enumerate([(2.0, 70.0), (8.0, 50.0)])
    ]
    entry = report.summary(rows)["forward"]
    assert entry["geomean_speedup"] == pytest.approx(4.0)
    assert entry["min_speedup"] == 2.0 and entry["min_pct_floor"] == 50.0
    assert entry["min_pct_floor_case"] == "c1"


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "normlab.bench", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--quick" in out.stdout


def test_normlab_provider_is_the_bare_module_and_ignores_a_forced_backend(monkeypatch):
    """`normlab` is what users get: called as bare as torch.nn's module (a wrapper would
    add its cost to small cases), with any NORMLAB_BACKEND of the caller cleared for the
    run and restored after."""
    pytest.importorskip("numba")
    from normlab.backends.cpu import backend as numba_backend
    from normlab.bench import run as bench_run
    from normlab.bench.cases import Case, build

    case = Case("ln", (4, 8))
    fns = build(case, ("torch", "normlab"))
    assert isinstance(fns["normlab"], torch.nn.Module)
    calls = []  # every kernel call of the backend fetches the kernels module first
    original = numba_backend.runtime.kernels
    monkeypatch.setattr(numba_backend.runtime, "kernels", lambda: calls.append(1) or original())
    monkeypatch.setenv("NORMLAB_BACKEND", "reference")
    bench_run.run_case(case, ["forward"], ["torch", "normlab"], repeats=1, min_time=0.0)
    assert calls, "the normlab provider ran on the forced reference backend"
    assert os.environ["NORMLAB_BACKEND"] == "reference"


def _models_script(folder: str = "cpu"):
    """``benchmarks/<folder>/models.py``, imported from its file (benchmarks/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / folder / "models.py"
    spec = importlib.util.spec_from_file_location(f"bench_models_{folder}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["resnet20", "resnet20-gn", "encoder-ln", "encoder-rms"])
def test_model_benchmark_times_a_normlab_twin_of_each_model(name):
    models = _models_script()
    torch.manual_seed(0)
    twin = models.from_torch(models.MODELS[name].build())
    assert any(type(m).__module__.startswith("normlab") for m in twin.modules())
    assert not any(type(m).__module__.startswith("torch.nn") and "Norm" in type(m).__name__
                   for m in twin.modules())
    for mode in ("train", "infer"):
        row = models.compare(models.MODELS[name], 2, mode, rounds=1)
        assert row["model"] == name and row["mode"] == mode
        assert row["torch_ms"] > 0 and row["normlab_ms"] > 0
        assert row["speedup"] == pytest.approx(row["torch_ms"] / row["normlab_ms"])


def _make_twins_off_by_a_bit(monkeypatch, models) -> None:
    """Make a models script's ``from_torch`` shift a BatchNorm bias of every twin."""
    convert = models.from_torch

    def off_by_a_bit(model):
        twin = convert(model)
        with torch.no_grad():
            next(m for m in twin.modules() if hasattr(m, "running_mean")).bias.add_(0.1)
        return twin

    monkeypatch.setattr(models, "from_torch", off_by_a_bit)


def test_model_benchmark_refuses_a_twin_that_computes_something_else(monkeypatch):
    models = _models_script()
    _make_twins_off_by_a_bit(monkeypatch, models)
    with pytest.raises(AssertionError, match="differs from torch.nn"):
        models.compare(models.MODELS["resnet20"], 2, "infer", rounds=1)


def test_gpu_model_benchmark_runs_eager_on_cpu_and_refuses_a_different_twin(monkeypatch):
    """benchmarks/gpu/models.py checks itself on CPU (eager only; no graphs there)."""
    models = _models_script("gpu")
    row = models.compare("encoder-rms", 2, "infer", 1, torch.device("cpu"), graphs=False)
    assert row["eager_torch_ms"] > 0 and row["eager_normlab_ms"] > 0
    assert row["eager_speedup"] == pytest.approx(row["eager_torch_ms"] / row["eager_normlab_ms"])
    assert math.isnan(row["graph_speedup"])
    _make_twins_off_by_a_bit(monkeypatch, models)
    with pytest.raises(AssertionError, match="differs from torch.nn"):
        models.compare("resnet20", 2, "train", 1, torch.device("cpu"), graphs=False)
