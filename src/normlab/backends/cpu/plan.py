"""Mapping a (NormSpec, memory layout) onto one of the two kernel views.

See :mod:`normlab.backends.cpu._kernels` for the views. The mapping is read off the
spec's axes, not its family name, so any spec with the same structure (e.g.
``SampleRMSNorm``, a GroupNorm(1)-shaped RMS norm) runs on the kernels too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ...core.spec import NormSpec

__all__ = ["Plan", "plan_for", "make_plan", "layout_of", "row_blocks"]


@dataclass(frozen=True)
class Plan:
    """Kernel view of one input.

    ``kind`` "grouped": dims (A, P, K, S, G); "cl" (channels-last): dims (N, S, G, K)
    with B row blocks per sample. ``per_sample``: statistics per (n, g) (else per g,
    BatchNorm). ``channels``: number of affine channels (G*K).
    """

    kind: str
    dims: tuple[int, ...]
    channels: int
    blocks: int = 1


def layout_of(x: torch.Tensor) -> str | None:
    """"contiguous", "channels_last" (4D/5D, not also contiguous), or None (strided)."""
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last"
    return None


def _channel_structure(spec: NormSpec) -> tuple[str, int] | None:
    """("batch" | "sample", groups) for a spec with one affine channel dim 1, else None."""
    shape, gshape, red = spec.input_shape, spec.group_shape, spec.reduce_dims
    d = len(shape)
    if spec.feature_dims != (1,) or d < 2:
        return None
    spatial = tuple(range(2, d))
    if gshape == shape:
        if red == (0, *spatial) and d >= 2:
            return "batch", shape[1]
        if red == spatial and d >= 3:
            return "sample", shape[1]  # InstanceNorm: C groups of one channel
        if red == (1, *spatial):
            return "sample", 1  # one group of all channels
        return None
    n, c = shape[0], shape[1]
    if len(gshape) == d + 1 and gshape[0] == n and gshape[3:] == shape[2:] \
            and gshape[1] * gshape[2] == c and red == tuple(range(2, d + 1)):
        return "sample", gshape[1]  # GroupNorm
    return None


#: Channels-last work is split into row blocks by the input's size alone -- never by the
#: thread count -- so that the statistics (merged per block) come out bit-identical on
#: any number of threads: one block per ``_BLOCK_ELEMENTS`` elements, at most
#: ``_MAX_BLOCKS``; per-sample statistics (GroupNorm/InstanceNorm) use one sweep per
#: sample once there are ``_MIN_SAMPLES`` samples to share out. A block has at least
#: ``_MIN_BLOCK_ROWS`` rows where that still leaves ``_FEW_BLOCKS`` blocks to share out:
#: each block's statistics cost a few passes over per-channel arrays, as much as the
#: data of a block of ~32 wide rows (C = 2048: one thread, 32-row blocks took 1.4x as
#: long as 64-row ones; 128 rows gained no more).
_BLOCK_ELEMENTS = 1 << 16
_MAX_BLOCKS = 64
_MIN_BLOCK_ROWS = 64
_FEW_BLOCKS = 4
_MIN_SAMPLES = 8


def row_blocks(rows: int, channels: int) -> int:
    """Row blocks of a channels-last (rows, C) view whose statistics (or output) are
    per channel over all its rows: BatchNorm's (see ``_BLOCK_ELEMENTS``)."""
    return max(1, min(rows, _MAX_BLOCKS, rows * channels // _BLOCK_ELEMENTS,
                      max(rows // _MIN_BLOCK_ROWS, _FEW_BLOCKS)))


@lru_cache(maxsize=512)
def plan_for(spec: NormSpec, layout: str) -> Plan | None:
    """The kernel view of an input of ``spec.input_shape`` in ``layout``, or None."""
    return make_plan(spec, layout)


def make_plan(spec: NormSpec, layout: str) -> Plan | None:
    """:func:`plan_for` without the cache (plain Python that ``torch.compile`` traces)."""
    shape = spec.input_shape
    if math.prod(shape) == 0:
        return None
    red = spec.reduce_dims
    d = len(shape)
    # LayerNorm-like: statistics and affine over the same trailing dims.
    if spec.group_shape == shape and red and red == spec.feature_dims \
            and red == tuple(range(d - len(red), d)):
        if layout != "contiguous":
            return None
        k = math.prod(shape[d - len(red):])
        return Plan("grouped", (1, math.prod(shape) // k, k, 1, 1), k)
    structure = _channel_structure(spec)
    if structure is None:
        return None
    kind, groups = structure
    n, c = shape[0], shape[1]
    s = math.prod(shape[2:])
    k = c // groups
    if layout == "contiguous" and not (kind == "batch" and s == 1):
        if kind == "batch":
            return Plan("grouped", (n, c, 1, s, c), c)
        return Plan("grouped", (1, n * groups, k, s, groups), c)
    # channels-last view (also BatchNorm of (N, C) / (N, C, 1...) in contiguous memory);
    # its statistics kernels always center (non-centering specs such as FRN go elsewhere)
    if not spec.center:
        return None
    if kind == "batch":
        return Plan("cl", (1, n * s, groups, k), c, row_blocks(n * s, c))
    blocks = 1 if n >= _MIN_SAMPLES else max(1, min(s, -(-_MIN_SAMPLES // n)))
    return Plan("cl", (n, s, groups, k), c, blocks)
