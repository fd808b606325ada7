"""CLI arguments, the norm registry feeding --norm, explain, statistics of the report, models."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normlab.cli import main
from normlab.lab.config import LabConfig, lr_for_batch, steps_for_batch
from normlab.lab.data import Dataset
from normlab.lab.report import Stat, recommend, welch_p
from normlab.lab.results import ResultsStore
from normlab.lab.train import RunSpec, batch_indices, make_model, run_one
from normlab.nn import registry


def _fail(capsys, args: list[str], message: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_unknown_norm(capsys, tmp_path: Path) -> None:
    _fail(capsys, ["compare", "--norm", "bn,fancy", "--out", str(tmp_path / "r")], "unknown norm 'fancy'")
    assert not (tmp_path / "r").exists()


def test_batch_larger_than_dataset(capsys, tmp_path: Path) -> None:
    _fail(capsys, ["compare", "--quick", "--n-train", "50", "--batch-sizes", "4,64", "--out",
                   str(tmp_path / "r")], "batch size 64 is larger than the training set (50")


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "4,x"], "--batch-sizes expects comma-separated integers"),
    (["--batch-sizes", "0"], "batch sizes must be >= 1"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_bad_arguments(capsys, tmp_path: Path, args: list[str], message: str) -> None:
    _fail(capsys, ["compare", "--quick", *args, "--out", str(tmp_path / "r")], message)


def test_bad_arguments_in_a_subprocess(tmp_path: Path) -> None:
    # what the `normlab` console script runs
    code = "import sys; from normlab.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "compare", "--norm", "nosuchnorm",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "normlab compare: error: unknown norm 'nosuchnorm'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_registered_norm_is_accepted(monkeypatch, tmp_path: Path) -> None:
    def factory(c: int, spatial_dims: int, **kw):
        return registry.GroupNorm(2, c, **kw)

    monkeypatch.setitem(registry._REGISTRY, "gn2", factory)
    out = tmp_path / "r"
    threads = torch.get_num_threads()
    assert main(["compare", "--quick", "--norm", "gn2", "--batch-sizes", "4", "--seeds", "1",
                 "--min-steps", "5", "--no-progress", "--out", str(out)]) == 0
    assert {r["norm"] for r in ResultsStore(out).rows} == {"gn2"}
    assert torch.get_num_threads() == threads  # the run's --threads does not leak into the process


def test_lr_rule_and_budget() -> None:
    config = LabConfig()
    assert lr_for_batch(config, 32) == pytest.approx(0.1)
    assert lr_for_batch(config, 1) == pytest.approx(0.1 / 32)
    assert steps_for_batch(config, 1, 4000) == 4000  # one epoch
    assert steps_for_batch(config, 64, 4000) == config.min_steps


def _tiny_data(n: int = 64) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 4
    x = torch.randn(n, 1, 16, generator=gen) + y[:, None, None].float()
    return Dataset("tiny", x, y, x[:32].clone(), y[:32].clone(), ["a", "b", "c", "d"])


def test_same_initialization_for_every_norm() -> None:
    config, data = LabConfig(width=8), _tiny_data()
    models = {n: make_model(config, data, n, seed=3) for n in ("bn", "gn", "none", "rms")}
    ref = models["bn"]
    for m in models.values():
        for a, b in zip(m.convs, ref.convs, strict=True):
            assert torch.equal(a.weight, b.weight)
        assert torch.equal(m.head.weight, ref.head.weight)
    assert not torch.equal(make_model(config, data, "bn", seed=4).convs[0].weight, ref.convs[0].weight)


def test_runs_are_deterministic_given_the_seed() -> None:
    config, data = LabConfig(width=8, min_steps=20, epochs=0.1, eval_batch=16), _tiny_data()
    spec = RunSpec("sweep", "bn", 8, 0)
    a, b = (run_one(spec, config, data, torch.device("cpu")) for _ in range(2))
    timing = {"train_seconds", "ms_per_step"}
    assert {k: v for k, v in a["metrics"].items() if k not in timing} == \
           {k: v for k, v in b["metrics"].items() if k not in timing}
    assert [p[:2] for p in a["curve"]] == [p[:2] for p in b["curve"]]


def test_noniid_batches_hold_few_classes() -> None:
    labels = torch.arange(100) % 10
    for idx in batch_indices(labels, 8, 30, seed=0, classes_per_batch=2):
        assert len(idx) == 8 and len(set(labels[idx].tolist())) == 2
    for idx in batch_indices(labels, 8, 30, seed=0):
        assert len(idx) == 8 and len(set(idx.tolist())) == 8


def test_welch_matches_scipy() -> None:
    from scipy import stats

    a, b = [10.0, 11.5, 9.7], [12.0, 14.1, 13.2, 12.6]
    expected = stats.ttest_ind(a, b, equal_var=False).pvalue
    assert welch_p(a, b) == pytest.approx(expected, rel=1e-10)
    assert welch_p([1.0], [2.0, 3.0]) is None
    s = Stat([1.0, 2.0, 4.0])
    assert s.mean == pytest.approx(7 / 3) and s.std == pytest.approx(math.sqrt(((1 - 7/3)**2 + (2 - 7/3)**2
                                                                               + (4 - 7/3)**2) / 2))


def test_recommendation_ranks_and_tests() -> None:
    rows = []
    errs = {"bn": [30.0, 31.0, 29.0], "gn": [10.0, 10.5, 9.5], "ln": [10.2, 10.9, 9.6]}
    for norm, values in errs.items():
        for seed, v in enumerate(values):
            rows.append({"scenario": "sweep", "norm": norm, "batch_size": 2, "seed": seed,
                         "metrics": {"err_test": v}})
    (label, ranked), = recommend(rows, ["bn", "gn", "ln"])
    assert label.startswith("small") and [r.norm for r in ranked] == ["gn", "ln", "bn"]
    assert ranked[1].p_vs_best > 0.05 and ranked[2].p_vs_best < 0.001


def test_explain_counts(capsys, tmp_path: Path) -> None:
    png = tmp_path / "gn.png"
    assert main(["explain", "gn", "--shape", "2,6,4,4", "--groups", "3", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    # GN: one statistic per (sample, group) = 2*3; each over C/G * H * W = 2*4*4 elements
    assert "-> 6 statistic(s)" in out and "each averages 32 elements" in out
    assert "C/G=2, H=4, W=4" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_explain_all(capsys, tmp_path: Path) -> None:
    png = tmp_path / "all.png"
    assert main(["explain", "all", "--shape", "4,6,3,3", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    # BN: C=6 statistics of N*H*W=36; IN: N*C=24 of H*W=9; LN/RMS: N=4 of C*H*W=54
    assert "Batch Norm" in out and "-> 6 statistic(s)" in out and "each averages 36 elements" in out
    assert "-> 24 statistic(s)" in out and "each averages 9 elements" in out
    assert out.count("each averages 54 elements") == 2
    from matplotlib.image import imread

    h, w = imread(png).shape[:2]
    assert w > 3 * h  # five cubes side by side


@pytest.mark.parametrize("args, message", [
    (["explain", "zz", "--shape", "2,4,3,3"], "unknown method 'zz'"),
    (["explain", "gn", "--shape", "2,6,3,3", "--groups", "4"], "must divide the channel count C=6"),
    (["explain", "bn", "--shape", "2,a"], "--shape expects"),
    (["explain", "bn", "--shape", "2,3"], "at least one spatial size"),
])
def test_explain_bad_arguments(capsys, args: list[str], message: str) -> None:
    _fail(capsys, args, message)


def test_norm_that_cannot_build_for_the_data(monkeypatch, capsys, tmp_path: Path) -> None:
    def only_2d(c: int, spatial_dims: int, **kw):
        if spatial_dims != 2:
            raise ValueError(f"only2d: expected spatial_dims=2, got {spatial_dims}")
        return registry.GroupNorm(1, c)

    monkeypatch.setitem(registry._REGISTRY, "only2d", only_2d)
    _fail(capsys, ["compare", "--quick", "--norm", "bn,only2d", "--out", str(tmp_path / "r")],
          "norm 'only2d' cannot be used with mnist1d (1-D inputs)")
    assert not (tmp_path / "r").exists()


def test_config_file_and_flag_precedence(tmp_path: Path, capsys) -> None:
    from normlab.cli import build_parser
    from normlab.lab.cli import build_config

    cfg = tmp_path / "lab.yaml"
    cfg.write_text("lr: 0.05\nseeds: 5\nbatch_sizes: [2, 4]\n")
    args = build_parser().parse_args(["compare", "--quick", "--config", str(cfg), "--seeds", "2"])
    config = build_config(args)
    assert config.lr == 0.05 and config.batch_sizes == [2, 4]  # file over preset
    assert config.seeds == 2  # flag over file
    assert config.preset == "quick" and config.min_steps == 100  # preset over defaults
    cfg.write_text("learning_rate: 0.05\n")
    _fail(capsys, ["compare", "--config", str(cfg)], "unknown config field(s): learning_rate")
