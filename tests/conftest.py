"""Shared test helpers: the one tolerance table, and a comparison that says where it failed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

# One table for the whole suite: (atol, rtol) per dtype of the tensors compared.
# float32: statistics of a few hundred elements differ from torch.nn's by summation order.
# float16/bfloat16: both sides compute in float32 and round once, so they differ by at
# most ~1 ulp of the output dtype (2^-10, 2^-7 relative), plus the float32 noise.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict[str, float]:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol * scale, "rtol": rtol * scale}


def assert_close(actual, expected, dtype: torch.dtype | None = None, scale: float = 1.0,
                 what: str = "") -> None:
    """Compare tensors/arrays with the table's tolerance; on failure name the worst element."""
    actual_t = torch.as_tensor(actual).detach()
    expected_t = torch.as_tensor(expected).detach()
    dtype = dtype or actual_t.dtype
    assert actual_t.shape == expected_t.shape, f"{what}: shape {tuple(actual_t.shape)} != {tuple(expected_t.shape)}"
    a = actual_t.double()
    e = expected_t.double()
    t = tol(dtype, scale)
    bad = ~torch.isclose(a, e, **t, equal_nan=True)
    if bad.any():
        diff = (a - e).abs().masked_fill(~bad, 0)
        idx = np.unravel_index(int(diff.argmax()), tuple(a.shape)) if a.dim() else ()
        pytest.fail(
            f"{what}: {int(bad.sum())}/{a.numel()} elements differ beyond atol={t['atol']:.1e} "
            f"rtol={t['rtol']:.1e}; worst at {tuple(int(i) for i in idx)}: "
            f"got {a[idx].item():.8g}, expected {e[idx].item():.8g}"
        )


def assert_layers_match_torch_nn(x4: torch.Tensor, groups: int, scales=(1.0, 2.0, 5.0)) -> None:
    """Every normlab layer against its torch.nn twin on ``x4`` (N, C, H, W; its device and
    memory format): BatchNorm2d, InstanceNorm2d with running statistics and GroupNorm(groups)
    -- and, for a contiguous x4, LayerNorm(W), RMSNorm([H, W]) and BatchNorm1d on (4N, C).
    Same random parameters; output, input and parameter gradients (tolerance scales
    ``scales`` for y, dx, dparams) and buffers, in training and, where running statistics
    make a difference, in eval mode."""
    import normlab as nl

    n, c, h, w = x4.shape
    both, train = ("train", "eval"), ("train",)  # eval differs from train only with running stats
    pairs = [
        (nl.BatchNorm2d(c), torch.nn.BatchNorm2d(c), x4, both),
        (nl.InstanceNorm2d(c, affine=True, track_running_stats=True),
         torch.nn.InstanceNorm2d(c, affine=True, track_running_stats=True), x4, both),
        (nl.GroupNorm(groups, c), torch.nn.GroupNorm(groups, c), x4, train),
    ]
    if x4.is_contiguous():  # LayerNorm/RMSNorm take contiguous rows only
        pairs += [
            (nl.LayerNorm(w), torch.nn.LayerNorm(w), x4, train),
            (nl.RMSNorm([h, w]), torch.nn.RMSNorm([h, w]), x4, train),
            (nl.BatchNorm1d(c), torch.nn.BatchNorm1d(c), torch.randn(4 * n, c, device=x4.device), both),
        ]
    dy_gen = torch.Generator(device=x4.device)

    def fwd_bwd(module, x):
        x = x.detach().requires_grad_(True)
        y = module(x)
        y.backward(torch.randn(y.shape, generator=dy_gen.manual_seed(9), device=y.device, dtype=y.dtype))
        return y.detach(), x.grad, [p.grad for p in module.parameters()]

    for ours, theirs, x, modes in pairs:
        ours.to(x.device)
        theirs.to(x.device)
        with torch.no_grad():
            for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
                p.copy_(torch.randn(p.shape))
                q.copy_(p)
        for mode in modes:
            ours.train(mode == "train")
            theirs.train(mode == "train")
            for p in [*ours.parameters(), *theirs.parameters()]:
                p.grad = None
            (y, dx, dps), (ey, edx, edps) = fwd_bwd(ours, x), fwd_bwd(theirs, x)
            what = f"{type(ours).__name__} {'contiguous' if x.is_contiguous() else 'channels_last'} {mode}"
            assert_close(y, ey, scale=scales[0], what=f"{what} y")
            assert_close(dx, edx, scale=scales[1], what=f"{what} dx")
            for dp, edp in zip(dps, edps, strict=True):
                assert_close(dp, edp, scale=scales[2], what=f"{what} dparam")
            for buf, ebuf in zip(ours.buffers(), theirs.buffers(), strict=True):
                assert_close(buf, ebuf, torch.float32, what=f"{what} buffer")  # incl. num_batches_tracked
