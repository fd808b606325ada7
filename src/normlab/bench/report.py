"""Printing, saving and plotting benchmark rows (plotting is separate from measuring)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["format_table", "merge_processes", "summary", "write_csv", "write_json", "plot"]

_ENV_KEYS = ("date", "machine", "platform", "python", "torch", "numpy", "numba", "normlab", "threads")


def _fmt(v: object, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: Sequence[dict]) -> str:
    """One block per (case, mode): a line per provider."""
    lines = []
    header = f"{'provider':<11} {'ms':>9} {'GB/s':>7} {'%floor':>7} {'vs torch':>8} {'saved MB':>9}"
    key = None
    for r in rows:
        if (r["case"], r["mode"]) != key:
            key = (r["case"], r["mode"])
            lines.append("")
            cold = ", cold cache" if r.get("cache") == "cold" else ""
            lines.append(f"{r['case']} -- {r['mode']} (copy {r['copy_gbps']:.1f} GB/s{cold})")
            lines.append(header)
        speedup = r["speedup_vs_torch"]
        speedup_text = f"{speedup:>7.2f}x" if speedup is not None else f"{'-':>8}"
        lines.append(f"{r['provider']:<11} {r['median_ms']:>9.3f} {r['gbps']:>7.1f} "
                     f"{_fmt(r['pct_floor'], '>7.1f')} {speedup_text} {_fmt(r['saved_mb'], '>9.1f')}")
    return "\n".join(lines).lstrip("\n")


def summary(rows: Sequence[dict], provider: str = "cpu-numba", min_numel_mb: float = 1.0) -> dict:
    """Figures the issue's targets are stated in, for ``provider``: per mode the
    geometric-mean speed-up over torch.nn, the worst speed-up and the worst % of the
    floor, over the cases of at least ``min_numel_mb`` MB (small cases are reported
    apart, as their time is per-call overhead, not bandwidth)."""
    out: dict[str, dict] = {}
    for mode in sorted({r["mode"] for r in rows}):
        big, small = [], []
        for r in rows:
            if r["mode"] != mode or r["provider"] != provider or r["speedup_vs_torch"] is None:
                continue
            size_mb = math.prod(int(s) for s in r["shape"].split("x")) * _itemsize(r["dtype"]) / 2**20
            (big if size_mb >= min_numel_mb else small).append(r)
        entry: dict[str, object] = {}
        if big:
            sp = [r["speedup_vs_torch"] for r in big]
            entry.update({
                "cases": len(big),
                "geomean_speedup": math.exp(sum(math.log(s) for s in sp) / len(sp)),
                "min_speedup": min(sp),
                "min_speedup_case": min(big, key=lambda r: r["speedup_vs_torch"])["case"],
                "min_pct_floor": min(r["pct_floor"] for r in big),
                "min_pct_floor_case": min(big, key=lambda r: r["pct_floor"])["case"],
            })
        if small:
            entry["small_cases_speedup"] = {r["case"]: r["speedup_vs_torch"] for r in small}
        out[mode] = entry
    return out


def merge_processes(runs: Sequence[Sequence[dict]]) -> list[dict]:
    """One row per (case, mode, provider) from the rows of several processes that timed
    the same suite: ``median_ms``, ``gbps``, ``pct_floor``, ``copy_gbps`` and
    ``speedup_vs_torch`` are the medians over the processes (each speed-up measured
    inside one process, interleaved with torch.nn), ``min_ms`` the minimum, with
    ``speedup_min``/``speedup_max`` and ``processes`` (how many had the row) beside them."""
    import statistics

    def median(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    by_key: dict[tuple, list[dict]] = {}
    for rows in runs:
        for r in rows:
            by_key.setdefault((r["case"], r["mode"], r["provider"]), []).append(r)
    merged = []
    for same in by_key.values():
        speedups = [r["speedup_vs_torch"] for r in same if r["speedup_vs_torch"] is not None]
        merged.append({**same[0], **{k: median([r.get(k) for r in same])
                                     for k in ("median_ms", "gbps", "pct_floor", "copy_gbps", "speedup_vs_torch")},
                       "min_ms": min((r["min_ms"] for r in same if r.get("min_ms") is not None), default=None),
                       "speedup_min": min(speedups) if speedups else None,
                       "speedup_max": max(speedups) if speedups else None, "processes": len(same)})
    return merged


def _itemsize(dtype: str) -> int:
    return 8 if dtype == "float64" else 4 if dtype == "float32" else 2


def write_csv(rows: Sequence[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0].keys()) if rows else []
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v))
                             for k, v in r.items()})


def write_json(rows: Sequence[dict], path: str | Path, note: str = "", **extra: object) -> None:
    """``{"environment": ..., "note": ..., "summary": ..., "rows": [...], **extra}``; rows
    carry only their own fields (the environment is stated once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {k: rows[0][k] for k in _ENV_KEYS if rows and k in rows[0]}
    slim = [{k: v for k, v in r.items() if k not in _ENV_KEYS} for r in rows]
    providers = {r["provider"] for r in rows}
    summ = {p: summary(rows, p) for p in sorted(providers) if p not in ("torch", "copy", "alloc+copy")}
    path.write_text(json.dumps({"environment": env, "note": note, "summary": summ, "rows": slim, **extra},
                               indent=1))


def plot(rows: Sequence[dict], path: str | Path) -> None:
    """Bar chart: % of the copy floor per case and mode, one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["pct_floor"] is not None]
    groups = list(dict.fromkeys((r["case"], r["mode"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    value = {(r["case"], r["mode"], r["provider"]): r["pct_floor"] for r in rows}
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(groups)), 5))
    for i, p in enumerate(providers):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [value.get((c, m, p), 0) for c, m in groups], width, label=p)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{c}\n{m}" for c, m in groups], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("% of copy-bandwidth floor")
    ax.axhline(100, color="gray", lw=0.5)
    ax.legend(fontsize=8)
    cold = " -- cold cache" if rows and rows[0].get("cache") == "cold" else ""
    ax.set_title(f"normlab bench: fraction of the memory floor (higher is better){cold}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
