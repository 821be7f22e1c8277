"""The versioned fact registry of casm, and the parser that fills it from raw passage text.

Nothing here reads Passage.subject/relation/value or any probe: the input is a list of strings per
period. Extraction uses three assumptions about the text, each learnt from or checked on the corpus:

1. a passage mentions the period it is about by name (the run's period names are known);
2. names are capitalised words; a capitalised word that opens a sentence (the first word, or one after
   ". ? ! :", as in a question-answer item) counts as a name only if the corpus also shows it
   capitalised mid-sentence, or it is directly followed by "'s" or another name;
3. the value is the sentence-final phrase (cloze convention): the last run of name/number tokens
   and the lowercase words that follow it ("135 million crowns"); a sentence that has no such run
   after its subject ends in a lowercase value ("teal", "clock restorer"), which is recovered as the
   longest common ending with another passage about the same subject in the same period, minus
   leading function words (tokens in at least `function_word_share` of all passages).

The subject is the first name run, the relation is the sentence with subject, value and period
replaced by <S>, <V>, <P> (a "skeleton"). Skeletons that state the same subject and value in the same
period are wordings of one relation and are merged (union-find). A statement whose skeleton has no
fact for its subject yet is linked to an existing fact of the subject when exactly one fact is a
plausible target: not stated in this period, with a value of the same shape (e.g. "9 million crowns",
"A A"); ties are broken by shared content words. Otherwise it is a new fact.

The registry is rebuilt from the full log of parsed statements every period (a pure function of the
log), so later evidence that two wordings are one relation also repairs the earlier history.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_TOKEN = re.compile(r"\d+(?:[.,]\d+)*(?:-\w+)*|[A-Za-z0-9][\w\-]*|'s|’s|[^\w\s]")
SUBJECT, VALUE, PERIOD = "<S>", "<V>", "<P>"


@dataclass(frozen=True)
class Statement:
    """One parsed passage: what it says, in its own words."""

    period: str
    text: str
    subject: str
    value: str
    skeleton: str  # the passage with <S>, <V>, <P> in place of subject, value and period


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.strip())


def _is_capitalised(tok: str) -> bool:
    return tok[:1].isupper()


SENTENCE_BREAK = {".", "?", "!", ":"}


def _starts_sentence(toks: Sequence[str], i: int) -> bool:
    """Whether toks[i] opens a sentence: the first token, or one after a sentence break. A question-answer
    item ("Q: In 2018, what was ...? A: Cosith.") has three such openings; a word capitalised there is
    no evidence of a name (the "A" of "A: ..." made every "A 2018 report on ..." passage's subject "A")."""
    return i == 0 or toks[i - 1] in SENTENCE_BREAK


def _has_digit(tok: str) -> bool:
    return any(c.isdigit() for c in tok)


def value_shape(value: str) -> str:
    """A coarse type signature: capitalised word A, number 9, lowercase word a; units kept literally."""
    toks = tokenize(value)
    out = []
    for i, tok in enumerate(toks):
        if _has_digit(tok):
            out.append("9")
        elif _is_capitalised(tok):
            out.append("A")
        elif i > 0 and out and out[0] == "9":
            out.append(tok.lower())  # "9 kHz", "9 employees": the unit is part of the type
        else:
            out.append("a")
    return " ".join(out)


def _content_words(skeleton: str) -> set[str]:
    return {t.lower() for t in tokenize(skeleton) if t.isalpha() and len(t) > 3}


class TemplateParser:
    """Turns passage strings into Statements, learning what it needs from the corpus it is given."""

    def __init__(self, period_names: Sequence[str], function_word_share: float = 0.2) -> None:
        self.period_names = list(period_names)
        self.function_word_share = function_word_share

    def parse_corpus(self, by_period: Sequence[tuple[str, Sequence[str]]]) -> tuple[list[Statement], list[str]]:
        """Parse every period's texts with statistics from the whole corpus; (statements, unparsed)."""
        all_texts = [t for _, texts in by_period for t in texts]
        tokenised = {t: tokenize(t) for t in all_texts}
        mid_caps: set[str] = set()
        doc_freq: Counter[str] = Counter()
        for toks in tokenised.values():
            doc_freq.update({t.lower() for t in toks})
            for i, tok in enumerate(toks):
                if _is_capitalised(tok) and not _starts_sentence(toks, i):
                    mid_caps.add(tok)
        function_words = {w for w, n in doc_freq.items() if n >= max(2, self.function_word_share * len(all_texts))}
        statements: list[Statement] = []
        unparsed: list[str] = []
        for period, texts in by_period:
            parsed = [self._parse_one(period, t, tokenised[t], mid_caps) for t in texts]
            # Lowercase values: recover from a sibling passage (same subject, same period).
            for i, item in enumerate(parsed):
                if item is None:
                    unparsed.append(texts[i])
                    continue
                toks, s_span, v_span, p_idx = item
                if v_span is None:
                    v_span = self._lowercase_value(i, parsed, function_words)
                statements.append(self._statement(period, texts[i], toks, s_span, v_span, p_idx))
        return statements, unparsed

    # -- one passage -------------------------------------------------------------------------
    def _parse_one(
        self, period: str, text: str, toks: list[str], mid_caps: set[str]
    ) -> tuple[list[str], tuple[int, int], tuple[int, int] | None, int] | None:
        if toks and toks[-1] == ".":
            toks = toks[:-1]
        p_idx = next((i for i, t in enumerate(toks) if t == period), None)
        if p_idx is None:
            p_idx = next((i for i, t in enumerate(toks) if t in self.period_names), None)
        if p_idx is None or len(toks) < 3:
            return None

        def entity(i: int) -> bool:
            tok = toks[i]
            if i == p_idx:
                return False
            if _has_digit(tok):
                return True
            if not _is_capitalised(tok):
                return False
            if not _starts_sentence(toks, i):
                return True
            nxt = toks[i + 1] if i + 1 < len(toks) else ""
            return tok in mid_caps or nxt in ("'s", "’s") or (_is_capitalised(nxt) and p_idx != i + 1)

        runs: list[tuple[int, int]] = []
        i = 0
        while i < len(toks):
            if entity(i):
                j = i
                while j + 1 < len(toks) and entity(j + 1):
                    j += 1
                runs.append((i, j + 1))
                i = j + 1
            else:
                i += 1
        if not runs:
            return None
        subject = runs[0]
        later = [r for r in runs[1:] if r[0] > subject[1]]
        value: tuple[int, int] | None = None
        if later:
            # the last name/number run and everything after it ("135 million crowns", "1240 kHz")
            value = (later[-1][0], len(toks))
        return toks, subject, value, p_idx

    def _lowercase_value(self, i: int, parsed: list[Any], function_words: set[str]) -> tuple[int, int]:
        toks, s_span, _, p_idx = parsed[i]
        subject = toks[s_span[0] : s_span[1]]
        floor = max(s_span[1], p_idx + 1)
        best = 0
        for j, other in enumerate(parsed):
            if j == i or other is None:
                continue
            o_toks, o_s, _o_v, _ = other
            if o_toks[o_s[0] : o_s[1]] != subject:
                continue
            n = 0
            while n < len(toks) - floor and n < len(o_toks) and toks[-1 - n] == o_toks[-1 - n]:
                n += 1
            best = max(best, n)
        start = len(toks) - max(best, 1)
        while start < len(toks) - 1 and toks[start].lower() in function_words:
            start += 1
        return start, len(toks)

    @staticmethod
    def _statement(
        period: str, text: str, toks: list[str], s_span: tuple[int, int], v_span: tuple[int, int], p_idx: int
    ) -> Statement:
        out: list[str] = []
        for i, tok in enumerate(toks):
            if s_span[0] <= i < s_span[1]:
                if i == s_span[0]:
                    out.append(SUBJECT)
            elif v_span[0] <= i < v_span[1]:
                if i == v_span[0]:
                    out.append(VALUE)
            elif i == p_idx:
                out.append(PERIOD)
            else:
                out.append(tok)
        return Statement(
            period=period,
            text=text,
            subject=_join(toks[s_span[0] : s_span[1]]),
            value=_join(toks[v_span[0] : v_span[1]]),
            skeleton=_join(out),
        )


def _join(toks: Iterable[str]) -> str:
    out = ""
    for tok in toks:
        if out and not (tok in ("'s", "’s", ",", ".", ";", ":") or out.endswith("-")):
            out += " "
        out += tok
    return out


# ------------------------------------------------------------------------------------------------
# the registry


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> str:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        keep, drop = sorted((ra, rb))  # deterministic root: the smaller string
        self.parent[drop] = keep
        return keep


def build_registry(
    statements: Sequence[Statement], period_order: Sequence[str], slots: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The registry as plain JSON data, from the log of statements (a pure function of it).

    facts: one entry per (subject, relation cluster) with its versions in time order. A version has
    value, valid_from, valid_until (first period whose statement contradicts it; None = still active),
    parent (previous version id), contradicts / contradicted_by (version ids), confirmed_in (periods
    whose passages state it), slot (where the memory holds it, from `slots` keyed by
    "<period>|<subject>|<value>") and evidence (period -> passage texts).
    """
    slots = slots or {}
    order = {p: i for i, p in enumerate(period_order)}
    uf = _UnionFind()
    by_period: dict[str, list[Statement]] = defaultdict(list)
    for st in statements:
        by_period[st.period].append(st)
        uf.find(st.skeleton)
    # Co-statements: one subject and value in one period under two wordings -> one relation.
    for period, sts in by_period.items():
        wordings: dict[tuple[str, str], list[str]] = defaultdict(list)
        for st in sts:
            wordings[(st.subject, st.value)].append(st.skeleton)
        for skels in wordings.values():
            for other in skels[1:]:
                uf.union(skels[0], other)

    # observations[(subject, root)] = list of (period, value, texts); built period by period so a
    # link made in an early period is visible to the later ones.
    observations: dict[tuple[str, str], list[tuple[str, str, list[str]]]] = {}
    first_skeleton: dict[str, str] = {}
    for st in statements:
        first_skeleton.setdefault(st.skeleton, st.skeleton)

    def rekey() -> None:
        merged: dict[tuple[str, str], list[tuple[str, str, list[str]]]] = {}
        for (subj, root), obs in observations.items():
            merged.setdefault((subj, uf.find(root)), []).extend(obs)
        observations.clear()
        observations.update(merged)

    links: list[dict[str, str]] = []
    for period in sorted(by_period, key=lambda p: order.get(p, len(order))):
        groups: dict[tuple[str, str, str], list[Statement]] = defaultdict(list)
        for st in by_period[period]:
            groups[(st.subject, uf.find(st.skeleton), st.value)].append(st)
        stated_now = {(s, r) for (s, r, _) in groups}
        for (subj, root, value), sts in sorted(groups.items()):
            root = uf.find(root)
            key = (subj, root)
            if key not in observations:
                target = _link_target(subj, root, value, sts, observations, stated_now, uf, period)
                if target is not None:
                    links.append({"period": period, "from": root, "to": target[1], "subject": subj})
                    uf.union(root, target[1])
                    rekey()
                    key = (subj, uf.find(root))
            observations.setdefault(key, []).append((period, value, [s.text for s in sts]))
        rekey()

    facts = []
    for (subj, root), obs in sorted(observations.items()):
        obs.sort(key=lambda o: order.get(o[0], len(order)))
        label = min((s for s in first_skeleton if uf.find(s) == root), key=lambda s: (len(s), s))
        fact_id = f"{subj} | {label}"
        versions: list[dict[str, Any]] = []
        for period, value, texts in obs:
            if versions and versions[-1]["value"] == value:
                # restated: the same version, with more evidence
                versions[-1]["evidence"].setdefault(period, []).extend(texts)
                if period not in versions[-1]["confirmed_in"]:
                    versions[-1]["confirmed_in"].append(period)
                continue
            vid = f"{fact_id} @ {period}"
            version: dict[str, Any] = {
                "id": vid,
                "value": value,
                "valid_from": period,
                "valid_until": None,
                "parent": versions[-1]["id"] if versions else None,
                "contradicts": [],
                "contradicted_by": [],
                "confirmed_in": [period],
                "evidence": {period: list(texts)},
                "slot": slots.get(f"{period}|{subj}|{value}"),
            }
            if versions:
                prev = versions[-1]
                prev["valid_until"] = period
                prev["contradicted_by"].append(vid)
                version["contradicts"].append(prev["id"])
            versions.append(version)
        facts.append(
            {
                "id": fact_id,
                "subject": subj,
                "relation": label,
                "wordings": sorted(s for s in first_skeleton if uf.find(s) == root),
                "versions": versions,
            }
        )
    num_versions = sum(len(f["versions"]) for f in facts)
    return {
        "schema_version": 1,
        "periods": list(period_order),
        "facts": facts,
        "num_facts": len(facts),
        "num_versions": num_versions,
        "num_contradictions": num_versions - len(facts),
        "relation_links": links,
    }


def _link_target(
    subj: str,
    root: str,
    value: str,
    sts: list[Statement],
    observations: dict[tuple[str, str], list[tuple[str, str, list[str]]]],
    stated_now: set[tuple[str, str]],
    uf: _UnionFind,
    period: str,
) -> tuple[str, str] | None:
    """An existing fact of `subj` that this unseen wording most plausibly restates or contradicts."""
    shape = value_shape(value)
    words = set().union(*(_content_words(s.skeleton) for s in sts))
    candidates = []
    for (s, r), obs in observations.items():
        if s != subj or (s, r) in stated_now or any(p == period for p, _, _ in obs):
            continue
        if value_shape(obs[-1][1]) != shape:
            continue
        cluster_words = set().union(*(_content_words(k) for k in uf.parent if uf.find(k) == r))
        candidates.append((len(words & cluster_words), r))
    if not candidates:
        return None
    candidates.sort(key=lambda c: (-c[0], c[1]))
    if len(candidates) > 1 and candidates[0][0] == candidates[1][0]:
        return None  # ambiguous: better a new fact than a wrong contradiction
    return subj, candidates[0][1]
