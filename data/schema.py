"""Typed records of a continual-learning benchmark: facts that change over periods.

These types are the contract between the data generator/loader (data/), the training loop
(training/), the methods (training/methods/) and evaluation (eval_and_metrics/). They are plain
frozen dataclasses so they hash, compare and serialise to JSON without surprises.

Label hygiene: Passage and Probe carry structured metadata (subject, relation, value) for
analysis and for the evaluation. A method must only ever read ``Passage.text`` during training
and ``Probe.prompt`` during evaluation; the metadata is never an input to a model or a router.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

ProbeKind = Literal["new", "changed", "unchanged"]
PROBE_KINDS: tuple[str, ...] = ("new", "changed", "unchanged")
# storage: the cloze of a wording trained for this fact (did the model store the sentence?);
# extraction: a wording never used by any training text (can the model use the fact?). docs/data.md.
ProbeFamily = Literal["storage", "extraction"]
PROBE_FAMILIES: tuple[str, ...] = ("storage", "extraction")


@dataclass(frozen=True)
class Fact:
    """One (subject, relation) and its value in every period, in period order."""

    subject: str
    relation: str
    values: dict[str, str]  # period name -> value


@dataclass(frozen=True)
class Passage:
    """One training text stating one fact as true in one period ("In 2020, ...")."""

    text: str
    subject: str
    relation: str
    value: str
    period: str
    template_id: str


@dataclass(frozen=True)
class Probe:
    """One evaluation query: ``prompt`` is completed greedily and compared with ``value``.

    kind: "new" (period 1: every fact is new), "changed" (value differs from the previous
    period), "unchanged" (same value as the previous period and absent from this period's
    training data). family: "storage" (the prompt is the cloze of a wording trained for this fact
    with this value: for new/changed the exact trained sentence of this period cut before the value;
    for unchanged one trained when the value was last taught, with this period's date) or
    "extraction" (a held-out wording that no training text of any fact or period uses).
    valid_until is the first period in which the value no longer holds (None: still true at
    the last period), so "formerly true after period k" is ``valid_until <= k``.
    """

    id: str
    subject: str
    relation: str
    value: str
    period: str
    valid_from: str
    valid_until: str | None
    previous_value: str | None
    kind: ProbeKind
    family: ProbeFamily
    prompt: str
    template_id: str

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Period:
    """One step of the sequence: what is trained on in it and what is probed for it."""

    index: int  # 1-based position in the sequence
    name: str  # e.g. "2020"
    passages: tuple[Passage, ...]
    probes: tuple[Probe, ...]


@dataclass(frozen=True)
class Benchmark:
    name: str
    periods: tuple[Period, ...]
    fingerprint: str  # sha256 of the canonical serialised content
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def period_names(self) -> list[str]:
        return [p.name for p in self.periods]

    def all_probes(self) -> list[Probe]:
        return [probe for period in self.periods for probe in period.probes]

    def period_index(self, name: str) -> int:
        """1-based index of a period name."""
        return self.period_names.index(name) + 1
