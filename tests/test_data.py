"""Synthetic TemporalWiki generator, benchmark files, CASM raw reader and their error messages."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from data import (
    DataConfig,
    DataError,
    check_no_leakage,
    load_benchmark,
    read_benchmark,
    read_casm_raw,
    write_benchmark,
)
from data.build import fingerprint, template_split
from data.schema import Benchmark, Passage, Period, Probe
from data.templates import (
    QUESTION_FRAMES,
    RELATIONS,
    WORDINGS_PER_RELATION,
    family_for,
    family_problems,
    normalise_relation,
    prompt_of,
    render,
)
from data.temporalwiki import generate

PERIODS = ["2018", "2020", "2022", "2024"]

# Real people, places and companies that must never appear in invented data.
REAL_NAMES = ["London", "Paris", "Berlin", "Tokyo", "Madrid", "Rome", "Lima", "Oslo", "Vienna",
              "Sydney", "Boston", "Chicago", "Texas", "Obama", "Einstein", "Newton", "Smith",
              "Johnson", "Williams", "Mary", "John", "Google", "Microsoft", "Amazon", "Apple",
              "Tesla", "Toyota", "Siemens"]


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    return generate(DataConfig())


def facts_of(bench: Benchmark) -> dict[tuple[str, str], dict[str, str]]:
    return {(f["subject"], f["relation"]): f["values"] for f in bench.meta["facts"]}


def trained_keys(period: Period) -> set[tuple[str, str]]:
    return {(p.subject, p.relation) for p in period.passages}


# ---------------------------------------------------------------------------------------------
# config


def test_config_defaults_are_valid_and_errors_are_messages() -> None:
    assert DataConfig().validate() == []
    assert DataConfig(change_share=1.5).validate() == ["data.change_share must be in (0, 1] (got 1.5)"]
    bad = DataConfig(seed=True, periods="2018", num_facts=0, passages_per_fact=12,  # type: ignore[arg-type]
                     unchanged_probes_per_period=-1, extraction_share=float("nan"), benchmark="",
                     qa_share=1.5, num_heldout_templates=0)
    messages = bad.validate()  # must not raise, whatever the types
    assert len(messages) == 9, messages
    assert all(m.startswith("data.") and "\n" not in m for m in messages)
    assert DataConfig(periods=["2018", "2018"]).validate()
    assert DataConfig(periods=["2018"]).validate()
    assert DataConfig(periods=["20/18", "2020"]).validate()
    with pytest.raises(DataError, match="data.num_facts"):
        generate(DataConfig(num_facts=0))


@pytest.mark.parametrize("fields, message", [
    ({"num_training_templates": 9, "num_heldout_templates": 4},
     "data.num_heldout_templates must be <= 12 - data.num_training_templates = 3 (each relation has 12 "
     "wordings; got 4)"),
    ({"num_training_templates": 3, "passages_per_fact": 4},
     "data.passages_per_fact must be <= data.num_training_templates = 3 (each passage uses a different "
     "training wording; got 4)"),
    ({"num_heldout_templates": 0}, "data.num_heldout_templates must be in [1, 11] (got 0)"),
    ({"qa_share": -0.1}, "data.qa_share must be in [0, 1] (got -0.1)"),
])
def test_template_and_augmentation_options_are_validated(fields: dict, message: str) -> None:
    assert DataConfig(**fields).validate() == [message]
    with pytest.raises(DataError, match=re.escape(message)):
        generate(DataConfig(**fields))


# ---------------------------------------------------------------------------------------------
# generator


def test_generate_is_deterministic_and_files_byte_identical(tmp_path: Path) -> None:
    a, b = generate(DataConfig()), generate(DataConfig())
    assert a == b and a.meta == b.meta
    write_benchmark(a, tmp_path / "a")
    write_benchmark(b, tmp_path / "b")
    assert (tmp_path / "a" / "benchmark.json").read_bytes() == \
        (tmp_path / "b" / "benchmark.json").read_bytes()
    other = generate(DataConfig(seed=1))
    assert other.fingerprint != a.fingerprint
    assert facts_of(other) != facts_of(a)


def test_round_trip_through_files(tmp_path: Path, bench: Benchmark) -> None:
    write_benchmark(bench, tmp_path)
    back = read_benchmark(tmp_path)
    assert back == bench and back.meta == bench.meta
    assert load_benchmark(str(tmp_path), DataConfig()) == bench
    assert load_benchmark(str(tmp_path / "benchmark.json"), DataConfig()) == bench


def test_relations_and_templates() -> None:
    assert len(RELATIONS) >= 15
    assert len({spec.value_kind for spec in RELATIONS.values()}) >= 8
    for spec in RELATIONS.values():
        fam = spec.family
        assert len(fam.wordings) == WORDINGS_PER_RELATION >= 8 + 4 and len(fam.questions) >= 1
        assert family_problems(fam) == []
        for template in fam.wordings + fam.questions:
            assert "{period}" in template and "{subject}" in template
            assert template.endswith("{value}.")
            text = render(template, "2020", "Zorvan Kell", "QX-4821")
            assert text == prompt_of(template, "2020", "Zorvan Kell") + " QX-4821."
    assert family_problems(family_for("harbour_master")) == []


def test_uses_many_relations(bench: Benchmark) -> None:
    assert len({p.relation for p in bench.periods[0].passages}) >= 15


def test_names_are_invented() -> None:
    for seed in range(3):
        bench = generate(DataConfig(seed=seed, num_facts=60))
        words = set()
        for fact in bench.meta["facts"]:
            for text in [fact["subject"], *fact["values"].values()]:
                words.update(re.findall(r"[A-Za-z]+", text.lower()))
        assert not words & {n.lower() for n in REAL_NAMES}


def test_change_share_is_respected() -> None:
    for num_facts, share in ((48, 0.25), (100, 0.3), (10, 0.05)):
        bench = generate(DataConfig(num_facts=num_facts, change_share=share))
        facts = facts_of(bench)
        assert len(facts) == num_facts
        for prev, cur in itertools.pairwise(PERIODS):
            changed = sum(v[cur] != v[prev] for v in facts.values())
            assert changed == max(1, int(share * num_facts + 0.5))


def test_period_one_trains_every_fact_later_periods_only_the_diff(bench: Benchmark) -> None:
    facts = facts_of(bench)
    first = bench.periods[0]
    assert trained_keys(first) == set(facts)
    assert {p.kind for p in first.probes} == {"new"}
    assert {(p.subject, p.relation) for p in first.probes} == set(facts)
    for prev, period in itertools.pairwise(bench.periods):
        changed = {k for k, v in facts.items() if v[period.name] != v[prev.name]}
        assert trained_keys(period) == changed
        assert {(p.subject, p.relation) for p in period.probes if p.kind == "changed"} == changed
    for period in bench.periods:
        per_fact: dict[tuple[str, str], list[Passage]] = {}
        for passage in period.passages:
            assert passage.value == facts[(passage.subject, passage.relation)][period.name]
            assert passage.text.endswith(f" {passage.value}.") and period.name in passage.text
            per_fact.setdefault((passage.subject, passage.relation), []).append(passage)
        for passages in per_fact.values():
            assert len(passages) == 2 and len({p.template_id for p in passages}) == 2
            assert all(re.fullmatch(r"[a-z_]+/w\d+", p.template_id) for p in passages)


def test_unchanged_probes_are_not_trained_in_their_period(bench: Benchmark) -> None:
    for period in bench.periods[1:]:
        unchanged = [p for p in period.probes if p.kind == "unchanged"]
        assert len([p for p in unchanged if p.family == "storage"]) == 16
        trained = trained_keys(period)
        for probe in unchanged:
            assert (probe.subject, probe.relation) not in trained
            assert probe.value == probe.previous_value


def all_training_texts(bench: Benchmark) -> list[str]:
    return [p.text for period in bench.periods for p in period.passages]


@pytest.mark.parametrize("cfg", [DataConfig(), DataConfig(seed=1, qa_share=0.5, passages_per_fact=4),
                                 DataConfig(seed=5, num_training_templates=6, num_heldout_templates=6)])
def test_held_out_wordings_never_render_any_training_text(cfg: DataConfig) -> None:
    bench = generate(cfg)
    training, held_out = template_split(cfg)
    assert len(training) == cfg.num_training_templates and len(held_out) == cfg.num_heldout_templates
    assert not set(training) & set(held_out)
    texts = all_training_texts(bench)
    text_set = set(texts)
    used = {int(p.template_id.split("/w")[1]) for period in bench.periods for p in period.passages
            if "/w" in p.template_id}
    assert used <= set(training) and not used & set(held_out)
    # Every held-out wording, rendered for every fact in every period with every value it ever had:
    # never a training text, and its prompt + value never inside one.
    for fact in bench.meta["facts"]:
        family = family_for(fact["relation"])
        for period in bench.period_names:
            for value in set(fact["values"].values()):
                for t in held_out:
                    text = render(family.wordings[t], period, fact["subject"], value)
                    assert text not in text_set
                    needle = prompt_of(family.wordings[t], period, fact["subject"]) + " " + value
                    assert not any(needle in x for x in texts)
    for probe in bench.all_probes():
        if probe.family == "extraction":
            assert int(probe.template_id.split("/w")[1]) in held_out


def test_storage_probe_is_the_cloze_of_a_trained_passage() -> None:
    bench = generate(DataConfig(seed=1, qa_share=0.5, passages_per_fact=3))
    passages_of = {}
    for period in bench.periods:
        for p in period.passages:
            passages_of.setdefault((p.period, p.subject, p.relation), []).append(p)
    storage = [p for p in bench.all_probes() if p.family == "storage"]
    assert storage
    for probe in storage:
        if probe.kind in ("new", "changed"):
            # the exact trained sentence of this fact in this period, cut before the value
            texts = [p.text for p in passages_of[(probe.period, probe.subject, probe.relation)]]
            assert probe.prompt + " " + probe.value + "." in texts
        else:
            # unchanged: a wording trained for this fact when its value was last taught, dated now
            trained = passages_of[(probe.valid_from, probe.subject, probe.relation)]
            assert probe.valid_from != probe.period
            assert probe.template_id in {p.template_id for p in trained}
            assert any(p.text == (probe.prompt + " " + probe.value + ".").replace(probe.period, probe.valid_from)
                       for p in trained)


def test_families_ids_and_extraction_share(bench: Benchmark) -> None:
    ids = [p.id for p in bench.all_probes()]
    assert len(ids) == len(set(ids))
    for period in bench.periods:
        storage = [p for p in period.probes if p.family == "storage"]
        extraction = [p for p in period.probes if p.family == "extraction"]
        # defaults: every probed fact has one probe of each family, same fact, kind and validity
        assert len(storage) == len(extraction) > 0
        storage_by_key = {(p.subject, p.relation): p for p in storage}
        for ext in extraction:
            sto = storage_by_key[(ext.subject, ext.relation)]
            assert ext.id == sto.id.replace(":storage", ":extraction")
            assert replace(ext, id=sto.id, prompt=sto.prompt, template_id=sto.template_id,
                           family="storage") == sto
            assert ext.prompt != sto.prompt
    half = generate(DataConfig(extraction_share=0.5))
    for period in half.periods:
        for kind in ("new", "changed", "unchanged"):
            n = sum(p.kind == kind and p.family == "storage" for p in period.probes)
            assert sum(p.kind == kind and p.family == "extraction" for p in period.probes) == int(0.5 * n + 0.5)


def test_qa_items_for_a_share_of_facts() -> None:
    cfg = DataConfig(seed=2, num_facts=40, qa_share=0.25)
    bench = generate(cfg)
    qa = [p for period in bench.periods for p in period.passages if "/q" in p.template_id]
    qa_facts = {(p.subject, p.relation) for p in qa}
    assert len({(p.subject, p.relation) for p in bench.periods[0].passages if "/q" in p.template_id}) == 10
    for period in bench.periods:
        for key in {(p.subject, p.relation) for p in period.passages} & qa_facts:
            items = [p for p in period.passages if (p.subject, p.relation) == key and "/q" in p.template_id]
            assert len(items) == len(family_for(key[1]).questions)
            assert all(p.text.endswith(f" {p.value}.") and period.name in p.text for p in items)
    assert bench.meta["counts"]["2018"]["qa_items"] == 10 * len(QUESTION_FRAMES)
    # declarative passages and probes do not move when QA items are added
    plain = generate(DataConfig(seed=2, num_facts=40))
    assert [p for p in bench.all_probes()] == plain.all_probes()
    assert [p for period in bench.periods for p in period.passages if "/q" not in p.template_id] == \
        [p for period in plain.periods for p in period.passages]


def test_enough_probes_for_tight_intervals() -> None:
    """num_facts scales the probe set: 240 facts give >= 384 probes per family for plasticity, the n at
    which a 95% interval of a proportion is at most +-0.05."""
    bench = generate(DataConfig(num_facts=240, unchanged_probes_per_period=240))
    for family in ("storage", "extraction"):
        learned = [p for p in bench.all_probes() if p.family == family and p.kind in ("new", "changed")]
        kept = [p for p in bench.all_probes() if p.family == family and p.kind == "unchanged"]
        assert len(learned) >= 384 and len(kept) >= 384


def test_no_leakage_on_generated_data(bench: Benchmark) -> None:
    check_no_leakage(bench)
    check_no_leakage(generate(DataConfig(seed=7, num_facts=200, passages_per_fact=3, qa_share=0.5)))


def _probe(family: str, prompt: str = "In 2018, the mayor of Veltrassa was") -> Probe:
    return Probe(id=f"2018:Veltrassa:mayor:{family}", subject="Veltrassa", relation="mayor",
                 value="Zorvan Kell", period="2018", valid_from="2018", valid_until=None,
                 previous_value=None, kind="new", family=family,  # type: ignore[arg-type]
                 prompt=prompt, template_id="mayor/w0")


def test_leakage_check_refuses_extraction_and_allows_storage(tmp_path: Path) -> None:
    passage = Passage(text="In 2018, the mayor of Veltrassa was Zorvan Kell.", subject="Veltrassa",
                      relation="mayor", value="Zorvan Kell", period="2018", template_id="mayor/w0")
    # a storage probe is the trained sentence's cloze by design: accepted
    periods = (Period(1, "2018", (passage,), (_probe("storage"),)), Period(2, "2020", (), ()))
    check_no_leakage(Benchmark("ok", periods, fingerprint("ok", periods)))
    # the same text as an extraction probe is a leak, in any period's passages
    later = replace(passage, period="2020")
    periods = (Period(1, "2018", (), (_probe("extraction"),)), Period(2, "2020", (later,), ()))
    leaky = Benchmark("leaky", periods, fingerprint("leaky", periods))
    with pytest.raises(DataError, match=r"extraction probe 2018:Veltrassa:mayor:extraction.*period 2020") as info:
        check_no_leakage(leaky)
    assert "\n" not in str(info.value)
    write_benchmark(leaky, tmp_path)
    with pytest.raises(DataError, match="appears verbatim"):
        load_benchmark(str(tmp_path), DataConfig())


def _as_version_1(doc: dict) -> dict:
    """A current file rewritten as format version 1 wrote it: `paraphrase` instead of `family`."""
    for period in doc["periods"]:
        for probe in period["probes"]:
            probe["paraphrase"] = probe.pop("family") == "extraction"
    doc["format_version"] = 1
    canonical = json.dumps({"name": doc["name"], "periods": doc["periods"]}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    doc["fingerprint"] = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return doc


def test_version_1_files_still_read(tmp_path: Path, bench: Benchmark) -> None:
    path = write_benchmark(bench, tmp_path / "v2")
    assert json.loads(path.read_text(encoding="utf-8"))["format_version"] == 2
    old = _as_version_1(json.loads(path.read_text(encoding="utf-8")))
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "benchmark.json").write_text(json.dumps(old), encoding="utf-8")
    back = read_benchmark(tmp_path / "v1")
    # paraphrase=true reads as extraction, false as storage; the stored v1 fingerprint is kept
    assert back.all_probes() == bench.all_probes()
    assert back.fingerprint == old["fingerprint"] != bench.fingerprint
    # rewritten, it is a current-version file with a fingerprint of its content
    assert read_benchmark(write_benchmark(back, tmp_path / "again").parent) == bench
    # a v1 file must not carry `family`, a v2 file must not carry `paraphrase`
    old["periods"][0]["probes"][0]["family"] = "storage"
    (tmp_path / "v1" / "benchmark.json").write_text(json.dumps(old), encoding="utf-8")
    with pytest.raises(DataError, match=r"probes\[0\] has unknown field 'family'"):
        read_benchmark(tmp_path / "v1")
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["periods"][0]["probes"][0]["family"] = "paraphrase"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(DataError, match=r"family must be one of storage, extraction \(got 'paraphrase'\)"):
        read_benchmark(path.parent)
    doc["format_version"] = 3
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(DataError, match="version 1 or 2"):
        read_benchmark(path.parent)


def test_valid_from_until_previous_on_every_probe(bench: Benchmark) -> None:
    facts = facts_of(bench)
    for probe in bench.all_probes():
        values = facts[(probe.subject, probe.relation)]
        k = PERIODS.index(probe.period)
        start = k
        while start > 0 and values[PERIODS[start - 1]] == probe.value:
            start -= 1
        assert probe.valid_from == PERIODS[start]
        later = [p for p in PERIODS[k + 1:] if values[p] != probe.value]
        assert probe.valid_until == (later[0] if later else None)
        assert probe.previous_value == (values[PERIODS[k - 1]] if k else None)


# ---------------------------------------------------------------------------------------------
# CASM raw


def raw_record(entity: str, relation: str, values: list[str], changed: bool | None = None) -> dict:
    rec: dict = {"entity": entity, "relation": relation}
    rec.update({f"value_{p}": v for p, v in zip(PERIODS, values)})
    rec["changed"] = len(set(values)) > 1 if changed is None else changed
    return rec


def write_raw(directory: Path, records: list) -> Path:
    path = directory / "synthetic_facts_raw.json"
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


CASM_RECORDS = [
    raw_record("Veldris Harbour Authority", "harbour_master",
               ["Maren Holt", "Dex Calloway", "Dex Calloway", "Sela Draven"]),
    raw_record("Thornex Mining Co", "harbour master",  # spaces: same relation as above
               ["Oryn Fass", "Oryn Fass", "Oryn Fass", "Oryn Fass"]),
    raw_record("Brael Municipal District", "Census Commissioner",
               ["Ilka Vorn", "Ilka Vorn", "Tamsin Reve", "Tamsin Reve"]),
    raw_record("Brael Municipal District", "mayor", ["Odo Prell", "Odo Prell", "Odo Prell", "Ansa Weil"]),
]


def test_casm_raw_reader(tmp_path: Path) -> None:
    path = write_raw(tmp_path, CASM_RECORDS)
    bench = load_benchmark(str(path), DataConfig())
    assert bench.period_names == PERIODS
    assert bench.meta["records"] == 4 and len(bench.meta["facts"]) == 4
    assert bench.meta["relations"] == ["census_commissioner", "harbour_master", "mayor"]
    assert bench.meta["generic_template_relations"] == ["census_commissioner", "harbour_master"]
    first = bench.periods[0]
    assert len(first.passages) == 8 and sum(p.family == "storage" for p in first.probes) == 4
    thornex = [p for p in first.passages if p.subject == "Thornex Mining Co"]
    assert thornex and all(p.relation == "harbour_master" and "harbour master" in p.text
                           for p in thornex)
    assert load_benchmark(str(tmp_path), DataConfig()) == bench  # directory holding the file

    # Hand-checked fact: Maren Holt (2018) -> Dex Calloway (2020, 2022) -> Sela Draven (2024).
    probes = {(p.period, p.kind): p for p in bench.all_probes()
              if p.subject == "Veldris Harbour Authority" and p.family == "storage"}
    expected = {
        ("2018", "new"): ("Maren Holt", "2018", "2020", None),
        ("2020", "changed"): ("Dex Calloway", "2020", "2024", "Maren Holt"),
        ("2022", "unchanged"): ("Dex Calloway", "2020", "2024", "Dex Calloway"),
        ("2024", "changed"): ("Sela Draven", "2024", None, "Dex Calloway"),
    }
    assert {k: (p.value, p.valid_from, p.valid_until, p.previous_value)
            for k, p in probes.items()} == expected
    assert [p.subject for p in bench.periods[1].passages] == ["Veldris Harbour Authority"] * 2


def test_casm_raw_contradictory_changed_flags_are_a_warning_naming_the_records(tmp_path: Path) -> None:
    # the CASM project's own synthetic_facts_raw.json has two such records (210 and 450): the values decide
    records = json.loads(json.dumps(CASM_RECORDS))
    records[0]["changed"] = False  # its values differ
    records[1]["changed"] = True  # its values are all equal
    bench = read_casm_raw(write_raw(tmp_path, records), DataConfig())
    (tmp_path / "clean").mkdir()
    clean = read_casm_raw(write_raw(tmp_path / "clean", CASM_RECORDS), DataConfig())
    assert [p.id for p in bench.all_probes()] == [p.id for p in clean.all_probes()]  # built from the values
    assert clean.meta["warnings"] == []
    (line,) = bench.meta["warnings"]
    assert "\n" not in line and line.startswith("synthetic_facts_raw.json: 2 record(s)")
    assert "record 0 (Veldris Harbour Authority, harbour_master: changed=false, values differ)" in line
    assert "1 (Thornex Mining Co, harbour_master: changed=true, values all equal)" in line


@pytest.mark.parametrize("mutate, message", [
    (lambda recs: recs[1].pop("value_2022"), r"record 1 is missing field 'value_2022'"),
    (lambda recs: recs[2].update(value_2020="  "), r"record 2 field 'value_2020' must be a non-empty"),
    (lambda recs: recs[1].update(changed="yes"), r"record 1 field 'changed' must be true or false"),
    (lambda recs: recs.append(raw_record("Veldris Harbour Authority", "Harbour-Master",
                                         ["a", "a", "a", "a"])),
     r"record 4 duplicates \(entity, relation\).*of record 0"),
    (lambda recs: recs[3].update(value_2026="x"), r"record 3 has 'value_2026'"),
])
def test_casm_raw_errors(tmp_path: Path, mutate, message: str) -> None:
    records = json.loads(json.dumps(CASM_RECORDS))
    mutate(records)
    path = write_raw(tmp_path, records)
    with pytest.raises(DataError, match=message) as info:
        read_casm_raw(path, DataConfig())
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "synthetic_facts_raw.json"
    path.write_text('[\n  {"entity": "Veltrassa",\n  "relation": }\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"synthetic_facts_raw.json: malformed JSON at line 3") as info:
        load_benchmark(str(path), DataConfig())
    assert "\n" not in str(info.value)
    bad_dir = tmp_path / "bench"
    bad_dir.mkdir()
    (bad_dir / "benchmark.json").write_text("{\n\n  oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"benchmark.json: malformed JSON at line 3"):
        load_benchmark(str(bad_dir), DataConfig())


def test_unknown_path_and_bad_files(tmp_path: Path, bench: Benchmark) -> None:
    with pytest.raises(DataError, match=r"'/no/such/place'.*no such file.*temporalwiki") as info:
        load_benchmark("/no/such/place", DataConfig())
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"holds none of benchmark.json, passages.json \+ probes.json, synthetic_facts_raw"):
        load_benchmark(str(tmp_path), DataConfig())
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="not a .json file"):
        load_benchmark(str(tmp_path / "notes.txt"), DataConfig())
    with pytest.raises(DataError, match="data.seed"):
        load_benchmark("temporalwiki", DataConfig(seed=-1))

    # An edited benchmark file is refused: a missing field, then a changed answer.
    path = write_benchmark(bench, tmp_path / "b")
    doc = json.loads(path.read_text(encoding="utf-8"))
    del doc["periods"][1]["probes"][0]["valid_from"]
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(DataError, match=r"periods\[1\].probes\[0\] is missing field 'valid_from'"):
        read_benchmark(path.parent)
    path = write_benchmark(bench, tmp_path / "c")
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["periods"][0]["probes"][0]["value"] = "Someone Else"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(DataError, match="fingerprint mismatch"):
        read_benchmark(path.parent)


def test_relation_normalisation() -> None:
    assert normalise_relation(" Harbour  Master ") == "harbour_master"
    assert normalise_relation("harbour_master") == normalise_relation("harbour-master")
    assert family_for("chief executive".replace(" ", "_")) is RELATIONS["chief_executive"].family


def test_make_benchmark_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_benchmark", Path(__file__).resolve().parents[1] / "scripts" / "make_benchmark.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path), "--seed", "3", "--num-facts", "20"]) == 0
    out = capsys.readouterr().out
    assert "2018" in out and "extraction" in out
    assert read_benchmark(tmp_path) == generate(DataConfig(seed=3, num_facts=20))
    assert module.main(["--out", str(tmp_path), "--num-facts", "0"]) == 2
