"""Batched probe evaluation: greedy generation and teacher-forced gold log-probability.

Probes are sorted by prompt length and run in batches with left padding, so one `generate` call
(KV cache on) serves a whole batch; there is no per-probe generate loop. For each probe we keep the
cleaned prediction and three scores: normalised exact match, SQuAD token F1, and the mean
log-probability of the gold value's tokens given the prompt (length-normalised, teacher forced).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from data.schema import Probe
from eval_and_metrics.scoring import clean_generation, exact_match, token_f1
from training.batching import pad


@dataclass
class ProbeResult:
    id: str
    prediction: str
    em: float
    f1: float
    logprob: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "prediction": self.prediction, "em": self.em, "f1": self.f1,
                "logprob": self.logprob}


class EvalInterrupted(Exception):
    """A stop was requested between two eval batches; the period is redone from its checkpoint."""


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad(seqs, pad_id, left=True)
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def _gold_logprobs(model: nn.Module, prompts: list[list[int]], golds: list[list[int]], pad_id: int,
                   device: torch.device) -> list[float]:
    """Mean log p(gold token | prompt, earlier gold tokens) per probe, in one forward pass."""
    seqs = [p + g for p, g in zip(prompts, golds)]
    ids, mask = _left_pad(seqs, pad_id, device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    # Left padding puts every gold answer at the end, so the vocabulary head (49k wide for SmolLM2)
    # only has to run on the last `keep` positions instead of the whole sequence.
    keep = max(len(g) for g in golds) + 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=keep).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position j predicts token j+1
    targets = ids[:, -(keep - 1):]
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return [token_logp[row, token_logp.shape[1] - len(gold):].mean().item() for row, gold in enumerate(golds)]


@torch.inference_mode()
def evaluate_probes(model: nn.Module, tokenizer, probes: list[Probe], device: torch.device, batch_size: int,
                    max_new_tokens: int = 0, should_stop: Callable[[], bool] = lambda: False,
                    progress: Callable[[int], None] | None = None) -> list[ProbeResult]:
    """Score every probe; results come back in the order of `probes`."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    prompts = [_encode(tokenizer, p.prompt) for p in probes]
    golds = [_encode(tokenizer, " " + p.value) for p in probes]
    if max_new_tokens <= 0:
        max_new_tokens = max((len(g) for g in golds), default=1) + 4
    order = sorted(range(len(probes)), key=lambda i: (len(prompts[i]), i))
    results: dict[int, ProbeResult] = {}
    for start in range(0, len(order), batch_size):
        if should_stop():
            raise EvalInterrupted()
        idx = order[start:start + batch_size]
        ids, mask = _left_pad([prompts[i] for i in idx], pad_id, device)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(generated[:, ids.shape[1]:], skip_special_tokens=True)
        logps = _gold_logprobs(model, [prompts[i] for i in idx], [golds[i] for i in idx], pad_id, device)
        for i, text, lp in zip(idx, texts, logps):
            pred = clean_generation(text)
            gold = probes[i].value
            results[i] = ProbeResult(probes[i].id, pred, exact_match(pred, gold), token_f1(pred, gold), lp)
        if progress is not None:
            progress(len(idx))
    model.train(was_training)
    return [results[i] for i in range(len(probes))]
