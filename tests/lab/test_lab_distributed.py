"""``normlab compare --nproc N``: DDP runs, the per-process batch scenario, torchrun's world, bad input.

Process start-up dominates the cost here, so each launch covers as much as it can
and the runs are tiny (a few SGD steps on MNIST-1D or on random data).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from normlab.cli import main
from normlab.distributed import launch_local
from normlab.lab.config import LabConfig
from normlab.lab.data import Dataset
from normlab.lab.results import ResultsStore
from normlab.lab.train import make_model, shard, train_model

LAUNCH_TIMEOUT = 180.0
# a small --quick: one sweep batch size, one seed, few steps; the per-process batch scenario
# at b = 1, 2 (global 2, 4: the (bn, 4) and (gn, 4) runs are shared with the sweep)
TINY = ["compare", "--quick", "--norm", "bn,gn", "--batch-sizes", "4", "--seeds", "1", "--min-steps", "15",
        "--per-process-batches", "1,2", "--no-progress"]


def _fail(capsys, args: list[str], message: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- end to end
def test_compare_nproc2_end_to_end_and_resume(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main([*TINY, "--nproc", "2", "--out", str(out)]) == 0
    rows = ResultsStore(out).rows
    keys = {r["key"] for r in rows}
    expected = {"sweep/bn/bs4/seed0", "sweep/gn/bs4/seed0", "noniid/bn/bs16/seed0", "noniid/gn/bs16/seed0",
                "cost/bn/bs16/seed0", "cost/gn/bs16/seed0",
                "ppb/bn/bs2/seed0", "ppb/syncbn/bs2/seed0", "ppb/gn/bs2/seed0", "ppb/syncbn/bs4/seed0"}
    assert keys == expected
    for row in rows:
        assert row["nproc"] == 2
        if row["scenario"] == "ppb":
            assert row["metrics"]["per_process_batch"] == row["batch_size"] // 2
        if row["scenario"] != "cost":
            m = row["metrics"]
            assert 0.0 <= m["err_test"] <= 100.0 and math.isfinite(m["final_loss"])
            assert m["lr"] == pytest.approx(0.1 * row["batch_size"] / 32)  # global batch's lr
    config = LabConfig.from_dict(__import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert config.nproc == 2 and config.per_process_batches == [1, 2]

    md = (out / "report.md").read_text()
    assert "## Per-process batch (2 processes)" in md
    assert "| norm | b=1 (global 2) | b=2 (global 4) |" in md
    section = md.split("## Per-process batch")[1].split("\n## ")[0]
    for norm in ("bn", "syncbn", "gn"):
        line = next(ln for ln in section.splitlines() if ln.startswith(f"| {norm} |"))
        assert "--" not in line, line  # every cell measured (shared sweep runs included)
    assert (out / "plots" / "per_process_batch.png").read_bytes()[:4] == b"\x89PNG"
    assert "syncbn" not in md.split("## Batch-size sweep")[1].split("\n## ")[0]  # not in the sweep table
    capsys.readouterr()

    # resume: nothing left, so nothing is spawned and nothing changes
    before = (out / "results.jsonl").read_text()
    assert main([*TINY, "--nproc", "2", "--out", str(out)]) == 0
    assert (out / "results.jsonl").read_text() == before
    assert "(10 of 10 runs already done)" in " ".join(capsys.readouterr().err.split())
    # the same directory with another process count is another experiment
    _fail(capsys, [*TINY, "--out", str(out), "--per-process-batches", "off"],
          "different settings (nproc)")


def _torchrun_like(rank: int, out: str) -> int:
    """What one process started by torchrun does: run the CLI inside an existing world."""
    return main(["compare", "--quick", "--norm", "gn", "--batch-sizes", "4", "--seeds", "1",
                 "--min-steps", "10", "--per-process-batches", "2", "--no-progress", "--out", out])


def test_joins_an_existing_world_instead_of_spawning(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # launch_local sets RANK/WORLD_SIZE/MASTER_* and initializes the group, as torchrun + init would
    codes = launch_local(_torchrun_like, 2, str(out), timeout=LAUNCH_TIMEOUT, num_threads=1)
    assert codes == [0, 0]
    rows = ResultsStore(out).rows
    assert {r["key"] for r in rows} == {"sweep/gn/bs4/seed0", "noniid/gn/bs16/seed0", "cost/gn/bs16/seed0",
                                        "ppb/bn/bs4/seed0", "ppb/syncbn/bs4/seed0"}
    assert all(r["nproc"] == 2 for r in rows)
    assert "Per-process batch (2 processes)" in (out / "report.md").read_text()


# --------------------------------------------------------------------------- equivalence
def _tiny_data() -> Dataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 40, generator=gen) * 2.0 + 1.0
    y = torch.randint(0, 10, (64,), generator=gen)
    return Dataset("synthetic", x, y, x[:16], y[:16], [str(i) for i in range(10)])


def _tiny_config() -> LabConfig:
    # 3 steps (the step floor), every step on the loss curve
    return LabConfig(width=8, min_steps=3, epochs=0.01, curve_points=100)


BATCH = 5  # not divisible by 2: parts of 3 and 2 examples


def _ddp_train(rank: int) -> dict:
    """Train syncbn and bn models under DDP (one launch: starting processes is the cost)."""
    from torch.nn.parallel import DistributedDataParallel

    config, data = _tiny_config(), _tiny_data()
    out = {}
    for norm in ("syncbn", "bn"):
        model = make_model(config, data, norm, seed=0)
        log = train_model(DistributedDataParallel(model), config, data, BATCH, 0, torch.device("cpu"),
                          rank=rank, world_size=2)
        out[norm] = {"state": {k: v.clone() for k, v in model.state_dict().items()}, "curve": log.curve}
    return out


def test_syncbn_under_ddp_trains_like_one_process_on_the_whole_batch() -> None:
    """3 SGD steps of the lab's model: SyncBN on 2 processes (parts of 3 and 2) == BatchNorm in
    one process on the batch of 5 -- parameters, running statistics and the logged global loss.
    BatchNorm with per-process statistics does not match (the test can fail)."""
    config, data = _tiny_config(), _tiny_data()
    ref_model = make_model(config, data, "bn", seed=0)
    ref = train_model(ref_model, config, data, BATCH, 0, torch.device("cpu"))
    assert ref.steps == 3
    results = launch_local(_ddp_train, 2, timeout=LAUNCH_TIMEOUT, num_threads=1)
    expected = ref_model.state_dict()
    for rank, res in enumerate(r["syncbn"] for r in results):
        assert set(res["state"]) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(res["state"][name], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name, r=rank: f"rank {r}, {n}: {m}")
        assert [p[0] for p in res["curve"]] == [1, 2, 3]
        for (_, loss, _), (_, ref_loss, _) in zip(res["curve"], ref.curve, strict=True):
            assert loss == pytest.approx(ref_loss, rel=1e-5)

    local = results[0]["bn"]["state"]
    diff = max(float((local[k].float() - expected[k].float()).abs().max()) for k in expected)
    assert diff > 1e-3  # per-process statistics train a different model


def test_shard_rule() -> None:
    idx = torch.arange(7)
    parts = [shard(idx, r, 3) for r in range(3)]
    assert [p.tolist() for p in parts] == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(torch.cat(parts).tolist()) == idx.tolist()


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("value, message", [
    ("0", "--nproc expects a positive integer, got 0"),
    ("-2", "--nproc expects a positive integer, got -2"),
    ("two", "--nproc expects a positive integer, got 'two'"),
    ("1.5", "--nproc expects a positive integer, got '1.5'"),
])
def test_bad_nproc(capsys, tmp_path: Path, value: str, message: str) -> None:
    _fail(capsys, ["compare", "--quick", "--nproc", value, "--out", str(tmp_path / "r")], message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["--nproc", "4", "--batch-sizes", "1,2"], "every batch size (1, 2) is smaller than --nproc 4"),
    (["--nproc", "32", "--batch-sizes", "64"], "--ref-batch 16 is smaller than --nproc 32"),
    (["--per-process-batches", "2"], "needs --nproc >= 2 (got 1)"),
    (["--nproc", "2", "--per-process-batches", "0,2"], "per-process batch sizes must be >= 1, got 0"),
    (["--nproc", "2", "--per-process-batches", "600"], "per-process batch 600 x 2 processes = 1200"),
])
def test_bad_process_settings(capsys, tmp_path: Path, args: list[str], message: str) -> None:
    _fail(capsys, ["compare", "--quick", *args, "--out", str(tmp_path / "r")], message)
    assert not (tmp_path / "r").exists()


def test_nproc_must_match_torchrun_world(capsys, tmp_path: Path, monkeypatch) -> None:
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(key, value)
    _fail(capsys, ["compare", "--quick", "--nproc", "3", "--out", str(tmp_path / "r")],
          "--nproc 3 does not match the 2 processes torchrun started (WORLD_SIZE=2)")
    monkeypatch.setenv("RANK", "x")
    _fail(capsys, ["compare", "--quick", "--out", str(tmp_path / "r")], "must be integers")


def test_rows_of_single_process_runs_keep_their_identity() -> None:
    # nproc joined the identity later: at its default it must not change old directories' ids
    config = LabConfig()
    assert "nproc" not in config.identity()
    assert json.dumps(LabConfig(nproc=2).identity()) != json.dumps(config.identity())


# --------------------------------------------------------------------------- launcher
def _one_rank_fails(rank: int) -> None:
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("rank 1 breaks")
    dist.barrier()  # rank 0 would wait here for the whole process-group timeout


def test_fail_fast_stops_the_survivors(monkeypatch) -> None:
    """What `compare --nproc` relies on: one failed rank ends the launch at once, not after
    the process group's timeout (60 s here) -- and launch_local accepts timeout=None."""
    import time

    import normlab.distributed as nd

    monkeypatch.setattr(nd, "FAIL_FAST_GRACE", 1.0)
    t0 = time.monotonic()
    with pytest.raises(nd.LaunchError) as info:
        nd.launch_local(_one_rank_fails, 2, timeout=None, pg_timeout=60.0, num_threads=1, fail_fast=True)
    assert time.monotonic() - t0 < 40.0
    statuses = [o.status for o in info.value.outcomes]
    assert statuses[1] == "error" and statuses[0] in ("stopped", "error")
    assert "rank 1 breaks" in str(info.value)
