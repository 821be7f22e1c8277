"""What a run's identity leaves out: the rule shared by the run id and the report's seed groups.

A run id ends in the hash of the resolved config minus the fields that never change the numbers:
where the run lives (`PLACE_KEYS`), how it executes (`RUNTIME_KEYS`), when it checkpoints and where it
is watched. training/config.py hashes that (and the resume check compares it); the report groups runs
whose configs are equal under the same rule, the seed aside, as seeds of one setup. The rule sits on
the ground floor because both layers read it and eval_and_metrics/ may not import training/.
"""

from __future__ import annotations

from typing import Any

# Settings that change how a run executes, not what it computes: they stay out of the config hash and
# of the resume check, so a run continues after a change of world size, strategy or progress bars.
RUNTIME_KEYS: dict[str, tuple[str, ...]] = {
    "train": (
        "progress",
        "strategy",
        "gradient_checkpointing",
        "deterministic",
        "collective_timeout_s",
        "rendezvous_timeout_s",
    )
}
# Runtime keys that left the config (training/config.py RETIRED_KEYS says what replaced each): a config
# saved while they were fields still holds them, and they stay out of the identity as before.
RETIRED_RUNTIME_KEYS: dict[str, tuple[str, ...]] = {"train": ("step_sleep",)}
# Where the run lives, not what it computes.
PLACE_KEYS = ("run_root", "run_id")


def drop_runtime_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """tree (a resolved config, changed in place) without the runtime settings; returns it."""
    for section, keys in [*RUNTIME_KEYS.items(), *RETIRED_RUNTIME_KEYS.items()]:
        node = tree.get(section)
        if isinstance(node, dict):  # a hand-edited config.yaml read by the report may lack the section
            for key in keys:
                node.pop(key, None)
    tree["checkpoint"] = {}  # when we checkpoint never changes the numbers
    tree.pop("track", None)  # nor where the run is watched
    return tree


def identity_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """tree (a resolved config, changed in place) minus every field the run identity ignores; returns it."""
    for key in PLACE_KEYS:
        tree.pop(key, None)
    return drop_runtime_keys(tree)
