"""lm-evaluation-harness is the oracle: our scorers and lm-eval itself on the same documents and model.

A tiny random Llama and its word-level tokenizer are saved with save_pretrained; lm-eval's hf backend
(HFLM) loads that directory and runs three local tasks through simple_evaluate, and our stream
machinery reads the same task YAMLs through the `lm_eval` source and scores them with our scorers.
Per document the log-likelihoods must agree within 1e-4 nats and the chosen answers must be the same,
and so must every aggregate metric:

- a cloze task with a description and multi-character choices of different lengths, some not ASCII,
  so acc, acc_norm (len in characters) and acc_bytes (UTF-8 bytes) each choose differently somewhere;
- a letter task with a description (lm-eval's mmlu form);
- a loglikelihood_rolling task: word_perplexity, byte_perplexity, bits_per_byte, with texts longer
  than the window, so the rolling windows are compared too.

lm-eval is what is right here; a difference is a bug in our code (or a convention to name in
docs/scorers.md), never a reason to loosen the tolerance.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from data.streams import load_stream
from eval_and_metrics.evaluate import Budget
from eval_and_metrics.scorers.multiple_choice import MultipleChoice, choice_metrics
from eval_and_metrics.scorers.perplexity import Perplexity
from training.models import build_word_tokenizer

CPU = torch.device("cpu")
WINDOW = 24  # lm-eval's max_length: longer texts take several windows, longer prompts lose their start
TOL = 1e-4

# short names, where the length of the delimiter matters most, long ones, and some not ASCII
ANIMALS = ["ox", "a cat", "owl", "the large brown dog", "emu", "café owl", "yak", "Zürich swan", "gnu", "naïve ox",
           "bee", "an old grey elephant", "eel", "horse", "a crowned crane", "the small quick fox",
           "ñandú", "日本の鶴"]
# Every question four times, once with each gold label: lm-eval reports per document only whether its
# choice was right, and across the four labels that says which choice it made.
CLOZE = [{"question": f"Which animal is number {i} in the list{'?' * (1 + i % 3)}",
          "choices": [ANIMALS[(i + k * (1, 5, 7, 11)[i % 4]) % len(ANIMALS)] for k in range(4)], "label": gold}
         for i in range(24) for gold in range(4)]
LETTER = [{"question": f" What is {i} plus {i % 3}?\n", "options": [str(i + k) for k in range(4)], "answer": gold}
          for i in range(6) for gold in range(4)]
TEXTS = [{"text": " ".join(["In", str(2018 + i), "the", "spouse", "of", "the", "mayor", "was", "married", "to",
                            "the", "owner", "of", "the", "car", "and"] * (1 + i % 3)) + " ended."}
         for i in range(5)] + [{"text": "Zürich swan café."}]

TASKS = {
    "oracle_cloze": """
        task: oracle_cloze
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {dir}/cloze.jsonl}}}}
        test_split: test
        output_type: multiple_choice
        description: "The following are questions about animals.\\n"
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_target: "{{{{label}}}}"
        doc_to_choice: "{{{{choices}}}}"
        metric_list: [{{metric: acc}}, {{metric: acc_norm}}, {{metric: acc_bytes}}]
    """,
    "oracle_letter": """
        task: oracle_letter
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {dir}/letter.jsonl}}}}
        test_split: test
        output_type: multiple_choice
        description: "The following are multiple choice questions (with answers) about sums.\\n\\n"
        doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{options[0]}}}}\\nB. {{{{options[1]}}}}\\nC. {{{{options[2]}}}}\\nD. {{{{options[3]}}}}\\nAnswer:"
        doc_to_target: "{{{{answer}}}}"
        doc_to_choice: ["A", "B", "C", "D"]
        metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
    """,
    "oracle_ppl": """
        task: oracle_ppl
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {dir}/texts.jsonl}}}}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list: [{{metric: word_perplexity}}, {{metric: byte_perplexity}}, {{metric: bits_per_byte}}]
    """,
}
STREAM = """
    name: oracle
    tasks:
      - {name: cloze, source: {type: lm_eval, task: oracle_cloze, include_path: tasks, include_defaults: false},
         scorer: multiple_choice, eval_split: test}
      - {name: letter, source: {type: lm_eval, task: oracle_letter, include_path: tasks, include_defaults: false},
         scorer: multiple_choice, eval_split: test}
      - {name: ppl, source: {type: lm_eval, task: oracle_ppl, include_path: tasks, include_defaults: false},
         scorer: perplexity, eval_split: test}
"""


@pytest.fixture(scope="module")
def lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        if os.environ.get("CI") == "true":  # .ci/run installs the lm-eval extra: the oracle must run there
            pytest.fail("CI=true but lm-eval is missing: uv sync --extra lm-eval", pytrace=False)
        pytest.skip("lm-eval is not installed (uv sync --extra lm-eval)")
    return lm_eval


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@pytest.fixture(scope="module")
def both(lm_eval: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """lm-eval's samples and results, and our rows and aggregates, on the same tasks and saved model."""
    root = tmp_path_factory.mktemp("oracle")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "cloze.jsonl").write_text(_jsonl(CLOZE), encoding="utf-8")
    (tasks / "letter.jsonl").write_text(_jsonl(LETTER), encoding="utf-8")
    (tasks / "texts.jsonl").write_text(_jsonl(TEXTS), encoding="utf-8")
    for name, text in TASKS.items():
        (tasks / f"{name}.yaml").write_text(textwrap.dedent(text.format(dir=tasks)).lstrip(), encoding="utf-8")
    (root / "stream.yaml").write_text(textwrap.dedent(STREAM).lstrip(), encoding="utf-8")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    stream = load_stream(str(root / "stream.yaml"))

    # The model: a random Llama over the words of every prompt and continuation, saved and loaded back
    # by both sides from the same directory.
    vocab = [e.prompt + " " + c.strip() for t in stream.tasks for e in t.eval for c in e.choices]
    vocab += [e.target for t in stream.tasks for e in t.eval]
    tokenizer = build_word_tokenizer(vocab)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        # a confident head, so choices' log-likelihoods differ by more than the tolerance
        model.get_input_embeddings().weight.data.normal_(0.0, 0.5)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    lm = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=4, max_length=WINDOW)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False))

    ours_model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    ours_tok = AutoTokenizer.from_pretrained(model_dir)
    ours: dict[str, tuple[list[dict[str, Any]], dict[str, float]]] = {}
    # Our window counts every token of a request, lm-eval's max_length the model's inputs, which leave
    # out the last token (only predicted): the same truncation and rolling windows are one apart.
    budget = Budget(max_length=WINDOW + 1)
    for task in stream.tasks:
        scorer = MultipleChoice() if task.scorer == "multiple_choice" else Perplexity()
        rows = scorer.score(ours_model, ours_tok, list(task.eval), CPU, batch_size=3, max_new_tokens=1,
                            budget=budget)
        ours[task.name] = (rows, scorer.aggregate(rows))
    return {"lm_eval": res, "ours": ours, "stream": stream}


def _samples(res: dict[str, Any], task: str) -> list[dict[str, Any]]:
    return sorted(res["samples"][task], key=lambda s: s["doc_id"])


@pytest.mark.parametrize("ours_name, task", [("cloze", "oracle_cloze"), ("letter", "oracle_letter")])
def test_multiple_choice_agrees_with_lm_eval(both: dict[str, Any], ours_name: str, task: str) -> None:
    rows, agg = both["ours"][ours_name]
    samples = _samples(both["lm_eval"], task)
    assert [r["id"] for r in rows] == [f"{ours_name}/test/doc{s['doc_id']}" for s in samples]
    metrics = [m for m in ("acc", "acc_norm", "acc_bytes") if m in samples[0]]
    assert metrics[:2] == ["acc", "acc_norm"]
    for row, sample in zip(rows, samples):
        theirs = [float(ll) for ll, _ in sample["filtered_resps"]]
        assert row["loglikelihoods"] == pytest.approx(theirs, abs=TOL), row["id"]
        for metric in metrics:
            assert row[metric] == sample[metric], (row["id"], metric)
    # the chosen answer: of the four copies of a question, lm-eval counts right the one whose gold it chose
    for first in range(0, len(rows), 4):
        group = samples[first:first + 4]
        assert [s["doc"]["question"] for s in group] == [group[0]["doc"]["question"]] * 4
        for metric, pred in (("acc", "pred_index"), ("acc_norm", "pred_index_norm"), ("acc_bytes", "pred_index_bytes")):
            if metric in metrics:
                chosen = [g for g, s in enumerate(group) if s[metric] == 1.0]
                assert chosen == [rows[first][pred]], (rows[first]["id"], metric)
    results = both["lm_eval"]["results"][task]
    for metric in ("acc", "acc_norm", "acc_bytes"):
        if f"{metric},none" in results:
            assert agg[metric] == pytest.approx(results[f"{metric},none"], abs=1e-12), metric


def test_the_cloze_task_tells_the_three_normalisations_apart(both: dict[str, Any]) -> None:
    # Otherwise the comparison above could not see a wrong length: acc_norm must choose differently from
    # acc, and acc_bytes from acc_norm, on some documents (and the prompt carries the description).
    rows, _ = both["ours"]["cloze"]
    assert any(r["pred_index"] != r["pred_index_norm"] for r in rows)
    assert any(r["pred_index_norm"] != r["pred_index_bytes"] for r in rows)
    # ... and dividing by the length with the " " delimiter (the old bug) must choose differently somewhere
    with_delimiter = [choice_metrics(r["loglikelihoods"], [n + 1 for n in r["choice_chars"]],
                                     [n + 1 for n in r["choice_bytes"]], r["gold"]) for r in rows]
    assert any(w["pred_index_norm"] != r["pred_index_norm"] for w, r in zip(with_delimiter, rows))
    assert any(w["pred_index_bytes"] != r["pred_index_bytes"] for w, r in zip(with_delimiter, rows))
    cloze = both["stream"].tasks[0]
    assert cloze.eval[0].prompt.startswith("The following are questions about animals.\nQuestion: ")
    assert both["stream"].tasks[1].eval[0].prompt.startswith("The following are multiple choice questions")


def test_rolling_perplexity_agrees_with_lm_eval(both: dict[str, Any]) -> None:
    rows, agg = both["ours"]["ppl"]
    samples = _samples(both["lm_eval"], "oracle_ppl")
    assert max(r["num_windows"] for r in rows) > 1  # the windows are compared, not just one pass
    for row, sample in zip(rows, samples):
        (theirs,) = sample["filtered_resps"]
        theirs = theirs[0] if isinstance(theirs, (list, tuple)) else theirs
        assert -row["nll"] == pytest.approx(float(theirs), abs=TOL), row["id"]
    results = both["lm_eval"]["results"]["oracle_ppl"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isclose(agg[metric], results[f"{metric},none"], rel_tol=1e-6), metric
