"""Shared-context multiple-choice scoring equals the per-request scorer it replaced.

MultipleChoice() packs each distinct context once with all of its choices' tokens behind it
(evaluate.shared_context_logprobs); MultipleChoice(shared_context=False) is the old path, one padded row
per (item, choice), kept as the reference. On random documents over a byte-level BPE (multi-token
choices, choices glued to the context with no delimiter so the first token merges across the boundary,
empty prompts that condition on BOS, prompts repeated across items, contexts truncated by the window)
both must choose the same answers and give log-likelihoods within 1e-4 nats, under SDPA and eager
attention, through a LoRA wrapper and a memory MLP hook, and on two ranks sharing the batches.

The model has sharp attention (query and key weights of unit scale): a fresh tiny Llama attends almost
uniformly, so shifted positions or one choice seeing another moved its log-likelihoods by only ~1e-5,
below the tolerance; here such a break moves them by more than 1e-3.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data.streams.schema import EvalItem
from eval_and_metrics import evaluate as ev
from eval_and_metrics.evaluate import Budget
from eval_and_metrics.scorers.multiple_choice import MultipleChoice, pack_requests

CPU = torch.device("cpu")
TOL = 1e-4
TEXT = ("The capital of France is Paris, and the capital of Italy is Rome. Question: which river runs "
        "through the old town of Veltrassa? Answer: the Amber, then the Grey; in 2019 the mayor was Ada.")


def bpe_tokenizer() -> Any:
    """A small byte-level BPE (the space belongs to the word after it, words merge across a boundary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def sharp_llama(vocab: int, attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         attn_implementation=attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.get_input_embeddings().weight.data.normal_(0.0, 1.0)
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.data.normal_(0.0, 1.0)  # attention that depends on where things are (see the module doc)
    return model.eval()


def random_items(n: int, seed: int) -> list[EvalItem]:
    """Documents cut from TEXT at random characters, so prompts end mid-word or in a space, and choices
    of one to several words; a third have no delimiter (the choice is glued to the prompt)."""
    rng = random.Random(seed)
    words = TEXT.split()
    items = []
    for i in range(n):
        start = rng.randrange(len(TEXT) - 40)
        prompt = TEXT[start:start + rng.randrange(0, 60)]
        if i % 7 == 3 or not prompt.strip():
            # conditions on BOS (a prompt of whitespace alone would leave an empty context: see the report)
            prompt = ""
        if i % 9 == 5 and items:
            prompt = items[-1].prompt  # the same context as the item before (shared across items)
        num = rng.randint(2, 5)
        choices: list[str] = []
        while len(choices) < num:
            cut = rng.randrange(len(TEXT) - 12)
            choice = (TEXT[cut:cut + rng.randint(1, 3)] if rng.random() < 0.4
                      else " ".join(rng.sample(words, rng.randint(1, 4))))
            if choice.strip() and choice not in choices:
                choices.append(choice)
        delimiter = rng.choice([None, " ", ""])
        if delimiter is None and not prompt:
            delimiter = " "
        items.append(EvalItem(f"d{i}", prompt, (delimiter or "") + choices[0], tuple(choices), rng.randrange(num),
                              delimiter=delimiter))
    return items


@pytest.fixture(scope="module")
def tok() -> Any:
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def items() -> list[EvalItem]:
    return random_items(40, seed=1)


def assert_same_rows(new: list[dict[str, Any]], old: list[dict[str, Any]]) -> None:
    for a, b in zip(new, old, strict=True):
        assert a["id"] == b["id"] and a["num_tokens"] == b["num_tokens"]
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=TOL), a["id"]
        for key in ("pred_index", "pred_index_norm", "pred_index_bytes", "prediction"):
            assert a[key] == b[key], (a["id"], key)


def count_forwards(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    model.mixes_positions = False  # this hook only counts (an undeclared hook would turn packing off)
    return calls


# ----------------------------------------------------------------------------------------------
# the packed layout


def test_packed_inputs_lay_out_one_context_and_its_choices() -> None:
    # context [5 6 7], choices [8 9] and [10] and [11 12 13]: fed are 8, (nothing), 11 12
    ids, mask, positions = ev.packed_inputs([[5, 6, 7]], [[[8, 9], [10], [11, 12, 13]]], 0, "bool", torch.float32)
    assert ids.tolist() == [[5, 6, 7, 8, 11, 12]]
    assert positions.tolist() == [[0, 1, 2, 3, 3, 4]]  # each choice starts right after the context
    assert mask.shape == (1, 1, 6, 6)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                         [1, 1, 0, 0, 0, 0],
                                         [1, 1, 1, 0, 0, 0],
                                         [1, 1, 1, 1, 0, 0],
                                         [1, 1, 1, 0, 1, 0],   # 11 never sees 8
                                         [1, 1, 1, 0, 1, 1]]
    # left padding: no real position sees padding (padding sees padding, never read); additive form for eager
    ids, mask, positions = ev.packed_inputs([[5], [5, 6, 7]], [[[8]], [[9]]], 0, "additive", torch.float32)
    assert ids.tolist() == [[0, 0, 5], [5, 6, 7]]
    blocked = torch.finfo(torch.float32).min
    assert mask[0, 0].tolist() == [[0, blocked, blocked], [0, 0, blocked], [blocked, blocked, 0]]


def test_pack_requests_shares_contexts_and_respects_the_window() -> None:
    requests = [(0, 0, [1, 2], [3]), (0, 1, [1, 2], [4, 5]), (1, 0, [1, 2], [4, 5]), (1, 1, [9], [3, 3, 3])]
    assert pack_requests(requests, max_len=8) == [([1, 2], [[3], [4, 5]]), ([9], [[3, 3, 3]])]
    # a window of 3: [1 2] + fed 4 is 3 tokens, so [4 5] still fits behind [3] (which feeds nothing)
    assert pack_requests(requests, max_len=3) == [([1, 2], [[3], [4, 5]]), ([9], [[3, 3, 3]])]
    assert pack_requests([(0, 0, [1], [2, 2]), (0, 1, [1], [3, 3])], max_len=2) == [([1], [[2, 2]]), ([1], [[3, 3]])]


# ----------------------------------------------------------------------------------------------
# equality with the per-request scorer


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_context_equals_per_request(tok: Any, items: list[EvalItem], attn: str) -> None:
    model = sharp_llama(len(tok), attn)
    assert ev.packed_mask_kind(model) == {"sdpa": "bool", "eager": "additive"}[attn]
    calls = count_forwards(model)
    old = MultipleChoice(shared_context=False).score(model, tok, items, CPU, batch_size=4, max_new_tokens=0)
    old_calls, calls[0] = calls[0], 0
    new = MultipleChoice().score(model, tok, items, CPU, batch_size=4, max_new_tokens=0)
    assert_same_rows(new, old)
    assert calls[0] < old_calls / 2  # the contexts really ran once: 40 rows (fewer, shared) vs 137 requests
    # the documents cover what they claim to: glued choices, empty prompts, shared prompts, several tokens
    assert any(it.delimiter == "" and it.prompt for it in items) and any(not it.prompt for it in items)
    assert len({it.prompt for it in items}) < len(items)
    assert max(n for r in old for n in r["num_tokens"]) >= 4 and min(n for r in old for n in r["num_tokens"]) == 1
    glued = [it for it in items if it.delimiter == "" and it.prompt]
    assert any(ev.encode(tok, it.prompt + it.choices[0])[:len(ev.encode(tok, it.prompt))]
               != ev.encode(tok, it.prompt) for it in glued), "some choice must merge with its context's end"


def test_truncated_contexts_and_split_rows_equal_per_request(tok: Any, items: list[EvalItem],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # a 12-token window: long prompts lose their start, and an item's choices no longer fit in one row
    model = sharp_llama(len(tok))
    budget = Budget(max_length=12, max_tokens=40)
    kept = [it for it in items if max(len(ev.encode(tok, (it.delimiter or " ") + c)) for c in it.choices) < 12]
    old = MultipleChoice(shared_context=False).score(model, tok, kept, CPU, batch_size=3, max_new_tokens=0,
                                                     budget=budget)
    seen: list[tuple[Any, Any]] = []

    def spy(requests: Any, max_len: int) -> Any:
        seen.append((requests, pack_requests(requests, max_len)))
        return seen[-1][1]

    monkeypatch.setattr("eval_and_metrics.scorers.multiple_choice.pack_requests", spy)
    new = MultipleChoice().score(model, tok, kept, CPU, batch_size=3, max_new_tokens=0, budget=budget)
    assert_same_rows(new, old)
    ((requests, rows),) = seen
    assert any(len(context) + len(cont) == 12 for _, _, context, cont in requests), "some context is truncated"
    assert len(rows) > len({tuple(context) for context, _ in rows}), "some context's choices take several rows"
    assert all(len(ev.packed_row(context, group)) <= 12 for context, group in rows)


def test_lora_and_memory_hooks_keep_positions_apart(tok: Any, items: list[EvalItem]) -> None:
    # peft's LoRA layers and smf's memory (an MLP forward hook, token query) work per position, so
    # packing changes nothing through them either.
    from peft import LoraConfig, get_peft_model
    from training.methods.memory import MemoryOptions, attach_memories, install_mask_hook

    model = sharp_llama(len(tok), seed=1)
    memories = attach_memories(model, MemoryOptions(layers=[1], num_keys=8, key_dim=8, top_k=4), 1, 0, "smf")
    install_mask_hook(model, memories)
    with torch.no_grad():
        for mem in memories.values():
            for v in mem.values:
                v.normal_(0.0, 1.0)  # values start at zero: give the memory something to add
    # smf declares its hooks per position for the token query (training/methods/memory/surgery.py)...
    assert model.mixes_positions is False and model.model.layers[1].mlp.mixes_positions is False
    assert ev.packed_mask_kind(model) == "bool"
    # ...and a hook that has not said what it does means one request at a time
    model.model.layers[0].register_forward_hook(lambda module, args, output: None)
    assert ev.packed_mask_kind(model) is None
    del model.model.layers[0]._forward_hooks[next(iter(model.model.layers[0]._forward_hooks))]
    prefix = sharp_llama(len(tok), seed=1)
    attach_memories(prefix, MemoryOptions(layers=[1], num_keys=8, key_dim=8, top_k=4, query="prefix_mean"), 1, 0, "smf")
    assert ev.packed_mask_kind(prefix) is None  # the prefix mean mixes positions
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert ev.packed_mask_kind(model) == "bool"
    old = MultipleChoice(shared_context=False).score(model, tok, items, CPU, batch_size=5, max_new_tokens=0)
    new = MultipleChoice().score(model, tok, items, CPU, batch_size=5, max_new_tokens=0)
    assert_same_rows(new, old)


class ThreadShard:
    """Rank `rank` of `size` ranks run as threads: owns every size-th batch, agrees and merges through
    shared lists (training/distributed.World does the same over a process group)."""

    def __init__(self, rank: int, size: int, barrier: threading.Barrier, board: list[Any]) -> None:
        self.rank, self.size, self.barrier, self.board = rank, size, barrier, board
        self.owned: list[int] = []

    active = True

    def owns(self, index: int) -> bool:
        if index % self.size == self.rank:
            self.owned.append(index)
            return True
        return False

    def _exchange(self, value: Any) -> list[Any]:
        self.board[self.rank] = value
        self.barrier.wait()
        out = list(self.board)
        self.barrier.wait()
        return out

    def agree(self, flag: bool) -> bool:
        return any(self._exchange(flag))

    def merge(self, values: list[Any]) -> list[Any]:
        shares = self._exchange(values)
        return [next((v for v in column if v is not None), None) for column in zip(*shares)]


def test_two_ranks_give_one_process_rows(tok: Any, items: list[EvalItem]) -> None:
    model = sharp_llama(len(tok))
    single = MultipleChoice().score(model, tok, items, CPU, batch_size=3, max_new_tokens=0)
    barrier, board = threading.Barrier(2), [None, None]
    shards = [ThreadShard(r, 2, barrier, board) for r in range(2)]
    out: list[Any] = [None, None]

    def run(rank: int) -> None:
        out[rank] = MultipleChoice().score(model, tok, items, CPU, batch_size=3, max_new_tokens=0,
                                           shard=shards[rank])

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert shards[0].owned and shards[1].owned and not set(shards[0].owned) & set(shards[1].owned)
    assert out[0] == out[1] == single  # bit for bit: each row is computed by one rank in the same batch


# ----------------------------------------------------------------------------------------------
# when packing is refused


def test_models_that_mix_positions_outside_attention_are_scored_per_request(tok: Any) -> None:
    model = sharp_llama(len(tok))
    model.model.layers[0].mlp.mixes_positions = True  # e.g. a router pooling over the row
    assert ev.packed_mask_kind(model) is None
    flash = sharp_llama(len(tok))
    flash.config._attn_implementation = "flash_attention_2"  # no dense 4D mask there
    assert ev.packed_mask_kind(flash) is None


def test_position_mixing_methods_are_scored_per_request(tok: Any, items: list[EvalItem]) -> None:
    # casm's router pools over the row and smf's prefix_mean query averages the prefix: packing would let
    # one choice's tokens into another's pooling. Their hooks have not declared anything, so they fall back.
    from training.methods.memory import MemoryOptions, attach_memories, install_mask_hook

    model = sharp_llama(len(tok))
    memories = attach_memories(model, MemoryOptions(layers=[1], num_keys=8, key_dim=8, top_k=4,
                                                    query="prefix_mean"), 1, 0, "smf")
    install_mask_hook(model, memories)
    with torch.no_grad():
        for v in memories[1].values:
            v.normal_(0.0, 1.0)
    assert ev.packed_mask_kind(model) is None
    old = MultipleChoice(shared_context=False).score(model, tok, items[:12], CPU, batch_size=4, max_new_tokens=0)
    assert MultipleChoice().score(model, tok, items[:12], CPU, batch_size=4, max_new_tokens=0) == old
    # ... and had it been packed, the prefix mean would have seen the other choices
    model.mixes_positions = False
    model.model.layers[1].mlp.mixes_positions = False
    packed = MultipleChoice().score(model, tok, items[:12], CPU, batch_size=4, max_new_tokens=0)
    assert any(abs(a - b) > TOL for p, o in zip(packed, old) for a, b in zip(p["loglikelihoods"], o["loglikelihoods"]))


# ----------------------------------------------------------------------------------------------
# the real model against lm-eval (slow: loads SmolLM2 twice and lm-eval)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_smollm2_mmlu_matches_the_per_request_scorer_and_lm_eval(fmt: str) -> None:
    pytest.importorskip("lm_eval")
    from scripts.bench_mc import run_mc_bench

    out = run_mc_bench(6, fmt, batch_size=4)
    for path in ("old", "lm_eval"):
        assert out[path]["same_choice_as_ref"] == out["questions"], (path, out[path])
        assert out[path]["max_abs_ll_diff"] <= TOL, (path, out[path])
