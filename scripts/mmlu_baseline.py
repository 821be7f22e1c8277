"""The base model on MMLU in both formulations: a stratified sample of every subject, Wilson intervals.

    uv run python scripts/mmlu_baseline.py                       # 18 questions x 57 subjects = 1,026, both formats
    uv run python scripts/mmlu_baseline.py --per-subject 4 --formats cloze --json runs/mmlu_baseline.json

The two formulations are the two presets' (configs/streams/): `letter` is mmlu-packaged's (lm-eval's
`mmlu`: the options listed with letters, " A".." D" scored after "Answer:"), `cloze` is
mmlu-packaged-cloze's (SmolLM / lighteval's `mmlu_cf`: the answer texts scored). Both score the same
questions: per subject a seeded sample from the held-out 20% of the presets' own split (the questions
whose answer texts repeat are dropped from both, as the cloze preset drops them), so the sample is
stratified (an equal number per subject, micro mean = macro mean over subjects) and disjoint from what
the presets train on. The model is built as a run builds it (training/restore.py): the embedded
SmolLM2-135M-Instruct, de-quantised from the GGUF's Q4_1 weights, in float32.

Reported per format: acc and acc_norm with 95% Wilson score intervals, how often each option is chosen
(a model that always answers " A" scores the share of gold "A"s), and the published figures the
format is comparable to.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from data.streams import PRESET_DIR  # noqa: E402
from data.streams.sources.packaged import mmlu_subjects  # noqa: E402
from eval_and_metrics.evaluate import Budget  # noqa: E402
from training.config import build_run_configs, load_tree  # noqa: E402
from training.methods import METHODS  # noqa: E402
from training.restore import build_model_and_method  # noqa: E402
from training.workload import load_workload  # noqa: E402

PRESETS = {"letter": "mmlu-packaged", "cloze": "mmlu-packaged-cloze"}
# What each formulation's number can be compared with (docs/results.md says where they come from).
PUBLISHED = {
    "cloze": "SmolLM2 model card, MMLU (cloze, lighteval): 135M-Instruct 29.3, 135M base 31.5",
    "letter": "lm-eval `mmlu` 0-shot (letter): no SmolLM2-135M figure published in this formulation",
}
Z95 = 1.959963984540054


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (Wilson 1927)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def stream_file(fmt: str, per_subject: int, directory: Path) -> Path:
    """A stream of one task per MMLU subject in the preset's formulation, each capped to a seeded sample."""
    preset = yaml.safe_load((PRESET_DIR / f"{PRESETS[fmt]}.yaml").read_text())
    template = preset["tasks"][0]
    tasks = []
    for subject in mmlu_subjects():
        task = {"name": subject, "source": {"type": "mmlu_packaged", "subject": subject, "distinct_answers": True},
                "scorer": "multiple_choice", "split": template["split"], "max_eval": per_subject}
        if "format" in template:
            task["format"] = template["format"]
        tasks.append(task)
    path = directory / f"mmlu-{fmt}-{per_subject}.yaml"
    path.write_text(yaml.safe_dump({"name": f"mmlu-{fmt}-baseline", "tasks": tasks}, sort_keys=False))
    return path


def score_format(fmt: str, per_subject: int, mode: str, model_name: str | None, directory: Path) -> dict[str, Any]:
    tree = load_tree(None, mode, {"data.stream": str(stream_file(fmt, per_subject, directory)),
                                  "model.name": model_name, "method.name": "full_ft"}, [])
    cfg = build_run_configs(tree, METHODS)[0]
    workload = load_workload(cfg.data)
    loaded, _method, model = build_model_and_method(cfg, workload)
    started = time.time()
    rows = workload.evaluate(model, loaded.tokenizer, loaded.device, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                             should_stop=lambda: False, progress=lambda n: None,
                             budget=Budget(cfg.eval.max_length, cfg.eval.max_tokens_per_batch))
    seconds = time.time() - started
    n = len(rows)
    out: dict[str, Any] = {"format": fmt, "preset": PRESETS[fmt], "n": n, "subjects": len(workload.stream.tasks),
                           "model": loaded.source, "seconds": round(seconds, 1), "published": PUBLISHED[fmt]}
    for metric in ("acc", "acc_norm"):
        hits = sum(r[metric] for r in rows)
        lo, hi = wilson(hits, n)
        out[metric] = {"value": hits / n, "ci95": [lo, hi]}
    letters = "ABCD"
    out["chosen"] = {letters[k]: v / n for k, v in sorted(Counter(r["pred_index"] for r in rows).items())}
    out["gold"] = {letters[k]: v / n for k, v in sorted(Counter(r["gold"] for r in rows).items())}
    out["rows"] = rows
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| format (preset) | questions | acc [95% Wilson] | acc_norm [95% Wilson] | chosen A/B/C/D | gold A/B/C/D "
             "| comparable to |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        cells = [f"{r[m]['value']:.3f} [{r[m]['ci95'][0]:.3f}, {r[m]['ci95'][1]:.3f}]" for m in ("acc", "acc_norm")]
        share = ["/".join(f"{d.get(x, 0.0):.2f}" for x in "ABCD") for d in (r["chosen"], r["gold"])]
        lines.append(f"| {r['format']} ({r['preset']}) | {r['n']} ({r['subjects']} subjects) | {cells[0]} | "
                     f"{cells[1]} | {share[0]} | {share[1]} | {r['published']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/mmlu_baseline.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--per-subject", type=int, default=18, help="questions per subject (57 subjects; default 18)")
    p.add_argument("--formats", default="letter,cloze", help="comma-separated: letter, cloze")
    p.add_argument("--mode", choices=["real", "synthetic"], default="real")
    p.add_argument("--model", help="HF hub id or local directory (default: the embedded SmolLM2)")
    p.add_argument("--json", type=Path, help="also write every number and per-question row here")
    args = p.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in PRESETS]
    if bad or not 1 <= args.per_subject <= 20:
        print(f"error: --formats takes {', '.join(PRESETS)} (got {', '.join(bad)}); --per-subject 1..20 (the "
              f"smallest subject holds 20 held-out questions)" if bad else
              "error: --per-subject must be 1..20 (the smallest subject holds 20 held-out questions)", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            results.append(score_format(fmt, args.per_subject, args.mode, args.model, Path(tmp)))
            r = results[-1]
            print(f"{fmt}: acc {r['acc']['value']:.3f} acc_norm {r['acc_norm']['value']:.3f} on {r['n']} questions "
                  f"in {r['seconds']:.0f}s", file=sys.stderr)
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
