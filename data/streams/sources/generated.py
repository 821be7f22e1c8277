"""An offline multi-domain task generator: invented, templated, seeded, byte-identical per seed.

Four domains, each a family of small templates with the same surface form every time, so a small
model fine-tuned on a few dozen items measurably learns the format and the rule (what the stream's
learning curves need), while the eval items are different instances it has not seen:

- math: arithmetic word problems in GSM8K's layout (a worked solution ending "#### <n>"), scored on
  the final number;
- code: small Python functions in HumanEval's layout (signature + docstring with one example as the
  prompt, a correct one-line body as the reference solution, `check(candidate)` with three asserts as
  the tests, the function name as entry_point);
- multiple_choice: four options and a gold index, the answer derivable from the question (a fact
  stated in it, the largest number, a sum, the odd one out);
- style: short texts in five distinct registers (weather report, recipe, ship's log, match report,
  public notice), for perplexity.

Names of people, places and creatures are invented. Each domain draws from its own random.Random
seeded with a string of (stream seed, option seed, domain, style), so the same options and seed give
the same items, in the same order, on every machine. Train and test items are one sequence of
distinct items: the first num_train are "train", the next num_eval "test", so the
split is disjoint by construction and the training items do not change when num_eval does. Code
items are distinct by function name, the others by their question or text.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from data.errors import DataError
from data.fields import Range
from data.streams.sources.base import Doc, ReadContext, Source, SourceRead

Domain = Literal["math", "code", "multiple_choice", "style"]
STYLES = ("weather", "recipe", "ship_log", "match_report", "notice")
SPLITS = ("train", "test")
MAX_ITEMS = 20_000
# Near a domain's capacity a new item needs more draws (a coupon collector); this many repeats in a
# row means the domain is exhausted, not unlucky (code has about 1,400 distinct functions).
MAX_REPEATS = 20_000

NAMES = (
    "Zorva",
    "Kelbin",
    "Thessa",
    "Drumo",
    "Vaelin",
    "Mirrek",
    "Osska",
    "Brannoc",
    "Quilla",
    "Tovrin",
    "Yselde",
    "Pellin",
    "Grenna",
    "Lutho",
    "Faskar",
    "Imbra",
)
PLACES = (
    "Veltrassa",
    "Kormoth",
    "Dunvik",
    "Silvaran",
    "Orrowyn",
    "Thalmor",
    "Brisk Hollow",
    "Quenmar",
    "Ashgrad",
    "Pellithane",
    "Morrowek",
    "Zanthora",
)
ITEMS = (
    ("glass beads", "glass bead"),
    ("copper rings", "copper ring"),
    ("river stones", "river stone"),
    ("clay bowls", "clay bowl"),
    ("paper lanterns", "paper lantern"),
    ("wool scarves", "wool scarf"),
    ("brass keys", "brass key"),
    ("seed packets", "seed packet"),
    ("tin whistles", "tin whistle"),
    ("candle stubs", "candle stub"),
)
COLOURS = ("crimson", "teal", "ochre", "indigo", "amber", "violet", "silver", "olive", "cobalt", "saffron")
CREATURES = (
    "glimmerfox",
    "stonebeetle",
    "marsh owl",
    "reed hare",
    "dune moth",
    "frost newt",
    "cliff goat",
    "lantern fish",
    "bramble wren",
    "salt lizard",
)
ANIMALS = ("goat", "heron", "otter", "badger", "lizard", "moth", "crab", "sparrow", "eel", "ox")
TOOLS = ("hammer", "ladle", "chisel", "spade", "kettle", "rake", "anvil", "awl")
WORDS = (
    "banana",
    "level",
    "tomato",
    "bookkeeper",
    "lantern",
    "mississippi",
    "parallel",
    "cobbler",
    "tundra",
    "harbour",
    "kettle",
    "velvet",
)
SUFFIXES = ("ish", "ward", "ling", "ster", "kin", "ful")
PREFIXES = ("zor", "vel", "kip", "tam", "rus", "mob", "dex", "lun", "fay", "gor", "hib", "jex")


@dataclass
class GeneratedOptions:
    domain: Domain = "math"  # which kind of items to generate
    num_train: Annotated[int, Range(1, MAX_ITEMS)] = 48  # items in the "train" split
    num_eval: Annotated[int, Range(1, MAX_ITEMS)] = 16  # items in the "test" split
    # style domain: one register, or "" for all five in turn
    style: Literal["", "weather", "recipe", "ship_log", "match_report", "notice"] = ""
    # mixed with the stream seed: two tasks of one domain need different seeds (else they leak)
    seed: Annotated[int, Range(0, 2**31 - 1)] = 0


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------
# math


def _math(rng: random.Random, i: int) -> dict[str, Any]:
    n, m = rng.sample(NAMES, 2)
    items, item = rng.choice(ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(3, 40), rng.randint(2, 30)
        r = a + b
        q = f"{n} has {a} {items}. {n} finds {b} more {items}. How many {items} does {n} have now?"
        s = f"{n} starts with {a} {items} and finds {b} more, so {n} has {a} + {b} = {r} {items}."
    elif kind == 1:
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        r = a - b
        q = f"{n} had {a} {items} and gave {b} of them to {m}. How many {items} does {n} have left?"
        s = f"{n} gave away {b} of {a} {items}, so {a} - {b} = {r} are left."
    elif kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        r = a * b
        q = f"{n} fills {a} boxes with {b} {items} each. How many {items} are in the boxes altogether?"
        s = f"Each of the {a} boxes holds {b} {items}, so there are {a} * {b} = {r} {items}."
    elif kind == 3:
        a, b = rng.randint(5, 30), rng.randint(5, 30)
        c = rng.randint(1, a + b - 1)
        r = a + b - c
        q = (
            f"{n} buys {a} {items} on market day and {b} more the next day, then uses {c} of them. "
            f"How many {items} does {n} have now?"
        )
        s = f"{n} buys {a} + {b} = {a + b} {items} and uses {c}, so {a + b} - {c} = {r} remain."
    elif kind == 4:
        r, b = rng.randint(2, 12), rng.randint(2, 9)
        total = r * b
        q = f"{n} shares {total} {items} equally among {b} friends. How many {items} does each friend get?"
        s = f"{total} {items} shared among {b} friends is {total} / {b} = {r} each."
    else:
        p, k = rng.randint(2, 15), rng.randint(2, 12)
        r = p * k
        q = f"One {item} costs {p} coins at the {m} market. How many coins do {k} {items} cost?"
        s = f"{k} {items} at {p} coins each cost {k} * {p} = {r} coins."
    return {"question": q, "answer": f"{s}\n#### {r}"}


# ---------------------------------------------------------------------------------------------
# code


@dataclass(frozen=True)
class _CodeFamily:
    stem: str
    arg: str  # "x: int"
    returns: str
    doc: str  # with {p}
    body: str  # with {p}
    func: Callable[[Any, Any], Any]  # (param, input) -> output, the reference behaviour
    param: Callable[[random.Random], Any]
    inputs: Callable[[random.Random, Any], Any]


def _ints(rng: random.Random, p: Any) -> int:
    return rng.randint(-20, 40)


def _maybe_multiples(rng: random.Random, p: Any) -> int:
    # Half multiples of p, so divisibility tests see both answers.
    return p * rng.randint(-3, 6) if rng.random() < 0.5 else rng.randint(-20, 40)


def _lists(rng: random.Random, p: Any) -> list[int]:
    return [rng.randint(0, 20) for _ in range(rng.randint(1, 5))]


def _words(rng: random.Random, p: Any) -> str:
    return rng.choice(WORDS)


_FAMILIES = (
    _CodeFamily(
        "add",
        "x: int",
        "int",
        "Return x plus {p}.",
        "    return x + {p}\n",
        lambda p, x: x + p,
        lambda r: r.randint(2, 20),
        _ints,
    ),
    _CodeFamily(
        "times",
        "x: int",
        "int",
        "Return x multiplied by {p}.",
        "    return x * {p}\n",
        lambda p, x: x * p,
        lambda r: r.randint(2, 12),
        _ints,
    ),
    _CodeFamily(
        "sum_plus",
        "xs: list[int]",
        "int",
        "Return the sum of the numbers in xs plus {p}.",
        "    return sum(xs) + {p}\n",
        lambda p, xs: sum(xs) + p,
        lambda r: r.randint(2, 20),
        _lists,
    ),
    _CodeFamily(
        "count",
        "s: str",
        "int",
        "Return how many times the letter '{p}' occurs in s.",
        "    return s.count('{p}')\n",
        lambda p, s: s.count(p),
        lambda r: r.choice("aeiklnoprst"),
        _words,
    ),
    _CodeFamily(
        "repeat",
        "s: str",
        "str",
        "Return s repeated {p} times.",
        "    return s * {p}\n",
        lambda p, s: s * p,
        lambda r: r.randint(2, 4),
        _words,
    ),
    _CodeFamily(
        "divisible",
        "x: int",
        "bool",
        "Return True if x is divisible by {p}, otherwise False.",
        "    return x % {p} == 0\n",
        lambda p, x: x % p == 0,
        lambda r: r.randint(2, 9),
        _maybe_multiples,
    ),
    _CodeFamily(
        "shift",
        "xs: list[int]",
        "list[int]",
        "Return a new list with {p} added to every number in xs.",
        "    return [x + {p} for x in xs]\n",
        lambda p, xs: [x + p for x in xs],
        lambda r: r.randint(2, 20),
        _lists,
    ),
    _CodeFamily(
        "max_minus",
        "xs: list[int]",
        "int",
        "Return the largest number in xs minus {p}.",
        "    return max(xs) - {p}\n",
        lambda p, xs: max(xs) - p,
        lambda r: r.randint(2, 20),
        _lists,
    ),
    _CodeFamily(
        "suffix",
        "s: str",
        "str",
        "Return s followed by the text '{p}'.",
        "    return s + '{p}'\n",
        lambda p, s: s + p,
        lambda r: r.choice(SUFFIXES),
        _words,
    ),
)


def _code(rng: random.Random, i: int) -> dict[str, Any]:
    # One docstring example + three asserts, all different inputs, and the asserts expect at least two
    # different values, so a constant function (return False, return 0) cannot pass them. Some
    # (family, parameter) pairs cannot give that (the letter 'i' occurs in one word only): draw again.
    while True:
        fam = rng.choice(_FAMILIES)
        p = fam.param(rng)
        args: list[Any] = []
        for _ in range(100):
            x = fam.inputs(rng, p)
            if x not in args:
                args.append(x)
            if len(args) == 4:
                break
        if len(args) == 4 and len({repr(fam.func(p, x)) for x in args[1:]}) >= 2:
            break
    name = f"{rng.choice(PREFIXES)}_{fam.stem}_{p}"
    doc = fam.doc.format(p=p)
    prompt = (
        f"def {name}({fam.arg}) -> {fam.returns}:\n"
        f'    """{doc}\n'
        f"    >>> {name}({args[0]!r})\n"
        f"    {fam.func(p, args[0])!r}\n"
        f'    """\n'
    )
    test = "def check(candidate):\n" + "".join(f"    assert candidate({x!r}) == {fam.func(p, x)!r}\n" for x in args[1:])
    return {
        "task_id": f"generated/{i}",
        "prompt": prompt,
        "canonical_solution": fam.body.format(p=p),
        "test": test,
        "entry_point": name,
    }


# ---------------------------------------------------------------------------------------------
# multiple choice


def _multiple_choice(rng: random.Random, i: int) -> dict[str, Any]:
    kind = rng.randrange(4)
    if kind == 0:
        place, creature = rng.choice(PLACES), rng.choice(CREATURES)
        options = rng.sample(COLOURS, 4)
        gold = rng.randrange(4)
        q = (
            f"In {place}, every {creature} is {options[gold]}. What colour is {_article(creature)} {creature} "
            f"from {place}?"
        )
    elif kind == 1:
        numbers = rng.sample(range(1, 100), 4)
        options = [str(x) for x in numbers]
        gold = numbers.index(max(numbers))
        q = f"Which number is the largest: {numbers[0]}, {numbers[1]}, {numbers[2]} or {numbers[3]}?"
    elif kind == 2:
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        wrong = rng.sample([a + b + d for d in (-10, -5, -3, -2, -1, 1, 2, 3, 5, 10) if a + b + d > 0], 3)
        options = [str(x) for x in [a + b, *wrong]]
        rng.shuffle(options)
        gold = options.index(str(a + b))
        q = f"What is {a} plus {b}?"
    else:
        name = rng.choice(NAMES)
        things = [*rng.sample(ANIMALS, 3), rng.choice(TOOLS)]
        rng.shuffle(things)
        gold = next(k for k, t in enumerate(things) if t in TOOLS)
        options = things
        listed = ", ".join(f"{_article(t)} {t}" for t in things[:3]) + f" and {_article(things[3])} {things[3]}"
        q = f"{name} lists {listed}. Which one is not an animal?"
    return {"question": q, "choices": options, "gold": gold}


# ---------------------------------------------------------------------------------------------
# style texts


def _style_text(rng: random.Random, style: str) -> str:
    place = rng.choice(PLACES)
    if style == "weather":
        sky = rng.choice(("clear", "grey", "hazy", "stormy", "bright", "misty"))
        wind = rng.choice(("light", "steady", "gusty", "cold", "warm"))
        direction = rng.choice(("north", "south", "east", "west"))
        advice = rng.choice(
            (
                "Carry an umbrella",
                "A good day for the harbour",
                "Expect frost after dark",
                "Keep the shutters closed",
                "Fine weather for the fields",
            )
        )
        return (
            f"Weather for {place}: {sky} skies in the morning, {rng.randint(2, 31)} degrees by noon, and a "
            f"{wind} wind from the {direction}. {advice}."
        )
    if style == "recipe":
        dish = rng.choice(("barley cakes", "river soup", "honey loaf", "pepper stew", "plum tart"))
        a, b = rng.sample(("oat flour", "goat milk", "crushed nuts", "dried plums", "root broth", "butter"), 2)
        spice = rng.choice(("salt", "cinnamon", "thyme", "pepper", "saffron"))
        finish = rng.choice(("golden", "firm", "bubbling", "dark at the edges"))
        return (
            f"To make {dish}, stir {rng.randint(1, 4)} cups of {a} into the {b}, add a pinch of {spice}, and "
            f"bake for {rng.randint(10, 60)} minutes until {finish}."
        )
    if style == "ship_log":
        ship = rng.choice(("Grey Heron", "Saltwind", "Lady of Kormoth", "Tidebreaker", "Amber Gull"))
        direction = rng.choice(("north", "south", "east", "west"))
        event = rng.choice(
            (
                "Sighted whales at dusk",
                "Mended the foresail",
                "Rationed the water",
                "Calm seas all day",
                "Lost a barrel overboard",
            )
        )
        return (
            f"Day {rng.randint(1, 90)} of the voyage. The {ship} sailed {direction} past {place} with a crew "
            f"of {rng.randint(6, 40)}. {event}."
        )
    if style == "match_report":
        home, away = rng.sample(PLACES, 2)
        s1 = rng.randint(1, 6)
        s2 = rng.randint(0, s1 - 1)
        day = rng.choice(("Monday", "Wednesday", "Friday", "Saturday", "Sunday"))
        return (
            f"{home} Rovers beat {away} United {s1} to {s2} on {day}. {rng.choice(NAMES)} scored twice "
            f"before the break and the crowd sang until the final whistle."
        )
    facility = rng.choice(("library", "bridge", "bathhouse", "market hall", "east gate"))
    reason = rng.choice(("repairs", "cleaning", "a festival", "an inspection", "flood works"))
    d1 = rng.randint(1, 20)
    return (
        f"Notice to the residents of {place}: the {facility} will be closed from the {d1}th to the "
        f"{d1 + rng.randint(1, 8)}th for {reason}. We regret any inconvenience."
    )


# ---------------------------------------------------------------------------------------------


_FIELDS: dict[str, dict[str, str]] = {
    "math": {"question": "str", "answer": "str"},
    "code": {"task_id": "str", "prompt": "str", "canonical_solution": "str", "test": "str", "entry_point": "str"},
    "multiple_choice": {"question": "str", "choices": "list[str]", "gold": "int"},
    "style": {"text": "str", "style": "str"},
}

_FORMATS: dict[str, dict[str, Any]] = {
    # The training completion is the worked solution; the eval target is its final number only.
    "math": {"prompt": "Question: {question}\nAnswer:", "target": " {answer|final_number}", "completion": " {answer}"},
    "code": {"prompt": "{prompt}", "target": "{canonical_solution}", "tests": "{test}", "entry_point": "{entry_point}"},
    "multiple_choice": {
        "prompt": "Question: {question}\n{choices|lettered}\nAnswer:",
        "choices": "choices",
        "gold": "gold",
    },
    "style": {"prompt": "", "target": "{text}"},
}


def generate_items(opts: GeneratedOptions, stream_seed: int) -> list[dict[str, Any]]:
    """num_train + num_eval distinct items of one domain, in a fixed order for a given seed."""
    rng = random.Random(f"generated:{stream_seed}:{opts.seed}:{opts.domain}:{opts.style}")
    wanted = opts.num_train + opts.num_eval
    # Code items are distinct by function name: two prompts for one name would be one problem twice.
    key = {"math": "question", "code": "entry_point", "multiple_choice": "question", "style": "text"}[opts.domain]
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    num_repeats = 0  # draws in a row that gave nothing new: the domain's templates are used up
    while len(out) < wanted:
        if num_repeats > MAX_REPEATS:
            raise DataError(
                f"generated source, domain {opts.domain}: only {len(out)} distinct items exist for these "
                f"options, {wanted} asked (num_train + num_eval); lower num_train/num_eval"
            )
        i = len(out)
        if opts.domain == "math":
            item = _math(rng, i)
        elif opts.domain == "code":
            item = _code(rng, i)
        elif opts.domain == "multiple_choice":
            item = _multiple_choice(rng, i)
        else:
            style = opts.style or STYLES[i % len(STYLES)]
            item = {"text": _style_text(rng, style), "style": style}
        if item[key] in seen:
            num_repeats += 1
        else:
            num_repeats = 0
            seen.add(item[key])
            out.append(item)
    return out


class GeneratedSource(Source):
    name = "generated"
    options_cls = GeneratedOptions
    summary = "offline invented items (math, code, multiple_choice, style), byte-identical per seed"

    def splits(self, opts: GeneratedOptions) -> tuple[str, ...] | None:
        return SPLITS

    def fields(self, opts: GeneratedOptions, kind: str) -> dict[str, str]:
        return dict(_FIELDS[opts.domain])

    def default_format(self, opts: GeneratedOptions, kind: str) -> dict[str, Any]:
        return dict(_FORMATS[opts.domain])

    def check(self, opts: GeneratedOptions, kind: str) -> list[str]:
        if opts.style and opts.domain != "style":
            return [f"style {opts.style!r} applies to domain style only (got domain {opts.domain!r})"]
        return []

    def read(self, opts: GeneratedOptions, split: str, ctx: ReadContext) -> SourceRead:
        items = generate_items(opts, ctx.seed)
        part = range(opts.num_train) if split == "train" else range(opts.num_train, len(items))
        docs = [Doc(id=f"{opts.domain}-{i}", where=f"generated:{opts.domain} item {i}", fields=items[i]) for i in part]
        return SourceRead(
            docs,
            {
                "domain": opts.domain,
                "style": opts.style,
                "seed": opts.seed,
                "stream_seed": ctx.seed,
                "num_records": len(docs),
            },
        )
