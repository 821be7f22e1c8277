"""Per-probe answer scoring: SQuAD-style normalisation, exact match and token F1.

The model completes a probe prompt greedily; ``clean_generation`` keeps only the answer span
of that continuation, and ``exact_match`` / ``token_f1`` compare it with the gold value. The
normalisation is the official SQuAD v1.1 one (Rajpurkar et al. 2016) so our numbers read the
same way as the usual closed-book QA numbers. Definitions are written out in docs/metrics.md.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# A sentence ends at a "." followed by whitespace or the end of the text. A "." followed by a
# non-space character ("4.2 km", "QX-4.1", "v1.2.3") is part of a number or code and is kept.
_SENTENCE_END = re.compile(r"\.(?=\s|$)")


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop ASCII punctuation, drop articles, collapse spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    # Articles are removed after punctuation so "the-end" -> "theend" stays one token, as in SQuAD.
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(pred: str, gold: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def token_f1(pred: str, gold: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of the multiset of normalised tokens.

    Both empty after normalisation -> 1.0 (nothing asked, nothing said); exactly one empty -> 0.0.
    """
    pred_tokens = normalize_answer(pred).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    # Multiset intersection: a token repeated in the prediction counts only as often as in gold.
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def clean_generation(text: str, prompt: str | None = None) -> str:
    """The answer span of a greedy continuation: cut at the first newline or sentence end, stripped.

    ``text`` is the continuation after the prompt. If ``prompt`` is given and ``text`` starts with
    it (a decoder that returns prompt + continuation), the prompt is removed first. Leading
    whitespace, newlines included, is dropped before cutting: models often open with " " or "\\n",
    and cutting there would turn every such answer into "". A sentence end is a "." followed by
    whitespace or the end of the text, so decimals ("4.2 km") and codes ("QX-4.1") survive.
    """
    if prompt is not None and text.startswith(prompt):
        text = text[len(prompt) :]
    text = text.lstrip()
    text = text.split("\n", 1)[0]
    match = _SENTENCE_END.search(text)
    if match is not None:
        text = text[: match.start()]
    return text.strip()
