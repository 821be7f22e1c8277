"""Scorer names, what kind of item each needs, and the standard document schema of each kind.

The scorer registry itself lives in eval_and_metrics/scorers/ (owned by the scorers) and the CLI
checks a stream's scorer names against it. The data side needs only to know what shape of eval item
each scorer consumes, so that a stream file asking for `numeric` on a task whose target is free text,
or `multiple_choice` without choices, is refused before any data is read. The names here are the
registry's; a name passed in by the caller (load_stream(scorers=...)) that is not listed here is
accepted and its kind inferred from the format (choices -> multiple_choice, tests -> code, else
generate).

Kinds (lm-eval output types, split where the data differs):

- generate: generate_until, target is the gold text (exact_match, token_f1, rouge_l);
- numeric: generate_until, target is one number (numeric);
- code: generate_until, tests + entry_point run against prompt + completion (code_pass_at_1);
- multiple_choice: each choice scored as a continuation of the prompt, gold is its index;
- perplexity: loglikelihood_rolling of the target text given the (optional) prompt.
"""

from __future__ import annotations

KINDS = ("generate", "numeric", "code", "multiple_choice", "perplexity")

SCORER_KINDS: dict[str, str] = {
    "exact_match": "generate",
    "token_f1": "generate",
    "rouge_l": "generate",
    "numeric": "numeric",
    "code_pass_at_1": "code",
    "code_pass_at_1_lm_eval": "code",
    "multiple_choice": "multiple_choice",
    "perplexity": "perplexity",
}

# The documented schema of a user's own file (jsonl, csv, hf) per kind, used when a task declares no
# `fields:`; with it, a file written in this schema needs neither `fields:` nor `format:`.
STANDARD_FIELDS: dict[str, dict[str, str]] = {
    "generate": {"prompt": "str", "target": "str"},
    "numeric": {"prompt": "str", "target": "str"},
    "code": {"prompt": "str", "target": "str", "tests": "str", "entry_point": "str"},
    "multiple_choice": {"prompt": "str", "choices": "list[str]", "gold": "int"},
    "perplexity": {"text": "str"},
}

STANDARD_FORMATS: dict[str, dict[str, object]] = {
    "generate": {"prompt": "{prompt}", "target": "{target}"},
    "numeric": {"prompt": "{prompt}", "target": "{target}"},
    "code": {"prompt": "{prompt}", "target": "{target}", "tests": "{tests}", "entry_point": "{entry_point}"},
    "multiple_choice": {"prompt": "{prompt}", "choices": "choices", "gold": "gold"},
    "perplexity": {"prompt": "", "target": "{text}"},
}


def kind_of(scorer: str, fmt: dict[str, object]) -> str:
    """The kind of a scorer; for a name this table does not know, inferred from the format keys."""
    if scorer in SCORER_KINDS:
        return SCORER_KINDS[scorer]
    if fmt.get("choices") or fmt.get("choice_templates"):
        return "multiple_choice"
    if fmt.get("tests"):
        return "code"
    return "generate"
