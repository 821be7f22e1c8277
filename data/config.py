"""The ``data`` section of the run config.

Only simple field types so the config loader can build it straight from YAML and ``--set`` overrides.
``validate`` reports every problem at once (as human messages) instead of raising on the first one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# Period names become directory names (periods/<k>-<name>/) and parts of probe ids, so they are
# restricted to characters that are safe in both.
PERIOD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Every relation has 4 training templates and the standard probe must use one that was not used for
# the fact's passages in the same period, so at most 3 passages per fact and period.
TRAINING_TEMPLATES_PER_RELATION = 4
MAX_PASSAGES_PER_FACT = TRAINING_TEMPLATES_PER_RELATION - 1


def _default_periods() -> list[str]:
    return ["2018", "2020", "2022", "2024"]


@dataclass
class DataConfig:
    """Which benchmark to load and, for the generator, how to build it."""

    # "temporalwiki" = generate Synthetic TemporalWiki from this section; otherwise a path: a directory
    # written by write_benchmark, a synthetic_facts_raw.json file, or a directory holding one.
    benchmark: str = "temporalwiki"
    # Generator seed; independent from the training seed so several training seeds see the same data.
    seed: int = 0
    # Period names in order (generator only; the CASM raw format brings its own from its value_* keys).
    periods: list[str] = field(default_factory=_default_periods)
    # Number of (subject, relation) facts the generator invents.
    num_facts: int = 48
    # Share of facts whose value changes at each period boundary (generator only).
    change_share: float = 0.25
    # Training passages per fact per period, each from a different training template.
    passages_per_fact: int = 2
    # Cap on "unchanged" probes per later period (facts not retrained that period).
    unchanged_probes_per_period: int = 16
    # Share of standard probes (per period and kind) that also get a paraphrase probe.
    paraphrase_share: float = 0.5

    def validate(self) -> list[str]:
        """Human messages, one per problem, naming the field and the valid range; [] when fine."""
        errors: list[str] = []

        def is_int(value: object) -> bool:
            # bool is an int subclass; "seed: true" in YAML is a typo, not a seed.
            return isinstance(value, int) and not isinstance(value, bool)

        def is_real(value: object) -> bool:
            return (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value))

        if not isinstance(self.benchmark, str) or not self.benchmark.strip():
            errors.append("data.benchmark must be 'temporalwiki' or a path to benchmark files "
                          f"(got {self.benchmark!r})")
        if not is_int(self.seed) or self.seed < 0:
            errors.append(f"data.seed must be an integer >= 0 (got {self.seed!r})")

        if not isinstance(self.periods, list) or not all(isinstance(p, str) for p in self.periods):
            errors.append(f"data.periods must be a list of period names (got {self.periods!r})")
        else:
            if len(self.periods) < 2:
                errors.append("data.periods must name at least 2 periods, a continual benchmark "
                              f"needs a boundary (got {self.periods!r})")
            bad = [p for p in self.periods if not PERIOD_NAME_RE.match(p)]
            if bad:
                errors.append("data.periods entries must match [A-Za-z0-9][A-Za-z0-9_.-]* "
                              f"(got {bad!r})")
            if len(set(self.periods)) != len(self.periods):
                errors.append(f"data.periods must not repeat a name (got {self.periods!r})")

        if not is_int(self.num_facts) or self.num_facts < 1:
            errors.append(f"data.num_facts must be an integer >= 1 (got {self.num_facts!r})")
        if not is_real(self.change_share) or not 0 < self.change_share <= 1:
            errors.append(f"data.change_share must be in (0, 1] (got {self.change_share!r})")
        if (not is_int(self.passages_per_fact)
                or not 1 <= self.passages_per_fact <= MAX_PASSAGES_PER_FACT):
            errors.append(f"data.passages_per_fact must be an integer in [1, {MAX_PASSAGES_PER_FACT}] "
                          f"(each relation has {TRAINING_TEMPLATES_PER_RELATION} training templates "
                          f"and one is kept for the probe) (got {self.passages_per_fact!r})")
        if not is_int(self.unchanged_probes_per_period) or self.unchanged_probes_per_period < 0:
            errors.append("data.unchanged_probes_per_period must be an integer >= 0 "
                          f"(got {self.unchanged_probes_per_period!r})")
        if not is_real(self.paraphrase_share) or not 0 <= self.paraphrase_share <= 1:
            errors.append(f"data.paraphrase_share must be in [0, 1] (got {self.paraphrase_share!r})")
        return errors
