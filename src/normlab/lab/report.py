"""Render ``report.md``, ``report.html`` and the plots from a run directory's saved rows.

Nothing here trains: everything comes from ``config.yaml`` and ``results.jsonl``, so
``normlab report DIR`` reproduces the report of a finished or partial run. Numbers are
mean +- sample standard deviation over seeds; the recommendation ranks norms by
measured error and tests each against the best with Welch's t-test over seeds.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .config import LabConfig
from .results import ResultsError, ResultsStore, atomic_write

__all__ = ["Stat", "aggregate", "print_summary", "recommend", "render_report", "summary_table", "welch_p"]

# Published context: Wu & He, "Group Normalization" (ECCV 2018), ResNet-50 on ImageNet,
# validation error (%). Table 1 (32 images per GPU) and Table 3 / Fig. 1 (batch sizes).
PUBLISHED_32 = {"bn": 23.6, "ln": 25.3, "in": 28.4, "gn": 24.1}
PUBLISHED_BS = {32: (23.6, 24.1), 16: (23.7, 24.2), 8: (24.8, 24.0), 4: (27.3, 24.2), 2: (34.7, 24.1)}
REGIMES = (("small (B <= 4)", 1, 4), ("medium (8 <= B <= 16)", 8, 16), ("large (B >= 32)", 32, 10**9))


@dataclass
class Stat:
    """Mean +- sample std of per-seed values (``values`` in seed order)."""

    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        if self.n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    def fmt(self, digits: int = 1) -> str:
        if not self.n:
            return "--"
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (unequal variances); None if not computable."""
    if len(a) < 2 or len(b) < 2:
        return None
    sa, sb = Stat(a), Stat(b)
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    if va + vb == 0:
        return 1.0 if sa.mean == sb.mean else 0.0
    t = (sa.mean - sb.mean) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    try:
        from scipy.stats import t as student_t
    except ImportError:  # scipy ships with scikit-learn (the lab extra); without it: no p-value
        return None
    return float(2.0 * student_t.sf(abs(t), df))


def aggregate(rows: list[dict], scenario: str, metric: str, by: tuple[str, ...] = ("norm", "batch_size")
              ) -> dict[tuple, Stat]:
    """Stat of ``metrics[metric]`` per ``by`` key over the rows of ``scenario`` (seed order)."""
    out: dict[tuple, Stat] = defaultdict(Stat)
    for row in sorted((r for r in rows if r["scenario"] == scenario), key=lambda r: r["seed"]):
        value = row["metrics"].get(metric)
        if value is None:
            continue
        out[tuple(row[k] for k in by)].values.append(float(value))
    return dict(out)


@dataclass
class Ranked:
    norm: str
    stat: Stat
    p_vs_best: float | None


def recommend(rows: list[dict], norms: list[str]) -> list[tuple[str, list[Ranked]]]:
    """For each batch-size regime with data: norms ranked by mean test error.

    A norm's value per seed is its error averaged over the regime's batch sizes, so the
    test compares like with like (same seeds, same batch sizes).
    """
    per = aggregate(rows, "sweep", "err_test", ("norm", "batch_size", "seed"))
    out = []
    for label, lo, hi in REGIMES:
        ranked = []
        for norm in norms:
            seeds: dict[int, list[float]] = defaultdict(list)
            for (n, bs, seed), stat in per.items():
                if n == norm and lo <= bs <= hi:
                    seeds[seed] += stat.values
            if seeds:
                ranked.append(Ranked(norm, Stat([sum(v) / len(v) for _, v in sorted(seeds.items())]), None))
        if not ranked:
            continue
        ranked.sort(key=lambda r: (math.isnan(r.stat.mean), r.stat.mean))
        for r in ranked[1:]:
            r.p_vs_best = welch_p(r.stat.values, ranked[0].stat.values)
        sizes = sorted({bs for (_, bs, _) in per if lo <= bs <= hi})
        out.append((f"{label}: B in {{{', '.join(map(str, sizes))}}}", ranked))
    return out


# --------------------------------------------------------------------------- document model
@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    table: tuple[list[str], list[list[str]]] | None = None
    figure: str | None = None  # stem under plots/


def _table_md(headers: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
    return re.sub(r"\*([^*]+)\*", r"<i>\1</i>", text)


def _to_markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {title}\n"]
    for s in sections:
        parts.append(f"## {s.title}\n")
        parts += [p + "\n" for p in s.paragraphs]
        if s.figure:
            parts.append(f"![{s.title}](plots/{s.figure}.png)\n")
        if s.table:
            parts.append(_table_md(*s.table) + "\n")
    return "\n".join(parts)


def _to_html(title: str, sections: list[Section], plot_dir: Path) -> str:
    css = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;"
           "color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
           "padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
           "img{max-width:100%}code{background:#f3f3f3;padding:0 3px}")
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1>"]
    for s in sections:
        out.append(f"<h2>{html.escape(s.title)}</h2>")
        out += [f"<p>{_inline_html(p)}</p>" for p in s.paragraphs]
        png = plot_dir / f"{s.figure}.png" if s.figure else None
        if png is not None and png.exists():
            data = base64.b64encode(png.read_bytes()).decode()
            out.append(f"<img alt='{html.escape(s.title)}' src='data:image/png;base64,{data}'>")
        if s.table:
            headers, body = s.table
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in body]
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


# --------------------------------------------------------------------------- the report
def _load(run_dir: Path) -> tuple[LabConfig, list[dict]]:
    from .sweep import load_config

    config = load_config(run_dir)
    store = ResultsStore(run_dir)
    if store.config_id is not None and store.config_id != config.identity_hash():
        raise ResultsError(f"{store.path} does not belong to {run_dir / 'config.yaml'} (config ids differ)")
    return config, store.rows


def _order(rows: list[dict], config: LabConfig) -> tuple[list[str], list[int]]:
    """Norms of the main scenarios (config order first) and the sweep's batch sizes."""
    rows = [r for r in rows if r["scenario"] != "ppb"]  # the per-process batch section has its own
    seen = list(dict.fromkeys(list(config.norms) + [r["norm"] for r in rows]))
    norms = [n for n in seen if any(r["norm"] == n for r in rows)]
    sizes = sorted({r["batch_size"] for r in rows if r["scenario"] == "sweep"})
    return norms, sizes


def _ref_batch(config: LabConfig, sizes: list[int]) -> int | None:
    if not sizes:
        return None
    if config.ref_batch in sizes:
        return config.ref_batch
    return min(sizes, key=lambda b: abs(b - config.ref_batch))


def _arch(config: LabConfig) -> str:
    from .models import default_arch

    if config.model != "auto":
        arch = config.model
    else:
        arch = default_arch(config.dataset, 1 if config.dataset == "mnist1d" else 2)
    return f"{arch}, {config.depth} block(s) per stage" if arch == "resnet" else arch


def _p_text(p: float | None) -> str:
    if p is None:
        return "p n/a"
    return f"p={p:.3f}" if p >= 0.001 else "p<0.001"


def build_sections(config: LabConfig, rows: list[dict], plot_dir: Path) -> list[Section]:
    """The report's sections; draws the plots into ``plot_dir`` as a side effect."""
    from . import plots

    norms, sizes = _order(rows, config)
    seeds = sorted({r["seed"] for r in rows})
    ref = _ref_batch(config, sizes)
    sections: list[Section] = []
    versions = rows[0]["versions"] if rows else {}
    devices = sorted({r["device"] for r in rows})
    setup = Section("Setup", [
        f"Dataset **{config.dataset}**" + (f" from `{config.data_dir}`" if config.data_dir else "") +
        f"; model `{_arch(config)}` (width {config.width}); GroupNorm groups: {config.groups}; "
        f"norms: {', '.join(norms) or '--'}; batch sizes: {', '.join(map(str, sizes)) or '--'}; "
        f"seeds: {', '.join(map(str, seeds)) or '--'} (preset `{config.preset}`).",
        f"Every norm gets the same initialization (convolution weights drawn from the run's seed "
        f"before any norm is built; norm weight 1, bias 0), the same batch order per seed, and the "
        f"same optimizer: SGD, momentum {config.momentum}, weight decay {config.weight_decay}, cosine "
        f"decay to 0. **Learning-rate rule (linear scaling):** lr = {config.lr} × B / "
        f"{config.lr_ref_batch} for batch size B.",
        f"Budget: a run with batch size B takes max({config.min_steps}, ⌈{config.epochs:g} × N_train / B⌉) "
        f"steps. The default budget is sized to finish in minutes on a laptop CPU, so the models "
        f"are not trained to convergence; raise `--epochs` / `--min-steps` for a longer, "
        f"better-converged comparison. Test error is measured in eval mode. Numbers are mean ± "
        f"sample std over seeds; significance is Welch's t-test over seeds (two-sided, α = 0.05).",
        f"Rows: {len(rows)}; device: {', '.join(devices) or '--'}; versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
    ])
    if config.nproc > 1:
        setup.paragraphs.append(
            f"**{config.nproc} processes** (DistributedDataParallel): every run trains with "
            f"{config.nproc} processes; B is the global batch (same steps and learning rate as one "
            f"process), process r trains on examples r, r+{config.nproc}, ... of each batch "
            f"(parts differ by at most one example when {config.nproc} does not divide B; batch sizes "
            f"below {config.nproc} are not run). BatchNorm (`bn`) normalizes with each process's own "
            f"part (about B/{config.nproc} examples); `syncbn` with the whole batch. Evaluation and "
            "timings are rank 0's.")
    sections.append(setup)
    err = aggregate(rows, "sweep", "err_test")
    diverged = sorted({r["key"] for r in rows if r["metrics"].get("diverged")})

    # Recommendation ---------------------------------------------------------------
    rec = Section("Recommendation (derived from the measurements above)")
    for label, ranked in recommend(rows, norms):
        best = ranked[0]
        tied = [r.norm for r in ranked[1:] if r.p_vs_best is None or r.p_vs_best >= 0.05]
        line = f"**{label}**: lowest error **{best.norm}** ({best.stat.fmt()} %)"
        if tied:
            line += f"; not significantly different from it: {', '.join(tied)}"
        worse = [r.norm for r in ranked[1:] if r.p_vs_best is not None and r.p_vs_best < 0.05]
        if worse:
            line += f"; significantly worse: {', '.join(worse)}"
        rec.paragraphs.append(line + ". Ranking (p = Welch vs the best): " + ", ".join(
            f"{r.norm} {r.stat.fmt()}" + ("" if r is best else f" ({_p_text(r.p_vs_best)})")
            for r in ranked) + ".")
    if not rec.paragraphs:
        rec.paragraphs.append("No batch-size sweep results yet.")
    elif len(seeds) < 3:
        rec.paragraphs.append(f"Only {len(seeds)} seed(s): the tests have little power; treat "
                              "'not significant' as 'not resolved'.")
    if diverged:
        rec.paragraphs.append(f"Diverged runs (loss became non-finite; their error is what the "
                              f"diverged model scores): {', '.join(diverged)}.")
    sections.append(rec)

    # Batch-size sweep ----------------------------------------------------------------
    if err:
        plots.batch_sweep(err, norms, sizes, plot_dir / "batch_sweep")
        body = [[n] + [err[(n, b)].fmt() if (n, b) in err else "--" for b in sizes] for n in norms]
        epochs = aggregate(rows, "sweep", "epochs", ("batch_size",))
        steps = aggregate(rows, "sweep", "steps", ("batch_size",))
        body.append(["*epochs seen*"] + [f"{epochs[(b,)].mean:.2g}" if (b,) in epochs else "--"
                                          for b in sizes])
        body.append(["*steps*"] + [f"{steps[(b,)].mean:.0f}" if (b,) in steps else "--" for b in sizes])
        sections.append(Section(
            "Batch-size sweep: test error (%) vs batch size",
            ["Eval-mode test error per norm and batch size -- the shape of Fig. 1 of the Group "
             "Normalization paper. Compare norms within a column: every norm gets the same steps "
             "and learning rate there. Across columns the budget differs where the step floor "
             "applies (last rows), so a column-to-column trend mixes batch size and budget."],
            (["norm"] + [f"B={b}" for b in sizes], body), "batch_sweep"))

    # Training curves ------------------------------------------------------------------
    curve_rows = [r for r in rows if r["scenario"] == "sweep" and r["batch_size"] == ref and r["curve"]]
    if curve_rows:
        plots.curves(curve_rows, norms, plot_dir / "curves")
        loss = aggregate(rows, "sweep", "final_loss")
        secs = aggregate(rows, "sweep", "train_seconds")
        body = [[n, loss[(n, ref)].fmt(3), secs[(n, ref)].fmt(2), err[(n, ref)].fmt()]
                for n in norms if (n, ref) in loss]
        sections.append(Section(
            f"Training curves (B={ref})",
            ["Training loss (mean over the interval between points, averaged over seeds) against "
             "steps and against training wall-clock time (evaluation excluded)."],
            (["norm", "final train loss", "train time (s)", "test error (%)"], body), "curves"))

    # Train/eval gap ----------------------------------------------------------------------
    bs_stats = aggregate(rows, "sweep", "err_batch_stats")
    recal = aggregate(rows, "sweep", "err_recal")
    if bs_stats:
        gap_norms = [n for n in norms if any(k[0] == n for k in bs_stats)]
        plots.train_eval_gap(err, bs_stats, recal, gap_norms, sizes, plot_dir / "train_eval_gap")
        body = [[f"{n} B={b}", err[(n, b)].fmt(), bs_stats[(n, b)].fmt(), recal[(n, b)].fmt()
                 if (n, b) in recal else "--"] for n in gap_norms for b in sizes if (n, b) in bs_stats]
        sections.append(Section(
            "Train/eval gap (norms with running statistics)",
            ["Test error in eval mode (running statistics from training), with batch statistics "
             "(test batches of the training batch size normalized by their own statistics, as in "
             "training), and after re-estimating the running statistics on the training set "
             f"(cumulative average over batches of {config.recal_batch}, no gradient)."
             + (f" With {config.nproc} processes the batch-statistics test batches are as large as "
                f"what one training step normalized over: one process's part (⌈B/{config.nproc}⌉) for "
                "BatchNorm, the whole batch for SyncBatchNorm." if config.nproc > 1 else "")],
            (["norm, batch", "eval (running stats)", "batch stats", "re-estimated stats"], body),
            "train_eval_gap"))

    # Test-time shift ----------------------------------------------------------------------
    shifts = [("err_test", "clean"), ("err_shift_offset", f"offset +{config.shift_offset:g}σ"),
              ("err_shift_scale", f"scale ×{config.shift_scale:g}"),
              ("err_shift_noise", f"noise σ={config.shift_noise:g}")]
    shift_stats = {label: aggregate(rows, "sweep", metric) for metric, label in shifts}
    if ref is not None and any((n, ref) in shift_stats[shifts[1][1]] for n in norms):
        plots.shift(shift_stats, norms, ref, plot_dir / "shift")
        body = [[n] + [shift_stats[label][(n, ref)].fmt() if (n, ref) in shift_stats[label] else "--"
                       for _, label in shifts] for n in norms]
        sections.append(Section(
            f"Test-time shift (B={ref})",
            ["Error of the trained models when every test input is shifted by a constant offset, "
             "multiplied by a constant, or given Gaussian noise (in units of the standardized "
             "input's std). Per-sample norms remove per-sample offsets and scales; running "
             "statistics do not."],
            (["norm"] + [label for _, label in shifts], body), "shift"))

    # Non-i.i.d. batches ---------------------------------------------------------------------
    noniid = aggregate(rows, "noniid", "err_test")
    if noniid:
        b = config.ref_batch
        plots.noniid(err, noniid, norms, b, plot_dir / "noniid")
        body = [[n, err[(n, b)].fmt() if (n, b) in err else "--", noniid[(n, b)].fmt()]
                for n in norms if (n, b) in noniid]
        sections.append(Section(
            f"Non-i.i.d. batches (B={b}, {config.noniid_classes} classes per batch)",
            [f"Training batches drawn from {config.noniid_classes} random classes each (equal shares), "
             "same steps and learning rate as the i.i.d. run; test error in eval mode on the usual "
             "test set."],
            (["norm", "i.i.d. batches", "non-i.i.d. batches"], body), "noniid"))

    # Cost ---------------------------------------------------------------------------------
    cost = {m: aggregate(rows, "cost", m, ("norm",)) for m in ("ms_step", "ms_forward", "saved_mb", "peak_mb",
                                                                "params")}
    if cost["ms_step"]:
        plots.cost(cost, norms, plot_dir / "cost")
        body = [[n, cost["ms_step"][(n,)].fmt(2), cost["ms_forward"][(n,)].fmt(2),
                 cost["saved_mb"][(n,)].fmt(2),
                 cost["peak_mb"][(n,)].fmt(1) if (n,) in cost["peak_mb"] else "n/a (CPU)",
                 f"{int(cost['params'][(n,)].mean)}"]
                for n in norms if (n,) in cost["ms_step"]]
        sections.append(Section(
            f"Cost (B={config.ref_batch})",
            ["Median time of one training step (forward, backward, SGD) and of one eval forward; "
             "memory autograd saves for the backward of one step (unique storages); the "
             "allocator's peak on CUDA. The CPU is shared and timings vary between runs. The times "
             "are of normlab's layers: on small activations (the default models') a call's fixed "
             "cost (Python, autograd), not the normalization's arithmetic, sets most of the "
             "differences between norms, and torch.nn's layers time differently (the repository's "
             "benchmarks/cpu/models.py compares the two on whole models)."
             + (f" With {config.nproc} processes: a DDP step of one process on its part of the batch "
                "(gradient all_reduce included) and that process's memory, as measured on rank 0."
                if config.nproc > 1 else "")],
            (["norm", "ms / train step", "ms / eval forward", "saved for backward (MB)", "peak (MB)",
              "parameters"], body), "cost"))

    # Per-process batch ------------------------------------------------------------------
    ppb_section = _per_process_batch_section(config, rows, norms, plot_dir)
    if ppb_section is not None:
        sections.append(ppb_section)

    # Published context ------------------------------------------------------------------
    sections.append(Section(
        "Published context (not measured here)",
        ["Wu & He, *Group Normalization* (ECCV 2018), ResNet-50 on ImageNet, validation error (%): "
         "a different model, data set and budget, shown only as context for the shape of the "
         "curves above."],
        (["source", "BN", "LN", "IN", "GN"],
         [["GN paper, 32 images/GPU"] + [f"{PUBLISHED_32[k]}" for k in ("bn", "ln", "in", "gn")]] +
         [[f"GN paper, {b} images/GPU", f"{bn}", "--", "--", f"{gn}"] for b, (bn, gn) in
          sorted(PUBLISHED_BS.items(), reverse=True) if b != 32])))
    return sections


def _per_process_batch_section(config: LabConfig, rows: list[dict], norms: list[str],
                               plot_dir: Path) -> Section | None:
    """BN with per-process statistics vs SyncBN vs GN at small per-process batches."""
    from . import plots

    ppb_rows = [r for r in rows if r["scenario"] == "ppb"]
    if not ppb_rows:
        return None
    nproc = max(1, config.nproc)
    # runs the plan shares with the sweep (same norm, same global batch: the same computation)
    wanted = {(n, b * nproc) for n in config.ppb_norms for b in config.per_process_batches or []}
    have = {(r["norm"], r["batch_size"], r["seed"]) for r in ppb_rows}
    ppb_rows += [dict(r, scenario="ppb") for r in rows if r["scenario"] == "sweep"
                 and (r["norm"], r["batch_size"]) in wanted
                 and (r["norm"], r["batch_size"], r["seed"]) not in have]
    err = aggregate(ppb_rows, "ppb", "err_test")  # keyed by (norm, global batch)
    order = list(dict.fromkeys(list(config.ppb_norms) + [r["norm"] for r in ppb_rows]))
    ppb_norms = [n for n in order if any(r["norm"] == n for r in ppb_rows)]
    globals_ = sorted({r["batch_size"] for r in ppb_rows})
    per_proc = {g: g // nproc for g in globals_}
    palette = norms + [n for n in ppb_norms if n not in norms]  # a norm keeps its colour
    plots.per_process_batch(err, ppb_norms, globals_, per_proc, palette, nproc,
                            plot_dir / "per_process_batch")
    body = [[n] + [err[(n, g)].fmt() if (n, g) in err else "--" for g in globals_] for n in ppb_norms]
    steps = aggregate(ppb_rows, "ppb", "steps", ("batch_size",))
    body.append(["*steps*"] + [f"{steps[(g,)].mean:.0f}" if (g,) in steps else "--" for g in globals_])
    return Section(
        f"Per-process batch ({nproc} processes)",
        [f"Test error (%) when each of the {nproc} processes holds b examples (global batch "
         f"{nproc}·b, its learning rate and steps by the rules above). `bn`: BatchNorm with each "
         "process's own statistics over its b examples (what DistributedDataParallel gives a plain "
         "BatchNorm); `syncbn`: the same model converted with "
         "`nl.SyncBatchNorm.convert_sync_batchnorm`, statistics over the whole global batch; "
         "`gn`: GroupNorm, independent of the batch. Small b is where per-process statistics "
         "get noisy; SyncBN pays for its statistics with two collectives per layer and step."],
        (["norm"] + [f"b={per_proc[g]} (global {g})" for g in globals_], body), "per_process_batch")


def render_report(run_dir: str | Path) -> Path:
    """(Re)write ``plots/``, ``report.md`` and ``report.html`` from the saved results."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ResultsError(f"{run_dir} is not a directory")
    config, rows = _load(run_dir)
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    sections = build_sections(config, rows, plot_dir)
    title = f"normlab compare: {config.dataset}"
    atomic_write(run_dir / "report.md", _to_markdown(title, sections))
    atomic_write(run_dir / "report.html", _to_html(title, sections, plot_dir))
    return run_dir / "report.md"


def summary_table(run_dir: str | Path):
    """A rich Table: test error (%) per norm and batch size, or None without sweep rows."""
    from rich import box
    from rich.table import Table

    config, rows = _load(Path(run_dir))
    err = aggregate(rows, "sweep", "err_test")
    if not err:
        return None
    norms, sizes = _order(rows, config)
    table = Table(title="test error %, mean ± std over seeds", box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("norm")
    for b in sizes:
        table.add_column(f"B={b}", justify="right")
    for n in norms:
        table.add_row(n, *[err[(n, b)].fmt() if (n, b) in err else "--" for b in sizes])
    return table


def print_summary(run_dir: str | Path) -> None:
    """Print :func:`summary_table` to stdout (not wrapped when stdout is a file or pipe)."""
    import sys

    from rich.console import Console

    table = summary_table(run_dir)
    if table is None:
        return
    console = Console(file=sys.stdout)
    if not console.is_terminal:
        console.width = max(console.width, 120)
    console.print(table)
