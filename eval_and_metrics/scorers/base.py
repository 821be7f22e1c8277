"""The Scorer interface and the batched generation loop the generate_until scorers share.

A scorer turns a model and a task's eval items into one JSON-safe row per item (the prediction and
the per-item numbers), and rows into the task's metrics. Rows hold everything the metrics need, so
a task can be re-aggregated, or re-scored with a changed extraction rule, without the model. The
vocabulary is lm-eval-harness's: an output type (generate_until, multiple_choice,
loglikelihood_rolling) and metrics that each say whether higher is better. Formulas: docs/scorers.md.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from data.streams.schema import EvalItem
from eval_and_metrics.evaluate import UNBOUNDED, Budget, EvalInterrupted, encode, generate_greedy, owned_batches
from eval_and_metrics.shard import ONE, Shard

OUTPUT_TYPES = ("generate_until", "multiple_choice", "loglikelihood_rolling")

Row = dict[str, Any]


class Scorer(ABC):
    name: ClassVar[str]  # registry key, lowercase snake case, = the module name
    output_type: ClassVar[str]  # one of OUTPUT_TYPES
    metrics: ClassVar[dict[str, bool]]  # metric -> higher is better; the first one is the primary metric

    @abstractmethod
    def score(
        self,
        model: nn.Module,
        tokenizer: Any,
        items: list[EvalItem],
        device: torch.device,
        batch_size: int,
        max_new_tokens: int,
        should_stop: Callable[[], bool] = lambda: False,
        progress: Callable[[int], None] = lambda n: None,
        shard: Shard = ONE,
        budget: Budget = UNBOUNDED,
    ) -> list[Row]:
        """One row per item, in item order: {"id", "prediction", <per-item values>}.

        should_stop() is polled before every batch (EvalInterrupted when it holds); progress(n) is
        called with the number of items each batch finished. max_new_tokens <= 0 means the
        scorer's default; scorers that do not generate ignore it. Under several ranks (`shard`,
        eval_and_metrics/shard.py) each computes the batches it owns and every rank returns all rows.
        `budget` bounds the sequences (the model's window capped) and each batch's padded tokens.
        """

    @abstractmethod
    def aggregate(self, rows: list[Row]) -> dict[str, float]:
        """Every metric in `metrics`, computed from the rows alone."""

    def check(self, items: list[EvalItem]) -> list[str]:
        """Problems with the items for this scorer, one message each (empty list: usable)."""
        problems = []
        if not items:
            problems.append(f"{self.name}: no eval items")
        seen: set[str] = set()
        for item in items:
            if not item.id:
                problems.append(f"{self.name}: an item has an empty id")
            elif item.id in seen:
                problems.append(f"{self.name}: duplicate item id {item.id!r} (it would be counted twice)")
            seen.add(item.id)
            problems.extend(f"{self.name}: item {item.id!r}: {msg}" for msg in self.check_item(item))
        return problems

    def check_item(self, item: EvalItem) -> list[str]:
        """Problems with one item; each scorer adds its own rules."""
        return []


def mean_of(rows: list[Row], key: str) -> float:
    """Mean of a per-item value over rows (macro over items); ValueError on no rows."""
    if not rows:
        raise ValueError("no rows to aggregate: a task with no eval items has no score")
    return math.fsum(float(r[key]) for r in rows) / len(rows)


def prompt_problems(item: EvalItem) -> list[str]:
    return [] if item.prompt else ["prompt is empty: a generate_until item continues its prompt"]


def poll(should_stop: Callable[[], bool]) -> None:
    if should_stop():
        raise EvalInterrupted()


class GenerationScorer(Scorer):
    """Greedy generation in left-padded, length-sorted batches; each subclass extracts and compares.

    A subclass says when a continuation is finished (`is_done`, which must only hold once the text
    so far decides the score, so stopping early never changes a result) and how a generation
    becomes a row (`score_generation`). Each per-item metric is stored in the row under the
    metric's own name, and the task's value is its mean over items.
    """

    output_type: ClassVar[str] = "generate_until"
    default_max_new_tokens: ClassVar[int] = 32

    @abstractmethod
    def is_done(self, item: EvalItem, generation: str) -> bool:
        """True once more tokens cannot change this item's score."""

    @abstractmethod
    def score_generation(self, item: EvalItem, generation: str) -> Row:
        """The row of one item without "id": "prediction", "generation" and every metric key."""

    def check_item(self, item: EvalItem) -> list[str]:
        problems = prompt_problems(item)
        if not item.target.strip():
            problems.append("target is empty: nothing to compare the generation with")
        return problems

    def aggregate(self, rows: list[Row]) -> dict[str, float]:
        return {metric: mean_of(rows, metric) for metric in self.metrics}

    def score(
        self,
        model: nn.Module,
        tokenizer: Any,
        items: list[EvalItem],
        device: torch.device,
        batch_size: int,
        max_new_tokens: int,
        should_stop: Callable[[], bool] = lambda: False,
        progress: Callable[[int], None] = lambda n: None,
        shard: Shard = ONE,
        budget: Budget = UNBOUNDED,
    ) -> list[Row]:
        positions = budget.window(model)
        if max_new_tokens <= 0:
            # The default leaves at least half of a small model's positions to the prompt; an
            # explicit value that does not fit is the caller's error (below).
            max_new_tokens = min(self.default_max_new_tokens, positions // 2)
        # A prompt longer than the model takes with room for the answer keeps its end, as lm-eval
        # does (the question is at the end of a few-shot prompt); the row records that it was cut.
        room = positions - max_new_tokens
        if room < 1:
            raise ValueError(
                f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's {positions} positions"
            )
        encoded = [encode(tokenizer, item.prompt) for item in items]
        prompts = [ids[-room:] for ids in encoded]
        order = sorted(range(len(items)), key=lambda i: (len(prompts[i]), i))
        rows: list[Row | None] = [None] * len(items)
        was_training = model.training
        model.eval()
        try:
            # a generation's width is its prompt and the tokens it may add (the KV cache holds both)
            lengths = [len(p) + max_new_tokens for p in prompts]
            for idx in owned_batches(order, batch_size, shard, should_stop, lengths, budget.max_tokens):

                def done(row: int, text: str, idx: list[int] = idx) -> bool:
                    return self.is_done(items[idx[row]], text)

                texts = generate_greedy(model, tokenizer, [prompts[i] for i in idx], device, max_new_tokens, done=done)
                for i, text in zip(idx, texts):
                    if not shard.active:  # between batches only when ranks must agree on it
                        poll(should_stop)  # scoring one row can take seconds (the code sandbox)
                    rows[i] = {
                        "id": items[i].id,
                        **self.score_generation(items[i], text),
                        "prompt_truncated": len(encoded[i]) > room,
                    }
                progress(len(idx))
        finally:
            model.train(was_training)
        return shard.merge(rows)
