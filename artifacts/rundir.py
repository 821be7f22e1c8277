"""The run directory: every path of a run, its logs read under one torn-line policy, its committed periods.

    run = RunDir(Path("runs/<run-id>"))
    run.period_dir(2, "2020")            # runs/<run-id>/periods/2-2020
    run.committed_prefix(names)          # [0, 1, 2]: the periods whose manifests verify, in order, up to a gap
    run.resolve_period(names, "2020")    # (2, "2020"); "2" gives the same, "9" a one-line BadInput
    rows = run.log_rows()                # train_log.jsonl, [] before the first record

The layout is in docs/design.md ("Run directory layout"); this module is the one place that spells it.
It knows names, not contents: what goes into a period (trainable state, eval files) is the trainer's,
what a workload's period names are is training/'s (callers pass them in as `names`, "base" first).

Torn lines (read_jsonl): train_log.jsonl is append-only and not atomic, so a kill mid-append leaves a
torn LAST line; it is skipped. A line that does not parse anywhere else cannot come from a kill and is
an error (UnreadableFileError, one line naming the file and line). The writer keeps that true across a
resume: `repair_log_tail()`, called under the run lock before the first append, cuts a torn tail off
(or ends a complete one with its newline), so the next record never lands on the same line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from artifacts.atomic import StrPath, UnreadableFileError, read_regular_text
from artifacts.manifest import MANIFEST_NAME, verify_manifest

if TYPE_CHECKING:
    import torch

# Names inside a run directory (docs/design.md, "Run directory layout").
CONFIG_FILE = "config.yaml"
RUN_META_FILE = "run.json"
RESULTS_FILE = "results.json"
TRAIN_LOG_FILE = "train_log.jsonl"
TRACKING_FILE = "tracking.json"
DATA_DIR = "data"
TOKENIZER_DIR = "tokenizer"
PERIODS_DIR = "periods"
CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"
PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.json"
# What the eval jobs add to a committed period later, each under its own manifest.
LANDSCAPE_DIR = "landscape"
LANDSCAPE_FILE = "landscape.json"
LM_EVAL_DIR = "lm_eval"
LM_EVAL_FILE = "results.json"

# A JSONL file of a run read whole: a train log of a million steps is a few hundred MiB; the bound only
# turns a planted multi-GB file into an error line instead of all of memory.
MAX_JSONL_BYTES = 4 << 30
# How much of the log's end last_record() reads: several records, however long a step's stats line is.
_TAIL_BYTES = 4096

_NUMBERED = re.compile(r"^(\d+)-(.+)$")  # <k>-<name>: a period dir, or a period's checkpoint root


class BadInput(ValueError):
    """Bad input to a command (an argument, a path, a run directory that is not one, a period it does not
    have): exit 2, one line per problem. A ValueError, so callers that already catch ValueError keep
    working. Defined here, on the ground floor, because the run directory and the period-model loader
    (training/period_model.py) refuse with it too; scripts/command.py maps it to the exit code."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        items = [problems] if isinstance(problems, str) else list(problems)
        self.problems = [" ".join(str(p).splitlines()) for p in items]
        super().__init__("; ".join(self.problems))


class UnknownPeriod(BadInput):
    """A period given by a name or an index the run does not have (see resolve_period)."""


def period_dir_name(index: int, name: str) -> str:
    """``<k>-<name>``: a committed period's directory, and its step checkpoints' root."""
    return f"{index}-{name}"


@dataclass(frozen=True)
class RunDir:
    """One run directory, ``<run_root>/<run_id>``: every path in it, and the reads that need no model."""

    root: Path

    def __init__(self, root: StrPath) -> None:
        object.__setattr__(self, "root", Path(root))

    # -- files and directories -----------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def run_meta(self) -> Path:
        return self.root / RUN_META_FILE

    @property
    def results(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def train_log(self) -> Path:
        return self.root / TRAIN_LOG_FILE

    @property
    def tracking(self) -> Path:
        """Where the experiment trackers' records are (training/tracking.py)."""
        return self.root / TRACKING_FILE

    @property
    def data(self) -> Path:
        return self.root / DATA_DIR

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER_DIR

    @property
    def periods(self) -> Path:
        return self.root / PERIODS_DIR

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    def period_dir(self, index: int, name: str) -> Path:
        return self.periods / period_dir_name(index, name)

    def checkpoint_root(self, index: int, name: str) -> Path:
        """Where period k's step checkpoints go (artifacts.StepCheckpoints' root)."""
        return self.checkpoints / period_dir_name(index, name)

    def eval_dir(self, index: int, name: str) -> Path:
        return self.period_dir(index, name) / EVAL_DIR

    def predictions(self, index: int, name: str) -> Path:
        return self.eval_dir(index, name) / PREDICTIONS_FILE

    def scores(self, index: int, name: str) -> Path:
        return self.eval_dir(index, name) / SCORES_FILE

    def landscape_dir(self, index: int, name: str) -> Path:
        return self.period_dir(index, name) / LANDSCAPE_DIR

    def lm_eval_dir(self, index: int, name: str) -> Path:
        return self.period_dir(index, name) / LM_EVAL_DIR

    # -- periods ---------------------------------------------------------------------------------------
    def period_entries(self) -> list[tuple[int, Path]]:
        """The ``<k>-<name>`` directories under periods/, as (k, path) sorted by k; committed or not (a
        ``.tmp-`` staging dir is not one; a symbolic link leads out of the run and is not its period)."""
        return _numbered_dirs(self.periods)

    def checkpoint_entries(self) -> list[tuple[int, Path]]:
        """The ``<k>-<name>`` step-checkpoint roots under checkpoints/, as (k, path) sorted by k."""
        return _numbered_dirs(self.checkpoints)

    def committed_periods(self) -> list[str]:
        """Names (<k>-<name>) of the period dirs with a manifest, in order; not checksummed (cheap, for
        messages: whoever loads a period verifies every file first)."""
        return [path.name for _, path in self.period_entries() if (path / MANIFEST_NAME).is_file()]

    def verified_periods(self, names: Sequence[str]) -> list[tuple[int, str]]:
        """Every (k, name) of `names` ("base" first) whose period dir's manifest verifies, in order."""
        return [(k, n) for k, n in enumerate(names) if verify_manifest(self.period_dir(k, n))[0]]

    def committed_prefix(self, names: Sequence[str]) -> list[int]:
        """0..k: the periods of `names` ("base" first) whose manifests verify, up to the first that does not
        (a later one may still be training; one after a gap was not produced by this run's order)."""
        out = []
        for k, name in enumerate(names):
            if not verify_manifest(self.period_dir(k, name))[0]:
                break
            out.append(k)
        return out

    @staticmethod
    def resolve_period(names: Sequence[str], period: str | int) -> tuple[int, str]:
        """A period given by name or index (0 = base) -> (index, name); `names` has "base" first.

        A name wins over an index: temporal periods are years ("2018"), which also look like indices.
        UnknownPeriod (one line, the valid names and range) for anything else."""
        names = list(names)
        if str(period) in names:
            return names.index(str(period)), str(period)
        # isascii: "²".isdigit() is True, int("²") fails
        if isinstance(period, int) or (str(period).isascii() and str(period).isdigit()):
            k = int(period)
            if not 0 <= k < len(names):
                raise UnknownPeriod(f"period {period} out of range; valid: 0..{len(names) - 1} or {', '.join(names)}")
            return k, names[k]
        raise UnknownPeriod(f"period {period!r} unknown; valid: {', '.join(names)} or 0..{len(names) - 1}")

    # -- the train log ---------------------------------------------------------------------------------
    def log_rows(self) -> list[dict[str, Any]]:
        """train_log.jsonl's records under the torn-line policy (read_jsonl); [] before the first one."""
        try:
            return read_jsonl(self.train_log)
        except FileNotFoundError:
            return []

    def last_record(self) -> dict[str, Any] | None:
        """The newest complete record of train_log.jsonl (cheap: reads its last 4 KiB), or None: no log,
        not a regular file (a FIFO must not block the reader), or no record that parses."""
        try:
            fd = os.open(self.train_log, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            os.set_blocking(fd, True)
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _TAIL_BYTES))
            lines = fh.read(_TAIL_BYTES).decode("utf-8", "replace").splitlines()
        for line in reversed(lines):
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line (a kill mid-append) or the cut first one
            if isinstance(rec, dict):
                return rec
        return None

    def repair_log_tail(self) -> None:
        """Make the log end at a line end before a resumed run appends to it (the caller holds the run
        lock): a torn tail (a kill mid-append) is cut off; a complete record that only lacks its newline
        gets it. Without this the next record would continue the torn line and tear a line in the middle."""
        path = self.train_log
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:].decode("utf-8"))
        except ValueError:  # UnicodeDecodeError is one
            os.truncate(path, cut)
        else:
            with open(path, "ab") as fh:
                fh.write(b"\n")


def read_jsonl(path: StrPath, max_bytes: int = MAX_JSONL_BYTES) -> list[dict[str, Any]]:
    """The records of a JSONL file, one per non-blank line, never through a symbolic link.

    The one torn-line policy of the toolkit: a last line that does not parse is a torn append (a kill
    mid-write of an append-only log) and is skipped; one anywhere else is an UnreadableFileError naming
    the file and the line. FileNotFoundError when the file is absent (RunDir.log_rows: no log yet, []).
    """
    lines = [
        (i, line)
        for i, line in enumerate(read_regular_text(path, max_bytes, follow_symlinks=False).splitlines(), start=1)
        if line.strip()
    ]
    rows = []
    for pos, (i, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if pos == len(lines) - 1:
                break  # a torn last line from a kill mid-append
            raise UnreadableFileError(
                f"{path}: line {i} is not JSON ({exc.msg}) and is not the last line, so it is not a torn append"
            ) from None
    return rows


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in name order: what a period's manifest
    records as trainable_sha256 and results.json as final_state_sha256, and what every loader checks."""
    import torch  # here, not at the top: artifacts stays importable without torch (scripts/command.py)

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _numbered_dirs(parent: Path) -> list[tuple[int, Path]]:
    if not parent.is_dir():
        return []
    out = []
    for child in parent.iterdir():
        m = _NUMBERED.match(child.name)
        if m and child.is_dir() and not child.is_symlink():
            out.append((int(m.group(1)), child))
    return sorted(out)
