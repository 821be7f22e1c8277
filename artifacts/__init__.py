"""Run-directory artifacts: atomic writes, manifests, the run lock and step checkpoints.

See docs/design.md ("Run directory layout", "artifacts/ API") for the contract.
"""

from artifacts.atomic import (
    STORAGE_ERRNOS,
    TMP_PREFIX,
    StorageError,
    UnsafePathError,
    append_text,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    cleanup_stale_tmp,
    commit_dir,
    fsync_dir,
    inside,
    read_text_inside,
    remove_path,
    sha256_bytes,
    sha256_file,
    staging_dir,
)
from artifacts.checkpoints import StepCheckpoints, step_dir_name
from artifacts.lock import LOCK_NAME, LockHeldError, RunLock, live_holder, read_holder, slurm_job_id
from artifacts.state import UnsafeStateError, load_state, load_tensors, save_state, save_tensors
from artifacts.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    read_manifest,
    utc_now_iso,
    verify_manifest,
    write_manifest,
)

__all__ = [
    "LOCK_NAME",
    "STORAGE_ERRNOS",
    "StorageError",
    "UnsafePathError",
    "UnsafeStateError",
    "inside",
    "read_text_inside",
    "append_text",
    "load_state",
    "load_tensors",
    "save_state",
    "save_tensors",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "TMP_PREFIX",
    "LockHeldError",
    "RunLock",
    "StepCheckpoints",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cleanup_stale_tmp",
    "commit_dir",
    "fsync_dir",
    "live_holder",
    "read_holder",
    "read_manifest",
    "remove_path",
    "sha256_bytes",
    "sha256_file",
    "slurm_job_id",
    "staging_dir",
    "step_dir_name",
    "utc_now_iso",
    "verify_manifest",
    "write_manifest",
]
