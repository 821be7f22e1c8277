"""The report's PNG plots (matplotlib Figure objects rendered by Agg, no pyplot), one function per figure.

Every function takes the aggregated groups of ONE benchmark (see report.Group: a method, maybe
with a variant label, with seed-aggregated values) and writes one PNG, returning its path, or
None when there is nothing to draw. Aggregates are dicts {"mean", "half", "n", ...} where "half"
is the half-width of the 95% t-interval (None for n < 2); error bars and bands show exactly that.
The stream_* functions take the groups of one task stream (report.Group with kind "stream").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

DPI = 90
# (key, label, higher is better) of the summary metrics, in table order.
# Storage (S: the cloze of a trained sentence) and extraction (X: a held-out wording) are named in every
# label and never averaged together (docs/metrics.md).
SUMMARY_METRICS: list[tuple[str, str, bool]] = [
    ("acc_storage", "final ACC (storage)", True),
    ("bwt_storage", "BWT (storage)", True),
    ("fwt_storage", "FWT (storage)", True),
    ("forgetting_storage", "forgetting (storage)", False),
    ("plasticity_storage_pooled", "plasticity (storage)", True),
    ("plasticity_extraction_pooled", "plasticity (extraction)", True),
    ("stability_storage_pooled", "stability (storage)", True),
    ("stability_extraction_pooled", "stability (extraction)", True),
    ("temporal_recall_storage_final", "temporal recall (storage)", True),
    ("temporal_recall_extraction_final", "temporal recall (extraction)", True),
    ("acc_extraction", "final ACC (extraction)", True),
]


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)


def _half(agg: dict[str, Any] | None) -> float:
    if not agg or agg.get("half") is None:
        return 0.0
    return float(agg["half"])


def colors(n: int) -> list[Any]:
    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def subplots(*args: Any, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    """pyplot.subplots without pyplot: no global figure registry or backend state (thread-safe, no GUI)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # a bare Figure renders with the Agg canvas
    return path


def _row_labels(period_names: Sequence[str]) -> list[str]:
    return ["base"] + [f"after {p}" for p in period_names]


def accuracy_heatmaps(groups: Sequence[Any], path: Path, title: str) -> Path | None:
    """One panel per method: the seed-mean score matrix R (rows = model states, columns = probe periods)."""
    groups = [g for g in groups if g.matrix_mean is not None]
    if not groups:
        return None
    t_count = len(groups[0].period_names)
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = subplots(
        rows, cols, figsize=(1.1 * t_count * cols + 2.5, 0.75 * (t_count + 1) * rows + 1.2), squeeze=False
    )
    for ax in axes.flat[len(groups) :]:
        ax.axis("off")
    for ax, g in zip(axes.flat, groups):
        m = np.array([[_nan(v) for v in row] for row in g.matrix_mean])
        h = g.matrix_half
        im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if math.isnan(m[i, j]):
                    continue
                text = f"{m[i, j]:.2f}"
                if h is not None and h[i][j] is not None:
                    text += f"\n±{h[i][j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if m[i, j] < 0.6 else "black")
        ax.set_xticks(range(t_count), g.period_names, fontsize=8)
        ax.set_yticks(range(t_count + 1), _row_labels(g.period_names), fontsize=8)
        ax.set_xlabel("probes of period")
        ax.set_title(f"{g.label} (n={g.n})", fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="exact match (storage probes)")
    fig.suptitle(f"{title}: accuracy matrix (mean over seeds)", fontsize=10)
    return _save(fig, path)


def _column_over_rows(ax: Any, groups: Sequence[Any], t: int) -> None:
    """Stage t's score after every row (base, then each stage), one line per group with its 95% CI band,
    and a dotted line where stage t is trained."""
    x = np.arange(len(groups[0].matrix_mean))
    for g, c in zip(groups, colors(len(groups))):
        y = np.array([_nan(row[t]) for row in g.matrix_mean])
        h = np.array(
            [0.0 if row[t] is None else row[t] for row in g.matrix_half] if g.matrix_half else np.zeros(len(x))
        )
        ax.plot(x, y, marker="o", ms=3, color=c, label=g.label)
        ax.fill_between(x, y - h, y + h, color=c, alpha=0.15, linewidth=0)
    ax.axvline(t + 1, color="grey", linestyle=":", linewidth=1)


def timelines(groups: Sequence[Any], path: Path, title: str) -> Path | None:
    """One panel per probe period t: its score after each period, per method, with 95% CI bands."""
    groups = [g for g in groups if g.matrix_mean is not None]
    if not groups:
        return None
    names = groups[0].period_names
    t_count = len(names)
    cols = min(4, t_count)
    rows = math.ceil(t_count / cols)
    fig, axes = subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows + 0.6), squeeze=False, sharey=True)
    for ax in axes.flat[t_count:]:
        ax.axis("off")
    x = np.arange(t_count + 1)
    for t, ax in enumerate(axes.flat[:t_count]):
        _column_over_rows(ax, groups, t)
        ax.set_title(f"probes of {names[t]}", fontsize=9)
        ax.set_xticks(x, ["base"] + names, fontsize=7, rotation=45)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("exact match (storage)")
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{title}: each period's storage score over the sequence (dotted: the period is trained)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def final_scores(groups: Sequence[Any], path: Path, title: str) -> Path | None:
    """Final model's score on each period's probes, methods side by side, 95% CI error bars."""
    groups = [g for g in groups if g.matrix_mean is not None]
    if not groups:
        return None
    names = groups[0].period_names
    x = np.arange(len(names))
    width = 0.8 / len(groups)
    fig, ax = subplots(figsize=(max(5.0, 1.2 * len(names) + 2), 3.4))
    for i, (g, c) in enumerate(zip(groups, colors(len(groups)))):
        y = [_nan(v) for v in g.matrix_mean[-1]]
        err = [0.0 if v is None else v for v in g.matrix_half[-1]] if g.matrix_half else None
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, y, width, yerr=err, capsize=3, color=c, label=g.label)
    ax.set_xticks(x, names)
    ax.set_xlabel("probes of period")
    ax.set_ylabel("storage EM after the last period")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{title}: final scores per period", fontsize=10)
    return _save(fig, path)


def forgetting_curves(groups: Sequence[Any], path: Path, title: str) -> Path | None:
    """Forgetting after period k (k = 2..T), our formula (docs/metrics.md) truncated at k, with CI bands."""
    groups = [g for g in groups if g.forgetting_curve]
    if not groups:
        return None
    fig, ax = subplots(figsize=(5.5, 3.4))
    for g, c in zip(groups, colors(len(groups))):
        names = g.period_names[1:]
        x = np.arange(len(names))
        y = np.array([_nan(a.get("mean")) for a in g.forgetting_curve])
        h = np.array([_half(a) for a in g.forgetting_curve])
        ax.plot(x, y, marker="o", color=c, label=g.label)
        ax.fill_between(x, y - h, y + h, color=c, alpha=0.15, linewidth=0)
        ax.set_xticks(x, [f"after {n}" for n in names], fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_ylabel("forgetting, storage (lower is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}: forgetting curves", fontsize=10)
    return _save(fig, path)


def plasticity_stability(groups: Sequence[Any], path: Path, title: str) -> Path | None:
    """Pooled plasticity vs pooled stability per method and probe family (filled: storage, hollow:
    extraction), 95% CI error bars on both axes."""
    points = [
        (g, fam, g.metrics.get(f"plasticity_{fam}_pooled"), g.metrics.get(f"stability_{fam}_pooled"))
        for g in groups
        for fam in ("storage", "extraction")
    ]
    points = [
        (g, fam, p, s) for g, fam, p, s in points if p and s and p.get("mean") is not None and s.get("mean") is not None
    ]
    if not points:
        return None
    fig, ax = subplots(figsize=(4.6, 4.0))
    color_of = dict(zip([g.label for g in groups], colors(len(groups))))
    for g, fam, p, s in points:
        c = color_of[g.label]
        ax.errorbar(
            p["mean"],
            s["mean"],
            xerr=_half(p),
            yerr=_half(s),
            fmt="o",
            color=c,
            capsize=4,
            markerfacecolor=c if fam == "storage" else "none",
            label=f"{g.label} {fam} (n={min(p['n'], s['n'])})",
        )
    ax.set_xlabel("plasticity (EM on the period's new/changed facts)")
    ax.set_ylabel("stability (EM on unchanged facts)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.6, linestyle=":")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}: plasticity vs stability (filled: storage, hollow: extraction)", fontsize=10)
    return _save(fig, path)


def summary_bars(groups: Sequence[Any], path: Path, title: str) -> Path | None:
    """The summary metrics per method as bars with 95% CI error bars."""
    if not groups:
        return None
    keys = SUMMARY_METRICS
    x = np.arange(len(keys))
    width = 0.8 / len(groups)
    fig, ax = subplots(figsize=(max(7.0, 0.9 * len(keys) + 2), 3.6))
    for i, (g, c) in enumerate(zip(groups, colors(len(groups)))):
        aggs = [g.metrics.get(k) or {} for k, _, _ in keys]
        y = [_nan(a.get("mean")) for a in aggs]
        err = [_half(a) for a in aggs]
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, y, width, yerr=err, capsize=3, color=c, label=g.label)
    ax.set_xticks(x, [f"{label} {'↑' if up else '↓'}" for _, label, up in keys], fontsize=8, rotation=30, ha="right")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{title}: summary metrics (mean ± 95% CI over seeds)", fontsize=10)
    return _save(fig, path)


def lm_eval_deltas(groups: Sequence[Any], path: Path, title: str) -> Path | None:
    """General-ability change vs the base model per period, one panel per task metric."""
    keys = sorted({k for g in groups for k in (g.lm_eval or {})})
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows + 0.5), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        for g, c in zip(groups, colors(len(groups))):
            series = (g.lm_eval or {}).get(key)
            if not series:
                continue
            x = np.arange(len(series["delta"]))
            y = np.array([_nan(a.get("mean")) for a in series["delta"]])
            h = np.array([_half(a) for a in series["delta"]])
            ax.plot(x, y, marker="o", ms=3, color=c, label=g.label)
            ax.fill_between(x, y - h, y + h, color=c, alpha=0.15, linewidth=0)
            ax.set_xticks(x, ["base"] + list(g.period_names)[: len(x) - 1], fontsize=7, rotation=45)
        ax.axhline(0, color="grey", linewidth=0.8)
        direction = next((g.lm_eval[key]["higher_is_better"] for g in groups if key in (g.lm_eval or {})), True)
        ax.set_title(f"{key} ({'higher' if direction else 'LOWER'} is better)", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("change vs base")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{title}: general ability (lm-eval) vs base model", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def landscape_trends(groups: Sequence[Any], path: Path, title: str) -> Path | None:
    """Per period: top Fisher eigenvalue and the Mirzadeh forgetting estimate vs observed forgetting."""
    groups = [g for g in groups if g.landscape]
    if not groups:
        return None
    fig, axes = subplots(1, 3, figsize=(12, 3.2))
    panels = [
        ("center_loss", "loss at the checkpoint"),
        ("fisher_top_eigenvalue", "top Fisher eigenvalue"),
        ("forgetting_estimate", "0.5·λmax·‖Δw‖² (Mirzadeh et al.)"),
    ]
    for ax, (key, label) in zip(axes, panels):
        for g, c in zip(groups, colors(len(groups))):
            names = ["base"] + list(g.period_names)
            per_k = g.landscape.get(key) or []
            xs = [k for k, a in enumerate(per_k) if a and a.get("mean") is not None]
            if not xs:
                continue
            y = np.array([per_k[k]["mean"] for k in xs])
            h = np.array([_half(per_k[k]) for k in xs])
            ax.errorbar(xs, y, yerr=h, marker="o", ms=3, capsize=3, color=c, label=g.label)
            ax.set_xticks(range(len(names)), names, fontsize=7, rotation=45)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: loss landscape per period checkpoint", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------
# task streams: groups carry `stream` (tasks, primary_metric, higher_is_better) and the seed-mean
# primary-metric matrix R in matrix_mean / matrix_half (rows = base, then after each task).


def _stream_groups(groups: Sequence[Any]) -> list[Any]:
    return [g for g in groups if getattr(g, "stream", None) and g.matrix_mean is not None]


def stream_score_heatmaps(groups: Sequence[Any], path: Path, title: str) -> Path | None:
    """One panel per method: the seed-mean primary-metric matrix (rows = model states, columns = tasks).

    Higher-is-better columns share one 0..1 colour scale. A lower-is-better column (NLL per token) has no
    fixed range and is never put on the accuracies' scale: it is shaded on its own range over all panels,
    in another colour map, brighter = lower = better, with the value written in the cell.
    """
    groups = _stream_groups(groups)
    if not groups:
        return None
    info = groups[0].stream
    tasks = info["tasks"]
    higher = [bool(info["higher_is_better"][t]) for t in tasks]
    t_count = len(tasks)
    mats = [np.array([[_nan(v) for v in row] for row in g.matrix_mean]) for g in groups]
    lo_range: dict[int, tuple[float, float]] = {}
    for j in (j for j in range(t_count) if not higher[j]):
        col = np.concatenate([m[:, j] for m in mats])
        col = col[np.isfinite(col)]
        if col.size:
            lo_range[j] = (float(col.min()), float(col.max()))
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = subplots(
        rows, cols, figsize=(1.5 * t_count * cols + 3.5, 0.75 * (t_count + 1) * rows + 1.4), squeeze=False
    )
    for ax in axes.flat[len(groups) :]:
        ax.axis("off")
    im = None
    for ax, g, m in zip(axes.flat, groups, mats):
        shade = np.full(m.shape, np.nan)
        for j in range(t_count):
            if higher[j]:
                shade[:, j] = m[:, j]
            elif j in lo_range:
                low, high = lo_range[j]
                shade[:, j] = (high - m[:, j]) / (high - low) if high > low else 0.5
        is_hi = np.broadcast_to(np.array(higher), m.shape)
        hi_mask, lo_mask = np.isnan(m) | ~is_hi, np.isnan(shade) | is_hi
        # masked cells are transparent, so the two layers never overlap
        im = ax.imshow(np.ma.array(shade, mask=hi_mask), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.imshow(np.ma.array(shade, mask=lo_mask), vmin=0.0, vmax=1.0, cmap="cividis", aspect="auto")
        h = g.matrix_half
        for i in range(m.shape[0]):
            for j in range(t_count):
                if math.isnan(m[i, j]):
                    continue
                text = f"{m[i, j]:.2f}"
                if h is not None and h[i][j] is not None:
                    text += f"\n±{h[i][j]:.2f}"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if _nan(shade[i, j]) < 0.6 else "black",
                )
        ax.set_xticks(
            range(t_count),
            [f"{t}\n{info['primary_metric'][t]} {'↑' if up else '↓'}" for t, up in zip(tasks, higher)],
            fontsize=7,
        )
        ax.set_yticks(range(t_count + 1), _row_labels(tasks), fontsize=8)
        ax.set_xlabel("eval items of task")
        ax.set_title(f"{g.label} (n={g.n})", fontsize=9)
    if im is not None and any(higher):
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="higher-is-better primary metric")
    note = "; ↓ columns shaded on their own range, brighter = lower" if not all(higher) else ""
    fig.suptitle(f"{title}: score matrix (mean over seeds{note})", fontsize=10)
    return _save(fig, path)


def stream_task_curves(groups: Sequence[Any], path: Path, title: str) -> Path | None:
    """One panel per task: its primary metric after each task of the stream, per method, with 95% CI
    bands; the dotted line is where the task itself is trained."""
    groups = _stream_groups(groups)
    if not groups:
        return None
    info = groups[0].stream
    tasks = info["tasks"]
    t_count = len(tasks)
    cols = min(4, t_count)
    rows = math.ceil(t_count / cols)
    # no shared y axis: a lower-is-better task (NLL) is on another scale than the accuracies
    fig, axes = subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows + 0.6), squeeze=False)
    for ax in axes.flat[t_count:]:
        ax.axis("off")
    x = np.arange(t_count + 1)
    for j, ax in enumerate(axes.flat[:t_count]):
        up = bool(info["higher_is_better"][tasks[j]])
        _column_over_rows(ax, groups, j)
        ax.set_title(
            f"{tasks[j]}: {info['primary_metric'][tasks[j]]} {'↑' if up else '↓ (lower is better)'}", fontsize=9
        )
        ax.set_xticks(x, ["base"] + list(tasks), fontsize=7, rotation=45)
        if up:
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{title}: each task's primary metric over the stream (dotted: the task is trained)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def confidence_traces(groups: Sequence[Any], path: Path, title: str) -> Path | None:
    """CASMO's confidence over the optimizer steps of the whole sequence, one line per method (the mean
    over its seeds, which share a step count), a dashed line at each period boundary and grey marks
    where the optimizer was still calibrating (plain AdamW). Nothing is drawn without a CASMO run."""
    lines = []
    for g in groups:
        traces = [r.confidence_trace for r in g.runs if getattr(r, "confidence_trace", None)]
        if not traces:
            continue
        length = min(len(t) for t in traces)
        mean = np.mean([[c for _, _, c, _ in t[:length]] for t in traces], axis=0)
        lines.append((g.label, traces[0][:length], mean, len(traces)))
    if not lines:
        return None
    fig, ax = subplots(figsize=(9, 3.4))
    for (label, trace, mean, n), c in zip(lines, colors(len(lines))):
        x = np.arange(1, len(trace) + 1)
        ax.plot(x, mean, color=c, lw=1.2, label=f"{label} (n={n})")
        calibrating = [i + 1 for i, (_, _, _, cal) in enumerate(trace) if cal]
        ax.scatter(calibrating, [1.03] * len(calibrating), s=3, color="grey")
    _, trace, _, _ = lines[0]
    for i in range(1, len(trace)):
        if trace[i][0] != trace[i - 1][0]:
            ax.axvline(i + 0.5, color="k", ls="--", lw=0.8)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("optimizer step over the sequence (grey: calibrating = plain AdamW)")
    ax.set_ylabel("confidence")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"{title}: CASMO confidence", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
