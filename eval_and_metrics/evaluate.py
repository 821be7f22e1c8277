"""Batched probe evaluation: greedy generation and teacher-forced gold log-probability.

Probes are sorted by prompt length and run in batches with left padding, so one `generate` call
(KV cache on) serves a whole batch; there is no per-probe generate loop. For each probe we keep the
cleaned prediction and three scores: normalised exact match, SQuAD token F1, and the mean
log-probability of the gold value's tokens given the prompt (length-normalised, teacher forced).

The low-level pieces (encoding, left padding, one batch of greedy generation, per-token
log-probabilities of continuations over a left-padded batch, the lm-eval context/continuation split)
are shared with the task-stream scorers in eval_and_metrics/scorers/.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import StoppingCriteria, StoppingCriteriaList

from data.schema import Probe
from eval_and_metrics.padding import pad, token_batches
from eval_and_metrics.scoring import clean_generation, exact_match, token_f1
from eval_and_metrics.shard import ONE, Shard


@dataclass
class ProbeResult:
    id: str
    prediction: str
    em: float
    f1: float
    logprob: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "prediction": self.prediction, "em": self.em, "f1": self.f1, "logprob": self.logprob}


class EvalInterrupted(Exception):
    """A stop was requested between two eval batches; the period is redone from its checkpoint."""


@dataclass(frozen=True)
class Budget:
    """How large one eval forward may be (eval.max_length, eval.max_tokens_per_batch in the run config).

    The model's own position table is no bound on a GPU: Llama 3 says 131,072, and one perplexity
    window that long does not fit beside an 8B model. Batches are bounded in padded tokens as well as in
    items, so a batch of long texts is smaller than a batch of short ones."""

    max_length: int = 0  # longest sequence a forward sees; 0 = the model's position table alone
    max_tokens: int = 0  # padded tokens (items x longest) per batch; 0 = the item count alone

    def window(self, model: nn.Module) -> int:
        positions = model_max_length(model)
        return min(positions, self.max_length) if self.max_length else positions


UNBOUNDED = Budget()


def owned_batches(
    order: list[int],
    batch_size: int,
    shard: Shard,
    should_stop: Callable[[], bool],
    lengths: list[int] | None = None,
    max_tokens: int = 0,
) -> Iterator[list[int]]:
    """The batches of `order` (indices, in one process's batch order; see token_batches) that this rank
    computes. Before every batch, owned or not, the ranks agree on a stop (EvalInterrupted), so they all
    leave at the same one."""
    for number, batch in enumerate(token_batches(order, batch_size, lengths, max_tokens)):
        if shard.agree(should_stop()):
            raise EvalInterrupted()
        if shard.owns(number):
            yield batch


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with no special tokens (training never adds them either)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad(seqs, pad_id, left=True)
    return ids.to(device), mask.to(device)


# The names tests/test_evaluate.py and older callers use.
_encode = encode
_left_pad = left_pad


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-eval-harness splits a loglikelihood request.

    Trailing whitespace of the context is moved to the continuation (BPE tokenizers glue a space to
    the word after it: " Paris" is one token, "Answer: " + "Paris" would score a rare lone-space
    token), then the whole text is encoded once and the continuation is what follows the context's
    tokens, so its tokens are exactly those the model would see in the joined text. lm-eval slices
    without checking that the context's own encoding is a prefix of the whole; when a merge crosses
    the boundary it is not, and we fall back to encoding the continuation on its own rather than
    scoring a slice that no longer spells the continuation. An empty context is the caller's job
    (lm-eval conditions on a prefix token then, see `prefix_token_id`).
    """
    assert context, "an empty context has no boundary to split at; condition on prefix_token_id instead"
    num_spaces = len(context) - len(context.rstrip())
    if num_spaces:
        context, continuation = context[:-num_spaces], context[-num_spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    if whole[: len(context_ids)] == context_ids:
        return context_ids, whole[len(context_ids) :]
    return context_ids, encode(tokenizer, continuation)


def prefix_token_id(tokenizer) -> int:
    """What an empty context conditions on (lm-eval's choice): BOS if the tokenizer has one, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def model_max_length(model: nn.Module, default: int = 2048) -> int:
    """The longest sequence the model was built for (its position table), `default` if it does not say."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


# Elements of one fp32 logits block of the scoring head (positions x vocabulary rows): 256 MiB, so a
# 2048-token window over a 128k vocabulary never holds its full fp32 logits (1 GiB per row) at once.
SCORE_BLOCK_ELEMENTS = 1 << 26
# Vocabulary rows of the head upcast to fp32 at a time (bf16 weights): 32k x 4096 x 4 bytes = 512 MiB at 8B.
SCORE_VOCAB_ROWS = 1 << 15


def target_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each of n positions (hidden: (n, d), targets: (n,)), in fp32 blocks.

    A float nn.Linear head is applied in fp32 to the hidden states (exact upcasts of bf16 values), so
    the logits are not rounded to bf16 first: at logits of 8-16 bf16 steps are 0.0625, which ties
    one-token choices. Only the target's logit and the logsumexp are kept, a block at a time. A head
    of another kind (a LoRA-wrapped or quantized one) runs as itself and its logits are upcast after.
    """
    weight = getattr(head, "weight", None)
    # the head when it is a float nn.Linear (typed as one from here on), else None
    linear = (
        head
        if isinstance(head, nn.Linear) and isinstance(weight, torch.Tensor) and weight.is_floating_point()
        else None
    )
    vocab = linear.weight.shape[0] if linear is not None else int(getattr(head, "out_features", SCORE_VOCAB_ROWS))
    # fp32 weights need no upcast copy, so they are used whole (and the numbers are log_softmax's, as before)
    vocab_rows = vocab if linear is not None and linear.weight.dtype == torch.float32 else min(vocab, SCORE_VOCAB_ROWS)
    step = max(1, SCORE_BLOCK_ELEMENTS // vocab_rows)
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.shape[0], step):
        h, t = hidden[start : start + step], targets[start : start + step].unsqueeze(-1)
        if linear is None or vocab_rows == vocab:
            bias = linear.bias.float() if linear is not None and linear.bias is not None else None
            logits = F.linear(h.float(), linear.weight.float(), bias) if linear is not None else head(h)
            out[start : start + step] = torch.log_softmax(logits.float(), dim=-1).gather(-1, t).squeeze(-1)
            continue
        h32 = h.float()
        picked = torch.zeros(t.shape, dtype=torch.float32, device=h.device)
        sums = []
        for v0 in range(0, vocab, vocab_rows):
            bias = linear.bias[v0 : v0 + vocab_rows].float() if linear.bias is not None else None
            logits = F.linear(h32, linear.weight[v0 : v0 + vocab_rows].float(), bias)
            sums.append(logits.logsumexp(-1, keepdim=True))
            inside = (t >= v0) & (t < v0 + logits.shape[-1])
            picked = torch.where(inside, logits.gather(-1, (t - v0).clamp(0, logits.shape[-1] - 1)), picked)
        out[start : start + step] = (picked - torch.cat(sums, dim=-1).logsumexp(-1, keepdim=True)).squeeze(-1)
    return out


def output_head(model: nn.Module) -> nn.Module:
    # a transformers model's method (nn.Module, the type here, does not declare it), through peft wrappers
    # too (they forward attribute lookups)
    head = model.get_output_embeddings()  # type: ignore[operator]
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings to score with")
    return head


@contextmanager
def scoring_head(
    model: nn.Module, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor
) -> Iterator[list[torch.Tensor]]:
    """Inside it, one forward of `model` yields log p(targets) at hidden positions (rows, cols) of the
    output layer's input in the returned list, and the layer itself runs on no position (empty logits).

    The work is done in a forward pre-hook of the output layer, so the model's own forward runs as always
    (peft wrappers, the memory methods' MLP hooks, FSDP's unsharded weights, a method's eval_scope)."""
    found: list[torch.Tensor] = []
    head = output_head(model)

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        found.append(target_logprobs(module, hidden[rows, cols], targets))
        return (hidden[:, :0], *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield found
    finally:
        handle.remove()


# no_grad, not inference_mode: under FSDP the forward all-gathers weights into buffers that training
# reuses, and a tensor created in inference mode can never be updated in place afterwards.
@torch.no_grad()
def continuation_logprobs(
    model: nn.Module, contexts: list[list[int]], continuations: list[list[int]], pad_id: int, device: torch.device
) -> list[torch.Tensor]:
    """log p(token | context, earlier continuation tokens) for every continuation token, one forward pass.

    One float32 tensor per pair (on `device`), of the continuation's length. Every continuation must
    hold at least one token, every context too (the first continuation token is predicted from it).
    The output layer runs in fp32 at the scored positions only (scoring_head).
    """
    assert all(contexts) and all(continuations), "contexts and continuations must be non-empty"
    seqs = [c + x for c, x in zip(contexts, continuations)]
    ids, mask = left_pad(seqs, pad_id, device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    # Left padding puts every continuation at the end, so only the last `keep` hidden states reach the
    # output layer; of those, row r's positions -1 - len(x_r) .. -2 predict its continuation (j predicts j + 1).
    keep = max(len(x) for x in continuations) + 1
    rows = torch.tensor([r for r, x in enumerate(continuations) for _ in x], dtype=torch.long, device=device)
    # counted from the end, so they hold however many positions the model passes on
    cols = torch.tensor([k - 1 - len(x) for x in continuations for k in range(len(x))], dtype=torch.long, device=device)
    targets = ids[rows, cols + ids.shape[1] + 1]
    with scoring_head(model, rows, cols, targets) as found:
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=keep)
    (token_logp,) = found
    return list(torch.split(token_logp, [len(x) for x in continuations]))


# Attention implementations that take a custom 4D mask, and the form each wants it in: SDPA a boolean
# mask (True = may attend), eager an additive float mask (it adds the mask to the scores, so a boolean
# one would add 0 and 1). Flash attention and flex attention take no dense 4D mask; a model running
# them is scored one request at a time.
PACKED_MASK_KINDS = {"sdpa": "bool", "eager": "additive"}


# Packages whose forward hooks never mix positions (FSDP's all-gathers, accelerate's device moves, ...).
POSITIONWISE_HOOK_PACKAGES = frozenset({"torch", "transformers", "peft", "accelerate"})


def _hook_package(hook: Any) -> str:
    fn = getattr(hook, "func", hook)  # functools.partial
    fn = getattr(fn, "__func__", fn)  # a bound method
    return (getattr(fn, "__module__", None) or "").split(".")[0]


def packed_mask_kind(model: nn.Module) -> str | None:
    """How a packed row's mask is handed to `model` ("bool", "additive"), None when it cannot be.

    Packing is exact only if positions mix through attention alone. A module says what its own extra
    code does with `mixes_positions`: True (casm's router pools over the row, smf's prefix_mean query
    averages the prefix) refuses packing, False (a per-token memory lookup) allows it. A module with a
    forward hook from outside torch/transformers/peft/accelerate and no such word is taken to mix
    positions: an unknown hook costs speed (one request at a time), never a wrong number."""
    for module in model.modules():
        declared = getattr(module, "mixes_positions", None)
        if declared:
            return None
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if declared is None and any(_hook_package(h) not in POSITIONWISE_HOOK_PACKAGES for h in hooks):
            return None
    config = getattr(model, "config", None)
    return PACKED_MASK_KINDS.get(str(getattr(config, "_attn_implementation", None)))


def packed_row(context: list[int], continuations: list[list[int]]) -> list[int]:
    """The tokens one forward of a shared context sees: the context, then every continuation but its last
    token (the last one is only predicted, never fed; a one-token continuation feeds nothing)."""
    return context + [t for cont in continuations for t in cont[:-1]]


def packed_inputs(
    contexts: list[list[int]], groups: list[list[list[int]]], pad_id: int, mask_kind: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, 4D attention mask, position_ids) of left-padded packed rows (see packed_row).

    In row r every continuation's tokens sit at positions len(context) onwards, as they would after the
    context alone, and see the context and their own earlier tokens, never another continuation's
    nor padding."""
    seqs = [packed_row(c, g) for c, g in zip(contexts, groups)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(seqs), width), dtype=torch.long)
    # segment of each column: -1 padding, 0 the context, j + 1 continuation j
    segment = torch.full((len(seqs), width), -1, dtype=torch.long)
    for r, (context, group, seq) in enumerate(zip(contexts, groups, seqs)):
        start = width - len(seq)
        ids[r, start:] = torch.tensor(seq, dtype=torch.long)
        num = len(context)
        positions[r, start : start + num] = torch.arange(num)
        segment[r, start : start + num] = 0
        col = start + num
        for j, cont in enumerate(group):
            fed = len(cont) - 1
            positions[r, col : col + fed] = torch.arange(num, num + fed)
            segment[r, col : col + fed] = j + 1
            col += fed
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # the context, or an earlier token of one's own segment (padding sees padding: a query that may see
    # nothing gives NaN under SDPA; padding's outputs are never read)
    mask = (causal & ((key == 0) | (key == query))).unsqueeze(1)
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return ids, mask, positions


@torch.no_grad()
def shared_context_logprobs(
    model: nn.Module,
    contexts: list[list[int]],
    groups: list[list[list[int]]],
    pad_id: int,
    device: torch.device,
    mask_kind: str,
) -> list[list[torch.Tensor]]:
    """log p(token | context, earlier tokens of the same continuation) for every token of every
    continuation in groups[r] after contexts[r], each context run once (one forward for the batch).

    The same numbers as continuation_logprobs on every (context, continuation) pair, up to float
    summation order: the rows hold the context once and the continuations side by side behind it,
    kept apart by the attention mask and by position ids that restart after the context for each
    (packed_inputs). mask_kind comes from packed_mask_kind. The output layer runs in fp32 at the
    scored positions only (scoring_head)."""
    assert all(contexts) and all(groups) and all(all(g) for g in groups), "contexts and continuations must be non-empty"
    dtype = model.get_input_embeddings().weight.dtype  # type: ignore[operator]  # a transformers model's method
    dtype = dtype if dtype.is_floating_point else torch.float32
    ids, mask, positions = packed_inputs(contexts, groups, pad_id, mask_kind, dtype)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    rows_l: list[int] = []
    cols_l: list[int] = []
    targets_l: list[int] = []
    # Columns counted from the end (the rows are left-padded): a row's scored positions are its last
    # context token and every fed continuation token, so only the last `keep` hidden states are needed.
    keep = 1
    for r, (context, group) in enumerate(zip(contexts, groups)):
        fed = sum(len(c) - 1 for c in group)
        keep = max(keep, fed + 1)
        last_context = -1 - fed  # the column of the context's last token
        col = last_context + 1
        for cont in group:
            # token 0 from the context's last position, token k from the continuation's own token k - 1
            cols_l.extend([last_context] + list(range(col, col + len(cont) - 1)))
            rows_l.extend([r] * len(cont))
            targets_l.extend(cont)
            col += len(cont) - 1
    rows = torch.tensor(rows_l, dtype=torch.long, device=device)
    cols = torch.tensor(cols_l, dtype=torch.long, device=device)
    targets = torch.tensor(targets_l, dtype=torch.long, device=device)
    with scoring_head(model, rows, cols, targets) as found:
        model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep)
    (token_logp,) = found
    flat = torch.split(token_logp, [len(c) for g in groups for c in g])
    out: list[list[torch.Tensor]] = []
    start = 0
    for group in groups:
        out.append(list(flat[start : start + len(group)]))
        start += len(group)
    return out


@torch.no_grad()
def _gold_logprobs(
    model: nn.Module, prompts: list[list[int]], golds: list[list[int]], pad_id: int, device: torch.device
) -> list[float]:
    """Mean log p(gold token | prompt, earlier gold tokens) per probe, in one forward pass."""
    return [lp.mean().item() for lp in continuation_logprobs(model, prompts, golds, pad_id, device)]


class _StopWhenDone(StoppingCriteria):
    """Finishes row r once `done(r, decoded continuation of r)` holds.

    `done` must only hold when the text so far already decides the score (the answer span is cut),
    so stopping there saves decoding steps without changing any result; a finished row is padded.
    Each check decodes every unfinished row in full, which grows with the length; since stopping a
    few tokens late is just as correct, rows are checked at every one of the first 32 steps, then
    every step // 32 steps (about 120 checks instead of 512 for 512 new tokens).
    """

    def __init__(self, tokenizer, prompt_width: int, done: Callable[[int, str], bool]) -> None:
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.done = done
        self.finished: list[bool] | None = None
        self.last_checked = 0

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if self.finished is None:
            self.finished = [False] * input_ids.shape[0]
        step = input_ids.shape[1] - self.prompt_width
        rows = [r for r, f in enumerate(self.finished) if not f]
        if rows and step - self.last_checked >= max(1, step // 32):
            self.last_checked = step
            new = input_ids[rows, self.prompt_width :].tolist()
            eos = self.tokenizer.eos_token_id
            for r, ids, text in zip(rows, new, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
                # A row past EOS is already finished by generate (it only gets padding now).
                self.finished[r] = (eos is not None and eos in ids) or self.done(r, text)
        # transformers annotates the legacy torch.BoolTensor, which no tensor constructor's type is
        return torch.tensor(self.finished, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    device: torch.device,
    max_new_tokens: int,
    done: Callable[[int, str], bool] | None = None,
) -> list[str]:
    """Greedy continuations of one left-padded batch of prompts (one `generate` call, KV cache on).

    Returns the decoded new text of each prompt, special tokens dropped. `done(row, text)`, if
    given, stops a row early (see _StopWhenDone); rows also stop at EOS or after max_new_tokens.
    """
    pad_id = tokenizer.pad_token_id
    ids, mask = left_pad(prompts, pad_id, device)
    extra: dict[str, Any] = {}
    if done is not None:
        extra["stopping_criteria"] = StoppingCriteriaList([_StopWhenDone(tokenizer, ids.shape[1], done)])
    # a transformers model's method (nn.Module, the type here, does not declare it)
    generated = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,  # type: ignore[operator]
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )
    return tokenizer.batch_decode(generated[:, ids.shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def evaluate_probes(
    model: nn.Module,
    tokenizer,
    probes: list[Probe],
    device: torch.device,
    batch_size: int,
    max_new_tokens: int = 0,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int], None] | None = None,
    shard: Shard = ONE,
) -> list[ProbeResult]:
    """Score every probe; results come back in the order of `probes` (on every rank of `shard`)."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    prompts = [_encode(tokenizer, p.prompt) for p in probes]
    golds = [_encode(tokenizer, " " + p.value) for p in probes]
    if max_new_tokens <= 0:
        max_new_tokens = max((len(g) for g in golds), default=1) + 4
    order = sorted(range(len(probes)), key=lambda i: (len(prompts[i]), i))
    results: list[ProbeResult | None] = [None] * len(probes)
    for idx in owned_batches(order, batch_size, shard, should_stop):
        texts = generate_greedy(model, tokenizer, [prompts[i] for i in idx], device, max_new_tokens)
        logps = _gold_logprobs(model, [prompts[i] for i in idx], [golds[i] for i in idx], pad_id, device)
        for i, text, lp in zip(idx, texts, logps):
            pred = clean_generation(text)
            gold = probes[i].value
            results[i] = ProbeResult(probes[i].id, pred, exact_match(pred, gold), token_f1(pred, gold), lp)
        if progress is not None:
            progress(len(idx))
    model.train(was_training)
    return shard.merge(results)
