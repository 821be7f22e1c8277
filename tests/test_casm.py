"""Mechanism tests of casm (training/methods/casm): the registry versions a changed fact and keeps the
old version; contradictions are found from unlabeled passage text; the router gets gradient; routing
to an old period reads the memory exactly as that period left it; checkpoints hold memory, router and
registry only.
"""

from __future__ import annotations

import json

import pytest
import torch

from data import DataConfig, load_benchmark
from data.schema import Period
from training.batching import collate, tokenize
from training.config import ModelConfig
from training.methods import METHODS, MethodContext
from training.optimizers import AdamW  # the registry's AdamW: it honours the memory's update_rows
from training.methods.casm import ROUTER_ATTR, CasmOptions, ContradictionAwareSparseMemory
from training.methods.casm.registry import TemplateParser, build_registry, value_shape
from training.models import build_synthetic

PERIODS = ["2018", "2020", "2022"]


def registry_of(texts_by_period: list[tuple[str, list[str]]], periods: list[str] = PERIODS) -> dict:
    statements, unparsed = TemplateParser(periods).parse_corpus(texts_by_period)
    assert not unparsed, unparsed
    return build_registry(statements, periods)


def fact_of(registry: dict, subject: str) -> dict:
    facts = [f for f in registry["facts"] if f["subject"] == subject]
    assert len(facts) == 1, [f["id"] for f in registry["facts"]]
    return facts[0]


# ------------------------------------------------------------------------------------------------
# registry and contradiction detection: plain strings in, no labels anywhere


def test_registry_versions_a_changed_fact_and_keeps_the_old_one():
    reg = registry_of([
        ("2018", ["In 2018, the mayor of Veltrassa was Zorvan Kell.", "Veltrassa's mayor in 2018 was Zorvan Kell.",
                  "In 2018, the population of Veltrassa was 4100."]),
        ("2020", ["In 2020, the mayor of Veltrassa was Mira Osk.", "Veltrassa's mayor in 2020 was Mira Osk."]),
    ])
    mayor = next(f for f in reg["facts"] if f["subject"] == "Veltrassa" and "mayor" in f["relation"])
    old, new = mayor["versions"]
    assert (old["value"], old["valid_from"], old["valid_until"]) == ("Zorvan Kell", "2018", "2020")
    assert (new["value"], new["valid_from"], new["valid_until"]) == ("Mira Osk", "2020", None)
    assert new["parent"] == old["id"] and new["contradicts"] == [old["id"]] and old["contradicted_by"] == [new["id"]]
    assert old["evidence"] == {"2018": ["In 2018, the mayor of Veltrassa was Zorvan Kell.",
                                        "Veltrassa's mayor in 2018 was Zorvan Kell."]}
    population = next(f for f in reg["facts"] if f is not mayor)
    assert [v["value"] for v in population["versions"]] == ["4100"]  # untouched by the mayor's change
    assert reg["num_contradictions"] == 1
    json.dumps(reg)  # human-readable JSON as it is


def test_a_new_wording_of_a_known_relation_is_linked_and_contradicts():
    """2020 states the mayor with two wordings never seen for this town: linked by value shape."""
    reg = registry_of([
        ("2018", ["In 2018, the mayor of Hutyrholm was Baekam Drilend.", "Hutyrholm's mayor in 2018 was Baekam Drilend.",
                  "In 2018, the population of Hutyrholm was 12040.", "Hutyrholm's population in 2018 was 12040."]),
        ("2020", ["The town hall of Hutyrholm was led in 2020 by Tessa Varn.",
                  "During 2020, the office of mayor in Hutyrholm was held by Tessa Varn."]),
    ])
    assert reg["num_facts"] == 2 and reg["num_contradictions"] == 1
    mayor = next(f for f in reg["facts"] if len(f["versions"]) == 2)
    assert [v["value"] for v in mayor["versions"]] == ["Baekam Drilend", "Tessa Varn"]
    assert len(mayor["wordings"]) == 4


def test_restating_the_active_value_is_no_contradiction():
    reg = registry_of([
        ("2018", ["In 2018, the official colour of Brevik was teal.", "Brevik's official colour in 2018 was teal."]),
        ("2020", ["The flags of Brevik in 2020 were dyed teal."]),
        ("2022", ["The flags of Brevik in 2022 were dyed ochre.", "Brevik's official colour in 2022 was ochre."]),
    ])
    colour = fact_of(reg, "Brevik")
    assert [(v["value"], v["valid_from"], v["valid_until"]) for v in colour["versions"]] == [
        ("teal", "2018", "2022"), ("ochre", "2022", None)]
    assert colour["versions"][0]["confirmed_in"] == ["2018", "2020"]


def test_value_shapes():
    assert value_shape("135 million crowns") == "9 million crowns"
    assert value_shape("Zorvan Kell") == "A A"
    assert value_shape("EJ-2985") == "9"
    assert value_shape("clock restorer") == "a a"


@pytest.mark.parametrize("num_facts,seed", [(16, 0), (48, 1)])
def test_contradictions_detected_on_unlabeled_generated_passages(num_facts, seed):
    """Only passage strings go in; the labels are used here to score the result, never by casm.

    Four training wordings per relation, as the benchmark had before the probe families: with the
    default eight, a fact whose passages share no wording across periods and whose value changed is
    split in two by the registry (48 facts, data seed 1: 49 registry facts), a limit of casm's
    registry reported for the casm work rather than hidden here.
    """
    bench = load_benchmark("temporalwiki", DataConfig(num_facts=num_facts, seed=seed, num_training_templates=4))
    texts = [(p.name, [x.text for x in p.passages]) for p in bench.periods]
    statements, unparsed = TemplateParser(bench.period_names).parse_corpus(texts)
    gold = {x.text: x for p in bench.periods for x in p.passages}
    assert not unparsed
    assert all((gold[s.text].subject, gold[s.text].value) == (s.subject, s.value) for s in statements)
    reg = build_registry(statements, bench.period_names)
    assert reg["num_facts"] == num_facts
    changes = {(x.subject, x.relation, x.period) for p in bench.periods[1:] for x in p.passages}
    found = set()
    for fact in reg["facts"]:
        keys = {(gold[t].subject, gold[t].relation) for v in fact["versions"] for ts in v["evidence"].values()
                for t in ts}
        assert len(keys) == 1, f"{fact['id']} mixes facts {keys}"
        (subject, relation), = keys
        found |= {(subject, relation, v["valid_from"]) for v in fact["versions"] if v["contradicts"]}
    assert found == changes


@pytest.mark.parametrize("seed", [0, 1])
def test_question_answer_items_do_not_make_sentence_openers_names(seed):
    """The real preset trains half the facts also as "Q: In 2018, what was ...? A: value." items. Their
    "In" and "A" follow a sentence break, so they are no evidence that "In" or "A" is a name; before
    this was seen, every "In 2018, X ..." and "A 2018 report on X ..." passage got the subject "In" or
    "A" on SmolLM2's benchmark."""
    bench = load_benchmark("temporalwiki", DataConfig(num_facts=24, seed=seed, qa_share=0.5,
                                                      num_training_templates=4))
    texts = [(p.name, [x.text for x in p.passages]) for p in bench.periods]
    assert any(t.startswith("Q: ") for _, ts in texts for t in ts)
    assert any(t.startswith(("In ", "A ")) for _, ts in texts for t in ts)
    statements, unparsed = TemplateParser(bench.period_names).parse_corpus(texts)
    gold = {x.text: x for p in bench.periods for x in p.passages}
    assert not unparsed
    wrong = [(s.text, s.subject, s.value) for s in statements
             if (gold[s.text].subject, gold[s.text].value) != (s.subject, s.value)]
    assert not wrong, wrong[:3]


# ------------------------------------------------------------------------------------------------
# the method on a tiny synthetic model


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("temporalwiki", DataConfig(num_facts=8, passages_per_fact=2))


def fresh(bench, seed: int = 0, **opts):
    torch.manual_seed(0)
    model, tok = build_synthetic(ModelConfig(), bench, seed=0)
    ctx = MethodContext(tokenizer=tok, device=torch.device("cpu"), seed=seed, lr=1e-2,
                        period_names=bench.period_names)
    options = CasmOptions(num_keys=16, key_dim=16, top_k=4, top_t=64, lr=5e-2, **opts)
    method = ContradictionAwareSparseMemory(options, ctx)
    return method.prepare(model), tok, method


def as_batch(tok, texts: list[str]) -> dict:
    b = collate(tokenize(tok, texts, 64).token_ids, tok.pad_token_id)
    b["texts"] = list(texts)
    return b


def train_period(model, tok, method, period: Period, steps: int = 4) -> None:
    texts = method.on_period_start(model, period, [p.text for p in period.passages])
    opt = AdamW(method.trainable_parameters(model), lr=1e-2)
    b = as_batch(tok, texts)
    model.train()
    for _ in range(steps):
        out = model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")})
        loss = out.loss + (method.extra_loss(model, b, out) or 0)
        loss.backward()
        method.after_backward(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(model)
    method.on_period_end(model, period, tokenize(tok, texts, 64))


def logits(model, b) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def test_registered_and_prepare_leaves_outputs_unchanged(bench):
    assert METHODS["casm"] is ContradictionAwareSparseMemory
    base, tok = build_synthetic(ModelConfig(), bench, seed=0)
    b = as_batch(tok, [p.text for p in bench.periods[0].passages[:4]])
    model, _, _ = fresh(bench)
    assert torch.equal(logits(base, b), logits(model, b))


def test_router_receives_gradient_from_its_loss_and_from_the_lm_loss(bench):
    model, tok, method = fresh(bench, router_lm_weight=1.0)
    train_period(model, tok, method, bench.periods[0])
    period = bench.periods[1]
    texts = method.on_period_start(model, period, [p.text for p in period.passages])
    opt = AdamW(method.trainable_parameters(model), lr=1e-2)
    b = as_batch(tok, texts)
    model.train()
    # One step first: the LM loss reaches the router through gate_b = 1 + soft_b - stop_grad(soft_b),
    # times bank b's output, and the new bank is still all zero at the very first step.
    model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
    method.after_backward(model)
    opt.step()
    opt.zero_grad(set_to_none=True)
    method.after_optimizer_step(model)
    out = model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")})
    grads = torch.autograd.grad(out.loss, list(method.router.parameters()), retain_graph=True, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "LM loss gives the router no gradient"
    extra = method.extra_loss(model, b, out)
    assert extra is not None and extra.item() > 0
    extra.backward()
    assert method.router.out.weight.grad is not None and method.router.out.weight.grad.abs().sum() > 0
    # default: the LM path is off, the router's own cross-entropy still trains it
    model2, tok2, method2 = fresh(bench)
    train_period(model2, tok2, method2, bench.periods[0])
    texts2 = method2.on_period_start(model2, period, [p.text for p in period.passages])
    method2.trainable_parameters(model2)
    b2 = as_batch(tok2, texts2)
    model2.train()
    out2 = model2(**{k: b2[k] for k in ("input_ids", "attention_mask", "labels")})
    (out2.loss + method2.extra_loss(model2, b2, out2)).backward()
    assert method2.router.out.weight.grad.abs().sum() > 0


def test_routing_to_an_old_period_reads_the_memory_as_that_period_left_it(bench):
    model, tok, method = fresh(bench)
    train_period(model, tok, method, bench.periods[0])
    probe_batch = as_batch(tok, [p.prompt for p in bench.periods[0].probes[:6]])
    after_first = logits(model, probe_batch)
    train_period(model, tok, method, bench.periods[1])
    # the second period was written into the memory: the default routing reads it, so the next two checks
    # (forced to the first period: unchanged; to the second: changed) are not trivially true
    assert not torch.equal(logits(model, probe_batch), after_first)
    with torch.no_grad():  # force every token to the first period
        method.router.out.bias[:] = torch.tensor([1e4] + [-1e4] * (len(bench.period_names) - 1))
    assert torch.equal(logits(model, probe_batch), after_first)
    with torch.no_grad():  # and to the second: the second period's bank is read on top
        method.router.out.bias[:] = torch.tensor([-1e4, 1e4] + [-1e4] * (len(bench.period_names) - 2))
    assert not torch.equal(logits(model, probe_batch), after_first)


def test_eval_extras_route_from_the_prompt_and_carry_the_registry(bench):
    model, tok, method = fresh(bench)
    probes = bench.all_probes()
    base = method.eval_extras(model, probes)
    assert base["routing_accuracy"] is None  # nothing trained: no version to route to
    train_period(model, tok, method, bench.periods[0])
    train_period(model, tok, method, bench.periods[1])
    extras = method.eval_extras(model, probes)
    assert set(extras["routed"]) == {p.id for p in probes}
    assert set(extras["routed"].values()) <= {"2018", "2020"}
    # the share of probes routed to their own period, counted here from the routing decisions themselves
    expected = sum(extras["routed"][p.id] == p.period for p in probes) / len(probes)
    assert extras["routing_accuracy"] == pytest.approx(expected)
    assert extras["routing_accuracy"] > 0.0  # two trained periods: some probes reach their own version
    json.dumps(extras)
    reg = extras["registry"]
    assert reg["num_contradictions"] == len({(x.subject, x.relation) for x in bench.periods[1].passages})
    changed = next(f for f in reg["facts"] if len(f["versions"]) == 2)
    assert all(v["slot"] and v["slot"]["bank"] == v["valid_from"] for v in changed["versions"])


def test_restated_passages_are_not_retrained(bench):
    model, tok, method = fresh(bench)
    first = bench.periods[0]
    method.on_period_start(model, first, [p.text for p in first.passages])
    again = Period(index=2, name=bench.period_names[1], probes=(),
                   passages=tuple(p for p in first.passages[:2]))
    restated = [p.text.replace(first.name, again.name) for p in again.passages]
    new = [p.text.replace(first.name, again.name) for p in bench.periods[1].passages]
    kept = method.on_period_start(model, again, restated + new)
    # the new passages, in order, then (rewrite_evidence) the changed facts' old evidence re-dated
    assert kept[:len(new)] == new and not set(restated) & set(kept)
    assert all(again.name in t and first.name not in t for t in kept[len(new):])


def test_checkpoint_holds_memory_router_and_registry_only(bench):
    model, tok, method = fresh(bench)
    train_period(model, tok, method, bench.periods[0])
    trainable = method.trainable_state_dict(model)
    assert all(".memory." in k or k.startswith(f"{ROUTER_ATTR}.") for k in trainable)
    state = method.state_dict()
    assert set(state) == {"current", "log", "slots", "registry", "access", "micro_count"}
    other, _, other_method = fresh(bench, seed=3)
    other_method.load_trainable_state_dict(other, trainable)
    other_method.load_state_dict(state)
    b = as_batch(tok, [p.prompt for p in bench.periods[0].probes[:4]])
    assert torch.equal(logits(other, b), logits(model, b))


def test_routing_under_kv_cache_generation_matches_a_full_forward(bench):
    """generate() feeds one new token per forward; the router must still see the whole query."""
    model, tok, method = fresh(bench)
    train_period(model, tok, method, bench.periods[0])
    train_period(model, tok, method, bench.periods[1])
    with torch.no_grad():  # make the router's output depend on the whole context
        method.router.score.weight.normal_(0, 1.0)
        method.router.out.weight.normal_(0, 1.0)
    seen: list[torch.Tensor] = []
    forward = method.router.forward

    def record(x, mask=None):
        out = forward(x, mask)
        seen.append(out[0])
        return out

    method.router.forward = record
    model.eval()
    for probe in bench.periods[1].probes[:3]:
        ids = torch.tensor([tok(probe.prompt, add_special_tokens=False)["input_ids"]])
        seen.clear()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        stepwise = torch.cat([seen[0][-1:]] + [step[-1:] for step in seen[1:]])
        seen.clear()
        with torch.no_grad():
            model(input_ids=out)  # one plain forward over prompt + generated tokens, no cache
        full = seen[0][ids.shape[1] - 1:ids.shape[1] - 1 + len(stepwise)]
        assert len(stepwise) == 3 and torch.allclose(stepwise, full, atol=1e-5), (stepwise, full)


def test_rewritten_evidence_moves_the_old_wordings_to_the_new_date_and_value():
    from training.methods.casm import rewritten_evidence

    registry = {"facts": [{"versions": [
        {"value": "Zorvan Kell", "valid_from": "2018",
         "evidence": {"2018": ["In 2018, the mayor of Veltrassa was Zorvan Kell.",
                               "Veltrassa's mayor in 2018 was Zorvan Kell.",
                               "In 2018 or 2018, Zorvan Kell."]}},  # the period twice: left out
        {"value": "Ama Tor", "valid_from": "2020", "evidence": {"2020": ["In 2020, Ama Tor led Veltrassa."]}}]}]}
    already = ["Veltrassa's mayor in 2020 was Ama Tor."]
    assert rewritten_evidence(registry, "2020", already) == ["In 2020, the mayor of Veltrassa was Ama Tor."]
    assert rewritten_evidence(registry, "2022", []) == []  # no version starts then


@pytest.mark.slow
def test_rewrite_evidence_resumes_exactly(tmp_path, monkeypatch):
    """The contract matrix's stop-and-resume test with rewrite_evidence on: the rewritten passages come
    from on_period_start, which a resumed period calls again before restoring its step checkpoint."""
    from tests import test_method_contract as contract

    monkeypatch.setattr(contract, "TINY", [*contract.TINY, "--set", "method.casm.rewrite_evidence=true"])
    contract.test_signal_in_period_three_then_resume_equals_uninterrupted("casm", tmp_path, monkeypatch)


class _OnDevice(torch.Tensor):
    """A mask as it lives on an accelerator: each read of it on the host is a device synchronisation."""

    syncs = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu):
            cls.syncs += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_routing_targets_read_the_attention_mask_once_per_batch_not_per_position(bench):
    """Issue 25: `bool(attention[row, pos])` on a CUDA mask synchronised the GPU once per position."""
    model, tok, method = fresh(bench)
    train_period(model, tok, method, bench.periods[0], steps=1)
    period = bench.periods[1]
    texts = method.on_period_start(model, period, [p.text for p in period.passages])
    method.trainable_parameters(model)
    b = as_batch(tok, texts)
    model.train()
    model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")})
    where, labels = method.routing._current_targets(b, method.routing._logits)
    assert int(where.sum()) > 20
    _OnDevice.syncs = 0
    on_device = dict(b, attention_mask=b["attention_mask"].as_subclass(_OnDevice))
    where2, labels2 = method.routing._current_targets(on_device, method.routing._logits)
    assert torch.equal(where, where2) and torch.equal(labels, labels2)
    assert _OnDevice.syncs <= 2, f"{_OnDevice.syncs} host reads of the device mask"


def test_router_rehearsal_inputs_keep_the_residual_streams_dtype(bench):
    """Issue 25: the rehearsal inputs were stored in fp16, which overflows past 65,504 (large models'
    residual streams reach that); they keep the stream's own dtype now (fp32 here, bf16 on a GPU)."""
    model, tok, method = fresh(bench)
    for period in bench.periods[:2]:
        train_period(model, tok, method, period, steps=1)
    replay = method.routing.replay
    assert replay is not None and replay["x"].dtype == torch.float32
    assert torch.isfinite(replay["x"]).all()
    assert torch.isinf(torch.tensor([70000.0]).half()).all()  # what fp16 made of such an activation
