"""End to end: `normlab compare --quick`, report re-rendering, resume, corrupt/foreign files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from normlab.cli import main
from normlab.lab import sweep as sweep_mod
from normlab.lab.results import FORMAT, ROW_FIELDS, ResultsError, ResultsStore, atomic_write, validate_row

SCENARIO_PLOTS = ("batch_sweep", "curves", "train_eval_gap", "shift", "noniid", "cost")
# A reduced --quick: 3 norms keep the test short; every scenario still runs.
QUICK = ["compare", "--quick", "--norm", "bn,ln,none", "--no-progress"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick") / "run"
    assert main([*QUICK, "--out", str(out)]) == 0
    return out


def test_quick_pipeline_writes_everything(quick_run: Path) -> None:
    for name in ("config.yaml", "results.jsonl", "report.md", "report.html"):
        assert (quick_run / name).is_file(), name
    for stem in SCENARIO_PLOTS:
        png = quick_run / "plots" / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
        assert (quick_run / "plots" / f"{stem}.svg").read_text().lstrip().startswith("<?xml")
    md = (quick_run / "report.md").read_text()
    for heading in ("Batch-size sweep", "Training curves", "Train/eval gap", "Test-time shift",
                    "Non-i.i.d. batches", "Cost", "Recommendation", "Learning-rate rule"):
        assert heading in md, heading
    html = (quick_run / "report.html").read_text()
    # self-contained: every figure embedded, no reference to files next to it
    assert html.count("data:image/png;base64,") == len(SCENARIO_PLOTS)
    assert "plots/" not in html


def test_results_schema_and_plan(quick_run: Path) -> None:
    lines = (quick_run / "results.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert header["format"] == FORMAT and header["version"] == 1
    rows = [json.loads(line) for line in lines[1:]]
    # quick preset: 2 seeds x (2 batch sizes + non-iid + cost) x 3 norms
    assert len(rows) == 2 * (2 + 1 + 1) * 3
    assert len({r["key"] for r in rows}) == len(rows)
    for row in rows:
        validate_row(row, "row")
        assert set(ROW_FIELDS) <= set(row)
        assert {"normlab", "torch", "numpy", "python"} <= set(row["versions"])
        m = row["metrics"]
        if row["scenario"] == "cost":
            assert m["ms_step"] > 0 and m["saved_mb"] > 0 and m["params"] > 0
            continue
        assert 0.0 <= m["err_test"] <= 100.0
        assert m["steps"] >= 100
        assert row["curve"] and row["curve"][-1][0] == m["steps"]
        if row["scenario"] == "sweep":
            assert {"err_shift_offset", "err_shift_scale", "err_shift_noise"} <= set(m)
            # only BatchNorm keeps running statistics
            assert ("err_recal" in m) == (row["norm"] == "bn")
    # linear scaling rule: lr = 0.1 * B / 32
    for row in rows:
        if row["scenario"] == "sweep":
            assert row["metrics"]["lr"] == pytest.approx(0.1 * row["batch_size"] / 32)


def test_report_rerenders_without_training(quick_run: Path, monkeypatch, capsys) -> None:
    before = (quick_run / "report.md").read_text()
    for stem in SCENARIO_PLOTS:
        (quick_run / "plots" / f"{stem}.png").unlink()
    (quick_run / "report.md").unlink()
    (quick_run / "report.html").unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("report must not train")

    monkeypatch.setattr(sweep_mod, "run_one", no_training)
    assert main(["report", str(quick_run)]) == 0
    assert (quick_run / "report.md").read_text() == before
    assert all((quick_run / "plots" / f"{s}.png").exists() for s in SCENARIO_PLOTS)
    assert (quick_run / "report.html").exists()
    assert "test error" in capsys.readouterr().out


def test_resume_after_interruption(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    args = ["compare", "--quick", "--norm", "bn,none", "--batch-sizes", "4", "--no-progress",
            "--out", str(out)]
    real = sweep_mod.run_one
    calls: list[str] = []

    def interrupted(spec, *a, **k):
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if Ctrl-C hit during the 5th run
        calls.append(spec.key)
        return real(spec, *a, **k)

    monkeypatch.setattr(sweep_mod, "run_one", interrupted)
    assert main(args) == 130
    first = ResultsStore(out).rows
    assert [r["key"] for r in first] == calls  # everything finished was saved, nothing else

    resumed: list[str] = []

    def counting(spec, *a, **k):
        resumed.append(spec.key)
        return real(spec, *a, **k)

    monkeypatch.setattr(sweep_mod, "run_one", counting)
    assert main(args) == 0
    rows = ResultsStore(out).rows
    plan = [s.key for s in sweep_mod.plan_runs(sweep_mod.load_config(out), ["bn", "none"])]
    assert sorted(r["key"] for r in rows) == sorted(plan) and len(plan) == 12
    assert not set(resumed) & set(calls)  # finished runs were not retrained
    assert rows[:4] == first  # and not lost or changed
    # a third invocation has nothing left to do
    resumed.clear()
    assert main(args) == 0
    assert resumed == []


def test_corrupt_and_foreign_results_are_refused(tmp_path: Path, capsys) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.jsonl").write_text("name,score\nalice,3\n")
    assert main([*QUICK, "--out", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "not a normlab results file" in err and "Traceback" not in err
    assert (foreign / "results.jsonl").read_text() == "name,score\nalice,3\n"  # untouched
    assert main(["report", str(foreign)]) == 2

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    text = json.dumps({"format": FORMAT, "version": 1, "config_id": "x"}) + "\n{\"key\": \"sweep/bn\n"
    (corrupt / "results.jsonl").write_text(text)
    with pytest.raises(ResultsError, match="line 2: corrupt JSON"):
        ResultsStore(corrupt)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_other_settings_in_same_directory_are_refused(quick_run: Path, capsys) -> None:
    before = (quick_run / "results.jsonl").read_text()
    assert main([*QUICK, "--lr", "0.5", "--out", str(quick_run)]) == 2
    assert "different settings (lr)" in capsys.readouterr().err
    assert (quick_run / "results.jsonl").read_text() == before


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "f.txt"
    atomic_write(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("normlab.lab.results.os.replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary left behind


def test_validate_row_rejects_bad_rows() -> None:
    good = {"key": "sweep/bn/bs1/seed0", "scenario": "sweep", "norm": "bn", "batch_size": 1, "seed": 0,
            "metrics": {}, "curve": [], "time_s": 1.0, "device": "cpu", "versions": {},
            "finished_at": "now"}
    validate_row(good, "row")
    with pytest.raises(ResultsError, match="lacks the field 'seed'"):
        validate_row({k: v for k, v in good.items() if k != "seed"}, "row")
    with pytest.raises(ResultsError, match="'batch_size' should be int"):
        validate_row({**good, "batch_size": "1"}, "row")
    with pytest.raises(ResultsError, match="expected a JSON object"):
        validate_row([1, 2], "row")


def test_report_of_a_run_interrupted_before_any_row(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_mod, "run_one", interrupted)
    assert main([*QUICK, "--out", str(out)]) == 130
    assert ResultsStore(out).rows == []  # header only, still recognised as ours
    assert main(["report", str(out)]) == 0
    assert "No batch-size sweep results yet" in (out / "report.md").read_text()
