"""Synthetic TemporalWiki: invented facts whose values change between dated periods.

The generator invents subjects (settlements, organisations, people) and, for each (subject, relation)
fact, a value per period. At each period boundary a fixed share of facts (``change_share``) switches
to a new value of the same type. Passages and probes are then built by data.build, which the CASM raw
reader shares, so both sources follow the same TemporalWiki rules (see docs/data.md).

Every name is assembled from syllables and checked against a list of real names, so a model cannot
answer from pre-training knowledge: what it knows about these facts it learnt from the passages.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict

from data.build import build_benchmark
from data.config import DataConfig
from data.errors import DataError
from data.schema import Benchmark, Fact
from data.templates import RELATIONS, SubjectKind, ValueKind

GENERATOR_NAME = "synthetic-temporalwiki/v1"
BENCHMARK_NAME = "temporalwiki"

# design.md names the generator's config type GeneratorConfig; it is the data section itself.
GeneratorConfig = DataConfig

# Names follow a simple (consonant) vowel (consonant) shape so they read like names ("Zorvan Kell",
# "Veltrassa") rather than random letter strings; clusters only start a word.
_ONSETS = (
    "b",
    "d",
    "k",
    "v",
    "z",
    "th",
    "dr",
    "m",
    "n",
    "r",
    "s",
    "t",
    "l",
    "g",
    "br",
    "kr",
    "f",
    "h",
    "j",
    "tr",
    "vr",
    "gl",
    "st",
    "p",
    "c",
)
_INNER_ONSETS = ("l", "n", "r", "v", "d", "m", "s", "t", "k", "th", "rv", "lt", "nd", "z")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "y")
_CODAS = ("", "", "n", "r", "l", "s", "th", "x", "k", "m", "nd", "rn", "ll", "ss", "sk", "v")
_PLACE_ENDINGS = (
    "ssa",
    "mor",
    "vik",
    "dral",
    "thane",
    "wyn",
    "ora",
    "ek",
    "ant",
    "ith",
    "ova",
    "grad",
    "holm",
    "eth",
    "arra",
)
_ORG_SUFFIXES = (
    "Holdings",
    "Works",
    "Guild",
    "Consortium",
    "Trading Company",
    "Foundry",
    "Collective",
    "Mutual",
    "Instruments",
    "Shipping",
    "Mills",
    "Exchange",
    "Ironworks",
    "Cartography",
    "Lamplighters",
)
COLOURS = (
    "crimson",
    "teal",
    "ochre",
    "indigo",
    "amber",
    "scarlet",
    "olive",
    "violet",
    "silver",
    "maroon",
    "cobalt",
    "saffron",
    "emerald",
    "umber",
    "lilac",
    "turquoise",
    "charcoal",
    "vermilion",
    "ivory",
    "mustard",
    "cerulean",
    "copper",
    "jade",
    "rust",
)
JOB_TITLES = (
    "harbour pilot",
    "chief archivist",
    "glass engraver",
    "signal keeper",
    "tide surveyor",
    "lamp inspector",
    "vault warden",
    "bridge engineer",
    "loom mechanic",
    "canal assessor",
    "map copyist",
    "bell founder",
    "salt merchant",
    "clock restorer",
    "ferry captain",
    "seed registrar",
    "dye chemist",
    "tower watchman",
    "rope maker",
    "ledger auditor",
)
_CODE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I/O: they read as 1/0

# Real names and words the syllable generator could stumble on; rejected so no fact can be
# answered from pre-training knowledge (and tests check a further list).
REAL_NAME_BLOCKLIST = frozenset(
    w.lower()
    for w in (
        "Paris",
        "Rome",
        "Lima",
        "Oslo",
        "Riga",
        "Kiev",
        "Sofia",
        "Milan",
        "Dana",
        "Maria",
        "Anna",
        "Tokyo",
        "Berlin",
        "London",
        "Madrid",
        "Vienna",
        "Prague",
        "Bern",
        "Doha",
        "Baku",
        "Male",
        "Nice",
        "Bath",
        "York",
        "Derby",
        "Troy",
        "Sparta",
        "Kyoto",
        "Dubai",
        "Hanoi",
        "Seoul",
        "Delhi",
        "Texas",
        "Java",
        "Bali",
        "Cuba",
        "Peru",
        "Chad",
        "Mali",
        "Iran",
        "Iraq",
        "Oman",
        "Laos",
        "Tonga",
        "Samoa",
        "Fiji",
        "Nauru",
        "Kenya",
        "Ghana",
        "Niger",
        "Sudan",
        "Malta",
        "Tibet",
        "John",
        "Mary",
        "James",
        "Sarah",
        "David",
        "Linda",
        "Thomas",
        "Karen",
        "Nora",
        "Dora",
        "Sara",
        "Vera",
        "Tara",
        "Mira",
        "Lena",
        "Nina",
        "Zara",
        "Kara",
        "Lara",
        "Rosa",
        "Tina",
        "Gina",
        "Smith",
        "Jones",
        "Brown",
        "Miller",
        "Davis",
        "Moore",
        "Taylor",
        "Hall",
        "Young",
        "King",
        "Thor",
        "Odin",
        "Zeus",
        "Hera",
        "Mars",
        "Venus",
        "Apollo",
        "Atlas",
        "Titan",
        "Kong",
        "Lego",
        "Sony",
        "Nokia",
        "Shell",
        "Tesla",
        "Google",
        "Amazon",
        "Apple",
        "Nasa",
        "Volvo",
        "Fiat",
        "Dell",
        "Ikea",
        "Zara",
        "Kodak",
        "Bosch",
        "Rolex",
        "Visa",
        "Uber",
        "Kia",
        "Dead",
        "Kill",
        "Hell",
        "Damn",
        "Slut",
        "Nazi",
        "Shit",
        "Fuck",
        "Dick",
        "Cock",
        "Tits",
    )
)


class NameRegistry:
    """Invents names that are unique and none of which contains another (case-insensitive).

    Containment matters beyond uniqueness: with subjects "Kell" and "Zorvan Kell", the probe
    "Kell's mayor in 2020 was" would be a substring of a passage about "Zorvan Kell".
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._names: list[str] = []
        self._lower: set[str] = set()

    def _word(self, syllables: int) -> str:
        rng = self._rng
        parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS)]
        parts += [rng.choice(_INNER_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables - 1)]
        return ("".join(parts) + rng.choice(_CODAS)).capitalize()

    def _accept(self, name: str) -> bool:
        low = name.lower()
        words = low.split()
        if any(w in REAL_NAME_BLOCKLIST or len(w) < 4 for w in words):
            return False
        if any(low in other or other in low for other in self._lower):
            return False
        self._names.append(name)
        self._lower.add(low)
        return True

    def _fresh(self, make: Callable[[], str]) -> str:
        for _ in range(10_000):
            name = make()
            if self._accept(name):
                return name
        raise RuntimeError("name generator exhausted; the syllable tables are too small")

    def person(self) -> str:
        rng = self._rng
        return self._fresh(lambda: f"{self._word(2)} {self._word(rng.choice((1, 2)))}")

    def place(self) -> str:
        rng = self._rng
        return self._fresh(lambda: self._word(rng.choice((1, 2))) + rng.choice(_PLACE_ENDINGS))

    def organisation(self) -> str:
        rng = self._rng
        return self._fresh(lambda: f"{self._word(2)} {rng.choice(_ORG_SUFFIXES)}")

    def subject(self, kind: SubjectKind) -> str:
        if kind == "settlement":
            return self.place()
        if kind == "organisation":
            return self.organisation()
        return self.person()


def _value_maker(kind: ValueKind, names: NameRegistry, rng: random.Random) -> Callable[[], str]:
    """A generator of values of one type. Values never contain '.', so cutting a generation at the
    first sentence end cannot truncate a correct answer."""
    makers: dict[str, Callable[[], str]] = {
        "person": names.person,
        "place": names.place,
        "organisation": names.organisation,
        "code": lambda: rng.choice(_CODE_LETTERS) + rng.choice(_CODE_LETTERS) + "-" + str(rng.randint(1000, 9999)),
        "colour": lambda: rng.choice(COLOURS),
        # Years before 2000 so a value is never mistaken for a period name.
        "year": lambda: str(rng.randint(1780, 1999)),
        "count": lambda: str(rng.randint(800, 250_000)),
        "money": lambda: f"{rng.randint(3, 950)} million crowns",
        "frequency": lambda: f"{rng.randint(531, 1701)} kHz",
        "employees": lambda: f"{rng.randint(12, 40_000)} employees",
        "job_title": lambda: rng.choice(JOB_TITLES),
    }
    return makers[kind]


def _new_value(make: Callable[[], str], history: list[str]) -> str:
    """A value of the same type never held before by this fact (so a change is a real change and a
    value never returns, which keeps valid_from/valid_until a single interval)."""
    for _ in range(1000):
        value = make()
        if value not in history:
            return value
    raise RuntimeError(f"could not draw a new value distinct from {history}")


def generate_facts(cfg: DataConfig) -> list[Fact]:
    """The fact table: ``num_facts`` (subject, relation) pairs with one value per period."""
    rng = random.Random(f"{cfg.seed}:facts")
    names = NameRegistry(random.Random(f"{cfg.seed}:names"))
    value_rng = random.Random(f"{cfg.seed}:values")
    change_rng = random.Random(f"{cfg.seed}:changes")

    # Relations round-robin over a shuffled order: every relation appears once num_facts >= 20.
    relation_keys = sorted(RELATIONS)
    rng.shuffle(relation_keys)
    chosen = [relation_keys[i % len(relation_keys)] for i in range(cfg.num_facts)]

    # Subjects carry about two relations each (a town has a mayor and a population), but a
    # (subject, relation) pair is unique: each relation draws distinct subjects from the pool.
    per_kind: Counter[str] = Counter(RELATIONS[r].subject_kind for r in chosen)
    per_relation = Counter(chosen)
    pools: dict[str, list[str]] = {}
    kinds: tuple[SubjectKind, ...] = ("settlement", "organisation", "person")
    for kind in kinds:
        if per_kind[kind] == 0:
            continue
        widest = max(n for r, n in per_relation.items() if RELATIONS[r].subject_kind == kind)
        size = max(widest, (per_kind[kind] + 1) // 2)
        pools[kind] = [names.subject(kind) for _ in range(size)]
    subjects_of: dict[str, list[str]] = {
        r: rng.sample(pools[RELATIONS[r].subject_kind], n) for r, n in sorted(per_relation.items())
    }

    facts_first: list[tuple[str, str]] = []
    taken: Counter[str] = Counter()
    for relation in chosen:
        facts_first.append((subjects_of[relation][taken[relation]], relation))
        taken[relation] += 1

    values: list[list[str]] = []
    makers = {r: _value_maker(RELATIONS[r].value_kind, names, value_rng) for r in RELATIONS}
    for subject, relation in facts_first:
        history = [subject]  # a town is never its own twin, a person never their own spouse
        first = _new_value(makers[relation], history)
        values.append([first])

    n_changes = max(1, _round_share(cfg.change_share, cfg.num_facts))
    for _ in cfg.periods[1:]:
        changing = set(change_rng.sample(range(cfg.num_facts), n_changes))
        for i, (subject, relation) in enumerate(facts_first):
            current = values[i][-1]
            if i in changing:
                values[i].append(_new_value(makers[relation], [subject, *values[i]]))
            else:
                values[i].append(current)

    return [
        Fact(subject=s, relation=r, values=dict(zip(cfg.periods, vals))) for (s, r), vals in zip(facts_first, values)
    ]


def _round_share(share: float, n: int) -> int:
    return int(share * n + 0.5)


def generate(cfg: DataConfig) -> Benchmark:
    """Synthetic TemporalWiki from ``cfg``; same config -> identical Benchmark (and files)."""
    errors = cfg.validate()
    if errors:
        raise DataError("; ".join(errors))
    facts = generate_facts(cfg)
    meta = {
        "source": "generator",
        "generator": GENERATOR_NAME,
        "config": asdict(cfg),
        "relations": sorted({f.relation for f in facts}),
        "facts": [asdict(f) for f in facts],
    }
    return build_benchmark(facts, list(cfg.periods), cfg, BENCHMARK_NAME, meta)
