"""Model tools on a torchvision-style ResNet-18 (normlab.tools.archs) and small nets."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlab as nl
from conftest import assert_close
from normlab.nn import extra as E
from normlab.tools import (
    convert_norms,
    fold_bn,
    foldable_pairs,
    freeze_bn,
    from_torch,
    inspect_bn,
    recalibrate_bn,
    to_torch,
    unfreeze_bn,
)
from normlab.tools.archs import resnet18, resnet18_tiny


@pytest.fixture(autouse=True)
def _deterministic():
    """Module initializations draw from the global RNG: seed it so every run is the same."""
    torch.manual_seed(0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 8, seed: int = 0, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=_gen(seed)) + offset


@pytest.fixture(scope="module")
def trained_resnet() -> nn.Module:
    """A tiny ResNet-18 whose BatchNorms have non-trivial statistics and affines."""
    torch.manual_seed(0)
    model = resnet18_tiny(num_classes=5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        model.train()
        for s in range(3):
            model(_images(8, seed=s, offset=0.5))
    return model.eval()


def _count(model: nn.Module, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def _state_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------ architecture
def test_resnet18_has_torchvision_layout():
    model = resnet18()
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision's resnet18
    keys = model.state_dict().keys()
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.bn2.num_batches_tracked",
                "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean", "fc.bias"):
        assert key in keys


# ------------------------------------------------------------------ from_torch / to_torch
def test_from_torch_to_torch_round_trip_resnet(trained_resnet):
    original_state = copy.deepcopy(trained_resnet.state_dict())
    ours = from_torch(trained_resnet)
    assert _count(ours, nn.BatchNorm2d) == 0 and _count(ours, nl.BatchNorm2d) == 20
    assert _count(trained_resnet, nn.BatchNorm2d) == 20  # the input is untouched
    _state_equal(ours.state_dict(), original_state)
    x = _images(4, seed=7)
    with torch.no_grad():
        assert_close(ours(x), trained_resnet(x), what="eval logits")
    # one training step from the same state gives the same outputs and statistics
    a, b = copy.deepcopy(trained_resnet).train(), copy.deepcopy(ours).train()
    with torch.no_grad():
        assert_close(b(x), a(x), what="train logits")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        if va.is_floating_point():
            assert_close(vb, va, what=ka)
        else:
            assert torch.equal(vb, va), ka
    back = to_torch(ours)
    assert _count(back, nl.BatchNorm2d) == 0 and _count(back, nn.BatchNorm2d) == 20
    _state_equal(back.state_dict(), original_state)


def test_from_torch_covers_every_torch_norm_and_keeps_flags():
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, momentum=None), nn.GroupNorm(3, 6),
        nn.InstanceNorm2d(6, affine=True, track_running_stats=True), nn.Flatten(2),
        nn.LayerNorm(196, bias=False), nn.RMSNorm(196), nn.Flatten(), nn.Linear(6 * 196, 4),
        nn.BatchNorm1d(4, affine=False),
    )
    model[2].weight.requires_grad_(False)
    model.train()
    model(_images(4))
    model[3].eval()
    ours = from_torch(model)
    kinds = [type(m) for m in ours]
    assert kinds[1] is nl.BatchNorm2d and kinds[2] is nl.GroupNorm and kinds[3] is nl.InstanceNorm2d
    assert kinds[5] is nl.LayerNorm and kinds[6] is nl.RMSNorm and kinds[9] is nl.BatchNorm1d
    assert ours[1].momentum is None and ours[5].bias is None
    assert ours[2].weight.requires_grad is False and ours[2].bias.requires_grad is True
    assert ours[3].training is False and ours[1].training is True
    _state_equal(ours.state_dict(), model.state_dict())
    x = _images(5, seed=3)
    with torch.no_grad():
        assert_close(ours(x), model(x), what="mixed norms, train mode")
    _state_equal(to_torch(ours).state_dict(), ours.state_dict())
    assert [type(m) for m in to_torch(ours)] == [type(m) for m in model]


def test_to_torch_refuses_affine_without_bias():
    with pytest.raises(ValueError, match="to_torch: .*without bias"):
        to_torch(nn.Sequential(nl.BatchNorm2d(3, bias=False)))


# ------------------------------------------------------------------ convert_norms
def test_convert_norms_bn_to_gn_carries_affine(trained_resnet):
    gn = convert_norms(trained_resnet, to="gn", num_groups=4)
    assert _count(gn, (nn.BatchNorm2d, nl.BatchNorm2d)) == 0
    assert _count(gn, nl.GroupNorm) == 20
    assert gn.layer2[0].downsample[1].num_groups == 4
    assert torch.equal(gn.bn1.weight, trained_resnet.bn1.weight)
    assert gn.layer1[0].bn1.training is False  # training mode of the replaced layer kept
    assert gn(_images(2)).shape == (2, 5)


def test_convert_norms_to_frozen_and_brn_keeps_statistics(trained_resnet):
    x = _images(4, seed=5)
    frozen = convert_norms(trained_resnet, to="frozen_bn")
    assert _count(frozen, E.FrozenBatchNorm2d) == 20
    brn = convert_norms(trained_resnet, to="brn")
    with torch.no_grad():
        ref = trained_resnet(x)
        assert_close(frozen(x), ref, what="frozen_bn conversion")
        assert_close(brn(x), ref, what="brn conversion (eval)")


def test_convert_norms_root_shared_and_errors():
    assert isinstance(convert_norms(nn.BatchNorm2d(8), to="gn"), nl.GroupNorm)
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    out = convert_norms(model, to="ln2d", inplace=True)
    assert out is model and isinstance(model[0], E.LayerNorm2d) and model[0] is model[2]
    seq1d = convert_norms(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), to="brn")
    assert isinstance(seq1d[1], E.BatchRenorm1d)
    back = convert_norms(seq1d, to=nn.LayerNorm, source=E.BatchRenorm1d)
    assert isinstance(back[1], nn.LayerNorm)
    with pytest.raises(ValueError, match="convert_norms: unknown norm kind 'xx'"):
        convert_norms(model, source="xx")
    with pytest.raises(ValueError, match="unknown norm 'nope'"):
        convert_norms(nn.Sequential(nn.BatchNorm2d(2)), to="nope")


# ------------------------------------------------------------------ fold_bn
def test_fold_bn_resnet_equal_outputs(trained_resnet):
    assert len(foldable_pairs(trained_resnet)) == 20
    folded = fold_bn(trained_resnet)
    assert _count(folded, nn.BatchNorm2d) == 0 and _count(trained_resnet, nn.BatchNorm2d) == 20
    assert folded.conv1.bias is not None and trained_resnet.conv1.bias is None
    x = _images(4, seed=9)
    with torch.no_grad():
        expected, got = trained_resnet(x), folded(x)
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel < 1e-5, f"folded output differs by {rel:.2e} relative"


def test_fold_bn_refuses_training_mode(trained_resnet):
    with pytest.raises(ValueError, match="fold_bn: expected a model in eval mode"):
        fold_bn(copy.deepcopy(trained_resnet).train())
    model = copy.deepcopy(trained_resnet)
    model.layer1[0].bn2.train()
    with pytest.raises(ValueError, match="layer1.0.bn2"):
        fold_bn(model)


class _Branchy(nn.Module):
    """Conv whose output feeds BN and a second use (must not fold); data-dependent flow."""

    def __init__(self, dynamic: bool) -> None:
        super().__init__()
        self.dynamic = dynamic
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nl.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        z = self.conv(x)
        if self.dynamic and x.sum() > 1e9:  # data-dependent: not traceable by torch.fx
            return z
        return self.block(self.bn(z) + z)


@pytest.mark.parametrize("dynamic", [False, True])
def test_fold_bn_only_folds_safe_pairs(dynamic):
    model = _Branchy(dynamic)
    model.train()
    for s in range(2):
        model(_images(4, seed=s))
    model.eval()
    folded = fold_bn(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)  # conv output used twice: left alone
    assert isinstance(folded.block[1], nn.Identity)  # Sequential Conv -> BN: folded
    x = _images(3, seed=4)
    with torch.no_grad():
        assert_close(folded(x), model(x), scale=5, what="partially folded")


def test_fold_bn_linear_bn1d_and_frozen():
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3, bias=False),
                          E.FrozenBatchNorm1d(3))
    with torch.no_grad():
        model[4].running_mean.uniform_(-1, 1)
        model[4].running_var.uniform_(0.5, 2)
    model.train()
    for s in range(2):
        model(torch.randn(16, 6, generator=_gen(s)))
    model.eval()
    folded = fold_bn(model)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[4], nn.Identity)
    x = torch.randn(7, 6, generator=_gen(3))
    with torch.no_grad():
        assert_close(folded(x), model(x), what="linear fold")


# ------------------------------------------------------------------ freeze_bn
def test_freeze_bn_survives_train(trained_resnet):
    frozen = freeze_bn(trained_resnet)
    assert _count(frozen, E.FrozenBatchNorm2d) == 20
    names = {n for n, _ in frozen.named_parameters()}
    assert not any("bn" in n or "downsample.1" in n for n in names)
    state = copy.deepcopy(frozen.state_dict())
    frozen.train()
    x = _images(4, seed=2).requires_grad_(True)
    y = frozen(x)
    y.sum().backward()
    _state_equal(frozen.state_dict(), state)
    with torch.no_grad():
        assert_close(y.detach(), trained_resnet(x.detach()), what="frozen in train == original eval")
    assert frozen.conv1.weight.grad is not None
    # the state dict is BatchNorm's: it loads strictly back into the original architecture
    restored = resnet18_tiny(num_classes=5)
    restored.load_state_dict(frozen.state_dict())
    thawed = unfreeze_bn(frozen)
    assert _count(thawed, nl.BatchNorm2d) == 20 and thawed.layer1[0].bn1.weight.requires_grad


# ------------------------------------------------------------------ recalibrate_bn
def test_recalibrate_bn_is_the_average_of_batch_statistics_and_restores_state():
    bn = nn.BatchNorm2d(3, momentum=0.3)
    model = nn.Sequential(nn.Identity(), bn, nn.Dropout(0.5))
    model.train()
    model[2].eval()
    bn.num_batches_tracked.fill_(7)
    batches = [torch.randn(4, 3, 2, 2, generator=_gen(s)) * (s + 1) + s for s in range(5)]
    recalibrate_bn(model, batches, num_batches=4, progress=False)
    used = torch.stack(batches[:4])  # (B, N, C, H, W)
    means = used.mean((1, 3, 4))
    unbiased = used.transpose(1, 2).reshape(4, 3, -1).var(-1, unbiased=True)
    assert_close(bn.running_mean, means.mean(0), what="recalibrated mean")
    assert_close(bn.running_var, unbiased.mean(0), what="recalibrated var")
    assert bn.momentum == 0.3 and int(bn.num_batches_tracked) == 7
    assert model.training and bn.training and not model[2].training


def test_recalibrate_bn_failure_restores_statistics_and_progress_bar():
    model = nn.Sequential(nn.BatchNorm1d(3))
    before = copy.deepcopy(model.state_dict())
    bad = [torch.randn(4, 3), torch.randn(4, 5)]
    with pytest.raises(RuntimeError, match="running_mean should contain 5 elements"):
        recalibrate_bn(model, bad, progress=False)  # torch.nn's own error, passed through
    _state_equal(model.state_dict(), before)
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate_bn(model, bad, num_batches=0)
    # with a progress bar (rich), on (x, y) batches
    recalibrate_bn(model, [(torch.randn(4, 3) + 2, torch.zeros(4))] * 2, progress=True)
    assert_close(model[0].running_mean.mean(), torch.tensor(2.0), scale=5e4, what="mean near 2")


def _two_gaussians(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    direction = torch.linspace(-1, 1, 8)
    return torch.randn(n, 8, generator=g) + (2 * y[:, None] - 1) * direction, y


def test_recalibration_improves_shifted_domain_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    x, y = _two_gaussians(512, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(60):
        i = torch.arange(step * 64, step * 64 + 64) % 512
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, yt = _two_gaussians(1024, 1)
    shifted = xt + 1.5 * torch.linspace(-1, 1, 8)  # covariate shift towards one class

    def error(inputs):
        with torch.no_grad():
            return float((model(inputs).argmax(1) != yt).float().mean())

    source_error, before = error(xt), error(shifted)
    recalibrate_bn(model, list(shifted.split(64)), progress=False)  # unlabeled target data (AdaBN)
    after = error(shifted)
    assert source_error < 0.06
    assert before > 0.3, f"the shift should hurt the eval-mode model (error {before:.3f})"
    assert after < 0.06 and after < before - 0.25, f"error {before:.3f} -> {after:.3f}"


# ------------------------------------------------------------------ inspect_bn
def test_inspect_bn_buffers(trained_resnet):
    model = copy.deepcopy(trained_resnet)
    with torch.no_grad():
        model.layer1[0].bn1.running_var[2] = float("nan")
        model.layer2[0].bn2.running_var[0] = 0.0
        model.layer3[1].bn1.weight[1] = 0.0
    report = inspect_bn(model)
    by_layer = {name: problems for name, problems in report.problems}
    assert set(by_layer) == {"layer1.0.bn1", "layer2.0.bn2", "layer3.1.bn1"}
    assert "non-finite" in by_layer["layer1.0.bn1"]
    assert "running_var < eps" in by_layer["layer2.0.bn2"]
    assert "weight exactly 0" in by_layer["layer3.1.bn1"]
    assert "PROBLEM" in str(report) and not report.ok
    fresh = inspect_bn(resnet18_tiny())
    assert len(fresh.problems) == 20 and all("never updated" in p for _, p in fresh.problems)


def test_inspect_bn_with_data_finds_gap_and_dead_channels(trained_resnet):
    model = copy.deepcopy(trained_resnet)
    data = [_images(8, seed=s, offset=0.5) for s in range(3)]
    recalibrate_bn(model, data, progress=False)
    state, modes = copy.deepcopy(model.state_dict()), [m.training for m in model.modules()]
    healthy = inspect_bn(model, data)
    assert healthy.ok, str(healthy)
    assert healthy.num_batches == 3 and healthy.num_samples == 24
    # the first layer's input does not depend on other BatchNorms: recalibrated exactly
    assert healthy.layers[0].mean_shift < 1e-4
    shifted = inspect_bn(model, [3 * d + 4 for d in data])
    assert any("train/eval gap" in p for _, p in shifted.problems)
    assert shifted.layers[0].mean_shift > 1.0
    _state_equal(model.state_dict(), state)
    assert [m.training for m in model.modules()] == modes
    with torch.no_grad():
        model.conv1.weight[3] = 0.0  # channel 3 of bn1's input is constant 0
    dead = inspect_bn(model, data)
    assert dead.layers[0].dead_channels == 1
    assert any("dead channel" in p for name, p in dead.problems if name == "bn1")
    nan_data = [d.clone() for d in data]
    nan_data[0][0, 0, 0, 0] = float("nan")
    assert any("non-finite input" in p for _, p in inspect_bn(model, nan_data).problems)


def test_fold_bn_leaves_weight_standardized_conv():
    model = nn.Sequential(E.WSConv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.train()
    model(_images(4))
    model.eval()
    folded = fold_bn(model)
    assert isinstance(folded[1], nn.BatchNorm2d)  # standardization would undo a folded scale
    x = _images(2, seed=1)
    with torch.no_grad():
        assert_close(folded(x), model(x), what="ws conv untouched")


def test_tools_on_the_lab_resnet():
    from normlab.lab.models import build_model

    model = build_model("resnet", "bn", 3, 6, (16, 16), width=8, depth=1)
    n_bn = _count(model, nl.BatchNorm2d)
    assert n_bn == 9  # stem + 3 blocks x (2 + shortcut where the shape changes)
    model.train()
    with torch.no_grad():
        for s in range(2):
            model(_images(8, seed=s, offset=0.5))
    model.eval()
    x = _images(4, seed=3)
    with torch.no_grad():
        ref = model(x)
        as_torch = to_torch(model)
        assert _count(as_torch, nn.BatchNorm2d) == n_bn
        assert_close(as_torch(x), ref, what="lab resnet to_torch")
        assert_close(from_torch(as_torch)(x), ref, what="lab resnet round trip")
        folded = fold_bn(model)
        assert _count(folded, nl.BatchNorm2d) == 0
        assert float((folded(x) - ref).abs().max() / ref.abs().max()) < 1e-5
        assert_close(freeze_bn(model).train()(x), ref, what="lab resnet frozen")
    assert _count(convert_norms(model, to="gn", num_groups=4), nl.GroupNorm) == n_bn
    recal = recalibrate_bn(copy.deepcopy(model), [_images(8, seed=s, offset=0.5) for s in range(2)],
                           progress=False)
    assert inspect_bn(recal, [_images(8, seed=s, offset=0.5) for s in range(2)]).layers[0].mean_shift < 1e-4


def test_norm_classes_match_torch_and_normlab_layers_of_a_kind_only():
    from normlab.tools import norm_classes

    layers = {
        "bn": (nn.BatchNorm2d(4), nl.BatchNorm2d(4), nl.BatchNorm1d(4), nn.SyncBatchNorm(4), nl.SyncBatchNorm(4)),
        "in": (nn.InstanceNorm2d(4), nl.InstanceNorm1d(4)),
        "gn": (nn.GroupNorm(2, 4), nl.GroupNorm(2, 4)),
        "ln": (nn.LayerNorm(4), nl.LayerNorm(4)),
        "rms": (nn.RMSNorm(4), nl.RMSNorm(4)),
    }
    for kind in layers:
        classes = norm_classes(kind)
        for other, others in layers.items():
            for module in others:
                assert isinstance(module, classes) == (other == kind), (kind, type(module))
    assert not isinstance(nl.FrozenBatchNorm2d(4), norm_classes("bn"))
    assert isinstance(nl.FrozenBatchNorm2d(4), norm_classes("frozen_bn"))
    with pytest.raises(ValueError, match="unknown norm kind 'batchnorm'; expected one of bn, in"):
        norm_classes("batchnorm")
    with pytest.raises(TypeError, match="expected a norm kind name"):
        norm_classes(nn.BatchNorm2d)
