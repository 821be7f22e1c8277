"""The ``data`` section of the run config.

Only simple field types so the config loader can build it straight from YAML and ``--set`` overrides.
Each field declares its valid values (data/fields.py); ``validate`` adds the cross-field rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated

from data.fields import Items, Name, Range, Text, field_problems
from data.templates import WORDINGS_PER_RELATION

# Period names become directory names (periods/<k>-<name>/) and parts of probe ids, so they are
# restricted to characters that are safe in both.
PERIOD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Every relation has WORDINGS_PER_RELATION declarative wordings (data/templates.py); a data seed splits
# them into training and held-out ones, so the two counts share that pool.
MAX_PASSAGES_PER_FACT = WORDINGS_PER_RELATION - 1


def _default_periods() -> list[str]:
    return ["2018", "2020", "2022", "2024"]


# The generator checks every new name against all earlier ones (no name may contain another), so its
# time grows with the square of num_facts: 5,000 facts take 3 s and 10,000 take 10 s on one core, and
# 10**8 would run for days while memory grows. 10,000 facts already make 20,000 training passages per
# period, far past any CPU budget and a long GPU run.
MAX_NUM_FACTS = 10_000
MAX_PERIODS = 100


@dataclass
class DataConfig:
    """Which benchmark to load and, for the generator, how to build it."""

    # "temporalwiki" = generate Synthetic TemporalWiki from this section; otherwise a path: a directory
    # written by write_benchmark, a synthetic_facts_raw.json file, or a directory holding one.
    benchmark: Annotated[str, Text(empty_ok=False)] = "temporalwiki"
    # A task stream (configs/streams/*.yaml, docs/streams.md) instead of the temporal benchmark; "" = none.
    stream: Annotated[str, Text()] = ""
    # Which of the stream's `orders:` to run (0 = the order its tasks are listed in).
    stream_order: Annotated[int, Range(0, 99)] = 0
    # Generator seed; independent from the training seed so several training seeds see the same data.
    # For a stream, the seed of its disjoint train/eval splits and of generated tasks.
    seed: Annotated[int, Range(0, 2**31 - 1)] = 0
    # Period names in order (generator only; the CASM raw format brings its own from its value_* keys).
    periods: Annotated[list[str], Items(2, MAX_PERIODS, Name(pattern=PERIOD_NAME_RE))] = field(
        default_factory=_default_periods
    )
    # Number of (subject, relation) facts the generator invents.
    num_facts: Annotated[int, Range(1, MAX_NUM_FACTS)] = 48
    # Share of facts whose value changes at each period boundary (generator only).
    change_share: Annotated[float, Range(0, 1, lo_open=True)] = 0.25
    # Wordings of each relation that training passages may use (the rest of the pool minus the held-out
    # ones is left unused). Many wordings per fact is what lets a model extract a fact in a new one.
    num_training_templates: Annotated[int, Range(1, WORDINGS_PER_RELATION - 1)] = 8
    # Wordings of each relation never used by any training text of any fact or period: the extraction
    # probes' wordings. num_training_templates + num_heldout_templates <= WORDINGS_PER_RELATION.
    num_heldout_templates: Annotated[int, Range(1, WORDINGS_PER_RELATION - 1)] = 4
    # Training passages per fact per period, each from a different training wording (<=
    # num_training_templates).
    passages_per_fact: Annotated[int, Range(1, MAX_PASSAGES_PER_FACT)] = 2
    # Share of facts that also get question-answer training items (one per question wording) whenever
    # they are trained; the same facts in every period. 0 = declarative passages only.
    qa_share: Annotated[float, Range(0, 1)] = 0.0
    # Cap on "unchanged" probes per later period (facts not retrained that period).
    unchanged_probes_per_period: Annotated[int, Range(0, MAX_NUM_FACTS)] = 16
    # Share of probed facts (per period and kind) that also get an extraction probe; every probed fact
    # gets a storage probe. Below 1 only to save evaluation time.
    extraction_share: Annotated[float, Range(0, 1)] = 1.0

    def validate(self) -> list[str]:
        """Every field's declared type and range (data/fields.py), then the cross-field rules."""
        problems = field_problems(self, "data")
        if problems:
            return problems
        if len(set(self.periods)) != len(self.periods):
            problems.append(f"data.periods must not repeat a name (got {self.periods!r})")
        pool = self.num_training_templates + self.num_heldout_templates
        if pool > WORDINGS_PER_RELATION:
            problems.append(
                f"data.num_heldout_templates must be <= {WORDINGS_PER_RELATION} - "
                f"data.num_training_templates = {WORDINGS_PER_RELATION - self.num_training_templates}"
                f" (each relation has {WORDINGS_PER_RELATION} wordings; got {self.num_heldout_templates})"
            )
        if self.passages_per_fact > self.num_training_templates:
            problems.append(
                f"data.passages_per_fact must be <= data.num_training_templates = "
                f"{self.num_training_templates} (each passage uses a different training wording; "
                f"got {self.passages_per_fact})"
            )
        return problems
