"""Reading models from disk and writing them back safely (used by the CLI).

A model file is either a whole pickled module (``torch.save(model)``) or a state dict
(``torch.save(model.state_dict())``, possibly wrapped as ``{"state_dict": ...}`` or
``{"model": ...}``, keys possibly prefixed by ``module.``) together with an
architecture name. Loading a pickled module runs code from the file
(``torch.load(weights_only=False)``): only load files you trust.

Writes are atomic (a temporary file in the target directory, then ``os.replace``), and
the input file is never written to.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .archs import architecture_names, build_architecture

__all__ = ["ModelFileError", "load_model", "load_tensor", "save_atomic", "check_output_path"]


class ModelFileError(ValueError):
    """A model or data file that cannot be read or does not fit (a user error)."""


def _torch_load(path: str | os.PathLike, what: str) -> Any:
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"cannot read {what} {str(p)!r}: no such file")
    if p.is_dir():
        raise ModelFileError(f"cannot read {what} {str(p)!r}: it is a directory")
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 -- any failure to unpickle is an unreadable file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFileError(f"cannot read {what} {str(p)!r}: not a readable PyTorch file ({reason})") \
            from None


def _unwrap_state_dict(obj: dict) -> dict[str, torch.Tensor] | None:
    for key in ("state_dict", "model_state_dict", "model"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return None
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_model(path: str | os.PathLike, arch: str | None = None, **arch_kwargs: Any) -> nn.Module:
    """The model in ``path``: a pickled module as is, or a state dict loaded (strictly)
    into ``build_architecture(arch, **arch_kwargs)``. Raises :class:`ModelFileError`
    with a one-line reason for unreadable or mismatched files."""
    obj = _torch_load(path, "model file")
    if isinstance(obj, dict) and isinstance(obj.get("model"), nn.Module):
        obj = obj["model"]
    if isinstance(obj, nn.Module):
        return obj
    if not isinstance(obj, dict):
        raise ModelFileError(f"{str(path)!r} holds a {type(obj).__name__}, expected an nn.Module "
                             "or a state_dict")
    state = _unwrap_state_dict(obj)
    if state is None:
        raise ModelFileError(f"{str(path)!r} holds a dict that is not a state_dict (keys: "
                             f"{', '.join(map(str, list(obj)[:5]))})")
    if arch is None:
        raise ModelFileError(f"{str(path)!r} holds a state_dict; name its architecture with --arch "
                             f"(built-in: {', '.join(architecture_names())})")
    try:
        model = build_architecture(arch, **arch_kwargs)
    except (ValueError, TypeError) as error:
        raise ModelFileError(str(error)) from None
    expected = model.state_dict()
    # checkpoints from before num_batches_tracked existed lack it; it starts at 0
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} key(s) (e.g. {keys[0]})")
        raise ModelFileError(f"the state_dict in {str(path)!r} does not match architecture {arch!r}: "
                             + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return model


def load_tensor(path: str | os.PathLike) -> torch.Tensor:
    """An input tensor from ``path``: a saved tensor, a tuple/list whose first item is
    one (``(x, y)``), or a dict with ``"x"``/``"input"``/``"inputs"``."""
    obj = _torch_load(path, "data file")
    if isinstance(obj, (tuple, list)) and obj:
        obj = obj[0]
    elif isinstance(obj, dict):
        obj = next((obj[k] for k in ("x", "input", "inputs", "images") if k in obj), None)
    if not isinstance(obj, torch.Tensor) or obj.dim() < 2 or not obj.is_floating_point():
        raise ModelFileError(f"data file {str(path)!r}: expected a floating-point tensor (N, ...) or "
                             "(x, y) / {'x': x}")
    return obj


def check_output_path(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Refuse to write ``dst`` when it is the input file (or a directory / missing dir)."""
    s, d = Path(src), Path(dst)
    if d.exists() and (d.is_dir() or (s.exists() and os.path.samefile(s, d))):
        what = "a directory" if d.is_dir() else "the input file"
        raise ModelFileError(f"output {str(d)!r} is {what}; write to a new file (the input is never "
                             "modified in place)")
    if os.path.realpath(s) == os.path.realpath(d):
        raise ModelFileError(f"output {str(d)!r} is the input file; write to a new file")
    if not d.parent.exists():
        raise ModelFileError(f"cannot write {str(d)!r}: directory {str(d.parent)!r} does not exist")


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file and ``os.replace``, so ``path``
    is either the old file or the complete new one, never a partial write."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
