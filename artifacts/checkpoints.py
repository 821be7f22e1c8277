"""Mid-period step checkpoints: ``<root>/step-<000123>/`` each with its own manifest.

A step dir is written under a ``.tmp-`` name, given a manifest, fsynced and renamed into place, so a
committed name always holds a complete checkpoint. We keep the newest ``keep`` (default 2) valid ones
because the newest can still be corrupt (bad disk, a file system that lost data after a node crash);
resuming then falls back to the one before it with a loud warning instead of failing or, worse,
loading garbage. Only the process holding the run lock may save, prune or clear.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from artifacts.atomic import (
    StrPath,
    cleanup_stale_tmp,
    commit_dir,
    remove_path,
    staging_dir,
)
from artifacts.manifest import verify_manifest, write_manifest

__all__ = ["StepCheckpoints", "cleanup_stale_tmp", "step_dir_name"]

logger = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    """``step-000123``; wider for steps past 999999 (parsing does not depend on the width)."""
    return f"step-{step:06d}"


class StepCheckpoints:
    """The step checkpoints of one period, under ``root = <run>/checkpoints/<k>-<name>``."""

    def __init__(self, root: StrPath, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (got {keep}); the newest checkpoint must survive")
        self.root = Path(root)
        self.keep = keep
        # Step dirs this object wrote or fully verified. Pruning consults it so that each save does
        # not re-hash gigabytes of older checkpoints. The corruption keep=2 guards against (data lost
        # in a node crash) comes with a new process and so an empty cache; latest_valid() always
        # re-verifies and updates the cache.
        self._known_valid: set[Path] = set()

    def path_for(self, step: int) -> Path:
        """Where step ``step`` is (or would be) committed."""
        return self.root / step_dir_name(step)

    def list_steps(self) -> list[tuple[int, Path]]:
        """Committed step dirs as (step, path), oldest first; not verified, ``.tmp-`` entries skipped."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in self.root.iterdir():
            m = _STEP_RE.match(entry.name)
            if m and entry.is_dir():
                out.append((int(m.group(1)), entry))
        return sorted(out)

    def save(self, step: int, write_fn: Callable[[Path], None], manifest_fields: dict[str, Any]) -> Path:
        """Write a checkpoint via ``write_fn(tmp_dir)``, commit it as ``step-<step>``, prune; return its path.

        A step that is already committed is replaced (e.g. a job preempted again right after resuming).
        """
        if step < 0:
            raise ValueError(f"step must be >= 0 (got {step})")
        final = self.path_for(step)
        tmp = staging_dir(final)
        try:
            write_fn(tmp)
            write_manifest(tmp, {**manifest_fields, "step": step})
            commit_dir(tmp, final)
        except BaseException:
            # Best effort: a crash here leaves the .tmp- dir, which readers ignore anyway.
            remove_path(tmp)
            raise
        self._known_valid.add(final)
        self._prune()
        return final

    def _is_valid_cached(self, path: Path) -> bool:
        if path in self._known_valid:
            return True
        ok, _reason = verify_manifest(path)
        if ok:
            self._known_valid.add(path)
        return ok

    def _prune(self) -> None:
        # Runs only after the new checkpoint is committed, so the newest valid one is never deleted
        # before its replacement exists. Invalid dirs are deleted too: they can never be resumed from
        # and would otherwise trigger a fallback warning on every resume.
        num_valid = 0
        for _step, path in reversed(self.list_steps()):
            if num_valid < self.keep and self._is_valid_cached(path):
                num_valid += 1
                continue
            self._known_valid.discard(path)
            remove_path(path)

    def latest_valid(self) -> tuple[int, Path] | None:
        """Newest step whose manifest verifies, as (step, path); warns about each corrupt newer one."""
        invalid: list[tuple[Path, str]] = []
        found: tuple[int, Path] | None = None
        for step, path in reversed(self.list_steps()):
            ok, reason = verify_manifest(path)
            if ok:
                self._known_valid.add(path)
                found = (step, path)
                break
            self._known_valid.discard(path)
            invalid.append((path, reason))
        fallback = f"falling back to step {found[0]}" if found else "no valid checkpoint left"
        for path, reason in invalid:
            msg = f"checkpoint {path} is invalid ({reason}); {fallback}"
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return found

    def clear(self) -> None:
        """Remove the whole root; called once the period itself is committed."""
        remove_path(self.root)
        self._known_valid.clear()
