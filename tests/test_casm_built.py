"""The reader of the CASM project's built files (passages.json + probes.json): the mapping onto our
records, one-line errors for unusable data, and warnings (data taken as the truth) for derived fields
that disagree with the values."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from data import DataConfig, DataError, load_benchmark, read_casm_built
from data.io import CASM_RAW_FILE, read_benchmark, write_benchmark
from tests.conftest import only_run_dir, read_results, run_main

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "casm_built"
PERIODS = ["2018", "2020", "2022", "2024"]
AZURE = "Azure Tide Harbor:primary_berth_depth:storage"  # 12 fathoms (2018, 2020) -> 14 fathoms (2022, 2024)
RETRAINED = "are kind unchanged but their fact is restated"  # the fixture's one warning: CASM's own design


def copy_fixture(tmp_path: Path, passages: Callable | None = None, probes: Callable | None = None) -> Path:
    """The fixture in tmp_path/casm, each file's JSON first passed through the given mutation."""
    out = tmp_path / "casm"
    shutil.copytree(FIXTURE, out)
    for name, mutate in (("passages.json", passages), ("probes.json", probes)):
        if mutate is not None:
            doc = json.loads((out / name).read_text(encoding="utf-8"))
            doc = mutate(doc) or doc
            (out / name).write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return out


def test_reads_the_fixture_into_periods_probes_and_passages() -> None:
    bench = read_casm_built(FIXTURE, DataConfig())
    assert bench.name == "casm_built" and bench.period_names == PERIODS
    assert [len(p.passages) for p in bench.periods] == [4, 4, 4, 4]
    assert [len(p.probes) for p in bench.periods] == [4, 4, 4, 4]
    counts = {name: (row["new"], row["changed"], row["unchanged"]) for name, row in bench.meta["counts"].items()}
    assert counts == {"2018": (4, 0, 0), "2020": (0, 1, 3), "2022": (0, 1, 3), "2024": (0, 1, 3)}
    assert bench.meta["source"] == "casm_built" and bench.meta["unattributed_passages"] == 0
    # CASM leaves previous_value and valid_until null on purpose: filled from the other periods' values.
    assert bench.meta["filled_from_values"] == {"previous_value": 12, "valid_until": 6}

    # Hand-checked fact: 12 fathoms in 2018 and 2020, 14 fathoms from 2022 on.
    probes = {p.id: p for p in bench.all_probes()}
    expected = {  # kind, value, previous_value, valid_from, valid_until
        "2018": ("new", "12 fathoms", None, "2018", "2022"),
        "2020": ("unchanged", "12 fathoms", "12 fathoms", "2018", "2022"),
        "2022": ("changed", "14 fathoms", "12 fathoms", "2022", None),
        "2024": ("unchanged", "14 fathoms", "14 fathoms", "2022", None),
    }
    for period, fields in expected.items():
        p = probes[f"{period}:{AZURE}"]
        assert (p.kind, p.value, p.previous_value, p.valid_from, p.valid_until) == fields, period
        assert p.prompt == f"[{period}] The primary berth depth of Azure Tide Harbor is"
        assert p.subject == "Azure Tide Harbor" and p.relation == "primary_berth_depth"
        assert p.period == period and p.family == "storage" and p.template_id.startswith("casm/")
    # Probe order within a period is the file's: the changed list, then the unchanged list.
    assert [p.subject for p in bench.periods[2].probes] == [
        "Azure Tide Harbor", "Coral Reef Buoy", "Seabridge Construction", "Whispering Shoals"]
    passage = bench.periods[2].passages[0]
    assert passage.text == "In 2022, the primary berth depth of Azure Tide Harbor is 14 fathoms."
    assert (passage.subject, passage.relation, passage.value) == (
        "Azure Tide Harbor", "primary_berth_depth", "14 fathoms")

    warnings = bench.meta["warnings"]
    assert len(warnings) == 1 and RETRAINED in warnings[0] and "and 6 more" in warnings[0]


def test_round_trips_through_our_own_file_format(tmp_path: Path) -> None:
    # A run directory keeps the benchmark as benchmark.json; reports read it back strictly.
    bench = read_casm_built(FIXTURE, DataConfig())
    write_benchmark(bench, tmp_path)
    again = read_benchmark(tmp_path)
    assert again == bench and again.meta["warnings"] == bench.meta["warnings"]


def test_period_order_is_the_files_not_sorted(tmp_path: Path) -> None:
    def rename(doc: dict) -> dict:
        return {"late": doc["2018"], "early": doc["2020"]}

    def rename_probes(doc: dict) -> dict:
        first, second = doc["2018"], doc["2020"]
        for rec in first["changed"] + second["changed"] + second["unchanged"]:
            for key in ("timestamp", "valid_from"):
                rec[key] = None
            rec["metadata"] = None
        return {"late": first, "early": second}

    bench = read_casm_built(copy_fixture(tmp_path, rename, rename_probes), DataConfig())
    assert bench.period_names == ["late", "early"]
    assert bench.meta["warnings"] == [w for w in bench.meta["warnings"] if RETRAINED in w]


def test_dispatch_from_a_directory_or_either_file(tmp_path: Path) -> None:
    bench = read_casm_built(FIXTURE, DataConfig())
    assert load_benchmark(str(FIXTURE), DataConfig()) == bench
    assert load_benchmark(str(FIXTURE / "probes.json"), DataConfig()) == bench
    assert load_benchmark(str(FIXTURE / "passages.json"), DataConfig()) == bench
    # CASM's data/ directory also holds the raw facts: the built files (what the paper ran) win.
    both = copy_fixture(tmp_path)
    (both / CASM_RAW_FILE).write_text("[]", encoding="utf-8")
    assert load_benchmark(str(both), DataConfig()) == bench
    # One of the two files alone is not a built benchmark; the raw file still dispatches as before.
    (both / "passages.json").unlink()
    with pytest.raises(DataError, match=r"synthetic_facts_raw.json: contains no fact records"):
        load_benchmark(str(both), DataConfig())


def _drop(split: str, i: int, key: str):
    def mutate(doc: dict) -> None:
        del doc["2020"][split][i][key]
    return mutate


def _set(period: str, split: str, i: int, key: str, value):
    def mutate(doc: dict) -> None:
        doc[period][split][i][key] = value
    return mutate


@pytest.mark.parametrize("passages, probes, message", [
    (lambda d: "nope", None, r"passages.json: must be a JSON object \{period: \[passage text"),
    (lambda d: {"2018": d["2018"]}, None, r"passages.json: needs at least two periods"),
    (lambda d: d.update({"2020": []}), None, r"passages.json: period '2020' has no passages"),
    (lambda d: d["2022"].__setitem__(1, 7), None, r"passages.json: period '2022' passage \[1\] must be a non-empty"),
    (lambda d: d.update({"20/22": d.pop("2022")}), None, r"passages.json: period name '20/22' must match"),
    (None, lambda d: d.update({"2026": d["2024"]}), r"probes.json: period '2026' is not in passages.json"),
    (None, lambda d: d.pop("2024"), r"probes.json: period '2024' of passages.json has no entry"),
    (None, lambda d: d.update({"2020": {"changed": [], "unchanged": []}}), r"probes.json: period '2020' has no probes"),
    (None, lambda d: d["2020"].update(new=[]), r"probes.json: period '2020' has unknown list 'new'"),
    (None, lambda d: d["2020"].update(changed={}), r"probes.json: period '2020' changed must be a list"),
    (None, _drop("unchanged", 1, "ground_truth"),
     r"probes.json: period '2020' unchanged\[1\] is missing field 'ground_truth'"),
    (None, _drop("changed", 0, "prompt"), r"probes.json: period '2020' changed\[0\] is missing field 'prompt'"),
    (None, _set("2022", "changed", 0, "ground_truth", 14),
     r"probes.json: period '2022' changed\[0\] field 'ground_truth' must be a non-empty string \(got 14\)"),
    (None, _set("2022", "unchanged", 2, "is_changed", "no"),
     r"probes.json: period '2022' unchanged\[2\] field 'is_changed' must be true, false or null"),
    (None, _set("2022", "unchanged", 0, "metadata", "2022"),
     r"probes.json: period '2022' unchanged\[0\] field 'metadata' must be a JSON object or null"),
    (None, _set("2024", "unchanged", 0, "valid_from", "2019"),
     r"probes.json: period '2024' unchanged\[0\] field 'valid_from' names period '2019', which is not in the files"),
    (None, lambda d: d["2024"]["unchanged"].append(d["2024"]["changed"][0]),
     r"probes.json: period '2024' unchanged\[3\] repeats \(subject, relation\).*of period '2024' changed\[0\]"),
    (None, lambda d: d["2020"]["changed"].__setitem__(0, ["x"]),
     r"probes.json: period '2020' changed\[0\] must be a JSON object \(got list\)"),
])
def test_unusable_data_is_one_line_per_problem(tmp_path: Path, passages, probes, message: str) -> None:
    directory = copy_fixture(tmp_path, passages, probes)
    with pytest.raises(DataError, match=message) as info:
        load_benchmark(str(directory), DataConfig())
    assert all("\n" not in p and str(directory) in p for p in info.value.problems), info.value.problems


def test_unreadable_files_and_every_problem_listed(tmp_path: Path) -> None:
    directory = copy_fixture(tmp_path)
    (directory / "probes.json").write_text('{\n  "2018": {\n    "changed": [,]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"probes.json: malformed JSON at line 3 column"):
        load_benchmark(str(directory), DataConfig())
    with pytest.raises(DataError, match=r"passages.json: no such file"):
        read_casm_built(tmp_path, DataConfig())

    def two_bad(doc: dict) -> None:
        del doc["2020"]["changed"][0]["subject"]
        doc["2022"]["unchanged"][1]["relation"] = None

    directory = copy_fixture(tmp_path / "b", probes=two_bad)
    with pytest.raises(DataError) as info:
        read_casm_built(directory, DataConfig())
    assert len(info.value.problems) == 2
    assert "'2020' changed[0] is missing field 'subject'" in info.value.problems[0]
    assert "'2022' unchanged[1] field 'relation' must be a non-empty string (got None)" in info.value.problems[1]


def test_contradicting_derived_fields_are_warnings_and_the_values_win(tmp_path: Path) -> None:
    def flaws(doc: dict) -> None:
        azure_2022 = doc["2022"]["changed"][0]  # 14 fathoms, changed from 12
        azure_2022.update(is_changed=False, valid_from="2018", previous_value="13 fathoms",
                          current_value="15 fathoms")
        doc["2020"]["unchanged"][0].update(is_changed=True, timestamp="2022", valid_until="2024")
        for rec in doc["2024"]["unchanged"]:  # every one of them: more than the ids shown
            rec["is_changed"] = True
        doc["2024"]["changed"].append(doc["2024"]["unchanged"].pop(0))  # listed under the wrong split

    bench = load_benchmark(str(copy_fixture(tmp_path, probes=flaws)), DataConfig())
    probes = {p.id: p for p in bench.all_probes()}
    p = probes[f"2022:{AZURE}"]
    assert (p.kind, p.value, p.previous_value, p.valid_from, p.valid_until) == (
        "changed", "14 fathoms", "12 fathoms", "2022", None)
    p = probes[f"2020:{AZURE}"]
    assert (p.kind, p.valid_until) == ("unchanged", "2022")
    assert probes[f"2024:{AZURE}"].kind == "unchanged"

    lines = bench.meta["warnings"]
    assert all("\n" not in line for line in lines)

    def line(needle: str) -> str:
        found = [w for w in lines if needle in w]
        assert len(found) == 1, (needle, lines)
        return found[0]

    assert f"1 probe(s) have is_changed=false although the values say changed (the values are used): 2022:{AZURE}" \
        in line("is_changed=false")
    flag = line("is_changed=true although the values say unchanged")
    assert f"2020:{AZURE}" in flag and "4 probe(s)" in flag and "and 1 more" in flag
    assert f"2024:{AZURE}" in line("listed under 'changed' although the values say unchanged")
    assert f"2022:{AZURE}" in line("previous_value that is not the 2020 ground_truth")
    assert f"2022:{AZURE}" in line("current_value that differs from ground_truth")
    assert f"2022:{AZURE}" in line("valid_from that disagrees")
    assert f"2020:{AZURE}" in line("valid_until that disagrees")
    assert f"2020:{AZURE}" in line("have timestamp '2022' although they are listed under period '2020'")
    assert len(lines) == 9  # the eight above and the fixture's own re-training warning


def test_probes_worded_exactly_like_a_passage_are_a_warning_not_a_refusal(tmp_path: Path) -> None:
    def storage_wording(doc: dict) -> None:
        doc["2018"]["changed"][0]["prompt"] = "In 2018, the primary berth depth of Azure Tide Harbor is"

    bench = load_benchmark(str(copy_fixture(tmp_path, probes=storage_wording)), DataConfig())
    (overlap,) = [w for w in bench.meta["warnings"] if "verbatim in a training passage" in w]
    assert "1 probe(s)" in overlap and f"2018:{AZURE}" in overlap


def test_cli_runs_the_fixture_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    proc = run_main("--mode", "synthetic", "--benchmark", str(FIXTURE), "--method", "lora",
                    "--set", "train.epochs=1", "--set", "train.progress=false", "--run-root", str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and RETRAINED in warnings[0]
    run = only_run_dir(root)
    assert run.name.startswith("casm_built-lora-")
    results = read_results(run)
    assert results["data_fingerprint"] == read_casm_built(FIXTURE, DataConfig()).fingerprint
    assert len(results["metrics"]["matrix_storage_em"]) == 5  # base row + 4 periods
    assert results["metrics"]["acc_extraction"] is None  # CASM has no held-out wordings


def test_a_fact_missing_from_a_period_falls_back_to_the_files_own_fields(tmp_path: Path) -> None:
    def gap(doc: dict) -> None:
        doc["2020"]["unchanged"].pop(0)  # Azure Tide Harbor is not probed in 2020
        doc["2018"]["changed"][0]["valid_until"] = "2020"  # a change inside the gap: cannot be checked

    bench = read_casm_built(copy_fixture(tmp_path, probes=gap), DataConfig())
    probes = {p.id: p for p in bench.all_probes()}
    assert f"2020:{AZURE}" not in probes
    assert probes[f"2018:{AZURE}"].valid_until == "2020"  # the file's, consistent with what is known
    p = probes[f"2022:{AZURE}"]  # no 2020 value to compare with: the file's is_changed and valid_from
    assert (p.kind, p.previous_value, p.valid_from) == ("changed", None, "2022")
    assert [w for w in bench.meta["warnings"] if RETRAINED not in w] == []


def test_first_period_flags_follow_casms_convention(tmp_path: Path) -> None:
    # CASM lists every period-1 fact under "changed" with is_changed false: that is silent; else a warning.
    def flaws(doc: dict) -> None:
        doc["2018"]["changed"][1]["is_changed"] = True
        doc["2018"]["unchanged"].append(doc["2018"]["changed"].pop(2))
        doc["2018"]["changed"][0]["previous_value"] = "11 fathoms"

    bench = read_casm_built(copy_fixture(tmp_path, probes=flaws), DataConfig())
    assert {p.kind for p in bench.periods[0].probes} == {"new"}
    assert bench.periods[0].probes[0].previous_value is None
    lines = [w for w in bench.meta["warnings"] if RETRAINED not in w]
    assert len(lines) == 3
    for needle in ("1 probe(s) have is_changed=true although it is the first period",
                   "1 probe(s) are listed under 'unchanged' although it is the first period",
                   f"1 probe(s) have a previous_value in the first period (dropped): 2018:{AZURE}"):
        assert any(needle in line for line in lines), (needle, lines)
