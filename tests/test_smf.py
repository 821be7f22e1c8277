"""Mechanism tests of sparse memory finetuning (training/methods/smf.py) on a tiny random Llama.

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

from data.fields import field_problems
from training.methods import METHODS, MethodContext
from training.methods.smf import MEMORY_ATTR, SmfOptions, SparseMemoryFinetune, resolve_layers, tfidf_top_t

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
    opt = torch.optim.AdamW(groups, lr=1e-2)
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
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=1e-2)
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
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=1e-2)
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
