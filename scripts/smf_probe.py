"""Does a memory store facts, and can a new wording reach them? Measurements on a finished temporal run.

    uv run python -m scripts.smf_probe RUN_DIR [--periods 1,2] [--out FILE.json]

For each committed period k (and each memory method also at the base model) it rebuilds the period's
model exactly as training did (training/period_model.py) and reports:

* **storage EM**: exact match on cloze prompts cut from period k's own training passages (a passage is
  `prompt + " " + value + "."`, docs/data.md), i.e. a wording the fact was trained under in that
  period. It asks whether the fact was stored at all.
* **extraction EM**: exact match on the period's probes whose prompt is not a prefix of any of that
  fact's passages in that period (with the current generator: all of them, standard and paraphrase).
  It asks whether a stored fact is reachable from another wording.
* **prev-value rate**: among the period's changed-fact probes (storage and extraction apart), the share
  whose prediction equals the fact's previous value (the old version still wins).
* **formerly-true storage EM** (k >= 2): temporal recall on storage probes, i.e. the training
  wordings of earlier periods (dated with their own period) of facts whose value had changed by
  period k, scored against the value of their own period.
* **new value, old wording** (k >= 2): the facts changed in period k, asked in the wordings of their
  earlier periods' passages re-dated to period k, scored against the new value (can the new version
  be reached from where the old one was stored).
* **slot overlap** (memory methods only, per memory layer): the slots the last prompt token reads
  (the position that predicts the value's first token). For each extraction probe, the Jaccard index
  of its top-k slot set with each storage prompt of the *same* fact (`same`), and with the storage
  prompts of the *other* facts of the same relation (`other`), plus the softmax weight they share
  (`sum_i min(w_a[i], w_b[i])`, `w_same`/`w_other`). `same` well above `other` means a new wording
  reads where the training wordings wrote. `other` is split by whether the other fact's passage used
  the probe's own template (`other_same_wording`) or not (`other_other_wording`): `same` is always a
  different wording, so `same` vs `other_other_wording` isolates what the subject contributes.
  `store_same` is the overlap between two storage wordings of one fact. The lookup does not depend on training when the backbone is frozen and the memory layer
  is the first one (its query is computed before any memory output), so period 0 already shows it.

Storage probes are built from passage text alone, so the script works on any temporal run (any method).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from data.schema import Passage, Probe
from eval_and_metrics.evaluate import evaluate_probes
from eval_and_metrics.scoring import exact_match
from artifacts import RunDir
from training.period_model import load_period_model


def storage_prompt(passage: Passage) -> str:
    tail = " " + passage.value + "."
    if not passage.text.endswith(tail):
        raise ValueError(f"passage does not end with its value: {passage.text!r}")
    return passage.text[:-len(tail)]


def storage_probes(passages: tuple[Passage, ...], probes: tuple[Probe, ...]) -> list[Probe]:
    """One cloze probe per training passage, with the metadata of the fact's own probe in that period."""
    meta = {(p.subject, p.relation): p for p in probes if not p.paraphrase}
    out = []
    for x in passages:
        ref = meta.get((x.subject, x.relation))
        out.append(Probe(id=f"{x.period}:{x.subject}:{x.relation}:store:{x.template_id}", subject=x.subject,
                         relation=x.relation, value=x.value, period=x.period,
                         valid_from=ref.valid_from if ref else x.period, valid_until=ref.valid_until if ref else None,
                         previous_value=ref.previous_value if ref else None,
                         kind=ref.kind if ref else "new", paraphrase=False, prompt=storage_prompt(x),
                         template_id=x.template_id))
    return out


def extraction_probes(passages: tuple[Passage, ...], probes: tuple[Probe, ...]) -> list[Probe]:
    """The period's probes whose prompt starts none of the same fact's passages of that period."""
    texts: dict[tuple[str, str], list[str]] = {}
    for x in passages:
        texts.setdefault((x.subject, x.relation), []).append(x.text)
    return [p for p in probes
            if not any(t.startswith(p.prompt + " ") for t in texts.get((p.subject, p.relation), []))]


def em_and_prev(results: list[Any], probes: list[Probe]) -> dict[str, Any]:
    changed = [(r, p) for r, p in zip(results, probes) if p.kind == "changed" and p.previous_value is not None]
    return {"num": len(probes), "em": mean(r.em for r in results) if results else None,
            "num_changed": len(changed),
            "prev_rate": mean(exact_match(r.prediction, p.previous_value) for r, p in changed) if changed else None}


@torch.no_grad()
def last_token_reads(model: torch.nn.Module, tokenizer: Any, memories: dict[int, Any], prompt: str,
                     device: torch.device) -> dict[int, tuple[list[int], list[float]]]:
    """Per memory layer: the slots (and softmax weights) the prompt's last token reads."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    for mem in memories.values():
        mem.keep_lookup = True
    try:
        model(input_ids=ids)
        out = {}
        for i, mem in memories.items():
            idx, w = mem.last_lookup
            out[i] = (idx[0, -1].tolist(), w[0, -1].float().tolist())
        return out
    finally:
        for mem in memories.values():
            mem.keep_lookup = False
            mem.last_lookup = None


def _jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb)


def _shared_weight(a: tuple[list[int], list[float]], b: tuple[list[int], list[float]]) -> float:
    wa, wb = dict(zip(*a)), dict(zip(*b))
    return sum(min(wa[i], wb[i]) for i in wa.keys() & wb.keys())


def slot_overlap(model: torch.nn.Module, tokenizer: Any, memories: dict[int, Any], store: list[Probe],
                 extract: list[Probe], device: torch.device) -> dict[str, dict[str, float]]:
    reads = {p.id: last_token_reads(model, tokenizer, memories, p.prompt, device) for p in store + extract}
    out: dict[str, dict[str, float]] = {}
    for layer in memories:
        same, other, w_same, w_other, store_same, other_tpl, other_notpl = [], [], [], [], [], [], []
        for q in extract:
            for s in store:
                if s.relation != q.relation:
                    continue
                a, b = reads[q.id][layer], reads[s.id][layer]
                bucket = (same, w_same) if s.subject == q.subject else (other, w_other)
                bucket[0].append(_jaccard(a[0], b[0]))
                bucket[1].append(_shared_weight(a, b))
                if s.subject != q.subject:
                    (other_tpl if s.template_id == q.template_id else other_notpl).append(bucket[0][-1])
        for i, s in enumerate(store):
            for t in store[i + 1:]:
                if (s.subject, s.relation) == (t.subject, t.relation):
                    store_same.append(_jaccard(reads[s.id][layer][0], reads[t.id][layer][0]))
        out[str(layer)] = {"same": _avg(same), "other": _avg(other), "w_same": _avg(w_same),
                           "w_other": _avg(w_other), "store_same": _avg(store_same),
                           "other_same_wording": _avg(other_tpl), "other_other_wording": _avg(other_notpl)}
    return out


def _avg(xs: list[float]) -> float | None:
    return round(mean(xs), 4) if xs else None


def measure(run_dir: Path, periods: list[str] | None) -> list[dict[str, Any]]:
    names = RunDir(run_dir).committed_periods()
    rows = []
    for k, name in enumerate(names):
        if periods is not None and name not in periods and str(k) not in periods:
            continue
        # without the config-hash check: a run trained before an option was added hashes differently now;
        # the check that matters stays (the rebuilt trainable state must hash to what the manifest recorded)
        pm = load_period_model(run_dir, k, check_config_hash=False)
        memories = getattr(pm.method, "memories", None) or {}
        if k == 0 and not memories:
            continue
        # period 0 (base): measured on period 1's data, to show what the untrained index does
        stage = pm.bench.bench.periods[max(k, 1) - 1]
        store = storage_probes(stage.passages, stage.probes)
        extract = extraction_probes(stage.passages, stage.probes)
        row: dict[str, Any] = {"period": k, "name": name.split("-", 1)[1], "data": stage.name}
        if k > 0:
            bs = pm.cfg.eval.batch_size
            row["storage"] = em_and_prev(evaluate_probes(pm.model, pm.tokenizer, store, pm.device, bs), store)
            row["extraction"] = em_and_prev(
                evaluate_probes(pm.model, pm.tokenizer, extract, pm.device, bs), extract)
        if k > 1:
            # temporal recall on storage probes: earlier periods' training wordings (their date included)
            # of facts whose value no longer holds at period k, scored against the value of their period
            order = {p.name: i for i, p in enumerate(pm.bench.bench.periods)}
            old = [p for j in range(k - 1) for p in storage_probes(pm.bench.bench.periods[j].passages,
                                                                    pm.bench.bench.periods[j].probes)
                   if p.valid_until is not None and order[p.valid_until] <= k - 1]
            if old:
                res = evaluate_probes(pm.model, pm.tokenizer, old, pm.device, pm.cfg.eval.batch_size)
                row["formerly_true_storage"] = {"num": len(old), "em": mean(r.em for r in res)}
            # the new value from the old wordings: facts changed in period k, asked in the wordings of
            # their earlier periods' passages re-dated to period k
            now = {(p.subject, p.relation): p.value for p in stage.probes if p.kind == "changed"}
            moved = [replace(p, id=p.id + ":redated", period=stage.name, value=now[(p.subject, p.relation)],
                             prompt=re.sub(rf"(?<!\w){re.escape(p.period)}(?!\w)", stage.name, p.prompt))
                     for p in old if (p.subject, p.relation) in now and p.value != now[(p.subject, p.relation)]]
            if moved:
                res = evaluate_probes(pm.model, pm.tokenizer, moved, pm.device, pm.cfg.eval.batch_size)
                row["new_value_old_wording"] = {"num": len(moved), "em": mean(r.em for r in res)}
        if memories:
            row["overlap"] = slot_overlap(pm.model, pm.tokenizer, memories, store, extract, pm.device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--periods", default="", help="comma-separated period names or indices (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = measure(args.run_dir, args.periods.split(",") if args.periods else None)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
