"""``normlab convert | fold | doctor``: the model tools on saved models.

Models are read with :func:`normlab.tools.files.load_model` (a pickled module, or a
state dict plus ``--arch``); outputs are written atomically as a pickled module (load
with ``torch.load(path, weights_only=False)``) and the input file is never modified.
Heavy work is imported inside the handlers so ``normlab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import ast
import json
from typing import Any

__all__ = ["add_parser"]


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="model file: a pickled nn.Module, or a state_dict (needs --arch)")
    parser.add_argument("--arch", help="architecture of a state_dict input: resnet18, resnet18_tiny "
                        "(built in), or any torchvision model name when torchvision is installed")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="num_classes to build --arch with (default: the architecture's)")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 8,3,32,32, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return shape


def _keyvalue(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``convert``, ``fold`` and ``doctor``."""
    p = subparsers.add_parser(
        "convert", help="swap the normalization layers of a saved model",
        description="Replace every norm of one kind in a saved model by another and save the result "
                    "to a new file. --to normlab / --to torch swap torch.nn's layers for normlab's "
                    "(and back) exactly; --to frozen_bn freezes BatchNorm.")
    _model_args(p)
    p.add_argument("output", help="where to write the converted model (a new file)")
    p.add_argument("--to", required=True,
                   help="target: a norm name (gn, ln, in, bn, brn, gbn, sn, frn, ln2d, frozen_bn, ...), "
                        "or 'normlab' / 'torch'")
    p.add_argument("--source", default="bn", help="kind of norm to replace (bn, in, gn, ln, rms, "
                   "frozen_bn, sn, frn; default bn)")
    p.add_argument("--num-groups", type=int, default=None, help="groups for --to gn")
    p.add_argument("--set", dest="options", type=_keyvalue, action="append", default=[],
                   metavar="KEY=VALUE", help="extra argument for the new layers (repeatable)")
    p.set_defaults(func=_convert)

    p = subparsers.add_parser(
        "fold", help="fold BatchNorm into the preceding Conv/Linear of a saved model",
        description="Fold eval-mode BatchNorm layers into the Conv/Linear before them and save the "
                    "folded model to a new file.")
    _model_args(p)
    p.add_argument("output", help="where to write the folded model (a new file)")
    p.add_argument("--check-shape", type=_shape, default=None, metavar="N,C,H,W",
                   help="verify on a random input of this shape that outputs match (1e-5 relative)")
    p.set_defaults(func=_fold)

    p = subparsers.add_parser(
        "doctor", help="diagnose the BatchNorm statistics of a saved model",
        description="Per-layer report: NaN/Inf in buffers, near-zero variance, zero weight, "
                    "untrained statistics and, with data, the train/eval gap and dead channels. "
                    "Exit status 0 when healthy, 1 when problems are found.")
    _model_args(p)
    p.add_argument("--data", help="input batch file: a saved tensor (N, ...), (x, y), or {'x': x}")
    p.add_argument("--batch-size", type=int, default=64, help="batch size for --data (default 64)")
    p.add_argument("--num-batches", type=int, default=None, help="batches of --data to use (default all)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_doctor)


def _load(args: argparse.Namespace):
    from ..cli import UsageError
    from .files import ModelFileError, load_model

    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    try:
        return load_model(args.input, args.arch, **kwargs)
    except ModelFileError as error:
        raise UsageError(str(error)) from None


def _check_output(args: argparse.Namespace) -> None:
    from ..cli import UsageError
    from .files import ModelFileError, check_output_path

    try:
        check_output_path(args.input, args.output)
    except ModelFileError as error:
        raise UsageError(str(error)) from None


def _count(model, classes) -> int:
    return sum(isinstance(m, classes) for m in model.modules())


def _convert(args: argparse.Namespace) -> int:
    from ..cli import UsageError
    from ._walk import ALL_NORMS
    from .convert import convert_norms, from_torch, to_torch
    from .files import save_atomic

    _check_output(args)
    model = _load(args)
    before = _count(model, ALL_NORMS)
    kwargs = dict(args.options)
    if args.num_groups is not None:
        kwargs["num_groups"] = args.num_groups
    try:
        if args.to == "normlab":
            converted = from_torch(model, inplace=True)
        elif args.to == "torch":
            converted = to_torch(model, inplace=True)
        else:
            converted = convert_norms(model, to=args.to, source=args.source, inplace=True, **kwargs)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    save_atomic(converted, args.output)
    print(f"converted {args.input} -> {args.output} (--to {args.to}; {before} norm layers in the model)")
    return 0


def _fold(args: argparse.Namespace) -> int:
    import torch

    from ..cli import UsageError
    from .files import save_atomic
    from .fold import _is_foldable_bn, fold_bn

    _check_output(args)
    model = _load(args).eval()
    folded = fold_bn(model)
    n_before = sum(map(_is_foldable_bn, model.modules()))
    n_after = sum(map(_is_foldable_bn, folded.modules()))
    if args.check_shape is not None:
        x = torch.randn(args.check_shape, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                expected, got = model(x), folded(x)
        except Exception as error:  # noqa: BLE001 -- report a bad --check-shape as a user error
            raise UsageError(f"cannot run the model on --check-shape {args.check_shape}: {error}") \
                from None
        scale = expected.abs().max().clamp_min(1e-12)
        rel = float((got - expected).abs().max() / scale)
        print(f"check: max |folded - original| / max |original| = {rel:.2e}")
        if rel > 1e-5:
            raise UsageError(f"folded model differs from the original by {rel:.2e} (relative); "
                             "not written")
    save_atomic(folded, args.output)
    print(f"folded {n_before - n_after} BatchNorm layer(s): {args.input} -> {args.output}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from ..cli import UsageError
    from .diagnose import inspect_bn
    from .files import ModelFileError, load_tensor

    model = _load(args)
    loader = None
    if args.data:
        if args.batch_size <= 0:
            raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
        try:
            data = load_tensor(args.data)
        except ModelFileError as error:
            raise UsageError(str(error)) from None
        loader = list(data.split(args.batch_size))
    try:
        report = inspect_bn(model, loader, num_batches=args.num_batches)
    except (RuntimeError, ValueError, TypeError) as error:
        raise UsageError(f"cannot run the model on {args.data}: {str(error).splitlines()[0]}") from None
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0 if report.ok else 1
