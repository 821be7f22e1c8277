"""scripts/export.py: every committed period exports to a standard artifact that loads with the stock
libraries (peft / transformers; the small project loader for memory methods) and scores every probe
exactly as the toolkit's own evaluation of that period did; bad input exits 2 and writes nothing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from artifacts import TMP_PREFIX, read_manifest, sha256_file, verify_manifest
from training.period_model import load_run_config
from scripts.export import EMBEDDED_BASE_ID, HF_MODEL, MEMORY_MODEL, PEFT_ADAPTER
from scripts.export_loader import load_memory_export
from tests.conftest import SMALL, run_main, tiny_stream_runs
from scripts import export as export_job
from training.config import ModelConfig
from training.models import build_synthetic, cached_embedded_dir
from training.workload import StreamWorkload, read_workload

# Two periods: the exported period (2020) is one whose model has seen an earlier period, so casm's
# router really chooses between banks; one period more would only add run time.
TWO_PERIODS = ["--set", "data.periods=[2018,2020]"]
ALL_METHODS = ("lora", "full_ft", "smf", "casm")
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


# ------------------------------------------------------------------------------------------------
# helpers


def runs_by_method(root: Path) -> dict[str, Path]:
    out = {}
    for run in sorted(root.iterdir()):
        if run.is_dir():
            out[yaml.safe_load((run / "config.yaml").read_text())["method"]["name"]] = run
    return out


def export(run: Path, out: Path, *args: str) -> int:
    """The job `main.py export` dispatches to, in-process: without 8 s of imports per call."""
    return export_job.main([str(run), "--out", str(out), *args])


def committed_predictions(run: Path, period_dir: str) -> list[dict[str, Any]]:
    text = (run / "periods" / period_dir / "eval" / "predictions.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


@contextmanager
def threads(n: int) -> Iterator[None]:
    # The run evaluated with train.threads; float sums can differ with another thread count.
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate(model: nn.Module, tokenizer: Any, run: Path) -> list[dict[str, Any]]:
    """The toolkit's evaluation of every item, with the run's own workload (probes or a stream's tasks)
    and eval settings: what the trainer ran after each period, without a method's eval_scope."""
    cfg = load_run_config(run)
    workload = read_workload(run / "data")
    with threads(cfg.train.threads):
        return workload.evaluate(model, tokenizer, torch.device("cpu"), cfg.eval.batch_size, cfg.eval.max_new_tokens,
                                 should_stop=lambda: False, progress=lambda n: None)


def item_ids(run: Path, period: str) -> set[str]:
    """The ids of the eval items of one period (a stream: one task)."""
    workload = read_workload(run / "data")
    if isinstance(workload, StreamWorkload):
        return {x.id for t in workload.stream.tasks if t.name == period for x in t.eval}
    return {p.id for p in workload.stages[workload.stage_names.index(period)].period.probes}


def rows_of(rows: list[dict[str, Any]], ids: set[str]) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r["id"] in ids), key=lambda r: r["id"])


def same_answers(got: list[dict[str, Any]], want: list[dict[str, Any]], tolerance: float) -> None:
    """Equal rows, except float scores (log-probabilities) within `tolerance`: for an export that sums in
    another order (a combined or merged adapter)."""
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in g:
            if isinstance(g[key], float) or (isinstance(g[key], list) and g[key] and isinstance(g[key][0], float)):
                a, b = (g[key], w[key]) if isinstance(g[key], list) else ([g[key]], [w[key]])
                assert max(abs(x - y) for x, y in zip(a, b)) <= tolerance, (g["id"], key, g[key], w[key])
            else:
                assert g[key] == w[key], (g["id"], key)


def synthetic_base(run: Path) -> nn.Module:
    """The synthetic base exists on no hub: rebuilt from the run's config and data, as training built it
    (the manifest's base_model_rebuild says the same)."""
    cfg = load_run_config(run)
    base, _ = build_synthetic(cfg.model, read_workload(run / "data"), cfg.seed)
    return base


def load_stock(out: Path, base: nn.Module | None) -> tuple[nn.Module, Any]:
    """Load an export the way a user outside the toolkit would."""
    fmt = read_manifest(out)["format"]
    if fmt == PEFT_ADAPTER:
        assert base is not None
        return PeftModel.from_pretrained(base, str(out)), AutoTokenizer.from_pretrained(str(out))
    if fmt == HF_MODEL:
        return (AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32),
                AutoTokenizer.from_pretrained(str(out)))
    loaded = load_memory_export(out)
    return loaded.model, loaded.tokenizer


def check_export(out: Path, run: Path, method: str, period: str, base_id: str) -> dict[str, Any]:
    """Manifest: verifies, lists every file, carries the run's config, the period and the base id;
    then the layout of the method's format."""
    assert verify_manifest(out) == (True, "ok")
    manifest = read_manifest(out)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == set(manifest["files"]) | {"manifest.json"}
    assert manifest["run_config"] == yaml.safe_load((run / "config.yaml").read_text())
    assert (manifest["period_name"], manifest["method"], manifest["base_model"]) == (period, method, base_id)
    source = read_manifest(run / manifest["source"]["period_dir"])
    assert manifest["source"]["trainable_sha256"] == source["trainable_sha256"]
    top = {p.name for p in out.iterdir()}
    if manifest["format"] == PEFT_ADAPTER:
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "manifest.json",
                *TOKENIZER_FILES} <= top, top
        assert not [n for n in top if n.startswith(("model", "pytorch_model"))], "no backbone in an adapter export"
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == base_id
        adapter = load_file(str(out / "adapter_model.safetensors"))
        assert adapter and all("lora_" in k for k in adapter), "the adapter file holds no backbone weight"
    elif manifest["format"] == HF_MODEL:
        assert {"config.json", "model.safetensors", "generation_config.json", *TOKENIZER_FILES} <= top, top
    else:
        assert top == {"README.md", "config.json", "manifest.json", "backbone", "clkit"}, top
        # the period's own state, byte for byte
        for name in ("trainable.safetensors", "method_state.pt"):
            assert sha256_file(out / "clkit" / name) == source["files"][name]["sha256"]
        # vanilla transformers must refuse rather than load the backbone without the memories
        with pytest.raises(ValueError, match=MEMORY_MODEL):
            AutoModelForCausalLM.from_pretrained(str(out))
    return manifest


# ------------------------------------------------------------------------------------------------
# the synthetic model, every method


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-runs")
    proc = run_main(*SMALL, *TWO_PERIODS, "--method", ",".join(ALL_METHODS), "--run-root", str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs_by_method(root)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_export_loads_with_stock_libraries_and_scores_every_probe_as_the_period(
        synthetic_runs: dict[str, Path], tmp_path: Path, method: str) -> None:
    run = synthetic_runs[method]
    out = tmp_path / "export"
    assert export(run, out, "--period", "2020") == 0
    manifest = check_export(out, run, method, "2020", "synthetic")
    assert manifest["format"] == {"lora": PEFT_ADAPTER, "full_ft": HF_MODEL}.get(method, MEMORY_MODEL)
    model, tokenizer = load_stock(out, synthetic_base(run) if manifest["format"] == PEFT_ADAPTER else None)
    got = evaluate(model, tokenizer, run)
    assert got == committed_predictions(run, "2-2020")  # predictions, em, f1 and logprob, bit for bit
    # ... and that is the trained period, not the base model answering the same
    assert got != committed_predictions(run, "0-base")


def test_merged_lora_is_a_plain_model_that_scores_like_the_adapter(synthetic_runs: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    run = synthetic_runs["lora"]
    out = tmp_path / "merged"
    assert export(run, out, "--period", "2020", "--merge") == 0
    manifest = check_export(out, run, "lora", "2020", "synthetic")
    assert manifest["format"] == HF_MODEL and manifest["merged"] is True
    assert not (out / "adapter_config.json").exists()
    model, tokenizer = load_stock(out, None)
    got, want = evaluate(model, tokenizer, run), committed_predictions(run, "2-2020")
    # W + s*B@A, rounded once, is not bit-identical to W x + s*B(A x): same answers, log-probs to 1e-4.
    assert [(g["id"], g["prediction"], g["em"], g["f1"]) for g in got] == \
           [(w["id"], w["prediction"], w["em"], w["f1"]) for w in want]
    assert max(abs(g["logprob"] - w["logprob"]) for g, w in zip(got, want)) < 1e-4


def test_period_all_and_the_default_period(synthetic_runs: dict[str, Path], tmp_path: Path) -> None:
    run = synthetic_runs["lora"]
    out = tmp_path / "all"
    assert export(run, out, "--period", "all") == 0
    assert sorted(p.name for p in out.iterdir()) == ["1-2018", "2-2020", "manifest.json"]
    top = read_manifest(out)
    assert verify_manifest(out) == (True, "ok") and top["kind"] == "export_set"
    assert top["periods"] == ["1-2018", "2-2020"] and "1-2018/adapter_model.safetensors" in top["files"]
    check_export(out / "1-2018", run, "lora", "2018", "synthetic")
    model, tokenizer = load_stock(out / "1-2018", synthetic_base(run))
    assert evaluate(model, tokenizer, run) == committed_predictions(run, "1-2018")
    # without --period: the newest committed period
    assert export(run, tmp_path / "default") == 0
    assert read_manifest(tmp_path / "default")["period_name"] == "2020"


def test_memory_loader_checks_the_export_before_loading(synthetic_runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "smf"
    assert export(synthetic_runs["smf"], out) == 0
    trainable = out / "clkit" / "trainable.safetensors"
    data = bytearray(trainable.read_bytes())
    data[-1] ^= 0xFF
    trainable.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 mismatch for clkit/trainable.safetensors"):
        load_memory_export(out)
    adapter = tmp_path / "lora"
    assert export(synthetic_runs["lora"], adapter) == 0
    with pytest.raises(ValueError, match="peft_adapter"):
        load_memory_export(adapter)


# ------------------------------------------------------------------------------------------------
# the continual-learning methods: one adapter (ewc, lwf, ...), a sum of adapters (olora), one adapter per
# period (per_task); the cheap settings of a run, two periods each

CL_SETTINGS = ["--mode", "synthetic", *TWO_PERIODS, "--set", "data.num_facts=8", "--set", "train.epochs=2",
               "--set", "train.progress=false"]
# replay, agem, ewc_replay and joint keep the same single `default` adapter as ewc and lwf: one code path
CL_METHODS = ("ewc", "lwf", "olora", "per_task")


@pytest.fixture(scope="module")
def cl_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-cl-runs")
    proc = run_main(*CL_SETTINGS, "--method", ",".join(CL_METHODS), "--run-root", str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs_by_method(root)


@pytest.fixture(scope="module")
def slow_cl_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    full = tmp_path_factory.mktemp("export-ewc-full")
    proc = run_main(*CL_SETTINGS, "--method", "ewc", "--set", "method.ewc.on=full", "--run-root", str(full))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"ewc_full": next(p for p in full.iterdir() if p.is_dir())}


def _check_single_adapter_round_trip(run: Path, method: str, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert export(run, out, "--period", "2020") == 0
    manifest = check_export(out, run, method, "2020", "synthetic")
    assert manifest["format"] == PEFT_ADAPTER and manifest["scores_items_of"] is None
    # the adapter under peft's own name, as lora has it: nothing renamed, nothing combined
    assert manifest["adapters_combined"] is None and manifest["combine_max_logprob_diff"] == 0.0
    model, tokenizer = load_stock(out, synthetic_base(run))
    got = evaluate(model, tokenizer, run)
    assert got == committed_predictions(run, "2-2020")
    assert got != committed_predictions(run, "0-base")


@pytest.mark.parametrize("method", ("ewc", "lwf"))
def test_single_adapter_methods_export_the_adapter_as_lora_does(cl_runs: dict[str, Path], tmp_path: Path,
                                                                method: str) -> None:
    _check_single_adapter_round_trip(cl_runs[method], method, tmp_path)


@pytest.mark.slow
def test_a_method_on_full_weights_exports_a_plain_model(slow_cl_runs: dict[str, Path], tmp_path: Path) -> None:
    run, out = slow_cl_runs["ewc_full"], tmp_path / "export"
    assert export(run, out, "--period", "2020") == 0
    assert check_export(out, run, "ewc", "2020", "synthetic")["format"] == HF_MODEL
    model, tokenizer = load_stock(out, None)
    assert evaluate(model, tokenizer, run) == committed_predictions(run, "2-2020")


def test_olora_exports_the_sum_of_every_period_adapter_as_one_adapter(cl_runs: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    run, out = cl_runs["olora"], tmp_path / "export"
    assert export(run, out, "--period", "2020") == 0
    manifest = check_export(out, run, "olora", "2020", "synthetic")
    assert manifest["format"] == PEFT_ADAPTER and manifest["scores_items_of"] is None
    assert manifest["adapters_combined"] == ["period_1", "period_2"]
    cfg = load_run_config(run).method.options
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    # rank concatenation: r doubles, and so does alpha, which keeps the scale alpha / r
    assert (adapter_cfg["r"], adapter_cfg["lora_alpha"]) == (2 * cfg.r, 2 * cfg.alpha)
    model, tokenizer = load_stock(out, synthetic_base(run))
    want = committed_predictions(run, "2-2020")
    # B A x with the rank concatenated is sum_k B_k A_k x summed in another order: equal up to rounding
    same_answers(evaluate(model, tokenizer, run), want, 1e-4)
    # merged: a plain model with the same answers
    merged = tmp_path / "merged"
    assert export(run, merged, "--period", "2020", "--merge") == 0
    assert check_export(merged, run, "olora", "2020", "synthetic")["format"] == HF_MODEL
    model, tokenizer = load_stock(merged, None)
    same_answers(evaluate(model, tokenizer, run), want, 1e-4)


def test_per_task_exports_each_period_adapter_for_that_period_items(cl_runs: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    run, out = cl_runs["per_task"], tmp_path / "all"
    assert export(run, out, "--period", "all") == 0
    final = committed_predictions(run, "2-2020")
    for k, name in ((1, "2018"), (2, "2020")):
        manifest = check_export(out / f"{k}-{name}", run, "per_task", name, "synthetic")
        assert manifest["format"] == PEFT_ADAPTER and manifest["scores_items_of"] == [name]
        assert manifest["adapters_combined"] == [f"period_{k}"]
        assert "Scores the items of " + name + " only" in (out / f"{k}-{name}" / "README.md").read_text()
        model, tokenizer = load_stock(out / f"{k}-{name}", synthetic_base(run))
        ids = item_ids(run, name)
        got = rows_of(evaluate(model, tokenizer, run), ids)
        # period k's adapter answers period k's items exactly as the run scored them, in row k and in every
        # later row (it never trains again): --period all reproduces the final row, one period's items each
        assert got == rows_of(final, ids) == rows_of(committed_predictions(run, f"{k}-{name}"), ids)
        assert got != rows_of(committed_predictions(run, "0-base"), ids)


def test_per_task_base_period_is_the_base_model(cl_runs: dict[str, Path], tmp_path: Path) -> None:
    run, out = cl_runs["per_task"], tmp_path / "base"
    assert export(run, out, "--period", "base") == 0
    assert check_export(out, run, "per_task", "base", "synthetic")["format"] == HF_MODEL
    model, tokenizer = load_stock(out, None)
    assert evaluate(model, tokenizer, run) == committed_predictions(run, "0-base")


# ------------------------------------------------------------------------------------------------
# a task stream (data/stream.json instead of data/benchmark.json)

@pytest.fixture(scope="module")
def stream_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_stream_runs(tmp_path_factory.mktemp("export-stream"), "lora,per_task")


def test_a_stream_run_exports_and_scores_every_item_as_the_period(stream_runs: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    run, out = stream_runs["lora"], tmp_path / "export"
    assert not (run / "data" / "benchmark.json").exists() and (run / "data" / "stream.json").is_file()
    assert export(run, out, "--period", "mcb") == 0
    manifest = check_export(out, run, "lora", "mcb", "synthetic")
    assert manifest["format"] == PEFT_ADAPTER
    assert manifest["data_fingerprint"] == read_manifest(run / "periods" / "2-mcb")["data_fingerprint"]
    assert "| mca | " in (out / "README.md").read_text()  # the task's own metrics in the model card
    model, tokenizer = load_stock(out, synthetic_base(run))
    got = evaluate(model, tokenizer, run)
    assert got == committed_predictions(run, "2-mcb")
    assert got != committed_predictions(run, "0-base")


def test_per_task_on_a_stream_exports_the_task_adapter(stream_runs: dict[str, Path], tmp_path: Path) -> None:
    run, out = stream_runs["per_task"], tmp_path / "mca"
    assert export(run, out, "--period", "mca") == 0
    assert read_manifest(out)["scores_items_of"] == ["mca"]
    model, tokenizer = load_stock(out, synthetic_base(run))
    ids = item_ids(run, "mca")
    assert rows_of(evaluate(model, tokenizer, run), ids) == rows_of(committed_predictions(run, "2-mcb"), ids)


# ------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


def _uncommitted(run: Path) -> None:
    (run / "periods" / "2-2020" / "manifest.json").unlink()


def _corrupted(run: Path) -> None:
    path = run / "periods" / "2-2020" / "trainable.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size: only the sha256 can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case, needle", [
    ("not_a_run", "is not a run directory"),
    ("unknown_period", "--period '2019' is not a period of this run; valid: all, base, 2018, 2020"),
    ("uncommitted", "period 2020 (periods/2-2020) is not committed or is corrupted: missing manifest.json; "
                    "committed periods: base, 2018"),
    ("corrupted", "sha256 mismatch for trainable.safetensors"),
    ("out_not_empty", "exists and is not an empty directory"),
    ("out_inside_run", "is inside the run directory"),
    ("no_out", "the following arguments are required: --out"),
    ("merge_memories", "cannot be merged"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(synthetic_runs: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str], case: str,
                                                            needle: str) -> None:
    method = "smf" if case == "merge_memories" else "lora"
    run = tmp_path / "run"
    shutil.copytree(synthetic_runs[method], run)
    out = tmp_path / "exports" / "out"
    argv = ["export", str(run), "--out", str(out)]
    if case == "not_a_run":
        argv[1] = str(run.parent)
    elif case == "unknown_period":
        argv += ["--period", "2019"]
    elif case in ("uncommitted", "corrupted"):
        (_uncommitted if case == "uncommitted" else _corrupted)(run)
        argv += ["--period", "2020"]
    elif case == "out_not_empty":
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("mine")
    elif case == "out_inside_run":
        argv[3] = str(run / "export")
    elif case == "no_out":
        argv = argv[:2]
    elif case == "merge_memories":
        argv += ["--merge"]
    code = export_job.main(argv[1:])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    if case == "out_not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not (tmp_path / "exports").exists(), "not even --out's parent is created"
    assert not (run / "export").exists()
    assert not [p for p in tmp_path.rglob(f"{TMP_PREFIX}*")], "no staging dir left behind"


# ------------------------------------------------------------------------------------------------
# the embedded SmolLM2-135M-Instruct: one method per export format that needs a real base model (the
# peft adapter, and the memory layout that smf and casm share). full_ft's plain model directory and
# casm's memories round-trip exactly on the synthetic model above; on SmolLM2 they add 1.6 GB of
# full_ft checkpoints and about two minutes to the suite for no new code path.
EMBEDDED_METHODS = ("lora", "smf")


@pytest.fixture(scope="module")
def embedded_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-embedded")
    # As small as a real run gets: 4 facts, 2 periods, 1 epoch (one optimizer step per period), 4
    # generated tokens. Exactness does not need more.
    proc = run_main("--mode", "real", *TWO_PERIODS, "--set", "data.num_facts=4", "--set", "train.epochs=1",
                    "--set", "data.unchanged_probes_per_period=1", "--set", "eval.max_new_tokens=4",
                    "--set", "train.progress=false", "--method", ",".join(EMBEDDED_METHODS),
                    # the main job's retention track (200 SmolLM2 items a row) is not what an export shows
                    "--set", "eval.retention=", "--run-root", str(root), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs_by_method(root)


@pytest.mark.slow
@pytest.mark.parametrize("method", EMBEDDED_METHODS)
def test_embedded_smollm2_export_round_trips_exactly(embedded_runs: dict[str, Path], tmp_path: Path,
                                                    method: str) -> None:
    run = embedded_runs[method]
    out = tmp_path / "export"
    assert export(run, out, "--period", "2020") == 0
    manifest = check_export(out, run, method, "2020", EMBEDDED_BASE_ID)
    base = None
    if manifest["format"] == PEFT_ADAPTER:
        # The base training used: the embedded GGUF, dequantised and cached as a plain model directory.
        base = AutoModelForCausalLM.from_pretrained(str(cached_embedded_dir(ModelConfig())), dtype=torch.float32)
    model, tokenizer = load_stock(out, base)
    got = evaluate(model, tokenizer, run)
    assert got == committed_predictions(run, "2-2020")
    assert got != committed_predictions(run, "0-base")


# ------------------------------------------------------------------------------------------------
# what no export reproduces is refused: exit 2, one line, nothing written


def _refused(code: int, err: str, needle: str, tmp_path: Path) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("export: ")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not (tmp_path / "exports").exists(), "not even --out's parent is created"
    assert not [p for p in tmp_path.rglob(f"{TMP_PREFIX}*")], "no staging dir left behind"


def test_a_stage_routed_method_without_adapters_is_refused(synthetic_runs: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # No such method exists today: full fine-tuning that scored each period in a context of its own would
    # be one, and a single model directory cannot hold a context.
    from contextlib import nullcontext

    from training.methods.full_ft import FullFineTune

    monkeypatch.setattr(FullFineTune, "eval_scope", lambda self, model, stage: nullcontext())
    code = export(synthetic_runs["full_ft"], tmp_path / "exports" / "out", "--period", "2020")
    _refused(code, capsys.readouterr().err, "scores each period's items in a context of its own", tmp_path)


def test_an_adapter_combination_that_changes_the_model_is_refused(cl_runs: dict[str, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = export_job._probe_logprobs

    def drifting(model: nn.Module) -> torch.Tensor:  # the combined adapter computes something else
        calls.append(1)
        return real(model) + (0.1 if len(calls) > 1 else 0.0)

    monkeypatch.setattr(export_job, "_probe_logprobs", drifting)
    code = export(cl_runs["olora"], tmp_path / "exports" / "out", "--period", "2020")
    _refused(code, capsys.readouterr().err, "the combined adapter of ['period_1', 'period_2'] changes "
             "log-probabilities by 0.1", tmp_path)
