"""``normlab convert | fold | doctor`` on saved models."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from torch import nn

import normlab as nl
from conftest import assert_close
from normlab.cli import build_parser, main
from normlab.nn import extra as E
from normlab.tools.archs import resnet18_tiny


@pytest.fixture(autouse=True)
def _deterministic():
    """Module initializations draw from the global RNG: seed it so every run is the same."""
    torch.manual_seed(0)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    m = resnet18_tiny(num_classes=4)
    m.train()
    with torch.no_grad():
        for s in range(2):
            m(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(s)) + 0.3)
    return m.eval()


@pytest.fixture
def files(tmp_path, model):
    module_file = tmp_path / "model.pt"
    state_file = tmp_path / "weights.pt"
    torch.save(model, module_file)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, state_file)
    return tmp_path, module_file, state_file


def _load(path) -> nn.Module:
    return torch.load(path, weights_only=False)


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def test_help_lists_the_commands():
    text = build_parser().format_help()
    for command in ("convert", "fold", "doctor"):
        assert command in text


def test_fold_full_module(files, model, capsys):
    tmp, module_file, _ = files
    before = _digest(module_file)
    out = tmp / "folded.pt"
    assert main(["fold", str(module_file), str(out), "--check-shape", "2,3,16,16"]) == 0
    assert "folded 20 BatchNorm layer(s)" in capsys.readouterr().out
    folded = _load(out)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        expected, got = model(_x()), folded(_x())
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5
    assert _digest(module_file) == before
    assert sorted(p.name for p in tmp.iterdir()) == ["folded.pt", "model.pt", "weights.pt"]  # no temp left


def test_convert_state_dict_with_arch(files, model):
    tmp, _, state_file = files
    before = _digest(state_file)
    out = tmp / "gn.pt"
    assert main(["convert", str(state_file), str(out), "--arch", "resnet18_tiny", "--num-classes", "4",
                 "--to", "gn", "--num-groups", "4"]) == 0
    converted = _load(out)
    norms = [m for m in converted.modules() if isinstance(m, nl.GroupNorm)]
    assert len(norms) == 20 and all(m.num_groups == 4 for m in norms)
    assert torch.equal(converted.bn1.weight, model.bn1.weight)
    assert _digest(state_file) == before


def test_convert_to_normlab_and_back_and_frozen(files, model):
    tmp, module_file, _ = files
    ours, back, frozen = tmp / "nl.pt", tmp / "torch.pt", tmp / "frozen.pt"
    assert main(["convert", str(module_file), str(ours), "--to", "normlab"]) == 0
    assert main(["convert", str(ours), str(back), "--to", "torch"]) == 0
    assert main(["convert", str(module_file), str(frozen), "--to", "frozen_bn"]) == 0
    m_ours, m_back, m_frozen = _load(ours), _load(back), _load(frozen)
    assert sum(isinstance(m, nl.BatchNorm2d) for m in m_ours.modules()) == 20
    assert sum(isinstance(m, E.FrozenBatchNorm2d) for m in m_frozen.modules()) == 20
    for key, value in model.state_dict().items():
        assert torch.equal(m_back.state_dict()[key], value), key
    with torch.no_grad():
        assert_close(m_ours(_x()), model(_x()), what="normlab conversion")
        assert_close(m_frozen.train()(_x()), model(_x()), what="frozen conversion")


def test_doctor_reports_and_exit_status(files, model, capsys):
    tmp, module_file, _ = files
    data = tmp / "data.pt"
    torch.save((torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1)) + 0.3,
                torch.zeros(12)), data)
    status = main(["doctor", str(module_file), "--data", str(data), "--batch-size", "6", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["num_batches"] == 2 and report["num_samples"] == 12 and len(report["layers"]) == 20
    assert status == (0 if not any(layer["problems"] for layer in report["layers"]) else 1)
    broken = _load(module_file)
    with torch.no_grad():
        broken.layer2[1].bn1.running_var[0] = float("inf")
    broken_file = tmp / "broken.pt"
    torch.save(broken, broken_file)
    assert main(["doctor", str(broken_file)]) == 1
    out = capsys.readouterr().out
    assert "layer2.1.bn1: 1 non-finite value(s)" in out


@pytest.mark.parametrize("case,message", [
    ("missing", "cannot read model file .*no such file"),
    ("garbage", "cannot read model file .*not a readable PyTorch file"),
    ("no_arch", "holds a state_dict; name its architecture with --arch"),
    ("mismatch", "does not match architecture 'resnet18_tiny'"),
    ("unknown_arch", "unknown architecture 'resnet999'"),
    ("same_file", "is the input file"),
    ("not_model", "holds a list, expected an nn.Module or a state_dict"),
])
def test_clear_errors(files, capsys, case, message):
    tmp, module_file, state_file = files
    out = str(tmp / "out.pt")
    garbage = tmp / "garbage.pt"
    garbage.write_text("not a checkpoint")
    wrong = tmp / "wrong.pt"
    torch.save(resnet18_tiny(num_classes=7).state_dict(), wrong)
    listed = tmp / "list.pt"
    torch.save([1, 2], listed)
    argv = {
        "missing": ["fold", str(tmp / "nope.pt"), out],
        "garbage": ["fold", str(garbage), out],
        "no_arch": ["fold", str(state_file), out],
        "mismatch": ["fold", str(wrong), out, "--arch", "resnet18_tiny", "--num-classes", "4"],
        "unknown_arch": ["doctor", str(state_file), "--arch", "resnet999"],
        "same_file": ["convert", str(module_file), str(module_file), "--to", "gn"],
        "not_model": ["doctor", str(listed)],
    }[case]
    before = _digest(module_file)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"normlab {argv[0]}: error: ") and len(err.strip().splitlines()) == 1

    assert re.search(message, err), err
    assert _digest(module_file) == before
    assert not (tmp / "out.pt").exists()


def test_bad_data_file_and_bad_target(files, capsys):
    tmp, module_file, _ = files
    bad = tmp / "labels.pt"
    torch.save(torch.zeros(4, dtype=torch.long), bad)
    assert main(["doctor", str(module_file), "--data", str(bad)]) == 2
    assert "expected a floating-point tensor" in capsys.readouterr().err
    assert main(["convert", str(module_file), str(tmp / "x.pt"), "--to", "nope"]) == 2
    assert "unknown norm 'nope'" in capsys.readouterr().err


def test_convert_passes_layer_options(files):
    tmp, module_file, _ = files
    out = tmp / "gbn.pt"
    assert main(["convert", str(module_file), str(out), "--to", "gbn", "--set", "virtual_batch_size=4"]) == 0
    layers = [m for m in _load(out).modules() if isinstance(m, E.GhostBatchNorm2d)]
    assert len(layers) == 20 and all(m.virtual_batch_size == 4 for m in layers)
