"""``normlab explain``: which axes a method normalizes over, in words, numbers and a cube.

The axes come from the same ``normlab.core.spec`` builders the layers use, so the
explanation cannot drift from the computation. The picture follows Fig. 2 of the Group
Normalization paper (Wu & He 2018): a cube with the batch axis N, the channel axis C
and the spatial axes folded into one (H, W); the elements that share one mean and
variance -- those of the first statistic -- are blue.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.spec import (
    NormSpec,
    batch_norm_spec,
    group_norm_spec,
    instance_norm_spec,
    layer_norm_spec,
    rms_norm_spec,
)

__all__ = ["METHODS", "describe", "draw_cubes", "method_spec", "parse_shape"]

METHODS: dict[str, str] = {"bn": "Batch Norm", "ln": "Layer Norm", "in": "Instance Norm",
                           "gn": "Group Norm", "rms": "RMS Norm"}
ALIASES = {"batchnorm": "bn", "layernorm": "ln", "instancenorm": "in", "groupnorm": "gn", "rmsnorm": "rms"}


def canonical(method: str) -> str:
    key = ALIASES.get(method.lower(), method.lower())
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)} or all")
    return key


def parse_shape(text: str) -> tuple[int, ...]:
    """``"N,C,H,W"`` -> (N, C, H, W); at least one spatial dim, all positive."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"--shape expects comma-separated integers like 6,6,4,4, got {text!r}") from None
    if len(shape) < 3 or any(s < 1 for s in shape):
        raise ValueError(f"--shape expects N,C and at least one spatial size, all >= 1, got {text!r}")
    return shape


def method_spec(method: str, shape: Sequence[int], groups: int = 2) -> NormSpec:
    """The NormSpec of ``method`` for an input ``shape`` (LayerNorm/RMSNorm over (C, *spatial))."""
    method = canonical(method)
    shape = tuple(shape)
    if method == "bn":
        return batch_norm_spec(shape)
    if method == "in":
        return instance_norm_spec(shape)
    if method == "gn":
        if groups < 1 or shape[1] % groups:
            raise ValueError(f"GroupNorm: --groups {groups} must divide the channel count C={shape[1]}")
        return group_norm_spec(shape, groups)
    if method == "ln":
        return layer_norm_spec(shape, shape[1:])
    return rms_norm_spec(shape, shape[1:])


def _spatial_names(k: int) -> list[str]:
    return {1: ["L"], 2: ["H", "W"], 3: ["D", "H", "W"]}.get(k, [f"S{i}" for i in range(k)])


def group_dim_names(spec: NormSpec) -> list[str]:
    """Names of the dims of ``spec.group_shape`` (GroupNorm splits C into G and C/G)."""
    spatial = _spatial_names(len(spec.input_shape) - 2)
    if len(spec.group_shape) == len(spec.input_shape) + 1:
        return ["N", "G", "C/G", *spatial]
    return ["N", "C", *spatial]


def describe(method: str, shape: Sequence[int], groups: int = 2) -> str:
    """A few lines: shared axes, number of statistics, elements per statistic, affine shape."""
    spec = method_spec(method, shape, groups)
    names = group_dim_names(spec)
    shared = [f"{names[d]}={spec.group_shape[d]}" for d in spec.reduce_dims]
    per = [f"{names[d]}={spec.group_shape[d]}" for d in range(len(names)) if d not in spec.reduce_dims]
    n_stats = math.prod(spec.stat_shape)
    in_names = ["N", "C", *_spatial_names(len(shape) - 2)]
    key = canonical(method)
    lines = [
        f"{METHODS[key]} ({key}) on input ({', '.join(in_names)}) = {tuple(shape)}"
        + (f", G={groups}" if key == "gn" else ""),
        f"  shares one {'mean and variance' if spec.center else 'mean square (no centering)'} over: "
        + ", ".join(shared),
        f"  one statistic per: {' x '.join(per) or 'the whole tensor'} -> {n_stats} statistic(s)",
        f"  each averages {spec.count} elements"
        + (" (batch and spatial positions)" if key == "bn" else ""),
        f"  learnable affine per: {' x '.join(in_names[d] for d in spec.feature_dims)} "
        f"(shape {spec.param_shape})",
    ]
    if key == "bn":
        lines.append("  train: batch statistics; eval: running averages of them")
    return "\n".join(lines)


def _membership(spec: NormSpec, n: int, c: int, s: int) -> bool:
    """Is element (n, c, flat spatial s) in the first statistic's set?"""
    spatial = np.unravel_index(s, spec.input_shape[2:])
    if len(spec.group_shape) == len(spec.input_shape) + 1:
        per_group = spec.input_shape[1] // spec.group_shape[1]
        coords = (n, c // per_group, c % per_group, *spatial)
    else:
        coords = (n, c, *spatial)
    return all(coords[d] == 0 for d in range(len(coords)) if d not in spec.reduce_dims)


def _draw_one(ax, method: str, shape: tuple[int, ...], groups: int) -> None:
    spec = method_spec(method, shape, groups)
    N, C = shape[0], shape[1]
    S = math.prod(shape[2:])
    nd, cd, sd = min(N, 8), min(C, 12), min(S, 6)  # cells drawn per axis (large axes subsampled)
    filled = np.ones((nd, cd, sd), dtype=bool)
    colors = np.empty((nd, cd, sd, 4))
    for i in range(nd):
        for j in range(cd):
            for k in range(sd):
                hit = _membership(spec, i * N // nd, j * C // cd, k * S // sd)
                colors[i, j, k] = (0.25, 0.45, 0.95, 0.95) if hit else (0.88, 0.88, 0.88, 0.35)
    ax.voxels(filled, facecolors=colors, edgecolor=(0.3, 0.3, 0.3, 0.4), linewidth=0.3)
    ax.set_box_aspect((nd, cd, sd), zoom=0.78)  # zoomed out so the axis labels fit
    ax.set_xlabel("N", labelpad=-12)
    ax.set_ylabel("C", labelpad=-12)
    ax.set_zlabel("H, W", labelpad=-12)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_zticks([])
    key = canonical(method)
    ax.set_title(f"{METHODS[key]}" + (f" (G={groups})" if key == "gn" else "")
                 + f"\n{math.prod(spec.stat_shape)} stats × {spec.count} elements", fontsize=10)
    ax.view_init(elev=22, azim=-55)


def draw_cubes(methods: Sequence[str], shape: Sequence[int], path: str | Path, groups: int = 2) -> Path:
    """Draw the cube picture for each method side by side into ``path`` (PNG)."""
    from matplotlib.figure import Figure

    shape = tuple(shape)
    width = max(4.5, 3.2 * len(methods))
    fig = Figure(figsize=(width, 3.8))
    fig.subplots_adjust(left=0.0, right=1.0, bottom=0.06, top=0.84, wspace=0.0)
    for i, m in enumerate(methods):
        _draw_one(fig.add_subplot(1, len(methods), i + 1, projection="3d"), m, shape, groups)
    note = f"input {shape}: blue = elements sharing one mean/variance"
    if shape[0] > 8 or shape[1] > 12 or math.prod(shape[2:]) > 6:
        note += " (large axes drawn subsampled)"
    fig.text(0.5, 0.015, textwrap.fill(note, int(width * 13)), ha="center", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path
