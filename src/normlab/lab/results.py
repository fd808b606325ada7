"""The results file of a run directory: JSON lines, one header and one row per finished run.

Layout of ``results.jsonl``::

    {"format": "normlab-lab-results", "version": 1, "config_id": "<16 hex>"}
    {"key": "sweep/bn/bs4/seed0", "scenario": "sweep", "norm": "bn", "batch_size": 4,
     "seed": 0, "metrics": {...}, "curve": [[step, loss, seconds], ...],
     "time_s": 1.9, "device": "cpu", "versions": {...}, "finished_at": "..."}

Every write replaces the whole file atomically (temporary file in the same folder,
fsync, ``os.replace``), so a crash leaves either the old or the new file -- never a
half-written one. A file that is not ours, or has an unparsable or incomplete line,
raises :class:`ResultsError` with the line number; nothing is ever overwritten then.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "RESULTS_NAME", "ROW_FIELDS", "ResultsError", "ResultsStore", "atomic_write"]

FORMAT = "normlab-lab-results"
VERSION = 1
RESULTS_NAME = "results.jsonl"
# Required fields of a row and their types.
ROW_FIELDS: dict[str, type | tuple[type, ...]] = {
    "key": str, "scenario": str, "norm": str, "batch_size": int, "seed": int, "metrics": dict,
    "curve": list, "time_s": (int, float), "device": str, "versions": dict, "finished_at": str,
}


class ResultsError(ValueError):
    """A results file that is corrupt, foreign, or from another configuration."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, nothing between."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def validate_row(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise ResultsError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name, kind in ROW_FIELDS.items():
        if name not in row:
            raise ResultsError(f"{where}: row lacks the field {name!r}")
        value = row[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ResultsError(f"{where}: field {name!r} should be {getattr(kind, '__name__', kind)}, "
                               f"got {type(value).__name__}")
    return row


class ResultsStore:
    """The rows of ``DIR/results.jsonl``, loaded and validated, with atomic appends."""

    def __init__(self, run_dir: str | os.PathLike, config_id: str | None = None) -> None:
        self.path = Path(run_dir) / RESULTS_NAME
        self.config_id = config_id
        self.rows: list[dict] = []
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ResultsError(f"cannot read {self.path}: {error}") from None
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not lines:
            raise ResultsError(f"{self.path} is empty; it is not a normlab results file "
                               "(delete it or choose another --out)")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ResultsError(f"{self.path} is not a normlab results file (its first line is not the "
                               f"'{FORMAT}' header); refusing to overwrite it -- choose another --out")
        if header.get("version") != VERSION:
            raise ResultsError(f"{self.path} has results format version {header.get('version')!r}; "
                               f"this normlab reads version {VERSION}")
        if self.config_id is not None and header.get("config_id") != self.config_id:
            raise ResultsError(
                f"{self.path} holds results of a different configuration "
                f"(config id {header.get('config_id')} != {self.config_id}); resume with the same "
                "settings, or choose another --out")
        self.config_id = header.get("config_id")
        keys = set()
        for number, line in enumerate(lines[1:], start=2):
            where = f"{self.path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ResultsError(f"{where}: corrupt JSON ({error.msg})") from None
            validate_row(row, where)
            if row["key"] in keys:
                raise ResultsError(f"{where}: duplicate run {row['key']!r}")
            keys.add(row["key"])
            self.rows.append(row)

    def keys(self) -> set[str]:
        return {row["key"] for row in self.rows}

    def append(self, row: dict) -> None:
        """Add a finished run and rewrite the file atomically."""
        validate_row(row, "new row")
        if row["key"] in self.keys():
            raise ResultsError(f"run {row['key']!r} is already in {self.path}")
        self.rows.append(row)
        self.flush()

    def flush(self) -> None:
        header = {"format": FORMAT, "version": VERSION, "config_id": self.config_id}
        lines = [json.dumps(header)] + [json.dumps(row, allow_nan=True) for row in self.rows]
        atomic_write(self.path, "\n".join(lines) + "\n")
