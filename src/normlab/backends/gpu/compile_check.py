"""Compile every Triton kernel ahead of time for a GPU architecture -- no GPU needed.

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' Python semantics but not
Triton's compiler, which is stricter (types of loop-carried values, constexpr
branches, what lowers to PTX). This check runs the real compiler down to a cubin
(``ptxas`` ships inside the triton wheel) for each kernel x dtype x flag setting, so
a kernel that would fail to compile on a GPU fails here on a CPU machine.

Usage::

    python -m normlab.backends.gpu.compile_check [--arch 90] [--dtypes fp32,bf16,fp16]

Run it without ``TRITON_INTERPRET=1`` in the environment (it needs the kernels as
compilable JIT functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _channels, _common, _groups, _rows
from ._common import LAUNCH

__all__ = ["KERNELS", "compile_kernel", "variants", "main"]

#: kernel -> {constexpr block size: value}; boolean flags are found by name.
KERNELS = {
    _common._split_sum_kernel: {"BLOCK_K": 256, "BLOCK_C": 32},
    _rows._rows_fwd_kernel: {"BLOCK": 1024, "BLOCK_M": 2},
    _rows._rows_bwd_kernel: {"BLOCK": 1024, "BLOCK_M": 2},
    # every phase in one program; SYNC (a flag) adds the barriers of the cooperative launch
    _channels._chan_fwd_kernel: {"BLOCK_R": 256, "BLOCK_C": 4, "BLOCK_K": 64, "MERGE_C": 1, "PHASES": 7},
    _channels._chan_bwd_kernel: {"BLOCK_R": 64, "BLOCK_C": 64, "BLOCK_K": 256, "MERGE_C": 1, "PHASES": 7},
    _channels._chan_merge_kernel: {"BLOCK_K": 8, "BLOCK_C": 256},
    _groups._group_fwd_kernel: {"BLOCK_C": 4, "BLOCK_S": 256},
    _groups._group_bwd_kernel: {"BLOCK_C": 4, "BLOCK_S": 256},
    _groups._group_partial_stats_kernel: {"BLOCK_C": 4, "BLOCK_S": 256},
    _groups._group_apply_kernel: {"BLOCK_C": 4, "BLOCK_S": 256},
    _groups._group_partial_grad_kernel: {"BLOCK_C": 4, "BLOCK_S": 256},
    _groups._group_dx_kernel: {"BLOCK_C": 4, "BLOCK_S": 256},
    _groups._cl_fwd_kernel: {"BLOCK_R": 64, "BLOCK_C": 64, "MERGE_G": 1, "BLOCK_KJ": 64, "PHASES": 7},
    _groups._cl_bwd_kernel: {"BLOCK_R": 64, "BLOCK_C": 64, "MERGE_G": 1, "BLOCK_KJ": 64, "PHASES": 7},
    _groups._group_grad_means_kernel: {"BLOCK_K": 64, "BLOCK_C": 4},
}

_DATA = {"X", "Y", "DX", "DY"}  # pointers to the input's dtype
_POINTERS = _DATA | {"W", "B", "Mean", "Var", "Rstd", "DWp", "DBp", "PMean", "PM2", "PSdy", "PSdyx",
                     "Sdy", "Sdyx", "C1", "C2", "P", "Out"}  # the others point to float32
_INT_POINTERS = {"Arrived"}
_FLOATS = {"eps", "inv_count", "inv_m"}


def _flags(fn) -> list[str]:
    return [a for a in fn.arg_names if a.isupper() and a not in KERNELS[fn] and a.startswith(
        ("HAS_", "NEED_", "CENTER", "SINGLE", "BATCH_", "SYNC"))]


# A launch specializes an integer argument equal to 1 into a constant, as a unit stride
# is: (rows x channels) kernels see one for the spatial axis (NCHW) or the channel axis
# (channels_last). The two variants below compile one each.
_SPATIAL_STRIDES = {"sxs", "sys", "sds", "sos"}
_CHANNEL_STRIDES = {"sxc", "syc", "sdc", "soc"}


def variants(fn) -> Iterator[dict[str, object]]:
    """Flag settings that between them give every boolean flag both values (all True,
    all False; one setting for a kernel without flags), with unit channel strides in
    the first and unit spatial strides in the second."""
    flags = _flags(fn)
    for value, unit in ((True, _CHANNEL_STRIDES), (False, _SPATIAL_STRIDES))[:2 if flags else 1]:
        yield {**KERNELS[fn], **{flag: value for flag in flags},
               **{stride: 1 for stride in unit if stride in fn.arg_names}}
    if "PHASES" in fn.arg_names:  # one launch per phase, without barriers
        for phase in (1, 2, 4):
            yield {**KERNELS[fn], **{flag: flag != "SYNC" for flag in flags}, "PHASES": phase}


def compile_kernel(fn, dtype: str, constexprs: dict[str, object], arch: int = 90,
                   num_warps: int = 4):
    """Compile ``fn`` with data pointers of ``dtype`` ('fp32', 'bf16', 'fp16') for
    ``sm_{arch}``; returns the compiled kernel (raises if Triton cannot compile it)."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _FLOATS:
            signature[name] = "fp32"
        elif name in _POINTERS:
            signature[name] = f"*{dtype}" if name in _DATA else "*fp32"
        elif name in _INT_POINTERS:
            signature[name] = "*i32"
        else:
            signature[name] = "i32"
    source = ASTSource(fn, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, **LAUNCH})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    args = parser.parse_args(argv)
    for dtype in args.dtypes.split(","):
        for fn in KERNELS:
            for constexprs in variants(fn):
                start = time.perf_counter()
                compile_kernel(fn, dtype, constexprs, args.arch)
                flags = ",".join(f for f in _flags(fn) if constexprs[f]) or "-"
                if "PHASES" in constexprs and constexprs["PHASES"] != 7:
                    flags += f" PHASES={constexprs['PHASES']}"
                flags += "".join(f" {name}=1" for name in sorted(_SPATIAL_STRIDES | _CHANNEL_STRIDES)
                                 if name in constexprs)
                print(f"ok  sm_{args.arch} {dtype:5s} {fn.__name__:28s} flags={flags:40s} "
                      f"{time.perf_counter() - start:.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
