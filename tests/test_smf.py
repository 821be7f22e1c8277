"""Mechanism tests of sparse memory finetuning (training/methods/smf.py, training/methods/memory) on a tiny
random Llama.

What the method promises: the prepared model computes what the base model does; only memory values
train; per step only the top-t slots by TF-IDF change (Adam momentum included); the access
statistics are method state; checkpoints hold the memory, stored as its written rows, never the
backbone.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from data.fields import build_dataclass, field_problems
from training.methods import METHODS, MethodContext
from training.methods.memory import MEMORY_ATTR, read_background, resolve_layers, tfidf_top_t
from training.methods.smf import SmfOptions, SparseMemoryFinetune
from training.optimizer_options import CasmoOptions
from training.optimizers import OPTIMIZERS, SGD_RULE, UPDATE_ROWS, AdamW

VOCAB = 50


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def make(opts: SmfOptions | None = None, seed: int = 0) -> tuple[LlamaForCausalLM, SparseMemoryFinetune]:
    ctx = MethodContext(tokenizer=None, device=torch.device("cpu"), seed=0, lr=1e-2, period_names=["a", "b"])
    method = SparseMemoryFinetune(opts or SmfOptions(num_keys=16, key_dim=16, top_k=4, top_t=8), ctx)
    model = method.prepare(tiny_llama(seed))
    return model, method


def batch(seed: int = 1, rows: int = 4, width: int = 12) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, width), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some right padding: padded positions must not count as accesses
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def step(model, method, opt, b) -> None:
    model.train()
    model(**b).loss.backward()
    method.after_backward(model)
    opt.step()
    opt.zero_grad(set_to_none=True)
    method.after_optimizer_step(model)


def values(model) -> torch.Tensor:
    return model.model.layers[1].mlp.memory.values[0]


def test_registered():
    assert METHODS["smf"] is SparseMemoryFinetune


def test_prepare_leaves_outputs_unchanged_and_freezes_the_backbone():
    b = batch()
    base = tiny_llama()
    with torch.no_grad():
        before = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    model, method = make()
    with torch.no_grad():
        after = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(before, after), "zero-initialised values must leave the outputs bit-identical"
    groups = method.trainable_parameters(model)
    trainable = {id(p) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            assert not p.requires_grad, f"{name} should be frozen"
    assert all(f".{MEMORY_ATTR}.values." in n for n, p in model.named_parameters() if id(p) in trainable)


def test_memory_goes_to_three_quarters_depth_by_default_and_to_the_configured_ones():
    model, method = make()
    assert list(method.memories) == [1]  # 2 layers -> layer 1
    assert resolve_layers([], 30, "smf") == [22]  # SmolLM2-135M
    ctx = MethodContext(tokenizer=None, device=torch.device("cpu"), seed=0, lr=1e-2, period_names=["a"])
    m2 = SparseMemoryFinetune(SmfOptions(layers=[0, -1], num_keys=8, key_dim=8, top_k=2), ctx)
    m2.prepare(tiny_llama())
    assert list(m2.memories) == [0, 1]
    with pytest.raises(ValueError, match="layers"):
        SparseMemoryFinetune(SmfOptions(layers=[5], num_keys=8, key_dim=8, top_k=2), ctx).prepare(tiny_llama())


def test_tfidf_prefers_slots_rare_in_the_background():
    counts = torch.tensor([5, 5, 1, 0])
    doc_freq = torch.tensor([9, 0, 0, 0])  # slot 0 was read by all 9 earlier steps, slot 1 by none
    assert tfidf_top_t(counts, doc_freq, num_docs=9, top_t=1).tolist() == [1]
    # never-read slots are no candidates, however many are asked for
    assert sorted(tfidf_top_t(counts, doc_freq, num_docs=9, top_t=10).tolist()) == [0, 1, 2]
    # no background yet: plain frequency, ties to the lower index
    assert tfidf_top_t(torch.tensor([2, 3, 3]), torch.zeros(3), 0, 2).tolist() == [1, 2]
    idf_common = math.log(10 / 10) + 1
    idf_rare = math.log(10 / 1) + 1
    assert 5 * idf_rare > 5 * idf_common  # the formula the docstring states


def test_a_step_updates_only_the_chosen_slots_even_with_adam_momentum():
    model, method = make()
    groups = method.trainable_parameters(model)
    opt = AdamW(groups, lr=1e-2)
    seen: set[int] = set()
    for i in range(4):  # later steps: Adam moments from earlier steps are non-zero for old rows
        before = values(model).detach().clone()
        step(model, method, opt, batch(seed=i))
        chosen = set(method.updater.last_selected[1].tolist())
        changed = set(torch.nonzero((values(model) != before).any(-1)).flatten().tolist())
        assert changed, "a step must write something"
        assert changed <= chosen, f"rows outside the top-t changed: {sorted(changed - chosen)[:5]}"
        assert len(chosen) <= method.cfg.top_t
        seen |= changed
    assert method.updater.num_docs == 4
    assert len(seen) > method.cfg.top_t, "different batches choose different slots"


def test_padding_is_not_an_access():
    model, method = make()
    method.trainable_parameters(model)
    b = batch()
    b["attention_mask"][:] = 0
    b["attention_mask"][:, 0] = 1  # one real token per row
    model.train()
    model(**b)
    assert int(method.memories[1].counts.sum()) == b["input_ids"].shape[0] * method.cfg.top_k


def test_background_counts_are_method_state_and_round_trip():
    model, method = make()
    opt = AdamW(method.trainable_parameters(model), lr=1e-2)
    for i in range(3):
        step(model, method, opt, batch(seed=i))
    state = method.state_dict()
    assert state["access"]["num_docs"] == 3
    assert int(state["access"]["doc_freq"]["1"].max()) <= 3 and int(state["access"]["doc_freq"]["1"].sum()) > 0
    other_model, other = make(seed=5)
    other.load_state_dict(state)
    assert torch.equal(other.state_dict()["access"]["doc_freq"]["1"], state["access"]["doc_freq"]["1"])


def test_checkpoint_is_memory_only_sparse_and_round_trips(tmp_path):
    model, method = make()
    opt = AdamW(method.trainable_parameters(model), lr=1e-2)
    step(model, method, opt, batch())
    state = method.trainable_state_dict(model)
    assert state and all(f".{MEMORY_ATTR}." in k for k in state), "no backbone tensor in a checkpoint"
    rows_key = next(k for k in state if k.endswith(".rows"))
    assert 0 < len(state[rows_key]) <= method.cfg.top_t  # only written rows are stored
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "t.safetensors"))
    loaded = load_file(str(tmp_path / "t.safetensors"))
    other_model, other = make(seed=0)
    other.load_trainable_state_dict(other_model, loaded)
    assert torch.equal(values(other_model), values(model))
    b = batch(seed=9)
    with torch.no_grad():
        assert torch.equal(other_model(**b).logits, model(**b).logits)
    with pytest.raises(RuntimeError, match="mismatch"):
        other.load_trainable_state_dict(other_model, {k: v for k, v in state.items() if k != rows_key})


def test_options_validate():
    assert SmfOptions().validate() == []
    # each field's range is declared (data/fields.py); validate() adds the cross-field rules
    problems = field_problems(SmfOptions(key_dim=3, top_k=0, top_t=0, lr=-1), "method.smf")
    assert len(problems) == 3 and all(p.startswith("method.smf.") for p in problems)
    assert SmfOptions(key_dim=3).validate() == ["method.smf.key_dim must be an even number (got 3)"]
    assert SmfOptions(num_keys=4, top_k=5).validate() == ["method.smf.top_k must be in [1, num_keys=4] (got 5)"]


def test_options_reject_unknown_rules():
    problems: list[str] = []
    build_dataclass(SmfOptions, {"value_rule": "adam", "background": "corpus"}, "method.smf", problems)
    assert len(problems) == 2 and all(p.startswith("method.smf.") for p in problems), problems


class _Train:
    lr, betas, weight_decay = 1e-2, (0.9, 0.999), 0.01
    casmo = CasmoOptions(calibration_steps=2)  # calibrates within the test's 5 steps


def test_an_sgd_group_takes_a_plain_sgd_step_and_the_base_rule_never_sees_it():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))
    ref_b = torch.nn.Parameter(b.detach().clone())
    opt = OPTIMIZERS["adamw"]([{"params": [a], "lr": 0.5, "rule": SGD_RULE}, {"params": [b]}], _Train())
    ref = torch.optim.AdamW([ref_b], lr=_Train.lr, betas=_Train.betas, weight_decay=_Train.weight_decay)
    for _ in range(3):
        a0 = a.detach().clone()
        ga, gb = torch.randn(5, 3), torch.randn(4)
        a.grad, b.grad, ref_b.grad = ga.clone(), gb.clone(), gb.clone()
        opt.step()
        ref.step()
        assert torch.equal(a, a0 - 0.5 * ga)  # no momentum, no weight decay
        assert torch.equal(b, ref_b)  # the other group is plain AdamW, to the bit
        assert torch.equal(a.grad, ga)  # the gradient is back after the step (logging may read it)
    assert a not in opt.state and b in opt.state
    # the rule survives a checkpoint: param_groups round-trip through state_dict
    again = OPTIMIZERS["adamw"]([{"params": [a], "lr": 0.5, "rule": SGD_RULE}, {"params": [b]}], _Train())
    again.load_state_dict(opt.state_dict())
    assert again.param_groups[0]["rule"] == SGD_RULE


def test_value_rule_sgd_moves_exactly_the_chosen_rows_by_lr_times_grad():
    model, method = make(SmfOptions(num_keys=16, key_dim=16, top_k=4, top_t=8, lr=3.0, value_rule="sgd"))
    groups = method.trainable_parameters(model)
    assert groups[0]["rule"] == SGD_RULE and groups[0]["lr"] == 3.0
    opt = OPTIMIZERS["adamw"](groups, _Train())
    for i in range(3):
        before = values(model).detach().clone()
        model.train()
        model(**batch(seed=i)).loss.backward()
        method.after_backward(model)
        grad = values(model).grad.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(model)
        chosen = method.updater.last_selected[1]
        others = torch.ones(len(before), dtype=torch.bool)
        others[chosen] = False
        assert torch.equal(values(model)[others], before[others])
        # add_(alpha=) may fuse the multiply-add, so the chosen rows agree to rounding
        torch.testing.assert_close(values(model)[chosen], before[chosen] - 3.0 * grad[chosen], rtol=0, atol=1e-6)
        assert (values(model)[chosen] != before[chosen]).any()
    assert not opt.state, "no optimizer state for SGD rows"


class _CharTokenizer:
    """Enough of a tokenizer for read_background: one id per character."""

    eos_token_id, pad_token_id = 1, 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[2 + ord(c) % (VOCAB - 2) for c in t] for t in texts]}


def test_passages_background_counts_each_text_once_and_stays_fixed_through_the_period():
    texts = ["abcabcabc", "xyz", "the same slots", "abc"]  # different lengths: the batch has padding
    model, method = make(SmfOptions(num_keys=16, key_dim=16, top_k=4, top_t=8, background="passages"))
    method.ctx.tokenizer = _CharTokenizer()
    mem = method.memories[1]
    # reference: each text alone, the slots it reads at least once
    expected = torch.zeros(mem.num_slots, dtype=torch.long)
    for t in texts:
        freq, num = read_background(model, method.memories, method.ctx.tokenizer, [t], 64)
        assert num == 1 and int(freq[1].max()) == 1
        expected += freq[1]
    assert method.on_period_start(model, None, texts) == texts
    assert method.updater.num_docs == len(texts)
    assert torch.equal(method.updater.doc_freq[1], expected)
    opt = AdamW(method.trainable_parameters(model), lr=1e-2)
    step(model, method, opt, batch())
    assert method.updater.num_docs == len(texts)  # training steps are not added to this background
    assert torch.equal(method.updater.doc_freq[1], expected)
    assert mem.seq_counts is None  # only counted while a background is read


@pytest.mark.slow
def test_sgd_and_passages_background_resume_exactly(tmp_path, monkeypatch):
    """The contract matrix's stop-and-resume test (tests/test_method_contract.py) with the non-default
    value rule and background, whose state lives in the optimizer groups and in on_period_start."""
    from tests import test_method_contract as contract

    extra = ["--set", "method.smf.value_rule=sgd", "--set", "method.smf.lr=100",
             "--set", "method.smf.background=passages"]
    monkeypatch.setattr(contract, "TINY", [*contract.TINY, *extra])
    contract.test_signal_in_period_three_then_resume_equals_uninterrupted("smf", tmp_path, monkeypatch)


def test_prefix_mean_query_reads_the_same_slots_with_a_kv_cache_and_ignores_padding():
    """query=prefix_mean keeps running sums across decoding steps: generation must read what a full
    forward reads, and padding must take no part in the mean."""
    model, method = make(SmfOptions(num_keys=16, key_dim=16, top_k=4, top_t=8, query="prefix_mean"))
    mem = method.memories[1]
    mem.keep_lookup = True
    ids = torch.randint(2, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(input_ids=ids)
        full = mem.last_lookup[0][0]
        out = model(input_ids=ids[:, :6], use_cache=True)
        steps = []
        for t in range(6, 9):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(mem.last_lookup[0][0, -1])
    assert torch.equal(torch.stack(steps), full[6:])
    x = torch.randn(2, 5, 8)
    mem.token_mask, mem.past_len = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), 0
    mean = mem._prefix_mean(x)
    torch.testing.assert_close(mean[0, 2:], x[0, 2:].cumsum(0) / torch.arange(1, 4).unsqueeze(-1))
    torch.testing.assert_close(mean[1], x[1].cumsum(0) / torch.arange(1, 6).unsqueeze(-1))


def _dense_then_restore(p: torch.nn.Parameter, opt: torch.optim.Optimizer, rows: torch.Tensor) -> None:
    """The rule update_rows replaces: a dense step, then every other row put back."""
    before = p.detach().clone()
    opt.step()
    others = torch.ones(len(p), dtype=torch.bool)
    others[rows] = False
    with torch.no_grad():
        p[others] = before[others]


@pytest.mark.parametrize("name", ["adamw", "casmo"])
def test_update_rows_moves_those_rows_exactly_as_a_dense_step_and_no_other(name):
    # AdamW's row-restricted update must equal torch's dense AdamW on the chosen rows to the bit (the
    # docs' smf numbers were measured with the dense step); casmo takes the generic dense-and-restore path
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 8))
    ref = torch.nn.Parameter(p.detach().clone())
    opt = OPTIMIZERS[name]([{"params": [p]}], _Train())
    ref_opt = (torch.optim.AdamW([ref], lr=_Train.lr, betas=_Train.betas, weight_decay=_Train.weight_decay)
               if name == "adamw" else OPTIMIZERS[name]([{"params": [ref]}], _Train()))
    for i in range(5):
        rows = torch.randperm(64)[:10]
        grad = torch.zeros(64, 8)
        grad[rows] = torch.randn(10, 8)
        p.grad, ref.grad = grad.clone(), grad.clone()
        setattr(p, UPDATE_ROWS, rows)
        before = p.detach().clone()
        opt.step()
        _dense_then_restore(ref, ref_opt, rows)
        assert getattr(p, UPDATE_ROWS) is None, "the step consumes the attribute"
        assert torch.equal(p, ref), f"step {i}: differs from a dense step restricted to the rows"
        assert not torch.equal(p[rows], before[rows])
        assert torch.equal(p.grad, grad)  # the gradient is back after the step
    torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[ref]["exp_avg"], rtol=0, atol=0)
    # the state is torch's: a checkpoint of the row rule loads into a plain AdamW and back
    if name == "adamw":
        torch.optim.AdamW([ref], lr=_Train.lr).load_state_dict(opt.state_dict())
