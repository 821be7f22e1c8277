"""Records of a task stream: what a task trains on, what it is evaluated on, and the stream itself.

The vocabulary follows lm-eval-harness where it has one: an eval item's `prompt` is doc_to_text, its
`target` doc_to_target, its `choices` doc_to_choice, and a task's scorer has an output type
(generate_until, multiple_choice, loglikelihood_rolling). Records are frozen and JSON-safe so a stream
can be written next to a run, fingerprinted, and read back byte-identically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

LossOn = Literal["completion", "all"]

# The stream a run trained on, as written into its data/ directory (Stream.to_json, sorted keys).
STREAM_FILE = "stream.json"


@dataclass(frozen=True)
class TrainItem:
    """One training example. Plain text is prompt "" + completion (loss on every token); a supervised
    example carries the loss on the completion only unless the task says loss_on: all."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class EvalItem:
    """One evaluation example; which fields matter depends on the task's scorer.

    - generate_until scorers (exact_match, token_f1, numeric, code_pass_at_1, rouge_l): `prompt` is
      continued greedily and the continuation is compared with `target` (for numeric, the gold number;
      for code, `tests` is a test program that runs against prompt + completion, `entry_point` names
      the function under test and `target` holds the reference solution's body);
    - multiple_choice: each of `choices` is scored as a continuation of `prompt`; `gold` is the index
      of the correct one and `target` its continuation (delimiter + text). `delimiter` is lm-eval's
      target_delimiter: the continuation is exactly delimiter + choice, and acc_norm / acc_bytes divide
      by the choice's own length, without it. None (items built by hand, streams written before the
      field existed, whose choices carry it) puts lm-eval's " " in front only where the prompt does not
      end in, and the choice does not start with, whitespace;
    - loglikelihood_rolling (perplexity): `target` is the held-out text, `prompt` an optional context
      that is conditioned on but not scored.
    """

    id: str
    prompt: str
    target: str
    choices: tuple[str, ...] = ()
    gold: int = -1
    tests: str = ""
    entry_point: str = ""
    delimiter: str | None = None


def eval_item_json(item: EvalItem) -> dict[str, Any]:
    """An eval item as JSON; a None delimiter is left out, so streams without one keep their bytes and
    fingerprints (and files written before the field existed read back unchanged)."""
    out = asdict(item)
    if out["delimiter"] is None:
        del out["delimiter"]
    return out


@dataclass(frozen=True)
class TaskData:
    """One task of a stream, loaded: its training and evaluation items and how to score them."""

    name: str
    scorer: str
    train: tuple[TrainItem, ...]
    eval: tuple[EvalItem, ...]
    loss_on: LossOn = "completion"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # source, counts read/used/dropped


@dataclass(frozen=True)
class Stream:
    """An ordered sequence of tasks; `order` is which of the stream's orders this is."""

    name: str
    tasks: tuple[TaskData, ...]
    order: int = 0

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "order": self.order,
            "tasks": [{**asdict(t), "eval": [eval_item_json(x) for x in t.eval]} for t in self.tasks],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Stream:
        """The inverse of to_json (a run's data/stream.json). Strict: a missing or unknown key raises
        (TypeError/KeyError), so a reader never works on a silently different stream; the fingerprint
        of the result equals the written stream's."""
        tasks = []
        for t in obj["tasks"]:
            fields = dict(t)
            train = tuple(TrainItem(**x) for x in fields.pop("train"))
            evals = tuple(EvalItem(**{**x, "choices": tuple(x.get("choices", ()))}) for x in fields.pop("eval"))
            tasks.append(TaskData(train=train, eval=evals, **fields))
        return cls(name=obj["name"], tasks=tuple(tasks), order=int(obj.get("order", 0)))

    @property
    def fingerprint(self) -> str:
        """sha256 of the content (not the meta): equal streams train and evaluate on the same items."""
        body = [
            {
                "name": t.name,
                "scorer": t.scorer,
                "loss_on": t.loss_on,
                "train": [asdict(x) for x in t.train],
                "eval": [eval_item_json(x) for x in t.eval],
            }
            for t in self.tasks
        ]
        return hashlib.sha256(json.dumps({"name": self.name, "tasks": body}, sort_keys=True).encode()).hexdigest()
