"""nl.SyncBatchNorm: equivalence with one process on the concatenated batch, and loud failures.

The multi-process tests start 2 or 3 local processes with
:func:`normlab.distributed.launch_local` (torch.multiprocessing spawn, gloo on
127.0.0.1, a free port per launch). The ground truth is torch.nn.BatchNorm run
in this (parent) process on the concatenation of every rank's slice; it never
touches the code under test. Each launch covers several cases, because starting
processes is what costs time here.

Gradient bookkeeping under DistributedDataParallel, with rank r's loss
``L_r = sum(y_r * g_r)`` and the reference loss ``L = sum_r L_r`` on the full batch:

* x.grad on rank r          == dL/dx restricted to rank r's rows (SyncBN's dx is
                               the gradient of the sum of all ranks' losses)
* parameter grads after DDP == dL/dtheta / world_size (DDP averages the ranks)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import normlab as nl
from conftest import assert_close
from normlab.distributed import LaunchError, launch_local
from normlab.nn.syncbn import SyncBatchNorm, merge_moments

# Generous wall-clock bound for one launch (process start-up dominates); the tests
# themselves take a few seconds.
LAUNCH_TIMEOUT = 120.0


# --------------------------------------------------------------------------- helpers
def _build_model(case: dict) -> nn.Module:
    """torch.nn reference model for ``case``: [a channel-mixing layer] -> BatchNorm."""
    c, tail = case["C"], case["tail"]
    bn_cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(tail)]
    bn = bn_cls(c, momentum=case["momentum"], affine=case["affine"], bias=case["bias"])
    layers: list[nn.Module] = []
    if case["pre"]:
        layers.append({0: lambda: nn.Linear(c, c), 1: lambda: nn.Conv1d(c, c, 1),
                       2: lambda: nn.Conv2d(c, c, 3, padding=1)}[len(tail)]())
    layers.append(bn)
    return nn.Sequential(*layers).to(case["model_dtype"])


def _make_case(seed: int, sizes, c, tail, dtype=torch.float64, momentum=0.1, affine=True, bias=True,
               pre=False, channels_last=False, steps=2, offset=3.0, model_dtype=None) -> dict:
    """A case: per-rank batch sizes, data and cotangents for each step (``dtype``), initial
    weights (``model_dtype``, default ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)
    case = {"sizes": tuple(sizes), "C": c, "tail": tuple(tail), "dtype": dtype, "momentum": momentum,
            "affine": affine, "bias": bias, "pre": pre, "channels_last": channels_last,
            "model_dtype": model_dtype or dtype}
    total = sum(sizes)
    shape = (total, c, *tail)

    def rand(scale=1.0, shift=0.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)

    # a different scale and offset per channel, so a wrong channel pairing shows
    case["steps"] = [(rand(2.0, offset), rand()) for _ in range(steps)]
    case["x_eval"] = rand(2.0, offset)
    torch.manual_seed(seed)
    model = _build_model(case)
    with torch.no_grad():  # non-trivial affine parameters
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.3)
    case["state"] = model.state_dict()
    return case


def _memory(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _run_case(rank: int, case: dict, group=None) -> dict:
    """Rank ``rank``'s part of ``case`` under DDP (called inside a launched process)."""
    model = _build_model(case)
    model.load_state_dict(case["state"])
    model = SyncBatchNorm.convert_sync_batchnorm(model, group)
    ddp = model
    if any(p.requires_grad for p in model.parameters()):  # DDP refuses a model without any
        # broadcast_buffers=False: each rank's running statistics are its own SyncBN's work
        ddp = nn.parallel.DistributedDataParallel(model, process_group=group, broadcast_buffers=False)
    start = sum(case["sizes"][:rank])
    rows = slice(start, start + case["sizes"][rank])
    out: dict = {"steps": []}
    for x_full, g_full in case["steps"]:
        model.zero_grad(set_to_none=True)
        x = _memory(x_full[rows].clone(), case["channels_last"]).requires_grad_()
        y = ddp(x)
        (y * g_full[rows]).sum().backward()
        out["steps"].append({
            "y": y.detach(),
            "y_channels_last": y.is_contiguous(memory_format=torch.channels_last) and y.dim() == 4,
            "x.grad": x.grad,
            "grads": {k: p.grad for k, p in model.named_parameters()},
        })
    out["buffers"] = {k: b.clone() for k, b in model.state_dict().items() if "running" in k
                      or "num_batches" in k}
    model.eval()
    with torch.no_grad():
        out["y_eval"] = model(case["x_eval"][rows])
    return out


def _reference(case: dict, ranks: list[int] | None = None) -> dict:
    """torch.nn in float64 on the concatenated batch of ``ranks`` (default: all)."""
    sizes = case["sizes"]
    ranks = list(range(len(sizes))) if ranks is None else ranks
    idx = torch.cat([torch.arange(sum(sizes[:r]), sum(sizes[:r + 1])) for r in ranks])
    model = _build_model(case)
    model.load_state_dict(case["state"])
    model.double()  # float32 cases too: the reference is the exact answer for the same inputs
    out: dict = {"steps": [], "rows": idx}
    for x_full, g_full in case["steps"]:
        model.zero_grad(set_to_none=True)
        x = x_full[idx].double().requires_grad_()
        y = model(x)
        (y * g_full[idx].double()).sum().backward()
        out["steps"].append({"y": y.detach(), "x.grad": x.grad,
                             "grads": {k: p.grad for k, p in model.named_parameters()}})
    out["buffers"] = {k: b.clone() for k, b in model.state_dict().items() if "running" in k
                      or "num_batches" in k}
    model.eval()
    with torch.no_grad():
        out["y_eval"] = model(case["x_eval"][idx].double())
    return out


def _check_equivalent(case: dict, results: list[dict], ranks: list[int] | None = None) -> None:
    """Every rank's results against the single-process reference on the concatenated batch."""
    ranks = list(range(len(case["sizes"]))) if ranks is None else ranks
    ref = _reference(case, ranks)
    world = len(ranks)
    dtype, pdtype = case["dtype"], case["model_dtype"]

    def tol(d: torch.dtype) -> tuple[torch.dtype, float]:
        # the 1e-5 promise: float64 is held to the (much tighter) table, float32 to 1e-5,
        # float16 to the table's float16 tolerance (one rounding of the output)
        return d, 0.5 if d == torch.float32 else 1.0

    offsets = [0]
    for r in ranks:
        offsets.append(offsets[-1] + case["sizes"][r])
    for pos, r in enumerate(ranks):
        local = slice(offsets[pos], offsets[pos + 1])
        res = results[r]
        for s, (got, want) in enumerate(zip(res["steps"], ref["steps"], strict=True)):
            where = f"sizes={case['sizes']} rank {r} step {s}"
            assert_close(got["y"], want["y"][local], *tol(dtype), f"output, {where}")
            assert_close(got["x.grad"], want["x.grad"][local], *tol(dtype), f"input grad, {where}")
            assert got["grads"].keys() == want["grads"].keys()
            for k, g in got["grads"].items():
                assert g.dtype == pdtype, f"grad of {k} is {g.dtype}, {where}"
                assert_close(g, want["grads"][k] / world, *tol(pdtype), f"grad of {k}, {where}")
            if case["channels_last"] and got["y"].dim() == 4:
                assert got["y_channels_last"], f"output lost channels_last, {where}"
        for k, b in res["buffers"].items():
            assert_close(b, ref["buffers"][k], *tol(pdtype), f"buffer {k}, rank {r}")
        assert_close(res["y_eval"], ref["y_eval"][local], *tol(dtype), f"eval output, rank {r}")


# --------------------------------------------------------------------------- workers
TWO_RANK_CASES = [
    _make_case(1, (4, 4), 3, (5, 6), pre=True),                                  # equal, 4D + conv
    _make_case(2, (3, 6), 4, (), momentum=None, affine=False, pre=True),         # unequal, (N, C)
    _make_case(3, (0, 5), 2, (7,), bias=False),                                  # an empty rank
    _make_case(4, (2, 5), 3, (4, 4), dtype=torch.float32, channels_last=True),   # float32, NHWC
]
THREE_RANK_CASES = [
    _make_case(5, (2, 5, 1), 3, (3, 4), pre=True),
    _make_case(6, (1, 1, 7), 5, (2,), momentum=0.3, affine=False),               # no parameters
    _make_case(9, (3, 2, 4), 3, (5,), dtype=torch.float16, model_dtype=torch.float32),  # AMP-style
]
PAIR_CASE = _make_case(7, (3, 4), 2, (3,), pre=True)   # ranks 0, 1 of 3 in their own group
SOLO_CASE = _make_case(8, (5,), 3, (2, 2))              # rank 2 alone: a group of one


def _two_rank_worker(rank: int, cases: list[dict]) -> dict:
    return {"cases": [_run_case(rank, case) for case in cases], "mismatch": _mismatch_checks(rank)}


def _three_rank_worker(rank: int, cases: list[dict], pair_case: dict, solo_case: dict) -> dict:
    out = {"cases": [_run_case(rank, case) for case in cases]}
    pair = dist.new_group([0, 1])  # every rank creates every group, in the same order
    solo = dist.new_group([2])
    out["subgroup"] = _run_case(rank, pair_case, pair) if rank < 2 else _run_case(0, solo_case, solo)
    return out


def _mismatch_checks(rank: int) -> dict:
    """Each bad call must raise the same error on both ranks and leave the group usable."""
    def attempt(module: nn.Module, x: torch.Tensor) -> tuple[str, str] | None:
        try:
            module(x)
        except Exception as exc:
            return type(exc).__name__, str(exc)
        return None

    out = {}
    # rank r has a layer and input of 3 + r channels
    out["channels"] = attempt(SyncBatchNorm(3 + rank), torch.randn(4, 3 + rank, 2))
    bn = SyncBatchNorm(3)
    out["dtype"] = attempt(bn, torch.randn(4, 3, 2, dtype=(torch.float32, torch.float64)[rank]))
    out["local_channels"] = attempt(bn, torch.randn(4, 3 if rank == 0 else 5))
    out["local_dims"] = attempt(bn, torch.randn(4, 3) if rank == 0 else torch.randn(3))
    out["not_floating"] = attempt(bn, torch.randn(4, 3) if rank == 0 else torch.ones(4, 3, dtype=torch.long))
    out["one_value"] = attempt(bn, torch.randn(1 - rank, 3))
    out["untouched"] = (bn.num_batches_tracked.item(), bn.running_mean.abs().max().item(),
                        (bn.running_var - 1).abs().max().item())
    # the group is still in lockstep: a valid call succeeds on both ranks
    x = torch.arange(6.0).view(3, 2) + 10 * rank
    with torch.no_grad():
        out["after"] = SyncBatchNorm(2, affine=False)(x)
    return out


def _dead_rank_worker(rank: int) -> dict | None:
    """Rank 1 dies between forward and backward; rank 0's backward must fail, not hang."""
    bn = SyncBatchNorm(3)
    y = bn(torch.randn(4, 3, requires_grad=True))
    if rank == 1:
        os._exit(17)
    start = time.monotonic()
    try:
        y.square().sum().backward()
    except Exception as exc:
        return {"runtime": isinstance(exc, RuntimeError), "type": type(exc).__name__,
                "message": str(exc)[:300], "elapsed": time.monotonic() - start}
    return None


def _silent_rank_worker(rank: int, flag: str) -> dict | None:
    """Rank 1 stays alive but never joins the collective; rank 0 must time out."""
    if rank == 1:
        deadline = time.monotonic() + 60
        while not Path(flag).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise KeyError("deliberate failure of the silent rank")  # exercises LaunchError reporting
    bn = SyncBatchNorm(3)
    start = time.monotonic()
    try:
        bn(torch.randn(4, 3))
    except Exception as exc:
        result = {"runtime": isinstance(exc, RuntimeError), "type": type(exc).__name__,
                  "message": str(exc)[:300], "elapsed": time.monotonic() - start}
    else:
        result = None
    Path(flag).touch()
    return result


# --------------------------------------------------------------------------- multi-process tests
@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """One 2-process launch shared by the tests below (starting processes is the slow part)."""
    return launch_local(_two_rank_worker, 2, TWO_RANK_CASES, timeout=LAUNCH_TIMEOUT)


def test_two_processes_match_one_process_on_the_concatenated_batch(two_ranks):
    for i, case in enumerate(TWO_RANK_CASES):
        _check_equivalent(case, [r["cases"][i] for r in two_ranks])


def test_three_processes_match_and_process_group_is_respected():
    results = launch_local(_three_rank_worker, 3, THREE_RANK_CASES, PAIR_CASE, SOLO_CASE,
                           timeout=LAUNCH_TIMEOUT)
    for i, case in enumerate(THREE_RANK_CASES):
        _check_equivalent(case, [r["cases"][i] for r in results])
    _check_equivalent(PAIR_CASE, [r["subgroup"] for r in results[:2]])
    # a group of one process is plain BatchNorm on the local batch
    _check_equivalent(SOLO_CASE, [results[2]["subgroup"]])


def test_mismatched_inputs_raise_the_same_clear_error_on_every_rank(two_ranks):
    expected = {
        "channels": ("ValueError", "ranks disagree on the number of channels (rank 0: 3, rank 1: 4)"),
        "dtype": ("ValueError",
                  "ranks disagree on the input dtype (rank 0: torch.float32, rank 1: torch.float64)"),
        "local_channels": ("ValueError", "rank 1: expected input with 3 channels at dim 1, got 5"),
        "local_dims": ("ValueError", "rank 1: expected at least 2D input (got 1D input)"),
        "not_floating": ("TypeError", "rank 1: expected a floating-point input, got a non-floating dtype"),
        "one_value": ("ValueError", "expected more than 1 value per channel over all ranks when training, "
                                    "got 1 (rank 0: 1, rank 1: 0)"),
    }
    r0, r1 = (r["mismatch"] for r in two_ranks)
    for key, (etype, text) in expected.items():
        assert r0[key] is not None, f"{key}: no error was raised"
        assert r0[key][0] == etype and text in r0[key][1], (key, r0[key])
        assert r0[key][1].startswith("SyncBatchNorm: "), r0[key]
        assert r1[key] == r0[key], f"{key}: rank 1 raised {r1[key]}, rank 0 {r0[key]}"
    # failed calls leave the running statistics untouched
    assert r0["untouched"] == r1["untouched"] == (0, 0.0, 0.0)
    # the valid call afterwards: rank 0 holds [0..5], rank 1 [10..15] as (3, 2) each
    full = torch.cat([torch.arange(6.0).view(3, 2), torch.arange(6.0).view(3, 2) + 10])
    want = (full - full.mean(0)) / torch.sqrt(full.var(0, unbiased=False) + 1e-5)
    assert_close(r0["after"], want[:3], torch.float32, what="valid call after the errors, rank 0")
    assert_close(r1["after"], want[3:], torch.float32, what="valid call after the errors, rank 1")


def test_a_dead_rank_makes_the_survivor_fail_within_the_timeout():
    pg_timeout = 5.0
    with pytest.raises(LaunchError) as info:
        launch_local(_dead_rank_worker, 2, timeout=LAUNCH_TIMEOUT, pg_timeout=pg_timeout)
    dead, survivor = info.value.outcomes[1], info.value.outcomes[0]
    assert dead.status == "died" and dead.exitcode == 17, dead.describe()
    assert survivor.status == "ok", survivor.describe()
    report = survivor.value
    assert report is not None, "the survivor's forward succeeded without its peer"
    assert report["runtime"], report
    assert report["message"].startswith("SyncBatchNorm: reducing the gradient sums"), report
    assert report["elapsed"] < pg_timeout + 3.0, report


def test_a_silent_rank_makes_the_others_time_out(tmp_path):
    pg_timeout = 2.0
    with pytest.raises(LaunchError) as info:
        launch_local(_silent_rank_worker, 2, str(tmp_path / "done"), timeout=LAUNCH_TIMEOUT,
                     pg_timeout=pg_timeout)
    silent, waiter = info.value.outcomes[1], info.value.outcomes[0]
    # LaunchError reports the failing rank with its exception and traceback
    assert silent.status == "error" and silent.error_type == "KeyError", silent.describe()
    assert "rank 1: raised KeyError" in str(info.value) and "Traceback" in str(info.value)
    assert waiter.status == "ok", waiter.describe()
    report = waiter.value
    assert report is not None, "the forward succeeded although rank 1 never joined"
    assert report["runtime"], report
    assert report["message"].startswith("SyncBatchNorm: exchanging input headers"), report
    # it waited for its peer for about the process group's timeout, no longer
    assert 0.5 * pg_timeout <= report["elapsed"] < pg_timeout + 3.0, report


# --------------------------------------------------------------------------- single-process tests
def test_merge_moments_is_stable_and_skips_empty_parts():
    gen = torch.Generator().manual_seed(0)
    sizes = [7, 0, 1, 30]
    parts = [torch.randn(n, 3, generator=gen, dtype=torch.float64) * 0.5 + 1e4 for n in sizes]
    parts32 = [p.float() for p in parts]
    means = torch.stack([p.mean(0) if len(p) else torch.full((3,), float("nan")) for p in parts32])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(3) for p in parts32])
    mean, m2, n = merge_moments(sizes, means, m2s)
    full = torch.cat(parts32).double()  # the exact float32 values, in float64
    assert n == sum(sizes)
    assert_close(mean, full.mean(0), torch.float32, what="merged mean")
    # E[x^2] - E[x]^2 in float32 would lose every digit here (|mean| = 1e4, std = 0.5)
    assert_close(m2 / n, full.var(0, unbiased=False), torch.float32, scale=50, what="merged variance")
    with pytest.raises(ValueError, match="positive total count"):
        merge_moments([0, 0], torch.zeros(2, 3), torch.zeros(2, 3))


def test_constructor_matches_torch_sync_batch_norm():
    import inspect

    ours = inspect.signature(SyncBatchNorm.__init__).parameters
    theirs = inspect.signature(nn.SyncBatchNorm.__init__).parameters
    assert list(ours) == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default and ours[name].kind == p.kind, name
    bn = SyncBatchNorm(4, 1e-3, None, True, True, "group", bias=False)
    assert (bn.eps, bn.momentum, bn.process_group, bn.bias) == (1e-3, None, "group", None)


@pytest.mark.parametrize("affine,bias,track", [(True, True, True), (True, False, True), (False, True, False)])
def test_state_dict_round_trips_with_torch(affine, bias, track):
    kw = {"affine": affine, "bias": bias, "track_running_stats": track}
    theirs = nn.SyncBatchNorm(5, **kw)
    ours = SyncBatchNorm(5, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        for t in theirs.state_dict().values():
            t.copy_(torch.arange(t.numel()).view(t.shape) + 2)
    ours.load_state_dict(theirs.state_dict())
    back = nn.SyncBatchNorm(5, **kw)
    back.load_state_dict(ours.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 3, 2)])
def test_without_a_process_group_it_is_batch_norm(shape):
    assert not dist.is_initialized()
    torch.manual_seed(0)
    ours = SyncBatchNorm(3, momentum=None).double()
    ref = nn.SyncBatchNorm(3, momentum=None).double()  # torch's falls back to BatchNorm here too
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
            m.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    for step in range(2):
        x = torch.randn(shape, dtype=torch.float64) * 3 + step
        g = torch.randn(shape, dtype=torch.float64)
        outs = []
        for m in (ours, ref):
            m.zero_grad()
            xi = x.clone().requires_grad_()
            y = m(xi)
            (y * g).sum().backward()
            outs.append((y, xi.grad, m.weight.grad, m.bias.grad))
        for a, b, what in zip(outs[0], outs[1], ("y", "x.grad", "weight.grad", "bias.grad"), strict=True):
            assert_close(a, b, torch.float64, what=f"{what}, step {step}")
    # momentum=None: a cumulative average of the two batches' statistics
    assert_close(ours.running_mean, ref.running_mean, torch.float64, what="running_mean")
    assert_close(ours.running_var, ref.running_var, torch.float64, what="running_var")
    ours.eval()
    x = torch.randn(shape, dtype=torch.float64)
    want = nn.functional.batch_norm(x, ref.running_mean, ref.running_var, ref.weight, ref.bias, False)
    assert_close(ours(x), want, torch.float64, what="eval output")


def test_input_errors_name_the_layer():
    bn = SyncBatchNorm(3)
    with pytest.raises(ValueError, match=r"SyncBatchNorm: expected at least 2D input \(got 1D input\)"):
        bn(torch.randn(3))
    with pytest.raises(TypeError, match="SyncBatchNorm: expected a floating-point input"):
        bn(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="SyncBatchNorm: expected input with 3 channels"):
        bn(torch.randn(2, 4))


def test_convert_sync_batchnorm_carries_parameters_buffers_and_mode():
    inner = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.2, eps=1e-3))
    model = nn.Sequential(
        inner,
        nl.BatchNorm2d(4, affine=False),
        nn.BatchNorm1d(4, bias=False),
        nn.InstanceNorm2d(4, affine=True),
        nl.GroupNorm(2, 4),
        nn.SyncBatchNorm(4, track_running_stats=False),
    )
    model[1].eval()
    model[2].qconfig = "qconfig-marker"
    with torch.no_grad():
        inner[1].running_mean.uniform_()
        inner[1].num_batches_tracked.fill_(7)
    before = {k: v for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}

    out = SyncBatchNorm.convert_sync_batchnorm(model, process_group="pg")
    assert out is model
    for i in (1, 2, 5):
        assert type(out[i]) is SyncBatchNorm and out[i].process_group == "pg"
    assert type(out[0][1]) is SyncBatchNorm
    assert type(out[3]) is nn.InstanceNorm2d and type(out[4]) is nl.GroupNorm
    bn = out[0][1]
    assert (bn.eps, bn.momentum, bn.num_batches_tracked.item()) == (1e-3, 0.2, 7)
    assert out[2].bias is None and out[2].qconfig == "qconfig-marker"
    assert out[1].weight is None and not out[1].training and out[0][1].training
    assert out[5].running_mean is None and not out[5].track_running_stats
    # the very same parameter and buffer tensors, so existing optimizers keep working
    after = out.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for k, v in after.items():
        assert v is tensors[k], k
    # a bare BatchNorm comes back as a new layer
    single = nl.BatchNorm1d(3)
    converted = SyncBatchNorm.convert_sync_batchnorm(single)
    assert type(converted) is SyncBatchNorm and converted.weight is single.weight


def _sleeper(rank: int) -> None:
    time.sleep(60)


def test_launch_local_kills_what_misses_the_deadline_and_checks_arguments():
    start = time.monotonic()
    with pytest.raises(LaunchError, match="did not finish within the deadline") as info:
        launch_local(_sleeper, 1, timeout=1.0)
    assert info.value.outcomes[0].status == "timeout"
    assert time.monotonic() - start < 10.0
    with pytest.raises(ValueError, match="nprocs"):
        launch_local(_sleeper, 0)
    with pytest.raises(ValueError, match="timeout"):
        launch_local(_sleeper, 1, timeout=0)
