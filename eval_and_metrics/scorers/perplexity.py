"""perplexity: loglikelihood_rolling of the target text, micro-averaged over the task's tokens.

Each item's `target` is scored token by token, conditioned on its `prompt` when there is one (the
prompt is context only, never scored) and on the BOS (else EOS) token when there is not, as
lm-eval does. Texts longer than the model's window are scored in rolling windows: each window
predicts the next chunk of at most max_length - 1 tokens from up to max_length - 1 tokens before
it, so every target token is scored exactly once with as much context as fits. Per task:

    nll_per_token   = sum_items nll / sum_items tokens           (lower is better)
    perplexity      = exp(nll_per_token)                          (lower is better)
    bits_per_byte   = sum nll / sum UTF-8 bytes / ln 2           (lm-eval bits_per_byte)
    byte_perplexity = exp(sum nll / sum UTF-8 bytes)              (lm-eval byte_perplexity)
    word_perplexity = exp(sum nll / sum words)                    (lm-eval word_perplexity)

All are micro averages (pooled over the task's tokens, bytes or words), not means of per-item
perplexities, which would weight a 5-token text like a 500-token one. Token-level numbers depend on
the tokenizer: compare models with different tokenizers by bits_per_byte or word_perplexity.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from data.streams.schema import EvalItem
from eval_and_metrics.evaluate import UNBOUNDED, Budget, continuation_logprobs, owned_batches
from eval_and_metrics.scorers.base import Row, Scorer
from eval_and_metrics.scorers.multiple_choice import encode_request
from eval_and_metrics.shard import ONE, Shard


def rolling_windows(num_context: int, num_total: int, max_length: int) -> list[tuple[int, int, int]]:
    """(start, split, end) windows over a sequence whose tokens [num_context, num_total) are scored.

    Feed seq[start:end] (at most max_length tokens) and score seq[split:end]; the scored chunks
    cover [num_context, num_total) once each, and each chunk keeps at least one context token.
    """
    if num_context < 1 or max_length < 2:
        raise ValueError("need at least one context token and max_length >= 2")
    windows = []
    split = num_context
    while split < num_total:
        end = min(num_total, split + max_length - 1)
        windows.append((max(0, end - max_length), split, end))
        split = end
    return windows


def count_words(text: str) -> int:
    """lm-eval's word count for word_perplexity: pieces of a split on runs of whitespace."""
    return len(re.split(r"\s+", text))


def rolling_metrics(nll: float, num_tokens: int, num_bytes: int, num_words: int) -> dict[str, float]:
    if num_tokens <= 0 or num_bytes <= 0 or num_words <= 0:
        raise ValueError("no scored tokens: perplexity of an empty text is undefined")
    per_token = nll / num_tokens
    return {
        "nll_per_token": per_token,
        "perplexity": math.exp(per_token),
        "bits_per_byte": nll / num_bytes / math.log(2),
        "byte_perplexity": math.exp(nll / num_bytes),
        "word_perplexity": math.exp(nll / num_words),
    }


class Perplexity(Scorer):
    name: ClassVar[str] = "perplexity"
    output_type: ClassVar[str] = "loglikelihood_rolling"
    metrics: ClassVar[dict[str, bool]] = {
        "nll_per_token": False,
        "perplexity": False,
        "bits_per_byte": False,
        "byte_perplexity": False,
        "word_perplexity": False,
    }

    def __init__(self, max_length: int | None = None) -> None:
        self.max_length = max_length  # window length in tokens; None = the budget's window (eval.max_length)

    def check_item(self, item: EvalItem) -> list[str]:
        return [] if item.target.strip() else ["target is empty: no text to score"]

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
        max_len = self.max_length or budget.window(model)
        windows: list[tuple[int, list[int], list[int]]] = []  # (item, context ids, scored ids)
        num_tokens, num_windows = [], []
        for i, item in enumerate(items):
            context, target = encode_request(tokenizer, item.prompt, item.target)
            seq = context + target
            item_windows = rolling_windows(len(context), len(seq), max_len)
            windows.extend((i, seq[s:p], seq[p:e]) for s, p, e in item_windows)
            num_tokens.append(len(target))
            num_windows.append(len(item_windows))
        order = sorted(range(len(windows)), key=lambda w: (len(windows[w][1]) + len(windows[w][2]), w))
        window_nll: list[float | None] = [None] * len(windows)
        remaining = list(num_windows)
        done_early = sum(1 for n in num_windows if n == 0)
        if done_early:
            progress(done_early)
        was_training = model.training
        model.eval()
        try:
            lengths = [len(context) + len(scored) for _, context, scored in windows]
            for batch in owned_batches(order, batch_size, shard, should_stop, lengths, budget.max_tokens):
                logps = continuation_logprobs(
                    model,
                    [windows[w][1] for w in batch],
                    [windows[w][2] for w in batch],
                    tokenizer.pad_token_id,
                    device,
                )
                finished = 0
                for w, lp in zip(batch, logps):
                    window_nll[w] = lp.double().sum().item()
                    remaining[windows[w][0]] -= 1
                    finished += remaining[windows[w][0]] == 0
                if finished:
                    progress(finished)
        finally:
            model.train(was_training)
        # summed in the batch order one process uses, whichever rank computed each window
        merged = shard.merge(window_nll)
        nll = [0.0] * len(items)
        for w in order:
            nll[windows[w][0]] -= merged[w]
        return [
            {
                "id": item.id,
                "prediction": None,
                "nll": nll[i],
                "num_tokens": num_tokens[i],
                "num_bytes": len(item.target.encode("utf-8")),
                "num_words": count_words(item.target),
                "num_windows": num_windows[i],
            }
            for i, item in enumerate(items)
        ]

    def aggregate(self, rows: list[Row]) -> dict[str, float]:
        if not rows:
            raise ValueError("no rows to aggregate: a task with no eval items has no score")
        return rolling_metrics(
            math.fsum(r["nll"] for r in rows),
            sum(r["num_tokens"] for r in rows),
            sum(r["num_bytes"] for r in rows),
            sum(r["num_words"] for r in rows),
        )
