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
