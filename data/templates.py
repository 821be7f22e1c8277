"""Sentence templates of Synthetic TemporalWiki, one family per relation.

Every template contains ``{period}`` and ``{subject}`` and ends with ``{value}.``, so a probe prompt is
the rendered text before the value (a cloze the model completes) and a passage is that same prompt
followed by `` <value>.``.

Each relation has a pool of ``WORDINGS_PER_RELATION`` declarative wordings: its own six sentences
(written for the relation) followed by six shared frames that read the relation as a noun phrase
("the {relation} of {subject}"). data/build.py splits the pool positions, once per data seed and the
same way for every relation, into a training pool (passages, and the cloze of a trained passage is a
*storage* probe) and a held-out pool that renders no training text at all (*extraction* probes).
Question-answer wordings (``questions``) render the optional QA training items; they are never probes.

Within a family no template's prompt followed by the value may occur inside another template's
rendered text, QA items included (checked at import), otherwise a held-out probe could leak into a
passage of another wording.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

SubjectKind = Literal["settlement", "organisation", "person"]
ValueKind = Literal[
    "person", "place", "organisation", "code", "colour", "year", "count", "money", "frequency", "employees", "job_title"
]

# Six sentences written per relation + six shared frames. The split into training and held-out
# wordings is a data option (data/config.py) bounded by this pool.
OWN_WORDINGS_PER_RELATION = 6

# Frames shared by every relation; {relation} is the relation key read with spaces ("chief executive").
# They start differently from every relation's own sentences so that no prompt is inside another text.
SHARED_FRAMES: tuple[str, ...] = (
    "According to records from {period}, the {relation} of {subject} was {value}.",
    "An archive entry for {subject} dated {period} gives the {relation} as {value}.",
    "In the {period} yearbook, the {relation} of {subject} is listed as {value}.",
    "Official sources for {period} record the {relation} of {subject} as {value}.",
    "Researchers checking {period} documents found that the {relation} of {subject} was {value}.",
    "A {period} report on {subject} stated that its {relation} was {value}.",
)
# Question-answer wordings of the optional QA items (DataConfig.qa_share). Never probes.
QUESTION_FRAMES: tuple[str, ...] = (
    "Question: What was the {relation} of {subject} in {period}? Answer: {value}.",
    "Q: In {period}, what was the {relation} of {subject}? A: {value}.",
)
WORDINGS_PER_RELATION = OWN_WORDINGS_PER_RELATION + len(SHARED_FRAMES)


@dataclass(frozen=True)
class TemplateFamily:
    """The wordings of one relation: the declarative pool and the question-answer wordings."""

    relation: str  # normalised relation key, e.g. "chief_executive"
    wordings: tuple[str, ...]  # WORDINGS_PER_RELATION declarative templates, split by data/build.py
    questions: tuple[str, ...]  # QA item templates ("Question: ... Answer: {value}.")
    generic: bool = False  # True when built from the relation name (relation not in RELATIONS)

    def wording_id(self, index: int) -> str:
        return f"{self.relation}/w{index}"

    def question_id(self, index: int) -> str:
        return f"{self.relation}/q{index}"


@dataclass(frozen=True)
class RelationSpec:
    """A relation the generator knows: what kind of subject it applies to and what its values are."""

    subject_kind: SubjectKind
    value_kind: ValueKind
    family: TemplateFamily


def relation_phrase(key: str) -> str:
    """How a relation key reads inside a sentence."""
    return key.replace("_", " ")


def _with_frames(relation: str, own: list[str] | tuple[str, ...], generic: bool = False) -> TemplateFamily:
    """A family from a relation's own sentences plus the shared frames and questions."""
    # Escape braces so a relation name like "x{y}" cannot inject format fields.
    phrase = relation_phrase(relation).replace("{", "{{").replace("}", "}}")
    shared = tuple(t.replace("{relation}", phrase) for t in SHARED_FRAMES)
    questions = tuple(t.replace("{relation}", phrase) for t in QUESTION_FRAMES)
    return TemplateFamily(relation, tuple(own) + shared, questions, generic)


def _spec(
    key: str, subject_kind: SubjectKind, value_kind: ValueKind, first: list[str], second: list[str]
) -> tuple[str, RelationSpec]:
    # The two lists were once "training" and "paraphrase"; now they are just the relation's own six
    # wordings, in a fixed order that the seeded split (data/build.py) indexes.
    return key, RelationSpec(subject_kind, value_kind, _with_frames(key, first + second))


# Past tense throughout: every sentence is a statement about a dated period. Templates of one family
# start differently so that none is a suffix of another (that would leak a probe into a passage).
RELATIONS: dict[str, RelationSpec] = dict(
    [
        # --- settlements ---------------------------------------------------------------------------
        _spec(
            "mayor",
            "settlement",
            "person",
            [
                "In {period}, the mayor of {subject} was {value}.",
                "{subject}'s mayor in {period} was {value}.",
                "The town hall of {subject} was led in {period} by {value}.",
                "During {period}, the office of mayor in {subject} was held by {value}.",
            ],
            [
                "Whoever visited {subject} in {period} would have found its mayor to be {value}.",
                "The person serving as mayor for {subject} throughout {period} was {value}.",
            ],
        ),
        _spec(
            "population",
            "settlement",
            "count",
            [
                "In {period}, the population of {subject} was {value}.",
                "{subject}'s population in {period} was {value}.",
                "The {period} census counted the residents of {subject} at {value}.",
                "As of {period}, the number of people living in {subject} was {value}.",
            ],
            [
                "Counting every inhabitant of {subject} in {period} gave {value}.",
                "The head count of townsfolk for {subject} over {period} reached {value}.",
            ],
        ),
        _spec(
            "twin_town",
            "settlement",
            "place",
            [
                "In {period}, the twin town of {subject} was {value}.",
                "{subject}'s twin town in {period} was {value}.",
                "During {period}, {subject} was officially twinned with {value}.",
                "The partner town listed by {subject} for {period} was {value}.",
            ],
            [
                "Delegations from {subject} in {period} travelled to its sister town, {value}.",
                # not "When {subject} ...": a rare capitalised opener is read as part of the subject by casm's
                # passage parser (training/methods/casm/registry.py), which now sees every own wording in training
                "{subject} named a sister town in {period}, choosing {value}.",
            ],
        ),
        _spec(
            "postal_code",
            "settlement",
            "code",
            [
                "In {period}, the postal code of {subject} was {value}.",
                "{subject}'s postal code in {period} was {value}.",
                "Letters sent to {subject} in {period} carried the postal code {value}.",
                "The postal service assigned {subject} for {period} the code {value}.",
            ],
            [
                "Mail addressed to {subject} during {period} had to bear the code {value}.",
                "Anyone posting a parcel to {subject} in {period} wrote the code {value}.",
            ],
        ),
        _spec(
            "official_colour",
            "settlement",
            "colour",
            [
                "In {period}, the official colour of {subject} was {value}.",
                "{subject}'s official colour in {period} was {value}.",
                "The flags of {subject} in {period} were dyed {value}.",
                "For {period}, the town council of {subject} declared its colour to be {value}.",
            ],
            [
                "Banners hung across {subject} in {period} showed the civic colour, {value}.",
                "The colour that stood for {subject} in {period} was {value}.",
            ],
        ),
        _spec(
            "annual_budget",
            "settlement",
            "money",
            [
                "In {period}, the annual budget of {subject} was {value}.",
                "{subject}'s annual budget in {period} was {value}.",
                "The council of {subject} approved a {period} budget of {value}.",
                "For the year {period}, {subject} planned to spend {value}.",
            ],
            [
                "Total public spending by {subject} in {period} came to {value}.",
                "The yearly accounts of {subject} for {period} showed a budget of {value}.",
            ],
        ),
        _spec(
            "radio_frequency",
            "settlement",
            "frequency",
            [
                "In {period}, the radio station of {subject} broadcast on {value}.",
                "{subject}'s radio station in {period} used the frequency {value}.",
                "Listeners in {subject} tuned in during {period} to {value}.",
                "The local broadcaster of {subject} was assigned in {period} the frequency {value}.",
            ],
            [
                "To hear the town station of {subject} in {period}, one set the dial to {value}.",
                "The airwaves of {subject} in {period} carried its station at {value}.",
            ],
        ),
        _spec(
            "charter_year",
            "settlement",
            "year",
            [
                "In {period}, the charter in force in {subject} dated from {value}.",
                "{subject}'s charter, as it stood in {period}, was adopted in {value}.",
                "The town charter that governed {subject} in {period} was written in {value}.",
                "During {period}, {subject} was governed by the charter of {value}.",
            ],
            [
                "The founding document that {subject} followed in {period} came from the year {value}.",
                "Asked in {period} when its charter was adopted, {subject} answered {value}.",
            ],
        ),
        # --- organisations -------------------------------------------------------------------------
        _spec(
            "chief_executive",
            "organisation",
            "person",
            [
                "In {period}, the chief executive of {subject} was {value}.",
                "{subject}'s chief executive in {period} was {value}.",
                "The company {subject} was run in {period} by {value}.",
                "During {period}, the board of {subject} answered to its chief executive, {value}.",
            ],
            [
                "The person at the helm of {subject} in {period} was {value}.",
                "{subject} was led as its top executive in {period} by {value}.",
            ],
        ),
        _spec(
            "headquarters",
            "organisation",
            "place",
            [
                "In {period}, the headquarters of {subject} was in {value}.",
                "{subject}'s headquarters in {period} stood in {value}.",
                "During {period}, {subject} ran its business from offices in {value}.",
                "The head office of {subject} was located in {period} in {value}.",
            ],
            [
                "Visitors to {subject} in {period} were sent to its main offices in {value}.",
                "The seat of {subject} during {period} was the town of {value}.",
            ],
        ),
        _spec(
            "employee_count",
            "organisation",
            "employees",
            [
                "In {period}, the workforce of {subject} numbered {value}.",
                "{subject}'s payroll in {period} listed {value}.",
                "During {period}, {subject} employed {value}.",
                "The staff of {subject} in {period} totalled {value}.",
            ],
            [
                "Counting all its workers, {subject} had in {period} a total of {value}.",
                "The headcount reported by {subject} for {period} was {value}.",
            ],
        ),
        _spec(
            "parent_company",
            "organisation",
            "organisation",
            [
                "In {period}, the parent company of {subject} was {value}.",
                "{subject}'s parent company in {period} was {value}.",
                "During {period}, {subject} was a subsidiary of {value}.",
                "The owner of {subject} in {period} was the firm {value}.",
            ],
            [
                "Throughout {period}, {subject} answered to a larger group, namely {value}.",
                "The group that controlled {subject} in {period} was {value}.",
            ],
        ),
        _spec(
            "registry_code",
            "organisation",
            "code",
            [
                "In {period}, the registry code of {subject} was {value}.",
                "{subject}'s registry code in {period} was {value}.",
                "The trade register listed {subject} in {period} under the code {value}.",
                "During {period}, official filings by {subject} bore the registry code {value}.",
            ],
            [
                "Looking up {subject} in the {period} company register gave the code {value}.",
                "The identifier on record for {subject} in {period} was {value}.",
            ],
        ),
        _spec(
            "brand_colour",
            "organisation",
            "colour",
            [
                "In {period}, the brand colour of {subject} was {value}.",
                "{subject}'s brand colour in {period} was {value}.",
                "The logo of {subject} in {period} was printed in {value}.",
                "During {period}, the shop signs of {subject} were painted {value}.",
            ],
            [
                "Products sold by {subject} in {period} came in packaging of {value}.",
                "The colour customers linked to {subject} in {period} was {value}.",
            ],
        ),
        _spec(
            "auditor",
            "organisation",
            "organisation",
            [
                "In {period}, the auditor of {subject} was {value}.",
                "{subject}'s auditor in {period} was {value}.",
                "The accounts of {subject} for {period} were checked by {value}.",
                "During {period}, {subject} hired as its auditor the firm {value}.",
            ],
            [
                "The books of {subject} in {period} were signed off by {value}.",
                "Responsibility for auditing {subject} in {period} lay with {value}.",
            ],
        ),
        # --- people --------------------------------------------------------------------------------
        _spec(
            "employer",
            "person",
            "organisation",
            [
                "In {period}, {subject} worked for {value}.",
                "{subject}'s employer in {period} was {value}.",
                "During {period}, {subject} drew a salary from {value}.",
                "The organisation that employed {subject} in {period} was {value}.",
            ],
            [
                "Each working day in {period}, {subject} reported to {value}.",
                "The payslips of {subject} in {period} came from {value}.",
            ],
        ),
        _spec(
            "residence",
            "person",
            "place",
            [
                "In {period}, {subject} lived in {value}.",
                "{subject}'s home in {period} was in {value}.",
                "During {period}, {subject} had a house in {value}.",
                "The town where {subject} resided in {period} was {value}.",
            ],
            [
                "Letters to {subject} in {period} were delivered to an address in {value}.",
                "Back in {period}, {subject} made a home in {value}.",
            ],
        ),
        _spec(
            "spouse",
            "person",
            "person",
            [
                "In {period}, the spouse of {subject} was {value}.",
                "{subject}'s spouse in {period} was {value}.",
                "During {period}, {subject} was married to {value}.",
                "The partner in marriage of {subject} in {period} was {value}.",
            ],
            [
                "At family gatherings in {period}, {subject} arrived with their spouse, {value}.",
                "The person {subject} was wed to in {period} was {value}.",
            ],
        ),
        _spec(
            "job_title",
            "person",
            "job_title",
            [
                "In {period}, the occupation of {subject} was {value}.",
                "{subject}'s job title in {period} was {value}.",
                "During {period}, {subject} held the post of {value}.",
                "The business card of {subject} in {period} read {value}.",
            ],
            [
                "Asked about their work in {period}, {subject} would answer {value}.",
                "The trade practised by {subject} during {period} was {value}.",
            ],
        ),
        _spec(
            "vehicle_registration",
            "person",
            "code",
            [
                "In {period}, the car of {subject} carried the plate {value}.",
                "{subject}'s vehicle registration in {period} was {value}.",
                "During {period}, {subject} drove a car registered as {value}.",
                "The number plate on the car of {subject} in {period} read {value}.",
            ],
            [
                "Traffic records from {period} list the vehicle of {subject} as {value}.",
                "Parking permits issued to {subject} in {period} named the plate {value}.",
            ],
        ),
    ]
)

# Own wordings for relations read from files that are not in RELATIONS. {relation} is the relation
# key with underscores as spaces; it is substituted before the other fields.
GENERIC_OWN: tuple[str, ...] = (
    "In {period}, the {relation} of {subject} was {value}.",
    "{subject}'s {relation} in {period} was {value}.",
    "Records from {period} list the {relation} of {subject} as {value}.",
    "For {subject}, the {relation} on file in {period} was {value}.",
    "The {relation} for {subject}, as of {period}, was {value}.",
    "Back in {period}, the entry for {relation} at {subject} read {value}.",
)


def normalise_relation(raw: str) -> str:
    """Canonical relation key: lower case, runs of spaces/underscores/hyphens become one underscore.

    "Harbour Master", "harbour_master" and "harbour-master" are one relation; files disagree on this
    and a silent mismatch drops facts.
    """
    return re.sub(r"[\s_\-]+", "_", raw.strip().lower()).strip("_")


def family_for(relation: str) -> TemplateFamily:
    """The template family of a normalised relation key; a generic one for unknown relations."""
    spec = RELATIONS.get(relation)
    if spec is not None:
        return spec.family
    phrase = relation_phrase(relation).replace("{", "{{").replace("}", "}}")
    return _with_frames(relation, [t.replace("{relation}", phrase) for t in GENERIC_OWN], generic=True)


def render(template: str, period: str, subject: str, value: str) -> str:
    """The passage text of a template."""
    return template.format(period=period, subject=subject, value=value)


def prompt_of(template: str, period: str, subject: str) -> str:
    """The probe prompt of a template: the rendered text before the value, without trailing space."""
    head = template[: template.rindex("{value}")]
    return head.format(period=period, subject=subject).rstrip()


def family_problems(family: TemplateFamily) -> list[str]:
    """Structural problems of a family (empty when fine); used at import and by the tests."""
    problems: list[str] = []
    name = family.relation
    if len(family.wordings) != WORDINGS_PER_RELATION:
        problems.append(f"{name}: {len(family.wordings)} wordings, need {WORDINGS_PER_RELATION}")
    templates = list(family.wordings) + list(family.questions)
    if len(set(templates)) != len(templates):
        problems.append(f"{name}: a template is listed twice")
    for template in templates:
        fields = re.findall(r"(?<!\{)\{([a-z]*)\}(?!\})", template)
        if sorted(fields) != ["period", "subject", "value"] or not template.endswith("{value}."):
            problems.append(
                f"{name}: template {template!r} must contain {{period}} and {{subject}} once and end with '{{value}}.'"
            )
    if problems:
        return problems
    # Sample arguments with a value that could be a suffix of a longer word, the worst case. Only
    # declarative wordings are probes; every template (questions too) renders training text.
    period, subject, value = "2020", "Zorvan Kell", "Vel"
    texts = [render(t, period, subject, value) for t in templates]
    for i, template in enumerate(family.wordings):
        needle = prompt_of(template, period, subject) + " " + value
        for j, text in enumerate(texts):
            if i != j and needle in text:
                problems.append(f"{name}: prompt of {template!r} occurs in {templates[j]!r}")
    return problems


def _check_table() -> None:
    problems = [p for spec in RELATIONS.values() for p in family_problems(spec.family)]
    problems += family_problems(family_for("generic_relation"))
    for key, spec in RELATIONS.items():
        if normalise_relation(key) != key or spec.family.relation != key:
            problems.append(f"{key}: relation keys must be normalised")
    if problems:
        # A broken table is a programming error; refuse to generate data from it.
        raise RuntimeError("data/templates.py template table is invalid: " + "; ".join(problems))


_check_table()
