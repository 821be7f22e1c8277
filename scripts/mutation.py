"""Mutation testing of the core modules against their fast tests (mutmut 3), module by module.

    uv run --group mutation python scripts/mutation.py                 # every module below
    uv run --group mutation python scripts/mutation.py metrics artifacts --jobs 2
    uv run --group mutation python scripts/mutation.py --report docs/mutation.md   # also rewrite the report

Each module is mutated in its own scratch copy of the tracked tree (never in the checkout: mutmut
writes a `mutants/` copy and rewrites functions into trampolines), with a `[tool.mutmut]` section naming
that module and the tests that are meant to catch a wrong number in it. A mutant is killed when one of
those tests fails; the score is killed / (killed + survived + timeout-free suspicious), and mutants no
test reaches count as survivors (a line no test runs is a line no test checks). Surviving mutants are
listed with their diff so each one is either killed by a new test or named as equivalent in the report.

Slow (minutes per module on 2 cores) and therefore never run in CI; docs/mutation.md holds the last report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    sources: tuple[str, ...]
    tests: tuple[str, ...]


# The modules issue 21 names, each with the tests whose claims cover it (fast layer only: a mutant runs
# the tests that reach the mutated function, and there are hundreds of mutants per module).
TARGETS: dict[str, Target] = {
    "metrics": Target(("eval_and_metrics/metrics.py",), ("tests/test_metrics.py",)),
    "stream_metrics": Target(("eval_and_metrics/stream_metrics.py",), ("tests/test_stream_metrics.py",)),
    "scorers": Target(("eval_and_metrics/scorers/",),
                      ("tests/test_scorers.py", "tests/test_scoring.py", "tests/test_lm_eval_oracle.py",
                       "tests/test_scorer_extraction.py")),
    # The scorers' answer extraction and comparison (the generate_until scorers but code_pass_at_1), a subset of
    # `scorers` small enough for a shared 2-core machine: each mutant of a scorer's score() reruns every test
    # that runs a model through it.
    "scorers_text": Target(("eval_and_metrics/scorers/exact_match.py", "eval_and_metrics/scorers/numeric.py",
                            "eval_and_metrics/scorers/rouge_l.py", "eval_and_metrics/scorers/token_f1.py"),
                           ("tests/test_scorers.py", "tests/test_scoring.py", "tests/test_lm_eval_oracle.py",
                            "tests/test_scorer_extraction.py")),
    # test_hardening's other fast tests run main.py (seconds each, for every mutant they reach); its
    # symlink test is the one that exercises artifacts/ directly.
    "artifacts": Target(("artifacts/",), (
        "tests/test_artifacts.py", "tests/test_artifacts_edges.py", "tests/test_state_files.py",
        "tests/test_hardening.py::test_symlinks_in_a_run_directory_are_never_followed")),
    # training/optimizers/ in two runs: the registry's mixins and the row-restricted AdamW step, and
    # CASMO's rule. test_casmo's report and trace-script tests train or plot a whole run (~45 s each)
    # and every mutant they reach would rerun them; the unit tests beside them check the update to the
    # bit. test_smf's update_rows test checks the row-restricted step against torch's dense AdamW.
    "optimizers": Target(("training/optimizers/__init__.py",), (
        "tests/test_casmo.py", "--deselect",
        "tests/test_casmo.py::test_the_report_draws_the_confidence_trace_and_labels_the_optimizer_variant",
        "--deselect", "tests/test_casmo.py::test_trace_script_reads_a_log",
        "tests/test_smf.py::test_update_rows_moves_those_rows_exactly_as_a_dense_step_and_no_other",
        "tests/test_smf.py::test_an_sgd_group_takes_a_plain_sgd_step_and_the_base_rule_never_sees_it",
        "tests/test_optimizers.py")),
    "casmo": Target(("training/optimizers/casmo.py",), (
        "tests/test_casmo.py", "tests/test_casmo_rules.py", "--deselect",
        "tests/test_casmo.py::test_the_report_draws_the_confidence_trace_and_labels_the_optimizer_variant",
        "--deselect", "tests/test_casmo.py::test_trace_script_reads_a_log")),
    # test_config_fields' sweep (1,400 CLI cases through every field) reaches every mutant of coerce and
    # build_dataclass and would rerun for each: hours on 2 cores. test_fields pins the same code by hand.
    # test_config's run-config tests reach the same code at seconds per mutant (torch imports, whole
    # configs), and test_config_fields builds its cases at import: a mutant of bad_values then ran over
    # mutmut's CPU limit and was scored a timeout (a kill) without any assertion failing.
    "fields": Target(("data/fields.py",), ("tests/test_fields.py",)),
}

# mutmut's exit-code statuses (mutmut/stats.py) grouped for the score.
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
SURVIVED = {"survived", "no tests", "suspicious"}


def _config(target: Target, top_level: list[str]) -> str:
    quoted = ", ".join(f'"{p}"' for p in target.sources)
    tests = ", ".join(f'"{t}"' for t in target.tests)
    # mutmut runs the tests inside mutants/ with the checkout's own directory taken off sys.path, and copies
    # there only the mutated paths and tests/: every other package the tests import (data/ for metrics.py)
    # must be named in also_copy, or every mutant is "not checked" after a failed collection.
    copied = ", ".join(f'"{p}"' for p in top_level)
    # forkserver: torch and its threads are not fork-safe after the test stats run in mutmut's own process
    return (f"\n[tool.mutmut]\nsource_paths = [{quoted}]\npytest_add_cli_args_test_selection = [{tests}]\n"
            f"also_copy = [{copied}]\n"
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]\nprocess_isolation = "forkserver"\n'
            # mutmut's default limit (15 x the test's duration + 1 s of CPU) scored equivalent mutants of
            # AdamW.row_step as timeouts, i.e. kills, on a loaded machine; a wider one keeps timeouts real
            "timeout_multiplier = 30.0\ntimeout_constant = 15.0\n"
            "use_git_change_detection = false\n")


def scratch_copy(dest: Path) -> list[str]:
    """The tracked tree (and this checkout's uncommitted edits to it) copied to dest, the venv linked;
    returns the tree's top-level entries."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    top_level = set()
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
            top_level.add(name.split("/")[0])
    (dest / ".venv").symlink_to(REPO / ".venv")
    return sorted(top_level)


def statuses(work: Path) -> dict[str, tuple[str, str]]:
    """mutant name -> (status, source file) from mutmut's per-file .meta records."""
    sys.path.insert(0, str(work))
    from mutmut.stats import status_by_exit_code

    found = {}
    for meta in (work / "mutants").rglob("*.py.meta"):
        data = json.loads(meta.read_text())
        source = meta.relative_to(work / "mutants").as_posix()[:-len(".meta")]
        for name, code in data.get("exit_code_by_key", {}).items():
            found[name] = (status_by_exit_code[code], source)
    return found


def run_target(name: str, target: Target, jobs: int, keep: bool) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix=f"mutation-{name}-"))
    try:
        top_level = scratch_copy(work)
        with (work / "pyproject.toml").open("a") as f:
            f.write(_config(target, top_level))
        env = {**os.environ, "CI": "", "OMP_NUM_THREADS": "1"}
        started = time.time()
        run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs)], cwd=work,
                             env=env, capture_output=True, text=True)
        elapsed = time.time() - started
        found = statuses(work)
        if not found:
            raise RuntimeError(f"{name}: mutmut produced no mutants (exit {run.returncode}):\n"
                               f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        unchecked = sum(1 for s, _ in found.values() if s == "not checked")
        if unchecked:  # the stats run failed (a test that does not collect in mutants/) or mutmut stopped early
            raise RuntimeError(f"{name}: {unchecked} of {len(found)} mutants never ran (exit {run.returncode}):\n"
                               f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        survivors = sorted(n for n, (s, _) in found.items() if s in SURVIVED)
        diffs = {}
        for mutant in survivors:
            shown = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=work, env=env,
                                   capture_output=True, text=True)
            diffs[mutant] = shown.stdout.strip()
        killed = sum(1 for s, _ in found.values() if s in KILLED)
        counted = killed + len(survivors)
        by_status: dict[str, int] = {}
        for s, _ in found.values():
            by_status[s] = by_status.get(s, 0) + 1
        return {"module": name, "sources": list(target.sources), "tests": list(target.tests),
                "mutants": len(found), "killed": killed, "survived": len(survivors),
                "score": killed / counted if counted else None, "by_status": by_status,
                "survivors": diffs, "elapsed_s": round(elapsed, 1)}
    finally:
        if keep:
            print(f"{name}: scratch copy kept at {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def markdown(results: list[dict[str, object]]) -> str:
    lines = ["| module | mutants | killed (of which timeouts) | survived | score | minutes |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        score = f"{100 * r['score']:.1f}%" if r["score"] is not None else "-"
        timeouts = r["by_status"].get("timeout", 0)  # type: ignore[union-attr]
        lines.append(f"| {r['module']} ({', '.join(r['sources'])}) | {r['mutants']} | {r['killed']} ({timeouts}) | "
                     f"{r['survived']} | {score} | {float(r['elapsed_s']) / 60:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", choices=[*TARGETS, []], metavar="MODULE",
                   help=f"any of {', '.join(TARGETS)} (default: all)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2)), help="mutants tested at once")
    p.add_argument("--json", type=Path, default=REPO / "runs" / "mutation.json", help="every result, survivors' diffs")
    p.add_argument("--keep", action="store_true", help="keep each scratch copy (to browse with mutmut browse)")
    args = p.parse_args(argv)
    results = []
    for name in args.modules or list(TARGETS):
        result = run_target(name, TARGETS[name], args.jobs, args.keep)
        results.append(result)
        print(f"{name}: {result['killed']}/{result['killed'] + result['survived']} killed "
              f"({result['mutants']} mutants, {result['elapsed_s']} s)", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    print(f"survivors' diffs: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
