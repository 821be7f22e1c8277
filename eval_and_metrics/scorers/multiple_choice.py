"""multiple_choice: the log-likelihood of each choice as a continuation of the prompt; no generation.

For each choice the model scores ll = sum of log p(token | prompt, earlier choice tokens) over the
choice's tokens (lm-eval-harness's multiple_choice output type). Then, over the choices of an item:

    acc       = [argmax_j ll_j == gold]
    acc_norm  = [argmax_j ll_j / len(choice_j) == gold]            len in characters (lm-eval: len(str))
    acc_bytes = [argmax_j ll_j / len(choice_j.encode()) == gold]   len in UTF-8 bytes (lm-eval: acc_bytes)

each averaged over items; ties go to the first choice (numpy's argmax, as lm-eval). The length is
the choice's own text, without the delimiter in front of it: lm-eval's convention (process_results
divides by len(choice) and len(choice.encode("utf-8")) of doc_to_choice's texts, while it scores
target_delimiter + choice). A generated letter is never parsed: a model that would answer "B" in
free text is scored on how likely it finds each answer, so the metric cannot be fooled by, or lose
points to, the output format.

Boundary: an item with a `delimiter` (every item a stream builds: format.choice_prefix, or the lm-eval
task's target_delimiter) scores exactly delimiter + choice, as lm-eval's construct_requests does.
An item without one (built by hand, or read from a stream written before the field existed, whose
choices carry the delimiter) scores " " + choice unless the prompt already ends in whitespace or the
choice starts with it. Either is encoded as lm-eval does (evaluate.encode_pair): whole minus context,
trailing context whitespace moved to the continuation. An empty prompt conditions on the BOS (else
EOS) token.

Speed: the choices of an item share its context, so by default the context runs once with every choice
packed behind it (pack_requests, evaluate.shared_context_logprobs; docs/scorers.md). The per-request
path (shared_context=False) is the reference tests/test_shared_context.py holds it to, and what a model
the packing cannot be exact for is scored with (evaluate.packed_mask_kind).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from data.streams.schema import EvalItem
from eval_and_metrics.evaluate import (
    UNBOUNDED,
    Budget,
    continuation_logprobs,
    encode,
    encode_pair,
    owned_batches,
    packed_mask_kind,
    packed_row,
    prefix_token_id,
    shared_context_logprobs,
)
from eval_and_metrics.scorers.base import Row, Scorer, mean_of
from eval_and_metrics.shard import ONE, Shard


def continuation_text(prompt: str, choice: str, delimiter: str | None = None) -> str:
    """The text scored after the prompt: delimiter + choice, or with no delimiter given, the choice with
    lm-eval's " " in front where one is needed."""
    if delimiter is not None:
        return delimiter + choice
    if prompt[-1:].isspace() or choice[:1].isspace():
        return choice
    return " " + choice


def encode_request(tokenizer: Any, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one loglikelihood request, lm-eval's way."""
    if not prompt:
        return [prefix_token_id(tokenizer)], encode(tokenizer, continuation)
    return encode_pair(tokenizer, prompt, continuation)


def argmax_first(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (numpy.argmax's rule)."""
    return max(range(len(values)), key=lambda j: (values[j], -j))


def choice_metrics(
    loglikelihoods: Sequence[float], choice_chars: Sequence[int], choice_bytes: Sequence[int], gold: int
) -> dict[str, Any]:
    """acc, acc_norm, acc_bytes and the three argmax indices of one item."""
    if min(choice_chars, default=0) <= 0 or min(choice_bytes, default=0) <= 0:
        raise ValueError("every choice needs a non-empty text to length-normalise by")
    pred = argmax_first(loglikelihoods)
    pred_norm = argmax_first([ll / n for ll, n in zip(loglikelihoods, choice_chars)])
    pred_bytes = argmax_first([ll / n for ll, n in zip(loglikelihoods, choice_bytes)])
    return {
        "pred_index": pred,
        "pred_index_norm": pred_norm,
        "pred_index_bytes": pred_bytes,
        "acc": float(pred == gold),
        "acc_norm": float(pred_norm == gold),
        "acc_bytes": float(pred_bytes == gold),
    }


# (item index, choice index, context ids, continuation ids) of one loglikelihood request
Request = tuple[int, int, list[int], list[int]]


def per_request_loglikelihoods(
    model: nn.Module,
    tokenizer: Any,
    requests: list[Request],
    num_items: int,
    device: torch.device,
    batch_size: int,
    should_stop: Callable[[], bool],
    progress: Callable[[int], None],
    shard: Shard,
    budget: Budget,
) -> list[float]:
    """The log-likelihood of every request, one padded row per request (batch_size counts requests)."""
    order = sorted(range(len(requests)), key=lambda r: (len(requests[r][2]) + len(requests[r][3]), r))
    request_ll: list[float | None] = [None] * len(requests)
    remaining = [0] * num_items
    for i, _, _, _ in requests:
        remaining[i] += 1
    lengths = [len(context) + len(cont) for _, _, context, cont in requests]
    for batch in owned_batches(order, batch_size, shard, should_stop, lengths, budget.max_tokens):
        logps = continuation_logprobs(
            model, [requests[r][2] for r in batch], [requests[r][3] for r in batch], tokenizer.pad_token_id, device
        )
        finished = 0
        for r, lp in zip(batch, logps):
            request_ll[r] = lp.double().sum().item()
            remaining[requests[r][0]] -= 1
            finished += remaining[requests[r][0]] == 0
        if finished:
            progress(finished)
    return shard.merge(request_ll)


def pack_requests(requests: list[Request], max_len: int) -> list[tuple[list[int], list[list[int]]]]:
    """(context, continuations) rows that together hold every distinct (context, continuation) pair once.

    Requests with the same context ids (the choices of one item, and items whose prompts encode the
    same) share rows, in the order of their first request; a row takes continuations while
    len(packed_row) stays within max_len, so no forward is longer than the longest single request
    may be (every request alone fits: the scorer truncates its context)."""
    by_context: dict[tuple[int, ...], dict[tuple[int, ...], None]] = {}
    for _, _, context, cont in requests:
        by_context.setdefault(tuple(context), {})[tuple(cont)] = None  # a dict keeps first-seen order
    rows: list[tuple[list[int], list[list[int]]]] = []
    for context_ids, conts in by_context.items():
        group: list[list[int]] = []
        length = len(context_ids)
        for cont_ids in conts:
            if group and length + len(cont_ids) - 1 > max_len:
                rows.append((list(context_ids), group))
                group, length = [], len(context_ids)
            group.append(list(cont_ids))
            length += len(cont_ids) - 1
        rows.append((list(context_ids), group))
    return rows


def shared_context_loglikelihoods(
    model: nn.Module,
    tokenizer: Any,
    requests: list[Request],
    num_items: int,
    device: torch.device,
    batch_size: int,
    should_stop: Callable[[], bool],
    progress: Callable[[int], None],
    shard: Shard,
    budget: Budget,
    max_len: int,
    mask_kind: str,
) -> list[float]:
    """The log-likelihood of every request, each distinct context run once (pack_requests,
    evaluate.shared_context_logprobs); batch_size counts packed rows, the token budget their real
    length. Rows are sorted by length, so documents with contexts of about the same length share a
    batch and padding stays small."""
    rows = pack_requests(requests, max_len)
    lengths = [len(packed_row(context, group)) for context, group in rows]
    order = sorted(range(len(rows)), key=lambda r: (lengths[r], r))
    # which requests each (context, continuation) answers, and how many rows each item waits for
    answers: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for r, (_, _, context, cont) in enumerate(requests):
        answers.setdefault((tuple(context), tuple(cont)), []).append(r)
    waiting: list[set[int]] = [set() for _ in range(num_items)]
    row_items: list[set[int]] = []
    for row, (context, group) in enumerate(rows):
        items = {requests[r][0] for cont in group for r in answers[(tuple(context), tuple(cont))]}
        row_items.append(items)
        for i in items:
            waiting[i].add(row)
    row_ll: list[list[float] | None] = [None] * len(rows)
    for batch in owned_batches(order, batch_size, shard, should_stop, lengths, budget.max_tokens):
        logps = shared_context_logprobs(
            model, [rows[r][0] for r in batch], [rows[r][1] for r in batch], tokenizer.pad_token_id, device, mask_kind
        )
        finished = 0
        for row, lps in zip(batch, logps):
            row_ll[row] = [lp.double().sum().item() for lp in lps]
            for i in row_items[row]:
                waiting[i].discard(row)
                finished += not waiting[i]
        if finished:
            progress(finished)
    merged = shard.merge(row_ll)
    pair_ll = {
        (tuple(context), tuple(cont)): ll for (context, group), lls in zip(rows, merged) for cont, ll in zip(group, lls)
    }
    return [pair_ll[(tuple(context), tuple(cont))] for _, _, context, cont in requests]


class MultipleChoice(Scorer):
    name: ClassVar[str] = "multiple_choice"
    output_type: ClassVar[str] = "multiple_choice"
    metrics: ClassVar[dict[str, bool]] = {"acc": True, "acc_norm": True, "acc_bytes": True}

    def check_item(self, item: EvalItem) -> list[str]:
        problems = []
        if len(item.choices) < 2:
            problems.append(f"has {len(item.choices)} choice(s): multiple choice needs at least 2")
        if not 0 <= item.gold < len(item.choices):
            problems.append(f"gold {item.gold} is not an index into its {len(item.choices)} choices")
        elif item.target and item.target != (item.delimiter or "") + item.choices[item.gold]:
            problems.append(
                f"target {item.target!r} is not delimiter + choices[gold] = "
                f"{(item.delimiter or '') + item.choices[item.gold]!r}"
            )
        if any(not c for c in item.choices):
            problems.append("has an empty choice (nothing to score, no length to normalise by)")
        if len(set(item.choices)) != len(item.choices):
            problems.append("has duplicate choices (their scores tie; the first one always wins)")
        return problems

    def __init__(self, shared_context: bool = True) -> None:
        # False: one request per (item, choice), the reference the shared-context path is tested against
        self.shared_context = shared_context

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
        max_len = budget.window(model)
        requests: list[Request] = []
        for i, item in enumerate(items):
            for j, choice in enumerate(item.choices):
                context, cont = encode_request(
                    tokenizer, item.prompt, continuation_text(item.prompt, choice, item.delimiter)
                )
                if not cont or len(cont) >= max_len:
                    raise ValueError(f"item {item.id!r} choice {j}: {len(cont)} tokens, need 1 to {max_len - 1}")
                # Too long: the context keeps its end (lm-eval truncates from the left as well).
                requests.append((i, j, context[-(max_len - len(cont)) :], cont))
        mask_kind = packed_mask_kind(model) if self.shared_context else None
        was_training = model.training
        model.eval()
        try:
            if mask_kind is None:
                request_ll = per_request_loglikelihoods(
                    model, tokenizer, requests, len(items), device, batch_size, should_stop, progress, shard, budget
                )
            else:
                request_ll = shared_context_loglikelihoods(
                    model,
                    tokenizer,
                    requests,
                    len(items),
                    device,
                    batch_size,
                    should_stop,
                    progress,
                    shard,
                    budget,
                    max_len,
                    mask_kind,
                )
        finally:
            model.train(was_training)
        lls: list[list[float]] = [[math.nan] * len(item.choices) for item in items]
        num_tokens: list[list[int]] = [[0] * len(item.choices) for item in items]
        for (i, j, _, cont), ll in zip(requests, request_ll):
            lls[i][j] = ll
            num_tokens[i][j] = len(cont)
        rows = []
        for i, item in enumerate(items):
            # the choice's own text, never the delimiter scored before it (lm-eval's len(choice))
            chars = [len(c) for c in item.choices]
            nbytes = [len(c.encode("utf-8")) for c in item.choices]
            result = choice_metrics(lls[i], chars, nbytes, item.gold)
            # the prediction is the scored continuation, comparable with `target`
            prediction = (item.delimiter or "") + item.choices[result["pred_index"]]
            rows.append(
                {
                    "id": item.id,
                    "prediction": prediction,
                    "gold": item.gold,
                    "loglikelihoods": lls[i],
                    "num_tokens": num_tokens[i],
                    "choice_chars": chars,
                    "choice_bytes": nbytes,
                    **result,
                }
            )
        return rows

    def aggregate(self, rows: list[Row]) -> dict[str, float]:
        # Recomputed from the stored log-likelihoods, so rows re-aggregate without the model.
        recomputed = [
            choice_metrics(r["loglikelihoods"], r["choice_chars"], r["choice_bytes"], r["gold"]) for r in rows
        ]
        return {metric: mean_of(recomputed, metric) for metric in self.metrics}
