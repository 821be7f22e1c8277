"""Manifests: the commit marker of a directory, with a checksum for every file in it.

A directory counts as committed only if its ``manifest.json`` exists and every file it lists has
the recorded size and sha256. Checking contents, not just existence, is the point: a crash between
a rename and the data reaching disk can leave files of the right name with zeros or short content.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from artifacts.atomic import (
    TMP_PREFIX,
    StrPath,
    UnreadableFileError,
    UnsafePathError,
    atomic_write_json,
    inside,
    read_regular_text,
    sha256_file,
)

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1

# Keys the manifest itself owns; a caller field with one of these names would corrupt verification.
_RESERVED = frozenset({"schema_version", "written_at", "files"})


def utc_now_iso() -> str:
    """Current UTC time as ISO 8601 with seconds, e.g. ``2024-05-01T12:00:00+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _list_files(directory: Path) -> list[str]:
    """Relative posix paths of every file under ``directory`` except the manifest and ``.tmp-`` entries."""
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        # In-flight temp dirs/files belong to a writer that has not committed them yet.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(TMP_PREFIX))
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            if name.startswith(TMP_PREFIX):
                continue
            if os.path.islink(os.path.join(dirpath, name)):
                raise UnsafePathError(
                    f"{os.path.join(dirpath, name)} is a symbolic link; a committed directory holds only its own files"
                )
            rel = Path(dirpath, name).relative_to(directory).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def write_manifest(directory: StrPath, fields: dict[str, Any], written_at: str | None = None) -> dict[str, Any]:
    """Checksum every file under ``directory``, merge ``fields``, write manifest.json last; return it.
    ``written_at`` defaults to now; a writer whose output must be byte-identical on a rerun passes its own."""
    directory = Path(directory)
    clash = _RESERVED & fields.keys()
    if clash:
        raise ValueError(f"manifest fields may not use the reserved keys {sorted(clash)}")
    files = {}
    for rel in _list_files(directory):
        p = directory / rel
        files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    manifest = {
        **fields,
        "schema_version": SCHEMA_VERSION,
        "written_at": written_at or utc_now_iso(),
        "files": files,
    }
    atomic_write_json(directory / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(directory: StrPath) -> dict[str, Any] | None:
    """The parsed manifest, or None when it is absent, unreadable or not a JSON object."""
    try:  # never blocks on a FIFO, never follows a link planted as the manifest, bounded
        obj = json.loads(read_regular_text(Path(directory) / MANIFEST_NAME, follow_symlinks=False))
    except (OSError, ValueError):  # UnreadableFileError and JSON errors are ValueErrors
        return None
    return obj if isinstance(obj, dict) else None


def _safe_rel(rel: str) -> bool:
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts


def verify_manifest(directory: StrPath) -> tuple[bool, str]:
    """(True, "ok") if every listed file matches its size and sha256, else (False, first problem).

    Files present but not listed are allowed: evaluation jobs add their own files (with their own
    sub-manifests) to a committed period later, and that must not invalidate the period.
    """
    directory = Path(directory)
    try:
        path = inside(directory, MANIFEST_NAME)
        text = read_regular_text(path, follow_symlinks=False)
    except UnsafePathError as exc:
        return False, f"unsafe path: {exc}"
    except (FileNotFoundError, NotADirectoryError):
        return False, f"missing {MANIFEST_NAME}"
    except (OSError, UnreadableFileError) as exc:
        return False, f"unreadable {MANIFEST_NAME}: {exc}"
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        return False, f"unreadable {MANIFEST_NAME}: invalid JSON ({exc})"
    if not isinstance(manifest, dict):
        return False, f"unreadable {MANIFEST_NAME}: not a JSON object"
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        return False, f"wrong schema_version {version!r} (expected {SCHEMA_VERSION})"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return False, f"malformed {MANIFEST_NAME}: no 'files' table"

    # Cheap checks (existence, size) for every file before any hashing, so a truncated or missing
    # file in a multi-GB checkpoint is reported without reading gigabytes first.
    for rel, entry in sorted(files.items()):
        if (
            not _safe_rel(rel)
            or not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            return False, f"malformed {MANIFEST_NAME}: bad entry for {rel!r}"
        try:
            p = inside(directory, rel)
        except UnsafePathError as exc:
            return False, f"unsafe path: {exc}"
        try:
            size = p.stat().st_size if p.is_file() else None
        except OSError:  # gone between the two calls: the dir is being replaced
            size = None
        if size is None:
            return False, f"missing file {rel}"
        if size != entry["size"]:
            return False, f"size mismatch for {rel}: expected {entry['size']} bytes, found {size}"
    for rel, entry in sorted(files.items()):
        try:
            digest = sha256_file(directory / rel)
        except OSError as exc:  # e.g. the dir was renamed away while we hashed it
            return False, f"unreadable file {rel}: {type(exc).__name__}"
        if digest != entry["sha256"]:
            return False, f"sha256 mismatch for {rel}"
    return True, "ok"
