"""The comparison lab: train the same model with every normalization and report.

``normlab compare`` (see :mod:`normlab.lab.cli`) runs a declared :class:`LabConfig`:
it loads a dataset (:mod:`.data`), builds one model per norm name from the shared
registry (:mod:`.models`), trains it across batch sizes and seeds (:mod:`.train`,
:mod:`.sweep`), appends one row per run to a results file (:mod:`.results`) and
renders plots and a report from those saved rows only (:mod:`.plots`,
:mod:`.report`), so ``normlab report DIR`` can re-render without training.
``normlab explain`` (:mod:`.explain`) shows which axes each method normalizes over.

Heavy optional dependencies (matplotlib, scikit-learn, mnist1d, rich) are imported
inside the functions that need them.
"""

from __future__ import annotations

from .config import LabConfig, lr_for_batch
from .results import ResultsError, ResultsStore
from .sweep import run_compare

__all__ = ["LabConfig", "ResultsError", "ResultsStore", "lr_for_batch", "run_compare"]
