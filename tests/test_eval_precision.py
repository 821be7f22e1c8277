"""Evaluation in bf16 and within a memory budget (issue 25, items 8-9): the scoring positions' output
layer runs in fp32, so a bf16 model chooses what its fp32 twin chooses where bf16 logits tie; the
perplexity window is capped; eval batches respect a token budget and score what unbatched forwards do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from data import DataConfig, load_benchmark
from eval_and_metrics import evaluate as ev
from eval_and_metrics.scorers.multiple_choice import choice_metrics
from training.config import ModelConfig
from training.models import build_synthetic

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def twins():
    """The tiny synthetic model in bf16 and the same (bf16-rounded) weights in fp32, and its tokenizer."""
    bench = load_benchmark("temporalwiki", DataConfig(num_facts=8))
    model, tok = build_synthetic(ModelConfig(), bench, seed=0)
    bf16 = model.to(torch.bfloat16).eval()
    return bf16, copy.deepcopy(bf16).float(), tok, [p.prompt for p in bench.all_probes()]


def _last_logits(model: nn.Module, tok, prompts: list[str]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ev.encode(tok, p)])).logits[0, -1] for p in prompts]


def _choices(model: nn.Module, tok, contexts: list[list[int]], pairs: list[tuple[int, int]]) -> list[int]:
    """The multiple-choice scorer's pick (its log-likelihoods, its first-on-ties argmax) of each
    one-token two-way item, scored in batches of 64 requests."""
    ctx = [c for c in contexts for _ in range(2)]
    cont = [[t] for pair in pairs for t in pair]
    lls = []
    for start in range(0, len(ctx), 64):
        lls += [lp.double().sum().item() for lp in ev.continuation_logprobs(
            model, ctx[start:start + 64], cont[start:start + 64], tok.pad_token_id, CPU)]
    return [choice_metrics(lls[2 * i:2 * i + 2], [1, 1], [1, 1], 1)["pred_index"] for i in range(len(pairs))]


def test_bf16_multiple_choice_chooses_what_fp32_chooses_where_bf16_logits_tie(twins):
    """Items: every pair of the fp32 model's 6 likeliest next tokens after each probe prompt, its loser
    first, so a tie (which goes to the first choice, as in lm-eval) picks the answer fp32 does not."""
    bf16, fp32, tok, prompts = twins
    logits32, logits16 = _last_logits(fp32, tok, prompts), _last_logits(bf16, tok, prompts)
    contexts, pairs, ties = [], [], 0
    for prompt, l32, l16 in zip(prompts, logits32, logits16):
        top = l32.topk(6).indices.tolist()
        for a in top:
            for b in top:
                if l32[a] < l32[b]:
                    contexts.append(ev.encode(tok, prompt))
                    pairs.append((a, b))
                    ties += bool(l16[a] == l16[b])
    # the condition: the bf16 output layer's own logits tie on some items (the old scorer chose 0 there)
    assert ties >= 5, f"only {ties} ties: the items no longer show the bf16 rounding"
    assert _choices(fp32, tok, contexts, pairs) == [1] * len(pairs)
    assert _choices(bf16, tok, contexts, pairs) == [1] * len(pairs)


def test_the_fp32_head_in_blocks_equals_one_fp32_log_softmax(monkeypatch):
    """bf16 weights are upcast a block of vocabulary rows at a time, positions a block at a time; the
    numbers are those of one fp32 log-softmax over the whole upcast layer."""
    gen = torch.Generator().manual_seed(0)
    head = nn.Linear(16, 50, bias=True).to(torch.bfloat16)
    hidden = (torch.randn(37, 16, generator=gen) * 3).bfloat16()
    targets = torch.randint(0, 50, (37,), generator=gen)
    reference = torch.log_softmax(nn.functional.linear(hidden.float(), head.weight.float(), head.bias.float()), -1)
    expected = reference.gather(-1, targets[:, None]).squeeze(-1)
    monkeypatch.setattr(ev, "SCORE_VOCAB_ROWS", 8)  # 7 blocks of rows, the last one short
    monkeypatch.setattr(ev, "SCORE_BLOCK_ELEMENTS", 8 * 5)  # 5 positions a block
    assert torch.allclose(ev.target_logprobs(head, hidden, targets), expected, atol=1e-5, rtol=0)
    # a head of another kind (LoRA-wrapped, quantized) runs as itself, its logits upcast after
    wrapped = nn.Sequential(head)
    wrapped.out_features = 50
    rounded = torch.log_softmax(head(hidden).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.equal(ev.target_logprobs(wrapped, hidden, targets), rounded)


def test_scoring_goes_through_a_peft_wrapper_and_matches_its_full_logits(twins):
    from peft import LoraConfig, get_peft_model

    _, fp32, tok, prompts = twins
    model = get_peft_model(copy.deepcopy(fp32), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    contexts = [ev.encode(tok, p) for p in prompts[:3]]
    conts = [ev.encode(tok, p)[:n] for p, n in zip(prompts[3:6], (1, 4, 2))]
    got = ev.continuation_logprobs(model, contexts, conts, tok.pad_token_id, CPU)
    with torch.no_grad():
        for c, x, lp in zip(contexts, conts, got):
            logp = torch.log_softmax(model(input_ids=torch.tensor([c + x])).logits[0].float(), -1)
            want = logp[len(c) - 1:-1].gather(-1, torch.tensor(x)[:, None]).squeeze(-1)
            assert torch.allclose(lp, want, atol=1e-5)
    assert not model.get_output_embeddings()._forward_pre_hooks, "the hook is removed"
