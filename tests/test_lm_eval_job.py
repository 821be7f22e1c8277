"""lm-eval job: a local task (include_path, no hub) on every period of a trained synthetic run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from artifacts import verify_manifest
from data.streams.schema import EvalItem
from eval_and_metrics import report
from eval_and_metrics.scorers.multiple_choice import MultipleChoice
from eval_and_metrics.scorers.perplexity import Perplexity
from scripts import lm_eval_job
from training.period_model import load_period_model
from tests.fixtures.sweep import pristine_sweep, runs_by_method_seed  # noqa: F401

TASKS_DIR = Path(__file__).parent / "fixtures" / "lm_eval_tasks"


@pytest.fixture
def lm_eval_installed() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but lm-eval is missing: uv sync --extra lm-eval")
        pytest.skip("lm-eval not installed (optional group: uv sync --extra lm-eval)")


def _our_scores(run: Path, k: int) -> dict[str, float]:
    """acc on clkit_tiny_mc and word perplexity on clkit_tiny_ppl of period k's model, by our scorers."""
    pm = load_period_model(run, k, "cpu")
    mc_docs = [json.loads(line) for line in (TASKS_DIR / "tiny_mc.jsonl").read_text().splitlines() if line.strip()]
    texts = [json.loads(line)["text"] for line in (TASKS_DIR / "tiny_text.jsonl").read_text().splitlines()
             if line.strip()]
    # lm-eval's defaults for these tasks: doc_to_text as the prompt, target_delimiter " " before each choice
    mc_items = [EvalItem(id=str(i), prompt=d["question"], target="", choices=tuple(d["choices"]), gold=d["label"],
                         delimiter=" ") for i, d in enumerate(mc_docs)]
    text_items = [EvalItem(id=str(i), prompt="", target=t) for i, t in enumerate(texts)]
    mc, ppl = MultipleChoice(), Perplexity()
    run_args = (pm.model, pm.tokenizer)
    acc = mc.aggregate(mc.score(*run_args, mc_items, pm.device, batch_size=4, max_new_tokens=0))["acc"]
    word_ppl = ppl.aggregate(ppl.score(*run_args, text_items, pm.device, batch_size=4,
                                       max_new_tokens=0))["word_perplexity"]
    return {"acc": acc, "word_perplexity": word_ppl}


def test_parse_scores_reads_directions_and_drops_bookkeeping() -> None:
    res = {
        "results": {"crows_pairs_english": {"alias": "crows", "likelihood_diff,none": 3.5,
                                            "likelihood_diff_stderr,none": 0.1, "pct_stereotype,none": 0.6,
                                            "pct_stereotype_stderr,none": "N/A", "sample_len": 10},
                    "piqa": {"acc,none": 0.7, "acc_stderr,none": 0.01, "acc_norm,none": 0.72}},
        "higher_is_better": {"crows_pairs_english": {"likelihood_diff": False, "pct_stereotype": False},
                             "piqa": {"acc": True, "acc_norm": True}},
    }
    scores = lm_eval_job.parse_scores(res)
    assert scores["crows_pairs_english"] == {
        "likelihood_diff": {"value": 3.5, "stderr": 0.1, "higher_is_better": False},
        "pct_stereotype": {"value": 0.6, "stderr": None, "higher_is_better": False}}
    assert scores["piqa"]["acc"] == {"value": 0.7, "stderr": 0.01, "higher_is_better": True}
    # no declared direction: the fallback list knows perplexities are lower-is-better
    fallback = lm_eval_job.parse_scores({"results": {"wikitext": {"word_perplexity,none": 30.0}}})
    assert fallback["wikitext"]["word_perplexity"]["higher_is_better"] is False


def test_lm_eval_job_on_every_period(lm_eval_installed: None, pristine_sweep: Path, tmp_path: Path,  # noqa: F811
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = runs_by_method_seed(pristine_sweep)[("lora", 1)]
    run = tmp_path / "runs" / src.name
    shutil.copytree(src, run)
    argv = [str(run), "--tasks", "clkit_tiny_mc,clkit_tiny_ppl", "--include-path", str(TASKS_DIR),
            "--no-default-tasks", "--batch-size", "4", "--threads", "1"]
    assert lm_eval_job.main(argv) == 0
    values = {}
    for period in sorted((run / "periods").iterdir()):
        k = int(period.name.split("-")[0])
        assert verify_manifest(period / "lm_eval") == (True, "ok")
        assert verify_manifest(period) == (True, "ok")
        stored = json.loads((period / "lm_eval" / "results.json").read_text())
        scores = stored["scores"]
        assert scores["clkit_tiny_mc"]["acc"]["higher_is_better"] is True
        assert scores["clkit_tiny_ppl"]["word_perplexity"]["higher_is_better"] is False
        assert scores["clkit_tiny_ppl"]["bits_per_byte"]["higher_is_better"] is False
        # lm-eval's numbers are this period's model's numbers: our own scorers on the same documents
        # (tests/test_lm_eval_oracle.py holds them to lm-eval on a fixed model) give the same values.
        ours = _our_scores(run, k)
        assert scores["clkit_tiny_mc"]["acc"]["value"] == ours["acc"]
        assert scores["clkit_tiny_ppl"]["word_perplexity"]["value"] == pytest.approx(ours["word_perplexity"],
                                                                                    rel=1e-4)
        values[k] = scores["clkit_tiny_ppl"]["word_perplexity"]["value"]
    assert sorted(values) == [0, 1, 2, 3, 4]

    # A requeued job skips what is done.
    settings = lm_eval_job.LmEvalSettings(tasks=["clkit_tiny_mc", "clkit_tiny_ppl"], batch_size=4,
                                          include_path=[str(TASKS_DIR.resolve())], include_defaults=False)
    assert lm_eval_job.evaluate_period(run, 2, settings, log=lambda m: None) is None

    out = tmp_path / "report"
    assert report.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    line = next(ln for ln in summary.splitlines() if "clkit_tiny_ppl/word_perplexity" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "LOWER"
    assert cells[3] == f"{values[0]:.3f} (n=1)"
    assert cells[-1] == f"{values[4] - values[0]:.3f} (n=1)"
    assert list((out / "plots").glob("*-lm_eval.png"))
