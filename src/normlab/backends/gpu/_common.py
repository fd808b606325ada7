"""Launch heuristics shared by the Triton kernels (imports triton; load lazily).

No autotuning: several configs fail in the interpreter, and a heuristic keeps the
first call free of benchmarking. Every size below is a power of two because
``tl.arange`` needs one. Tests shrink :data:`TUNING` to force the looped paths and
several programs per reduction on tiny shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["FINISH", "LAUNCH", "MERGE", "PARTIAL", "TUNING", "Tuning", "cdiv", "column_sums", "cooperative_launch",
           "device_guard", "dummy", "fsum", "merge_step", "num_programs", "num_warps", "partial_programs",
           "phase_barrier", "phase_launches", "pow2", "resident_programs", "resident_target", "run_phases",
           "split_blocks", "split_sum", "stats_buffers", "tile_barrier", "tile_launch"]


@dataclass
class Tuning:
    """Block-size and grid heuristics (element counts, not bytes)."""

    #: LayerNorm/RMSNorm rows up to this length stay in registers (one read of x);
    #: longer rows are processed in chunks of this size.
    max_row_block: int = 8192
    #: elements a LayerNorm/RMSNorm program handles at once: rows shorter than this are
    #: batched several to a program (a (rows, N) tile), so short rows don't waste threads.
    row_tile: int = 2048
    #: elements in one (channels x spatial) tile of the GroupNorm/InstanceNorm kernels.
    tile: int = 4096
    #: elements and warps of a (rows x channels) tile (BatchNorm, the channels_last
    #: group kernels).
    channel_tile: int = 4096
    tile_warps: int = 4
    #: programs launched per SM for grid-stride reductions (LN backward, BN splits).
    programs_per_sm: int = 4
    #: rows a program of the LayerNorm/RMSNorm backward takes at least (down to one
    #: program per SM): each program writes a row of dW/dB partials that is read back
    #: once more, 4/3 * programs / rows of the pass's own traffic in float32. On an H100,
    #: (4096, 8192) float32 forward+backward: 4 programs per SM 261 us, 1 per SM 242 us
    #: (and 24 MB less memory); (16384, 768) wants its 4 per SM (94 vs 126 us).
    rows_per_partial: int = 32
    #: programs per SM of a single-launch reduction whose programs wait for each other
    #: (BatchNorm: statistics, barrier, apply): all must be resident at once, which a
    #: cooperative launch checks. 0 turns the single launch off (one launch per phase).
    resident_per_sm: int = 2
    #: elements a program reads per step of a pass over per-split partials (the merges
    #: of split statistics, :func:`split_sum`, the GroupNorm group means) and columns a
    #: program owns there: these passes are latency-bound, so they take wide steps
    #: over many programs (see :func:`split_blocks`).
    split_tile: int = 8192
    split_columns: int = 16
    #: the same target when running under the interpreter (no SMs to fill).
    interpreter_programs: int = 4


TUNING = Tuning()

#: Options passed to every launch. Stating fp fusion (FMA contraction, Triton's
#: historical default) explicitly keeps Triton 3.9 from warning on each first compile.
LAUNCH = {"enable_fp_fusion": True}


# tl.sum and tl.zeros are themselves @triton.jit library functions, and the interpreter
# can only run those if triton was first imported with TRITON_INTERPRET=1 -- which fails
# whenever something imported triton earlier (torch.compile does, even on CPU). The
# kernels therefore use builtins only: tl.reduce with tl.sum's own combine function
# (identical code when compiled; numpy's sum in the interpreter) and tl.full.
_sum_combine = tl.standard._sum_combine


@triton.jit
def fsum(x, axis: tl.constexpr):
    """``tl.sum(x, axis)`` for float32 ``x``, runnable in the interpreter whatever
    the import order."""
    return tl.reduce(x, axis, _sum_combine)


def tile_launch(cooperative: bool = False) -> dict[str, object]:
    """Launch options of the (rows x channels) tile kernels. A ``cooperative`` launch
    (the single-launch reductions) also caps registers so that
    ``TUNING.resident_per_sm`` programs fit an SM's 64K whatever the tile (a tile too
    large spills instead of the driver refusing the launch: with 4 warps, 4 programs of
    8192-element float32 tiles did not fit an H100's SM uncapped; with 2, the default,
    no 4-warp program can exceed the cap of 255)."""
    if not cooperative:
        return {"num_warps": TUNING.tile_warps, **LAUNCH}
    cap = 65536 // (32 * TUNING.tile_warps * _resident_per_sm()) // 8 * 8
    return {"num_warps": TUNING.tile_warps, **LAUNCH, "launch_cooperative_grid": True, "maxnreg": min(cap, 255)}


# Host-side arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are
# constexpr functions in triton 3.6, whose wrapper costs ~2 us a call on the H100
# machine's CPU -- a dozen of them per BatchNorm step.


def pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints."""
    return -(-a // b)


def num_warps(block: int) -> int:
    """Warps for a program that handles ``block`` elements at once (memory-bound: about
    8 elements per thread; 1 warp for <= 256 elements, at most 8 below 16384)."""
    if block >= 16384:
        return 16
    return min(max(block // 256, 1), 8)


@functools.cache
def _multiprocessors(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device) -> int:
    """How many programs a grid-stride reduction should use to fill the device."""
    if device.type == "cuda":
        return _multiprocessors(device.index) * TUNING.programs_per_sm
    return TUNING.interpreter_programs


def partial_programs(device: torch.device, rows: int) -> int:
    """Programs of a grid-stride reduction over ``rows`` rows that writes one row of
    partial sums per program: as :func:`num_programs`, but no more than one program per
    :attr:`Tuning.rows_per_partial` rows, down to one per SM."""
    programs = num_programs(device)
    if device.type != "cuda":
        return programs
    return max(_multiprocessors(device.index), min(programs, cdiv(rows, TUNING.rows_per_partial)))


def resident_programs(device: torch.device) -> int:
    """How many programs of a single-launch reduction may wait for each other on
    ``device``: 0 where they cannot (the interpreter runs programs one at a time;
    a triton without cooperative launches cannot ask the driver to check)."""
    if device.type != "cuda" or not cooperative_launch() or device.index in _REFUSED:
        return 0
    return _multiprocessors(device.index) * _resident_per_sm()


#: devices (indices) whose driver refused a cooperative launch: planned without one since
_REFUSED: set[int | None] = set()


def _resident_per_sm() -> int:
    # at most 2048 threads an SM (the register cap of tile_launch(cooperative=True) covers the rest)
    return min(TUNING.resident_per_sm, 2048 // (32 * TUNING.tile_warps))


@functools.cache
def cooperative_launch() -> bool:
    """Whether this triton launches a grid cooperatively (``launch_cooperative_grid``:
    the driver refuses a grid whose programs cannot all be resident, instead of a
    barrier waiting forever). NVIDIA only: the barriers and the register cap were not
    tried on ROCm, whose builds take one launch per phase."""
    if torch.version.hip is not None:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - a triton without the NVIDIA backend
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


# The phases of the single-launch reductions (bits of a kernel's PHASES): a program first
# reduces its part of the input to partials, then merges a share of the statistics its
# barrier group needs, then makes its part of the output. On a GPU one cooperative
# launch runs all three with a barrier between them (SYNC): the programs are resident
# together, and the last phase re-reads what this program has just read, last tile
# first -- from L2 when it still is there. Without a cooperative launch (the
# interpreter runs programs one at a time) each phase is its own launch of the kernel.
PARTIAL = tl.constexpr(1)
MERGE = tl.constexpr(2)
FINISH = tl.constexpr(4)


@functools.lru_cache(maxsize=64)
def phase_launches(sync: bool, alone: bool, phases: tuple[int, ...]) -> tuple[tuple[int, bool], ...]:
    """(PHASES, SYNC) of each launch that runs ``phases`` (the constexprs above: the
    interpreter cannot take ``int & constexpr`` in the kernels' tests): one
    cooperative launch (``sync``), one launch without barriers when each barrier would
    hold a single program (``alone``), else one launch per phase. (Cached: a sum of
    constexprs costs ~1 us of Python on every call.)"""
    if sync or alone:
        return ((sum(phases), sync),)
    return tuple((phase, False) for phase in phases)


@triton.jit
def tile_barrier(Arrived, target):
    """Wait until the int32 counter at ``Arrived`` has seen ``target`` arrivals, this
    program's included: a barrier among the programs that share the counter. They must
    all be resident (a cooperative launch); stores made before it are visible to the
    other programs after it (release on arrival, acquire while waiting, as a grid sync
    does)."""
    tl.debug_barrier()  # every thread of this program has issued its stores
    seen = tl.atomic_add(Arrived, 1, sem="acq_rel", scope="gpu") + 1
    while seen < target:
        seen = tl.atomic_add(Arrived, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


def run_phases(launch: Callable[[int, bool], object], device: torch.device, sync: bool, alone: bool,
               phases: tuple[int, ...]) -> None:
    """``launch(PHASES, SYNC)`` for each launch of :func:`phase_launches`. Should the
    driver refuse the cooperative launch (fewer programs resident at once than planned:
    it counts the compiled kernel's registers, shared memory and threads, the plan only
    estimates them), the phases run one launch each instead, and ``device`` is planned
    without cooperative launches from then on. A refused launch runs nothing."""
    try:
        for bits, barrier in phase_launches(sync, alone, phases):
            launch(bits, barrier)
    except RuntimeError as err:
        if not sync or "cooperative" not in str(err):
            raise
        _REFUSED.add(device.index)
        for bits, barrier in phase_launches(False, alone, phases):
            launch(bits, barrier)


@triton.jit
def phase_barrier(Arrived, target, SYNC: tl.constexpr):
    """Between two phases of one launch: :func:`tile_barrier` when the barrier holds
    several programs (SYNC), else a barrier of this program's threads (its own stores,
    read by other threads of it next)."""
    if SYNC:
        tile_barrier(Arrived, target)
    else:
        tl.debug_barrier()


def resident_target(programs: int, resident: int, barrier_groups: int) -> int:
    """Programs a single-launch reduction plans for: no more than can be resident at
    once when that still leaves two per barrier group (one cooperative launch), else
    ``programs`` (the phases as separate launches)."""
    return min(programs, resident) if resident >= 2 * barrier_groups else programs


def merge_step(pairs: int, share: int) -> int:
    """Partials a merging program of a single-launch reduction reads per step, for
    ``pairs`` partials of each of its ``share`` columns: 4-warp programs take a quarter
    of ``TUNING.split_tile`` (sized for the 8-16 warps of the separate merge passes)."""
    return max(1, min(pow2(pairs), pow2(TUNING.split_tile) // 4 // share))


def split_blocks(splits: int, columns: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_C) of a pass over (splits, columns) partials (:func:`split_sum`,
    the statistics merges, the group means): up to ``TUNING.split_tile`` partials a
    step, at most ``TUNING.split_columns`` columns a program. These passes are
    latency-bound -- a few dependent steps over partials in L2 -- so they take wide
    steps over many programs: channels_last BatchNorm (32, 64, 56, 56) has 523 splits
    of 64 channels; one program walking them 32 splits a step took 23 us on an H100,
    as long as the statistics pass itself (two programs of 256 x 32: 6 us; four of
    512 x 16: 5 us)."""
    block_c = min(pow2(columns), pow2(TUNING.split_columns))
    return max(1, min(pow2(splits), pow2(TUNING.split_tile) // block_c)), block_c


@triton.jit
def column_sums(P, K, C, cols, cmask, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum over k of P[k, cols] for (K, C) contiguous float32 partials, BLOCK_K rows a
    step, in a fixed order (deterministic)."""
    acc = tl.full([BLOCK_K, BLOCK_C], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        acc += tl.load(P + k[:, None] * C + cols[None, :], mask=(k < K)[:, None] & cmask[None, :], other=0.0)
    return fsum(acc, axis=0)


@triton.jit
def _split_sum_kernel(P, Out, K, C, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Out[a, c] = sum over k of P[a, k, c], for a stack of (K, C) partials (program
    axis 1 picks a): the per-split gradient sums reduced over the splits."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    a = tl.program_id(1)
    tl.store(Out + a * C + cols, column_sums(P + a * K * C, K, C, cols, cmask, BLOCK_K, BLOCK_C), mask=cmask)


@functools.lru_cache(maxsize=512)
def _split_sum_plan(a: int, k: int, c: int, _tuning: tuple[int, int]) -> tuple[tuple[int, int], dict[str, object]]:
    block_k, block_c = split_blocks(k, c)
    return (cdiv(c, block_c), a), {"BLOCK_K": block_k, "BLOCK_C": block_c,
                                   "num_warps": num_warps(block_k * block_c), **LAUNCH}


def split_sum(partials: torch.Tensor) -> torch.Tensor:
    """(A, K, C) contiguous float32 partials -> (A, C), summed over K (one launch; the
    launch shape cached per shape, keyed on the TUNING it reads)."""
    a, k, c = partials.shape
    out = torch.empty((a, c), device=partials.device, dtype=torch.float32)
    grid, options = _split_sum_plan(a, k, c, (TUNING.split_tile, TUNING.split_columns))
    _split_sum_kernel[grid](partials, out, k, c, **options)
    return out


class _NoGuard:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_GUARD = _NoGuard()


def device_guard(x: torch.Tensor):
    """Make ``x``'s GPU the current one while launching (Triton launches on the current
    device); a no-op when it already is (switching costs ~4 us a call) and for CPU
    tensors under the interpreter."""
    if x.is_cuda and x.get_device() != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return _NO_GUARD


def stats_buffers(count: int, shape: int | tuple[int, ...], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``count`` contiguous float32 tensors of ``shape`` on ``like``'s device, carved out
    of one allocation (each ``torch.empty`` costs ~4 us of CPU time on a GPU machine;
    allocating them in their final shape saves a ``view`` each). Being views of one
    tensor they share its autograd version counter: nothing may modify one in place
    while another is saved for backward (normlab only reads them)."""
    shape = (shape,) if isinstance(shape, int) else shape
    return torch.empty((count, *shape), device=like.device, dtype=torch.float32).unbind(0)


def dummy(x: torch.Tensor) -> torch.Tensor:
    """A placeholder pointer argument for an absent tensor (never dereferenced: the
    kernel's HAS_* flag is False)."""
    return x
