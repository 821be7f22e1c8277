"""The ``data`` section of the run config.

Only simple field types so the config loader can build it straight from YAML and ``--set`` overrides.
Each field declares its valid values (data/fields.py); ``validate`` adds the cross-field rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated

from data.fields import Items, Name, Range, Text, field_problems

# Period names become directory names (periods/<k>-<name>/) and parts of probe ids, so they are
# restricted to characters that are safe in both.
PERIOD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Every relation has 4 training templates and the standard probe must use one that was not used for
# the fact's passages in the same period, so at most 3 passages per fact and period.
TRAINING_TEMPLATES_PER_RELATION = 4
MAX_PASSAGES_PER_FACT = TRAINING_TEMPLATES_PER_RELATION - 1


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
        default_factory=_default_periods)
    # Number of (subject, relation) facts the generator invents.
    num_facts: Annotated[int, Range(1, MAX_NUM_FACTS)] = 48
    # Share of facts whose value changes at each period boundary (generator only).
    change_share: Annotated[float, Range(0, 1, lo_open=True)] = 0.25
    # Training passages per fact per period, each from a different training template (one is kept
    # for the probe, so at most TRAINING_TEMPLATES_PER_RELATION - 1).
    passages_per_fact: Annotated[int, Range(1, MAX_PASSAGES_PER_FACT)] = 2
    # Cap on "unchanged" probes per later period (facts not retrained that period).
    unchanged_probes_per_period: Annotated[int, Range(0, MAX_NUM_FACTS)] = 16
    # Share of standard probes (per period and kind) that also get a paraphrase probe.
    paraphrase_share: Annotated[float, Range(0, 1)] = 0.5

    def validate(self) -> list[str]:
        """Every field's declared type and range (data/fields.py), then the cross-field rules."""
        problems = field_problems(self, "data")
        if problems:
            return problems
        if len(set(self.periods)) != len(self.periods):
            return [f"data.periods must not repeat a name (got {self.periods!r})"]
        return []
