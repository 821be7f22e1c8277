"""Rendering the gathered runs and their groups: the tidy CSV rows, summary.md, report.html and the PNG plots."""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from artifacts.rundir import RunDir
from eval_and_metrics.report.group import Group, _numeric_leaves, lm_eval_scores
from eval_and_metrics.report.records import (
    BASE_SOLVED_MARK,
    FAMILIES,
    LOWER_IS_BETTER,
    PER_PERIOD_KEYS,
    SCALAR_KEYS,
    STATUSES,
    STREAM_HIGHER_KEYS,
    STREAM_LOWER_KEYS,
    STREAM_SUMMARIES,
    SUMMARY_KEYS,
    SUMMARY_LABELS,
    Run,
)

# ------------------------------------------------------------------------------------------
# tidy rows


CSV_COLUMNS = [
    "run_id",
    "status",
    "benchmark",
    "model",
    "method",
    "variant",
    "seed",
    "period_index",
    "period_name",
    "scope",
    "probe_period",
    "metric",
    "value",
]


def tidy_rows(runs: Sequence[Run], groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One row per run x period x metric. scope: cell (score of a row on one period's probes), period
    (one value per model state), run (one value per run, reported at the last period).

    Stream runs: a cell is a row's score on one task (probe_period = the task) for every metric of the
    task's scorer and "n", re-aggregated from the predictions; run-scope metrics are named
    "higher_is_better_summary.<key>" / "lower_is_better_summary.<key>", plus "base_solved" (1 or 0) per
    higher-is-better task."""
    bench_label = {r.run_id: g.benchmark for g in groups for r in g.runs}
    out: list[dict[str, Any]] = []
    for run in runs:
        base = {
            "run_id": run.run_id,
            "status": run.status,
            "benchmark": bench_label.get(run.run_id, run.benchmark),
            "model": run.model,
            "method": run.method,
            "variant": run.variant,
            "seed": run.seed,
        }

        def add(
            k: int,
            scope: str,
            metric: str,
            value: Any,
            probe_period: str = "",
            run: Run = run,
            base: dict[str, Any] = base,
        ) -> None:
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                return
            name = "base" if k == 0 else run.period_names[k - 1]
            out.append(
                {
                    **base,
                    "period_index": k,
                    "period_name": name,
                    "scope": scope,
                    "probe_period": probe_period,
                    "metric": metric,
                    "value": value,
                }
            )

        for row in run.rows:
            if run.kind == "stream":
                for task, cell in row.task_scores.items():
                    for m, value in cell.items():
                        add(row.index, "cell", m, value, task)
            for key, cell in sorted(row.scores.items()) if run.kind == "temporal" else ():
                period, _, family = key.partition("/")
                prefix = f"{family}_" if family else ""
                for m in ("em", "f1", "n"):
                    add(row.index, "cell", f"{prefix}{m}", cell.get(m), period)
            for key, value in _numeric_leaves(row.extras).items():
                add(row.index, "period", f"extra/{key}", value)
            for key in ("total_steps", "tokens"):
                add(row.index, "period", f"train/{key}", row.train.get(key))
            for key, value in sorted(((row.landscape or {}).get("metrics") or {}).items()):
                add(row.index, "period", f"landscape/{key}", value)
            for key, (value, _) in sorted(lm_eval_scores(row.lm_eval).items()):
                add(row.index, "period", f"lm_eval/{key}", value)
        if run.metrics and run.kind == "stream":
            t_count = run.num_periods
            for summary, keys in STREAM_SUMMARIES.items():
                for key, _, _ in keys:
                    add(t_count, "run", f"{summary}.{key}", (run.metrics.get(summary) or {}).get(key))
            solved = set(run.metrics.get("base_solved") or [])
            for task, higher in run.metrics["higher_is_better"].items():
                if higher:
                    add(t_count, "run", "base_solved", int(task in solved), task)
        elif run.metrics:
            t_count = run.num_periods
            for family in FAMILIES:
                for k, row in enumerate(run.metrics.get(f"matrix_{family}_logprob") or []):
                    for t, value in enumerate(row):
                        add(k, "cell", f"{family}_logprob", value, run.period_names[t])
            for key in PER_PERIOD_KEYS:
                for k, value in enumerate(run.metrics.get(key) or [], start=1):
                    add(k, "period", key, value)
            for key in SCALAR_KEYS:
                add(t_count, "run", key, run.metrics.get(key))
    return out


# ------------------------------------------------------------------------------------------
# rendering


def fmt(agg: dict[str, Any] | None, group_n: int | None = None, digits: int = 3) -> str:
    """'0.412 ± 0.031' (95% CI half-width); '(n=k)' appended when k differs from the group's n."""
    if not agg or agg.get("mean") is None:
        return "–"
    text = f"{agg['mean']:.{digits}f}"
    if agg.get("half") is not None:
        text += f" ± {agg['half']:.{digits}f}"
    if group_n is None or agg["n"] != group_n or agg.get("half") is None:
        text += f" (n={agg['n']})"
    return text


def _by_benchmark(groups: Sequence[Group]) -> dict[str, list[Group]]:
    out: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        out[g.benchmark].append(g)
    return dict(out)


def _summary_header(groups: Sequence[Group]) -> tuple[list[str], bool]:
    multi_model = len({g.model for g in groups}) > 1
    head = ["method"] + (["model"] if multi_model else []) + ["n", "seeds", "not complete"]
    head += [f"{SUMMARY_LABELS[k]} {'↓' if k in LOWER_IS_BETTER else '↑'}" for k in SUMMARY_KEYS]
    return head, multi_model


def _summary_cells(g: Group, multi_model: bool) -> list[str]:
    cells = [g.label] + ([g.model] if multi_model else [])
    cells += [str(g.n), ",".join(str(s) for s in g.seeds) or "–", str(len(g.runs) - g.n)]
    cells += [fmt(g.metrics.get(k), g.n) for k in SUMMARY_KEYS]
    return cells


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _lm_eval_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    names = max((g.period_names for g in groups), key=len)
    head = ["method", "task/metric", "better", "base"] + [f"Δ after {p}" for p in names]
    rows = []
    for g in groups:
        for key, entry in sorted(g.lm_eval.items()):
            rows.append(
                [g.label, key, "higher" if entry["higher_is_better"] else "LOWER", fmt(entry["value"][0], g.n)]
                + [fmt(d, g.n) for d in entry["delta"][1:]]
            )
    return head, rows


def _retention_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    names = max((g.period_names for g in groups), key=len)
    head = (
        ["method", "task/metric", "better", "base"]
        + [f"drop after {p}" for p in names]
        + ["relative drop (final)", "final drop, 95% item interval (one run)"]
    )
    rows = []
    for g in groups:
        for key, entry in g.retention.items():
            ci = entry["item_ci"]
            rows.append(
                [g.label, key, "higher" if entry["higher_is_better"] else "LOWER", fmt(entry["base"], g.n)]
                + [fmt(d, g.n) for d in entry["drop"][1:]]
                + [fmt(entry["rel_drop_final"], g.n)]
                + [f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else "-"]
            )
    return head, rows


def _landscape_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    head = [
        "method",
        "period",
        "center loss",
        "loss range",
        "std",
        "max curvature",
        "λmax (Fisher)",
        "‖Δw‖",
        "forgetting estimate",
    ]
    keys = [
        "center_loss",
        "loss_range",
        "std_loss",
        "max_curvature",
        "fisher_top_eigenvalue",
        "delta_w_norm",
        "forgetting_estimate",
    ]
    rows = []
    for g in groups:
        if not g.landscape:
            continue
        for k, name in enumerate(["base"] + g.period_names):
            aggs = [g.landscape.get(key, [None] * (k + 1))[k] for key in keys]
            if all(a is None for a in aggs):
                continue
            rows.append([g.label, name] + [fmt(a, g.n, 4) for a in aggs])
    return head, rows


def _arrow(higher_is_better: bool) -> str:
    return "↑" if higher_is_better else "↓"


# A block of a stream's section, rendered by both summary.md and report.html: ("h", heading),
# ("p", paragraph) or ("table", head, rows, index of the first numeric column).
Block = tuple[Any, ...]


def _stream_blocks(groups: Sequence[Group]) -> list[Block]:
    """The tables of one stream: higher-is-better summary, lower-is-better summary (each only when the
    stream has such tasks; never averaged together) and the final score per task, base-solved marked."""
    ready = [g for g in groups if g.stream]
    if not ready:
        return [("p", "No complete run yet: nothing to aggregate.")]
    info = ready[0].stream
    tasks, primary, higher = info["tasks"], info["primary_metric"], info["higher_is_better"]
    hi = [t for t in tasks if higher[t]]
    lo = [t for t in tasks if not higher[t]]
    multi_model = len({g.model for g in groups}) > 1
    described = ", ".join(
        f"{t} ({info['scorers'][t]}: {primary[t]} {_arrow(higher[t])}, {info['eval_counts'][t]} items)" for t in tasks
    )
    blocks: list[Block] = [
        (
            "p",
            (
                f"Tasks in training order: {described}. R[i][t] is task t's primary metric after "
                "training through task i (row 0 = the base model); formulas: docs/metrics.md §10."
            ),
        )
    ]

    def prefix(g: Group) -> list[str]:
        return (
            [g.label]
            + ([g.model] if multi_model else [])
            + [str(g.n), ",".join(str(s) for s in g.seeds) or "–", str(len(g.runs) - g.n)]
        )

    head0 = ["method"] + (["model"] if multi_model else []) + ["n", "seeds", "not complete"]
    if hi:
        blocks += [
            ("h", f"Higher-is-better tasks ({', '.join(hi)})"),
            (
                "p",
                (
                    "Summary over the tasks whose primary metric is higher-is-better (accuracy, pass@1, EM, "
                    "F1, ROUGE-L). ACC is macro (each task once), ACC micro pools the eval items; ↓ marks the "
                    "columns where lower is better (forgetting, max drop, FG%)."
                ),
            ),
            (
                "table",
                head0 + [f"{label} {_arrow(up)}" for _, label, up in STREAM_HIGHER_KEYS],
                [
                    prefix(g)
                    + [fmt(g.metrics.get(f"higher_is_better_summary.{k}"), g.n) for k, _, _ in STREAM_HIGHER_KEYS]
                    for g in groups
                ],
                len(head0),
            ),
        ]
    if lo:
        metric = "/".join(sorted({primary[t] for t in lo}))
        blocks += [
            ("h", f"Lower-is-better tasks ({', '.join(lo)}): {metric}"),
            (
                "p",
                (
                    "Summarised apart and never averaged with the tasks above. Every column is lower-is-better "
                    "(↓): BWT > 0 and forgetting > 0 mean the loss rose again after the task was trained, "
                    "learning < 0 means training on the task lowered its loss."
                ),
            ),
            (
                "table",
                head0
                + [
                    f"{metric} {label} {_arrow(up)}" if key != "final" else f"final {metric} ↓"
                    for key, label, up in STREAM_LOWER_KEYS
                ],
                [
                    prefix(g)
                    + [fmt(g.metrics.get(f"lower_is_better_summary.{k}"), g.n) for k, _, _ in STREAM_LOWER_KEYS]
                    for g in groups
                ],
                len(head0),
            ),
        ]
    rows = []
    for t in tasks:
        cells = [t, info["scorers"][t], f"{primary[t]} {_arrow(higher[t])}"]
        for g in groups:
            solved = (g.stream or {}).get("base_solved", {}).get(t, 0)
            cell = fmt((g.stream or {}).get("final", {}).get(t), g.n)
            cells.append(cell + (f" {BASE_SOLVED_MARK}{solved}/{g.n}" if solved else ""))
        rows.append(cells)
    marked = [
        f"{g.label}: " + ", ".join(f"{t} ({k}/{g.n})" for t, k in g.stream["base_solved"].items() if k)
        for g in ready
        if any(g.stream["base_solved"].values())
    ]
    labels = [g.label + (f" ({g.model})" if multi_model else "") for g in groups]
    blocks += [("h", "Final score per task"), ("table", ["task", "scorer", "primary metric"] + labels, rows, 3)]
    if marked:
        margin = info.get("base_solved_margin")
        blocks.append(
            (
                "p",
                (
                    f"{BASE_SOLVED_MARK}k/n: base-solved in k of the method's n complete runs, i.e. "
                    f"R[0][t] ≥ R[t][t] − {margin} (docs/metrics.md §10): training on the task added "
                    "nothing measurable over the base model, so a later change of its score is drift, not "
                    "forgetting of something learnt. Such tasks still count in the summaries above. "
                    f"Base-solved: {'; '.join(marked)}."
                ),
            )
        )
    return blocks


def _attention_runs(runs: Sequence[Run]) -> list[Run]:
    return [r for r in runs if r.status != "complete"]


def render_summary_md(root: Path, runs: Sequence[Run], groups: Sequence[Group], generated: str) -> str:
    counts = {s: sum(r.status == s for r in runs) for s in STATUSES}
    lines = [
        "# Continual-learning report",
        "",
        f"Run root: `{root}`  ",
        f"Generated: {generated}  ",
        f"Runs: {len(runs)} (" + ", ".join(f"{counts[s]} {s}" for s in STATUSES) + ")",
        "",
        (
            "Cells are the mean over seeds ± the half-width of the 95% confidence interval of the mean "
            "(t-distribution, n−1 degrees of freedom; sd with ddof = 1), over the complete runs of the group. "
            "`(n=k)` marks a cell averaged over k runs, when that differs from the group's n or when "
            "k = 1 (no interval). ↑ higher is better, ↓ lower is better. Metric formulas: docs/metrics.md."
        ),
        "",
    ]
    for bench, gs in _by_benchmark(groups).items():
        models = ", ".join(sorted({g.model for g in gs}))
        if gs[0].kind == "stream":
            lines += [f"## {bench}", "", f"Model: {models}", ""]
            for block in _stream_blocks(gs):
                if block[0] == "h":
                    lines += [f"### {block[1]}", ""]
                elif block[0] == "p":
                    lines += [block[1], ""]
                else:
                    lines += [_md_table(block[1], block[2]), ""]
        else:
            head, multi_model = _summary_header(gs)
            lines += [f"## {bench}", "", f"Periods: {', '.join(gs[0].period_names)}; model: {models}", ""]
            lines += [_md_table(head, [_summary_cells(g, multi_model) for g in gs]), ""]
        # the optional sections: (present?, title, note, the table's rows)
        sections = [
            (
                any(g.lm_eval for g in gs),
                "General ability (lm-eval), change vs the base model",
                (
                    "Δ = score after the period − the same run's base score; for a metric marked LOWER "
                    "(e.g. perplexity, "
                    "CrowS-Pairs likelihood difference / pct stereotype) a negative Δ is an improvement."
                ),
                _lm_eval_rows,
            ),
            (
                any(g.retention for g in gs),
                "Retention: held-out tasks, drop vs the base model",
                (
                    "drop = base − value for a higher-is-better metric, value − base for a LOWER one, "
                    "so a positive drop is "
                    "ability lost in both; relative drop = drop / |base| (docs/metrics.md, section 11)."
                ),
                _retention_rows,
            ),
            (any(g.landscape for g in gs), "Loss landscape per period checkpoint", "", _landscape_rows),
        ]
        for present, title, note, table in sections:
            if present:
                h, rows = table(gs)
                lines += [f"### {title}", ""] + ([note, ""] if note else []) + [_md_table(h, rows), ""]
    attention = _attention_runs(runs)
    lines += ["## Runs not in the aggregates", ""]
    if attention:
        rows = [[r.run_id, r.status, f"{r.num_committed}/{r.num_periods or '?'}", r.reason] for r in attention]
        lines += [_md_table(["run", "status", "periods committed", "reason"], rows), ""]
    elif runs:
        lines += ["None: every run is complete.", ""]
    else:
        lines += [f"No run directories found under `{root}` (a run directory holds config.yaml or periods/).", ""]
    warned = [r for r in runs if r.warnings]
    if warned:
        lines += ["## Warnings", ""]
        lines += [f"- `{r.run_id}`: {w}" for r in warned for w in r.warnings]
        lines.append("")
    return "\n".join(lines)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{margin-bottom:4px} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;margin-right:6px;font-size:13px;color:#fff}
.complete{background:#2e7d32}.running{background:#1565c0}.partial{background:#ef6c00}
.corrupted{background:#c62828}.failed{background:#6a1b9a}
.plots{display:flex;flex-wrap:wrap;gap:12px}
.plots figure{margin:0;border:1px solid #eee;padding:6px;max-width:100%;box-sizing:border-box}
.plots img{max-width:100%;height:auto;display:block} figcaption{font-size:12px;color:#555}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px} .note{color:#555;font-size:13px}
.warn{color:#b71c1c}
"""

# Marks images that failed to decode, so a broken page says so instead of showing blank boxes; the
# body attribute lets a headless-browser test check that every plot rendered.
_JS = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0;
  imgs.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { ok += 1; return; }
    var p = document.createElement('p'); p.className = 'warn';
    p.textContent = 'image failed to render: ' + img.alt; img.replaceWith(p);
  });
  document.body.setAttribute('data-images-ok', ok + '/' + imgs.length);
});
"""


def _h(text: Any) -> str:
    return html.escape(str(text))


def _html_table(head: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 99) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_h(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ' class="num"' if i >= numeric_from else ""
            cells.append(f"<td{cls}>{cell if isinstance(cell, _Raw) else _h(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


class _Raw(str):
    """A table cell that is already HTML."""


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_h(caption)}">'
        f"<figcaption>{_h(caption)}</figcaption></figure>"
    )


def render_html(
    root: Path, runs: Sequence[Run], groups: Sequence[Group], plots: dict[str, list[tuple[Path, str]]], generated: str
) -> str:
    counts = {s: sum(r.status == s for r in runs) for s in STATUSES}
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>Continual-learning report</title>",
        f"<style>{_CSS}</style>",
        f"<script>{_JS}</script>",
        "</head><body>",
        "<h1>Continual-learning report</h1>",
        f"<p class='note'>Run root <code>{_h(root)}</code> · generated {_h(generated)} · {len(runs)} runs</p>",
        "<p>" + "".join(f"<span class='badge {s}'>{counts[s]} {s}</span>" for s in STATUSES) + "</p>",
    ]
    attention = _attention_runs(runs)
    if attention:
        parts.append("<h2>Runs not in the aggregates</h2>")
        rows = [
            [
                r.run_id,
                _Raw(f"<span class='badge {r.status}'>{r.status}</span>"),
                f"{r.num_committed}/{r.num_periods or '?'}",
                r.reason,
            ]
            for r in attention
        ]
        parts.append(_html_table(["run", "status", "periods committed", "reason"], rows))
    parts.append(
        "<p class='note'>Cells: mean over seeds ± half-width of the 95% t-interval of the mean "
        "(n−1 degrees of freedom), over complete runs; (n=k) marks cells over k runs when k differs "
        "from the group's n or k = 1. ↑ higher is better, ↓ lower is better. Formulas: "
        "docs/metrics.md.</p>"
    )
    for bench, gs in _by_benchmark(groups).items():
        models = ", ".join(sorted({g.model for g in gs}))
        if gs[0].kind == "stream":
            parts += [f"<h2>{_h(bench)}</h2>", f"<p class='note'>model {_h(models)}</p>"]
            for block in _stream_blocks(gs):
                if block[0] == "h":
                    parts.append(f"<h3>{_h(block[1])}</h3>")
                elif block[0] == "p":
                    parts.append(f"<p class='note'>{_h(block[1])}</p>")
                else:
                    parts.append(_html_table(block[1], block[2], block[3]))
        else:
            head, multi_model = _summary_header(gs)
            numeric = len(head) - len(SUMMARY_KEYS)
            parts += [
                f"<h2>{_h(bench)}</h2>",
                f"<p class='note'>Periods {_h(', '.join(gs[0].period_names))} · model {_h(models)}</p>",
                _html_table(head, [_summary_cells(g, multi_model) for g in gs], numeric),
            ]
        parts.append("<div class='plots'>" + "".join(_img(p, c) for p, c in plots.get(bench, [])) + "</div>")
        if any(g.lm_eval for g in gs):
            h, rows = _lm_eval_rows(gs)
            parts += [
                "<h3>General ability (lm-eval): change vs the base model</h3>",
                (
                    "<p class='note'>Δ = score after the period − the same run's base score. For metrics "
                    "marked LOWER a negative Δ is an improvement.</p>"
                ),
                _html_table(h, rows, 3),
            ]
        if any(g.retention for g in gs):
            h, rows = _retention_rows(gs)
            parts += [
                "<h3>Retention: held-out tasks, drop vs the base model</h3>",
                (
                    "<p class='note'>A positive drop is ability lost (base − value, or value − base for LOWER "
                    "metrics); relative drop = drop / |base| (docs/metrics.md, section 11).</p>"
                ),
                _html_table(h, rows, 3),
            ]
        if any(g.landscape for g in gs):
            h, rows = _landscape_rows(gs)
            parts += ["<h3>Loss landscape per period checkpoint</h3>", _html_table(h, rows, 2)]
            figures = []
            for g in gs:
                for run in g.complete[:1]:
                    for row in run.rows:
                        d = RunDir(run.path).landscape_dir(row.index, row.name)
                        if row.landscape and (d / "contour.png").is_file():
                            figures.append(_img(d / "contour.png", f"{g.label} seed {run.seed}: {row.name}"))
            if figures:
                parts.append("<div class='plots'>" + "".join(figures[:12]) + "</div>")
    parts.append("<h2>All runs</h2>")
    all_rows: list[list[Any]] = [
        [
            r.run_id,
            r.benchmark,
            r.method,
            r.seed,
            _Raw(f"<span class='badge {r.status}'>{r.status}</span>"),
            f"{r.num_committed}/{r.num_periods or '?'}",
            "; ".join(r.warnings),
        ]
        for r in runs
    ]
    parts.append(_html_table(["run", "benchmark", "method", "seed", "status", "periods", "warnings"], all_rows))
    parts.append(
        "<h2>Configs</h2><p class='note'>The resolved config.yaml of the first run of each group; "
        "the other runs differ only in the seed.</p>"
    )
    for g in groups:
        first = g.runs[0]
        parts.append(
            f"<details><summary>{_h(g.benchmark)} · {_h(g.label)} · {_h(g.model)} · "
            f"{len(g.runs)} runs</summary><p class='note'>runs: {_h(', '.join(r.run_id for r in g.runs))}"
            f"</p><pre>{_h(yaml.safe_dump(first.config, sort_keys=False))}</pre></details>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:60]


def make_plots(groups: Sequence[Group], directory: Path) -> dict[str, list[tuple[Path, str]]]:
    from eval_and_metrics import plots

    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[tuple[Path, str]]] = {}
    for i, (bench, gs) in enumerate(_by_benchmark(groups).items()):
        stem = f"{i}-{_slug(bench)}"
        made = []
        stream_figures = (
            (plots.stream_score_heatmaps, "matrix", "final score matrix per method (primary metric)"),
            (plots.stream_task_curves, "task_curves", "each task's primary metric over the stream"),
            (plots.lm_eval_deltas, "lm_eval", "general ability vs base (lm-eval)"),
            (plots.landscape_trends, "landscape", "loss landscape per task checkpoint"),
            (plots.confidence_traces, "confidence", "CASMO confidence per optimizer step (dashed: task boundaries)"),
        )
        temporal_figures = (
            (plots.summary_bars, "summary", "summary metrics"),
            (plots.accuracy_heatmaps, "matrix", "accuracy matrix per method"),
            (plots.timelines, "timelines", "each period's score over the sequence"),
            (plots.final_scores, "final", "final scores per period"),
            (plots.forgetting_curves, "forgetting", "forgetting curves"),
            (plots.plasticity_stability, "plasticity_stability", "plasticity vs stability"),
            (plots.lm_eval_deltas, "lm_eval", "general ability vs base (lm-eval)"),
            (plots.landscape_trends, "landscape", "loss landscape per period"),
            (plots.confidence_traces, "confidence", "CASMO confidence per optimizer step (dashed: period boundaries)"),
        )
        for fn, name, caption in stream_figures if gs[0].kind == "stream" else temporal_figures:
            path = fn(gs, directory / f"{stem}-{name}.png", bench)
            if path is not None:
                made.append((path, f"{bench}: {caption}"))
        out[bench] = made
    return out
