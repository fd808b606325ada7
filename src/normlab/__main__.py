"""``python -m normlab``: the same as the ``normlab`` command."""

from normlab.cli import main

raise SystemExit(main())
