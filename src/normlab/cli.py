"""The ``normlab`` command line: one entry point, one subcommand per feature area.

Each area module exposes ``add_parser(subparsers)`` that registers its subcommand and
sets ``func`` (taking the parsed args, returning an exit code). Areas are imported
lazily by name so that ``normlab --help`` stays fast and a missing optional
dependency only affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that provide add_parser(subparsers), one per feature area. An area whose
# module is not present in this installation is simply not offered.
COMMAND_MODULES: list[str] = [
    "normlab.lab.cli",  # compare, report, explain
    "normlab.bench.cli",  # bench
    "normlab.tools.cli",  # convert, fold, doctor
]


class UsageError(Exception):
    """A bad argument or input the user can fix: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab",
        description="Normalization layers for PyTorch, and a lab that compares them.",
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                continue  # this area is not part of the installation
            raise
        module.add_parser(subparsers)
    return parser


def _version() -> str:
    from . import __version__

    return f"normlab {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UsageError as error:
        print(f"normlab {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m normlab.cli` runs this file as __main__, a second copy of the module:
    # call the canonical one so that its UsageError is the one the commands raise.
    from normlab.cli import main as _main

    sys.exit(_main())
