"""The report's charts, drawn from aggregated results; each saved as PNG and SVG.

Uses matplotlib's object API (``Figure`` without pyplot), so no GUI backend or global
state is involved. A norm keeps its colour in every chart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["batch_sweep", "cost", "curves", "noniid", "per_process_batch", "save", "shift", "train_eval_gap"]

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#7f7f7f", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22"]


def _color(norms: list[str], norm: str) -> str:
    return _COLORS[norms.index(norm) % len(_COLORS)]


def _figure(width: float = 7.0, height: float = 4.2, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def save(fig, stem: Path) -> None:
    """Write ``stem.png`` (150 dpi) and ``stem.svg``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(stem.with_suffix(".png"), dpi=150)
    fig.savefig(stem.with_suffix(".svg"), metadata={"Date": None})


def _bars(ax, groups: list[str], series: list[tuple[str, list[float], list[float], str]]) -> None:
    """Grouped bars: for each series (label, means, stds, colour) one bar per group."""
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    for i, (label, means, stds, color) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, means, width, yerr=stds, label=label,
               color=color, capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(x, groups)
    ax.grid(axis="y", alpha=0.3)
    # room above the tallest bar for a one-row legend, so it never hides a bar
    heights = [m + s for _, means, stds, _ in series for m, s in zip(means, stds, strict=True)
               if np.isfinite(m + s)]
    top = max(heights, default=1.0)
    ax.set_ylim(0, 1.22 * top if top > 0 else 1.0)
    ax.legend(fontsize=8, ncol=len(series), loc="upper center", frameon=False)


def batch_sweep(err: dict, norms: list[str], sizes: list[int], stem: Path) -> None:
    """Test error vs batch size (log2 axis), one line per norm, error bars = std over seeds."""
    fig, (ax,) = _figure()
    for n in norms:
        pts = [(b, err[(n, b)]) for b in sizes if (n, b) in err]
        if not pts:
            continue
        b, s = zip(*pts, strict=True)
        ax.errorbar(b, [v.mean for v in s], yerr=[v.std for v in s], marker="o", ms=4, capsize=3,
                    label=n, color=_color(norms, n))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("test error (%)")
    ax.set_title("Test error vs batch size (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(title="norm")
    save(fig, stem)


def curves(rows: list[dict], norms: list[str], stem: Path) -> None:
    """Training loss vs step and vs training seconds, mean over seeds (band: min..max)."""
    fig, (ax_s, ax_t) = _figure(10.0, 4.0, 2)
    for n in norms:
        runs = [np.asarray(r["curve"], dtype=float) for r in rows if r["norm"] == n]
        if not runs:
            continue
        k = min(len(c) for c in runs)
        stack = np.stack([c[:k] for c in runs])
        steps, seconds = stack[0, :, 0], stack[:, :, 2].mean(0)
        loss = stack[:, :, 1]
        color = _color(norms, n)
        for ax, xs in ((ax_s, steps), (ax_t, seconds)):
            ax.plot(xs, loss.mean(0), label=n, color=color, lw=1.4)
            ax.fill_between(xs, loss.min(0), loss.max(0), color=color, alpha=0.15, lw=0)
    for ax, label in ((ax_s, "step"), (ax_t, "training time (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    ax_s.set_title("loss vs steps")
    ax_t.set_title("loss vs wall-clock")
    ax_s.legend(title="norm")
    save(fig, stem)


def train_eval_gap(err: dict, batch: dict, recal: dict, norms: list[str], sizes: list[int],
                   stem: Path) -> None:
    """Per batch size: eval-mode error vs batch-statistics error vs re-estimated statistics."""
    fig, axes = _figure(7.0 * max(1, len(norms)) ** 0.5, 4.2, len(norms))
    for ax, n in zip(axes, norms, strict=True):
        bs = [b for b in sizes if (n, b) in batch]
        series = []
        for label, table, color in (("eval (running stats)", err, "#1f77b4"),
                                    ("batch statistics", batch, "#ff7f0e"),
                                    ("re-estimated stats", recal, "#2ca02c")):
            if any((n, b) in table for b in bs):
                series.append((label, [table[(n, b)].mean if (n, b) in table else np.nan for b in bs],
                               [table[(n, b)].std if (n, b) in table else 0 for b in bs], color))
        _bars(ax, [f"B={b}" for b in bs], series)
        ax.set_ylabel("test error (%)")
        ax.set_title(f"{n}: train/eval gap")
    save(fig, stem)


def shift(stats: dict, norms: list[str], ref: int, stem: Path) -> None:
    """Test error under each shift, grouped by norm."""
    fig, (ax,) = _figure(8.0, 4.2)
    colors = ["#4c4c4c", "#1f77b4", "#ff7f0e", "#2ca02c"]
    series = []
    for (label, table), color in zip(stats.items(), colors, strict=True):
        series.append((label, [table[(n, ref)].mean if (n, ref) in table else np.nan for n in norms],
                       [table[(n, ref)].std if (n, ref) in table else 0 for n in norms], color))
    _bars(ax, norms, series)
    ax.set_ylabel("test error (%)")
    ax.set_title(f"Test-time input shift (B={ref})")
    save(fig, stem)


def noniid(err: dict, noniid_err: dict, norms: list[str], ref: int, stem: Path) -> None:
    """i.i.d. vs non-i.i.d. training batches, per norm."""
    fig, (ax,) = _figure()
    ns = [n for n in norms if (n, ref) in noniid_err]
    series = [("i.i.d. batches", [err[(n, ref)].mean if (n, ref) in err else np.nan for n in ns],
               [err[(n, ref)].std if (n, ref) in err else 0 for n in ns], "#1f77b4"),
              ("non-i.i.d. batches", [noniid_err[(n, ref)].mean for n in ns],
               [noniid_err[(n, ref)].std for n in ns], "#d62728")]
    _bars(ax, ns, series)
    ax.set_ylabel("test error (%)")
    ax.set_title(f"Non-i.i.d. training batches (B={ref})")
    save(fig, stem)


def cost(stats: dict, norms: list[str], stem: Path) -> None:
    """Time per training step and memory saved for backward, per norm."""
    fig, (ax_t, ax_m) = _figure(10.0, 4.0, 2)
    ns = [n for n in norms if (n,) in stats["ms_step"]]
    colors = [_color(norms, n) for n in ns]
    for ax, key, label in ((ax_t, "ms_step", "ms per training step"),
                           (ax_m, "saved_mb", "MB saved for backward")):
        vals = [stats[key][(n,)] for n in ns]
        ax.bar(ns, [v.mean for v in vals], yerr=[v.std for v in vals], color=colors, capsize=3)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    ax_t.set_title("time per step (median)")
    ax_m.set_title("activation memory")
    save(fig, stem)


def per_process_batch(err: dict, norms: list[str], global_batches: list[int], per_proc: dict[int, int],
                      palette: list[str], nproc: int, stem: Path) -> None:
    """Test error vs per-process batch (log2 axis), one line per norm; ``err`` is keyed by
    (norm, global batch), ``per_proc`` maps a global batch to its per-process batch."""
    fig, (ax,) = _figure()
    ticks = [per_proc[g] for g in global_batches]
    for n in norms:
        pts = [(per_proc[g], err[(n, g)]) for g in global_batches if (n, g) in err]
        if not pts:
            continue
        b, st = zip(*pts, strict=True)
        ax.errorbar(b, [v.mean for v in st], yerr=[v.std for v in st], marker="o", ms=4, capsize=3,
                    label=n, color=_color(palette, n))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{b}\n({b * nproc})" for b in ticks])
    ax.set_xlabel(f"examples per process (global batch, {nproc} processes)")
    ax.set_ylabel("test error (%)")
    ax.set_title("Per-process batch: local BN vs SyncBN vs GN (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(title="norm")
    save(fig, stem)
