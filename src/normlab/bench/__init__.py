"""``normlab.bench``: side-by-side timing of normalization providers against torch.nn
and the machine's copy-bandwidth floor (CLI: ``normlab bench``).

Modules: :mod:`~normlab.bench.cases` (cases and providers), :mod:`~normlab.bench.timing`
(interleaved medians, floor bytes, saved-for-backward bytes), :mod:`~normlab.bench.run`
(rows with machine/versions/date), :mod:`~normlab.bench.report` (table, CSV/JSON, plot).
"""

from __future__ import annotations

from .cases import DEFAULT_SUITE, QUICK_SUITE, Case
from .run import run_case, run_suite

__all__ = ["Case", "DEFAULT_SUITE", "QUICK_SUITE", "run_case", "run_suite"]
