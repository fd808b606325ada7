"""``python -m normlab.bench`` -- the same as ``normlab bench``."""

from __future__ import annotations

import sys

from ..cli import UsageError
from .cli import build_parser, handler


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return handler(args)
    except UsageError as error:
        print(f"normlab bench: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
