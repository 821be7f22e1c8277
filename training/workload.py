"""What the loop trains on and evaluates, whatever the benchmark: Synthetic TemporalWiki's periods or a task
stream's tasks. The trainer sees only this interface, so it never branches on the kind of benchmark.

    stages                  the sequence: index, name, the Period handed to method hooks, training items
    evaluate(...)           one JSON row per eval item of every stage (the full score-matrix row); each
                            stage's items are scored inside `scope(stage name)` when the method gives one
    row_summary(rows)       the per-stage numbers a period manifest carries
    derive(rows_per_row)    results.json's metrics from every row (row 0 = base model)
    write_files(dir)        the data a run directory keeps next to its results

A stream's stages are its tasks; each task is scored by its scorer (eval_and_metrics/scorers) and the
metrics come from eval_and_metrics/stream_metrics.py. The temporal benchmark keeps its own probes,
metrics and files exactly as before.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch

from artifacts import atomic_write_text
from data import DataError, load_benchmark
from data.config import DataConfig
from data.io import read_benchmark, write_benchmark
from data.schema import PROBE_FAMILIES, Benchmark, Period, Probe
from data.streams import load_stream
from data.streams.schema import STREAM_FILE, Stream
from eval_and_metrics.evaluate import UNBOUNDED, Budget, evaluate_probes
from eval_and_metrics.metrics import derive_metrics, score_matrix
from eval_and_metrics.scorers import SCORERS
from eval_and_metrics.shard import ONE, Shard
from eval_and_metrics.stream_metrics import derive_stream_metrics, row_summary
from training.batching import PeriodData, tokenize, tokenize_pairs
from training.config import ConfigError
from training.models import benchmark_texts

# The method's context for scoring one stage's items (training/methods/base.py: eval_scope); None = no
# stage needs a context of its own, so every item can share the same batches.
Scope = Callable[[str], AbstractContextManager[Any] | None]


def _no_scope(stage: str) -> None:
    return None


@dataclass(frozen=True)
class Stage:
    index: int  # 1-based
    name: str
    period: Period  # what method hooks receive (a stream task's has no passages or probes)
    pairs: tuple[tuple[str, str], ...]  # (prompt, completion); prompt "" = plain text
    loss_on_prompt: bool


class Workload:
    kind: ClassVar[str]
    # (dotted key into results.json's metrics, label) of the table main.py prints at the end
    summary_columns: ClassVar[list[tuple[str, str]]]
    summary_legend: ClassVar[str] = ""  # printed under that table: what its labels abbreviate
    name: str
    fingerprint: str
    stages: list[Stage]
    probes: list[Probe]  # what eval_extras sees (temporal probes; none for a stream)
    warnings: tuple[str, ...] = ()  # one line each about the input (data taken as the truth); the CLI prints them

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def period_names(self) -> list[str]:  # what model building and methods call the stages
        return self.stage_names

    def tokenize(self, tokenizer: Any, stage: Stage, texts: list[str], max_len: int) -> PeriodData:
        """The stage's training sequences, after the method's data hook returned `texts`. The hook sees
        prompt + completion joined; a text of any stage (replay and the joint bound bring earlier stages'
        items back) is split again and keeps the loss mask of the stage it came from, and a text the hook
        made up is trained as plain text."""
        split = self._pair_split
        items = [split.get(t, ("", t, True)) for t in texts]
        return tokenize_pairs(tokenizer, [(p, c) for p, c, _ in items], max_len, [on for _, _, on in items])

    @cached_property
    def _pair_split(self) -> dict[str, tuple[str, str, bool]]:
        """prompt + completion -> (prompt, completion, loss on the prompt too), over every stage."""
        return {p + c: (p, c, s.loss_on_prompt) for s in self.stages for p, c in s.pairs}

    def result_fields(self, cfg: Any) -> dict[str, Any]:
        """Fields results.json adds for this kind of benchmark."""
        return {}

    def num_eval_items(self) -> int:
        raise NotImplementedError

    def vocabulary_texts(self) -> list[str]:
        """The texts a synthetic model's tokenizer is built from (training.models.benchmark_texts)."""
        raise NotImplementedError

    def evaluate(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        device: torch.device,
        batch_size: int,
        max_new_tokens: int,
        should_stop: Callable[[], bool],
        progress: Callable[[int], None],
        scope: Scope = _no_scope,
        shard: Shard = ONE,
        budget: Budget = UNBOUNDED,
    ) -> list[dict[str, Any]]:
        raise NotImplementedError

    def row_summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def derive(self, rows_per_row: list[list[dict[str, Any]]]) -> dict[str, Any]:
        raise NotImplementedError

    def write_files(self, directory: Path) -> None:
        raise NotImplementedError


class TemporalWorkload(Workload):
    """Synthetic TemporalWiki (or CASM raw facts): periods of passages, probes scored by EM/F1/log-prob."""

    kind = "temporal"
    # Storage (S: the cloze of a trained sentence) and extraction (X: a wording never trained on) side
    # by side, never averaged together; subset metrics are pooled over all their probes.
    summary_columns: ClassVar[list[tuple[str, str]]] = [
        ("acc_storage", "ACC-S"),
        ("bwt_storage", "BWT-S"),
        ("forgetting_storage", "Fgt-S"),
        ("plasticity_storage_pooled", "Plast-S"),
        ("plasticity_extraction_pooled", "Plast-X"),
        ("stability_storage_pooled", "Stab-S"),
        ("stability_extraction_pooled", "Stab-X"),
        ("temporal_recall_storage_final", "TRec-S"),
        ("temporal_recall_extraction_final", "TRec-X"),
        ("outdated_storage_pooled", "Outd-S"),
        ("acc_extraction", "ACC-X"),
    ]
    summary_legend = (
        "-S = storage probes (the cloze of a trained sentence), -X = extraction probes (a wording "
        "never trained on); Plast and Stab pooled over all their probes; Outd = answers to a period's "
        "changed facts that give an earlier value (DyKnow's outdated, docs/metrics.md)"
    )

    def __init__(self, bench: Benchmark) -> None:
        self.bench = bench
        self.name = bench.name
        self.fingerprint = bench.fingerprint
        self.probes = bench.all_probes()
        self.warnings = tuple(bench.meta.get("warnings", ()))
        self.stages = [Stage(p.index, p.name, p, tuple(("", x.text) for x in p.passages), True) for p in bench.periods]

    def tokenize(self, tokenizer, stage, texts, max_len):
        # passages are plain text with loss on every token, tokenised as they always were
        return tokenize(tokenizer, texts, max_len)

    def num_eval_items(self) -> int:
        return len(self.probes)

    def vocabulary_texts(self) -> list[str]:
        return benchmark_texts(self.bench)

    def evaluate(
        self,
        model,
        tokenizer,
        device,
        batch_size,
        max_new_tokens,
        should_stop,
        progress,
        scope=_no_scope,
        shard=ONE,
        budget=UNBOUNDED,
    ):
        # a probe is one sentence and its answer, far below any budget: batches stay batch_size probes
        scopes = {p.name: scope(p.name) for p in self.bench.periods}
        # one set of batches over every probe unless a stage needs its own context (same numbers as always)
        groups = (
            [(nullcontext(), self.probes)]
            if all(c is None for c in scopes.values())
            else [(scopes[p.name] or nullcontext(), list(p.probes)) for p in self.bench.periods]
        )
        results = []
        for context, probes in groups:
            with context:
                results += evaluate_probes(
                    model,
                    tokenizer,
                    probes,
                    device,
                    batch_size,
                    max_new_tokens,
                    should_stop=should_stop,
                    progress=progress,
                    shard=shard,
                )
        return [r.to_json() for r in results]

    def row_summary(self, rows):
        by_id = {r["id"]: r for r in rows}
        summary: dict[str, Any] = {}
        for period in self.bench.periods:
            for family in PROBE_FAMILIES:
                sel = [by_id[p.id] for p in period.probes if p.family == family]
                if sel:
                    summary[f"{period.name}/{family}"] = {
                        "em": sum(r["em"] for r in sel) / len(sel),
                        "f1": sum(r["f1"] for r in sel) / len(sel),
                        "n": len(sel),
                    }
        return summary

    def derive(self, rows_per_row):
        rows_em = [{r["id"]: r["em"] for r in rows} for rows in rows_per_row]
        rows_f1 = [{r["id"]: r["f1"] for r in rows} for rows in rows_per_row]
        rows_lp = [{r["id"]: r["logprob"] for r in rows} for rows in rows_per_row]
        rows_pred = [{r["id"]: r["prediction"] for r in rows} for rows in rows_per_row]
        metrics = derive_metrics(rows_em, rows_f1, self.probes, self.bench.period_names, rows_pred)
        for family in PROBE_FAMILIES:

            def of_family(p: Probe, family: str = family) -> bool:
                return p.family == family

            logprob = score_matrix(rows_lp, self.probes, self.bench.period_names, select=of_family)
            metrics[f"matrix_{family}_logprob"] = [
                [None if math.isnan(v) else float(v) for v in row] for row in logprob
            ]
        return metrics

    def write_files(self, directory):
        write_benchmark(self.bench, directory)


class StreamWorkload(Workload):
    """A task stream: each task trains on its items and is scored by its own scorer after every task."""

    kind = "stream"
    # higher-is-better tasks first, then the mean final NLL of the lower-is-better ones (never mixed)
    summary_columns = [
        (f"higher_is_better_summary.{k}", label)
        for k, label in (
            ("acc", "ACC"),
            ("acc_micro", "ACCmic"),
            ("avg_acc_over_time", "AvgAcc"),
            ("bwt", "BWT"),
            ("fwt", "FWT"),
            ("forgetting", "Forget"),
            ("max_drop", "MaxDrop"),
            ("plasticity", "Plast"),
        )
    ] + [("lower_is_better_summary.final", "NLL↓"), ("lower_is_better_summary.bwt", "NLLBWT↓")]

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.name = stream.name
        self.fingerprint = stream.fingerprint
        self.probes = []
        self.stages = [
            Stage(
                k,
                t.name,
                Period(index=k, name=t.name, passages=(), probes=()),
                tuple((x.prompt, x.completion) for x in t.train),
                t.loss_on == "all",
            )
            for k, t in enumerate(stream.tasks, start=1)
        ]
        self.scorers = {t.name: SCORERS[t.scorer]() for t in stream.tasks}

    def result_fields(self, cfg):
        return {"kind": "stream", "benchmark": cfg.data.stream, "stream_order": self.stream.order}

    def num_eval_items(self) -> int:
        return sum(len(t.eval) for t in self.stream.tasks)

    def vocabulary_texts(self) -> list[str]:
        texts: list[str] = []
        for t in self.stream.tasks:
            texts.extend(x.prompt + x.completion for x in t.train)
            for x in t.eval:
                texts.extend([x.prompt + x.target, *(x.prompt + (x.delimiter or "") + c for c in x.choices), x.tests])
        return texts

    def evaluate(
        self,
        model,
        tokenizer,
        device,
        batch_size,
        max_new_tokens,
        should_stop,
        progress,
        scope=_no_scope,
        shard=ONE,
        budget=UNBOUNDED,
    ):
        rows: list[dict[str, Any]] = []
        for task in self.stream.tasks:
            with scope(task.name) or nullcontext():
                scored = self.scorers[task.name].score(
                    model,
                    tokenizer,
                    list(task.eval),
                    device,
                    batch_size,
                    max_new_tokens,
                    should_stop=should_stop,
                    progress=progress,
                    shard=shard,
                    budget=budget,
                )
            rows.extend({**row, "task": task.name} for row in scored)
        return rows

    def row_summary(self, rows):
        return row_summary(self.stream.task_names, self.scorers, rows)

    def derive(self, rows_per_row):
        # The derivation is shared with the report, which re-derives a run from its committed rows.
        tasks = self.stream.tasks
        return derive_stream_metrics(
            [t.name for t in tasks], [t.scorer for t in tasks], self.scorers, [len(t.eval) for t in tasks], rows_per_row
        )

    def write_files(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / STREAM_FILE, json.dumps(self.stream.to_json(), sort_keys=True) + "\n")


def read_workload(directory: Path) -> Workload:
    """The workload a run trained on, from its data directory (what write_files wrote): a stream when
    it holds stream.json, else the temporal benchmark's benchmark.json. The jobs that rebuild a period's
    model (export, landscape, lm-eval) read a run through this, never through one file name.

    Raises DataError (one line) for a missing or unreadable file; both readers are strict and
    recompute the fingerprint from the content.
    """
    path = Path(directory) / STREAM_FILE
    if not path.is_file():
        return TemporalWorkload(read_benchmark(directory))
    try:
        stream = Stream.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a stream file written by a run ({type(exc).__name__}: {reason})") from None
    return StreamWorkload(stream)


def load_workload(cfg: DataConfig) -> Workload:
    """The data section's benchmark: a task stream when `stream` names one, else the temporal benchmark.

    A stream is checked here against the scorer registry (unknown scorers, items a scorer cannot use,
    code tasks whose reference solution fails its own tests), every problem one line, before any run
    directory exists.
    """
    if not cfg.stream:
        return TemporalWorkload(load_benchmark(cfg.benchmark, cfg))
    stream = load_stream(cfg.stream, order=cfg.stream_order, seed=cfg.seed)
    problems = []
    for task in stream.tasks:
        if task.scorer not in SCORERS:
            problems.append(
                f"{cfg.stream}: task {task.name!r}: scorer {task.scorer!r} is not registered; "
                f"valid: {', '.join(SCORERS)}"
            )
            continue
        problems += [f"{cfg.stream}: task {task.name!r}: {p}" for p in SCORERS[task.scorer]().check(list(task.eval))]
    if problems:
        raise ConfigError(problems)
    return StreamWorkload(stream)
