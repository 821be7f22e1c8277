"""Evaluation in bf16 and within a memory budget (issue 25, items 8-9): the scoring positions' output
layer runs in fp32, so a bf16 model chooses what its fp32 twin chooses where bf16 logits tie; the
perplexity window is capped; eval batches respect a token budget and score what unbatched forwards do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from data import DataConfig, load_benchmark
from data.streams.schema import EvalItem
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
    assert torch.allclose(ev.target_logprobs(head, hidden, targets), expected, atol=1e-5, rtol=0)  # in one block
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


# -- item 9: bounded eval forwards ------------------------------------------------------------------

def test_token_batches_respect_the_budget_and_are_the_fixed_batches_without_one():
    order = list(range(10))
    lengths = [1, 2, 3, 4, 5, 6, 7, 8, 9, 30]
    assert ev.token_batches(order, 4) == ev.token_batches(order, 4, lengths, 0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    batches = ev.token_batches(order, 4, lengths, 16)
    assert [i for b in batches for i in b] == order
    assert batches == [[0, 1, 2, 3], [4, 5], [6, 7], [8], [9]]  # 30 alone is over the budget: a batch of one
    assert all(len(b) * max(lengths[i] for i in b) <= 16 for b in batches[:-1])


class _Widths:
    """Records (rows, width) of every forward of a model."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.seen.append(tuple(kwargs["input_ids"].shape))


def test_a_long_document_gets_a_capped_window_and_the_default_caps_llama3(twins):
    from eval_and_metrics.scorers.perplexity import Perplexity
    from training.config import RunConfig

    _, fp32, tok, prompts = twins
    doc = EvalItem("doc", "", " ".join(prompts[:12]))  # ~100 tokens, the model takes 512
    widths = _Widths(fp32)
    try:
        (capped,) = Perplexity().score(fp32, tok, [doc], CPU, 8, 0, budget=ev.Budget(max_length=32))
    finally:
        widths.handle.remove()
    assert max(w for _, w in widths.seen) <= 32 and capped["num_windows"] == sum(r for r, _ in widths.seen) > 2
    (whole,) = Perplexity().score(fp32, tok, [doc], CPU, 8, 0)
    assert whole["num_windows"] == 1 and whole["num_tokens"] == capped["num_tokens"]
    # the run's default bound: Llama 3's position table (131,072) is capped, a small model keeps its own
    cfg = RunConfig()
    budget = ev.Budget(cfg.eval.max_length, cfg.eval.max_tokens_per_batch)
    llama3 = nn.Module()
    llama3.config = type("Config", (), {"max_position_embeddings": 131072})()
    assert budget.window(llama3) == 4096 and budget.window(fp32) == 512
    # the bounds at their defaults leave the saved config (and so every pinned run id) as it was
    assert "max_length" not in cfg.to_dict()["eval"] and "max_tokens_per_batch" not in cfg.to_dict()["eval"]
    cfg.eval.max_length = 2048
    assert cfg.to_dict()["eval"]["max_length"] == 2048


@pytest.mark.parametrize("scorer_name", ["multiple_choice", "perplexity"])
def test_batches_respect_the_token_budget_and_score_what_unbatched_forwards_do(twins, scorer_name):
    from eval_and_metrics.scorers import SCORERS

    _, fp32, tok, prompts = twins
    if scorer_name == "perplexity":
        items = [EvalItem(f"p{i}", prompts[i] if i % 2 else "", " ".join(prompts[i + 1:i + 1 + i % 4]) + " ok")
                 for i in range(12)]
    else:
        items = [EvalItem(f"m{i}", " ".join(prompts[i:i + 1 + i % 3]), "was", ("was", "held", "the"), 0)
                 for i in range(12)]
    scorer = SCORERS[scorer_name]()
    budget = ev.Budget(max_tokens=60)
    widths = _Widths(fp32)
    try:
        batched = scorer.score(fp32, tok, items, CPU, 16, 0, budget=budget)
    finally:
        widths.handle.remove()
    assert all(rows * width <= 60 or rows == 1 for rows, width in widths.seen)
    assert any(rows > 1 for rows, _ in widths.seen) and len(widths.seen) > 3
    single = scorer.score(fp32, tok, items, CPU, 1, 0)
    key = "nll" if scorer_name == "perplexity" else "loglikelihoods"
    for a, b in zip(batched, single):
        assert a["id"] == b["id"] and a.get("pred_index") == b.get("pred_index")
        assert torch.allclose(torch.tensor(a[key], dtype=torch.float64), torch.tensor(b[key], dtype=torch.float64),
                              rtol=0, atol=1e-4)


# -- item 10: memory released or kept on the CPU ----------------------------------------------------

def test_gradients_and_optimizer_moments_are_freed_before_eval(tmp_path, monkeypatch):
    from training import cli, trainer

    made: list[torch.optim.Optimizer] = []
    adamw = trainer.OPTIMIZERS["adamw"]
    monkeypatch.setitem(trainer.OPTIMIZERS, "adamw", lambda *a: made.append(adamw(*a)) or made[-1])
    seen: list[tuple[int, int]] = []  # (params holding a .grad, optimizer states) at each eval
    evaluate = trainer.Trainer._evaluate

    def recording(self, desc):
        seen.append((sum(p.grad is not None for p in self.model.parameters()), sum(len(o.state) for o in made)))
        return evaluate(self, desc)

    monkeypatch.setattr(trainer.Trainer, "_evaluate", recording)
    assert cli.main(["--mode", "synthetic", "--set", "data.num_facts=8", "--set", "train.epochs=1",
                     "--set", "train.progress=false", "--method", "full_ft", "--run-root", str(tmp_path)]) == 0
    assert len(seen) == len(made) + 1 >= 3  # the base model and every period
    assert seen == [(0, 0)] * len(seen)


def test_checkpointed_weights_are_copied_to_the_cpu_not_cloned_on_the_gpu():
    """full_ft's trainable state (the whole model) used to be cloned on the GPU before it was written,
    a second copy of every weight beside training. A fake CUDA model (FakeTensorMode: no GPU, no data)
    shows where the copies land; on the CPU they are copies, not views."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from training.methods.full_ft import FullFineTune

    with FakeTensorMode():
        model = nn.Sequential(nn.Linear(4, 4, device="cuda"), nn.Linear(4, 2, device="cuda"))
        model[1].bias.requires_grad_(False)
        state = FullFineTune.trainable_state_dict(None, model)  # the base Method's implementation
    assert sorted(state) == ["0.bias", "0.weight", "1.weight"]
    assert {str(t.device) for t in state.values()} == {"cpu"}
    real = nn.Linear(3, 3)
    copied = FullFineTune.trainable_state_dict(None, real)
    assert copied["weight"].data_ptr() != real.weight.data_ptr() and not copied["weight"].requires_grad
    with torch.no_grad():
        real.weight.add_(1.0)
    assert not torch.equal(copied["weight"], real.weight)
