"""lm-evaluation-harness tasks as stream tasks: train on a task's training split, evaluate on another.

    source: {type: lm_eval, task: arc_easy}                  # an lm-eval task name
    source: {type: lm_eval, task: my_task, include_path: ./lm_tasks, include_defaults: false}

lm-eval defines a task by how a document becomes text (its YAML or Python): ``doc_to_text`` is the
prompt, ``doc_to_target`` the gold continuation (for multiple choice: the gold index or choice text)
and ``doc_to_choice`` the choices; ``output_type`` says how it is scored. This source asks lm-eval's
own ``TaskManager`` to build the task and renders every document through those functions, so a task
reads here exactly as lm-eval's own evaluation reads it, then hands on the standard schema of the
scorer's kind (data/streams/kinds.py): ``prompt``/``target`` (generate, numeric: lm-eval's
``target_delimiter`` goes before the target), ``prompt``/``choices``/``gold`` (multiple_choice), or
``text`` (perplexity). No ``format:`` is needed. Splits are lm-eval's ``train``, ``validation`` and
``test`` (``training_docs()``, ``validation_docs()``, ``test_docs()``); a split the task does not
define is an error when read.

The prompt is lm-eval's own zero-shot context (``Task.fewshot_context(doc, num_fewshot=0)``): the
task's ``description`` (mmlu_*'s "The following are multiple choice questions ...") then
``doc_to_text``. A multiple-choice item scores ``target_delimiter + choice`` with the choices verbatim,
and acc_norm divides by the choice alone, as lm-eval does. A loglikelihood_rolling task's text is
``doc_to_target`` alone, the text lm-eval scores. Few-shot prompts are refused (one line): a task
whose ``num_fewshot`` is above 0 would read here zero-shot and not as lm-eval scores it, and its
few-shot examples come from the split we would train on; copy the task with ``num_fewshot: 0``.
Chat-style ``gen_prefix`` is refused likewise.

lm-eval is an optional extra (``uv sync --extra lm-eval``), imported only when a task is read, so a
stream file naming this source still validates without it. Building a task may download its data set
(offline: a warm HF cache with HF_DATASETS_OFFLINE=1, or task YAMLs in ``include_path`` over local files).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from data.errors import DataError
from data.fields import Text
from data.streams.kinds import STANDARD_FIELDS
from data.streams.sources.base import Doc, ReadContext, RecordProblems, Source, SourceRead

# Our split names -> the Task method that yields that split's documents.
_SPLIT_DOCS = {"train": "training_docs", "validation": "validation_docs", "test": "test_docs"}
# The kinds whose items lm-eval's documents can become; code tasks need tests lm-eval does not carry.
_KINDS = ("generate", "numeric", "multiple_choice", "perplexity")


@dataclass
class LmEvalOptions:
    REQUIRED: ClassVar[tuple[str, ...]] = ("task",)

    task: Annotated[str, Text(empty_ok=False)] = ""  # an lm-eval task name (a single task, not a group)
    # a directory of extra lm-eval task YAMLs, relative to the stream file; "" = none
    include_path: Annotated[str, Text()] = ""
    include_defaults: bool = True  # also index lm-eval's built-in tasks (false: only include_path; faster)


def require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise DataError("source lm_eval needs lm-eval, an optional extra: run `uv sync --extra lm-eval`") from None
    return lm_eval


class LmEvalSource(Source):
    name = "lm_eval"
    options_cls = LmEvalOptions
    summary = "an lm-evaluation-harness task through its doc_to_text / doc_to_target / doc_to_choice"

    def splits(self, opts: LmEvalOptions) -> tuple[str, ...] | None:
        return tuple(_SPLIT_DOCS)

    def fields(self, opts: LmEvalOptions, kind: str) -> dict[str, str]:
        return dict(STANDARD_FIELDS[kind])

    def check(self, opts: LmEvalOptions, kind: str) -> list[str]:
        if kind not in _KINDS:
            return [
                (
                    f"task {opts.task!r}: lm-eval tasks carry no test programs, so they cannot feed a {kind} "
                    f"scorer; valid kinds: {', '.join(_KINDS)}"
                )
            ]
        return []

    def read(self, opts: LmEvalOptions, split: str, ctx: ReadContext) -> SourceRead:
        lm_eval = require_lm_eval()
        from lm_eval.tasks import TaskManager, get_task_dict

        include = str(ctx.path(opts.include_path, "include_path")) if opts.include_path else None
        where_task = f"lm-eval task {opts.task!r}"
        try:
            manager = TaskManager(include_path=include, include_defaults=opts.include_defaults)
            # TaskManager.load (lm-eval >= 0.4.10) replaces get_task_dict, which the older releases that
            # pyproject allows (>= 0.4.5) still need.
            if hasattr(manager, "load"):
                task = manager.load(opts.task)["tasks"].get(opts.task)
            else:
                task = get_task_dict([opts.task], manager).get(opts.task)
        except Exception as exc:  # noqa: BLE001 - lm-eval and datasets raise many types; each becomes one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise DataError(
                f"task {ctx.task!r}: cannot build {where_task} ({type(exc).__name__}: {first}); "
                "check the name (a single task, not a group), include_path, and the data set's "
                "availability offline"
            ) from None
        if task is None or not hasattr(task, "doc_to_text"):
            raise DataError(f"task {ctx.task!r}: {where_task} is a group or unknown; name one task of it")
        docs_of = getattr(task, _SPLIT_DOCS[split], None)
        raw = docs_of() if docs_of is not None else None
        if raw is None:
            defined = [s for s, m in _SPLIT_DOCS.items() if getattr(task, f"has_{m}")()]
            raise DataError(
                f"task {ctx.task!r}: {where_task} has no {split} split; it has: {', '.join(defined) or 'none'}"
            )
        output_type = task.config.output_type
        unsupported = _unsupported(task)
        if unsupported:
            raise DataError(f"task {ctx.task!r}: {where_task} {unsupported}")
        where_split = f"{where_task}[{split}]"
        problems = RecordProblems(where_split)
        docs = []
        for i, doc in enumerate(raw):
            where = f"{where_split} doc {i}"
            try:
                fields = _render(task, doc, ctx.kind, output_type)
            except ValueError as exc:
                problems.add(f"{where}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - a task's own doc_to_* function failed on this document
                problems.add(f"{where}: lm-eval's doc_to_* raised {type(exc).__name__}: {exc}")
                continue
            docs.append(Doc(id=f"doc{i}", where=where, fields=fields))
        problems.raise_if_any()
        delimiter = task.config.target_delimiter
        return SourceRead(
            docs,
            {
                "task": opts.task,
                "split": split,
                "output_type": output_type,
                "num_docs": len(docs),
                "lm_eval_version": getattr(lm_eval, "__version__", ""),
                "target_delimiter": delimiter,
                "num_fewshot": 0,
                "description": bool(getattr(task.config, "description", "")),
            },
            choice_delimiter=delimiter if ctx.kind == "multiple_choice" else None,
        )


def _unsupported(task: Any) -> str:
    """Why a task cannot be read zero-shot exactly as lm-eval reads it, or ""."""
    shots = getattr(task.config, "num_fewshot", None) or 0
    if shots > 0:
        return (
            f"asks for num_fewshot={shots}: streams score zero-shot prompts only (its examples would come "
            "from a split we may train on); use a copy of the task with num_fewshot: 0"
        )
    if getattr(task.config, "gen_prefix", None):
        return "has a gen_prefix (a chat-style answer prefix): not supported; use a copy without it"
    return ""


def _prompt(task: Any, doc: Any) -> str:
    """lm-eval's zero-shot context of a document: the task's description, then doc_to_text."""
    text = task.doc_to_text(doc)
    if not isinstance(text, str):
        raise ValueError(
            f"doc_to_text gave {type(text).__name__} {text!r}, not a prompt (a task scored "
            "by partial evaluation, such as winogrande, does not fit)"
        )
    context = task.fewshot_context(doc, num_fewshot=0)
    if not isinstance(context, str):
        raise ValueError(f"fewshot_context gave {type(context).__name__}, not a prompt")
    return context


def _render(task: Any, doc: Any, kind: str, output_type: str) -> dict[str, Any]:
    """One lm-eval document as the standard fields of `kind`; ValueError names what does not fit."""
    target = task.doc_to_target(doc)
    if kind == "perplexity" and output_type == "loglikelihood_rolling":
        # lm-eval scores doc_to_target alone, with no context (construct_requests: (doc_to_target,))
        return {"text": str(target)}
    text = _prompt(task, doc)
    if kind == "multiple_choice":
        if output_type != "multiple_choice":
            raise ValueError(f"the multiple_choice scorer needs a multiple_choice lm-eval task, not {output_type}")
        choices = [str(c) for c in task.doc_to_choice(doc)]
        if isinstance(target, str) and target in choices:
            target = choices.index(target)
        if isinstance(target, bool) or not isinstance(target, int):
            raise ValueError(f"doc_to_target gave {target!r}, neither a choice index nor a choice's text")
        return {"prompt": text, "choices": choices, "gold": target}
    if isinstance(target, list):
        raise ValueError(f"doc_to_target gave a list {target!r}: several golds cannot be one training target")
    if output_type == "multiple_choice" and isinstance(target, int):
        target = task.doc_to_choice(doc)[target]  # generate the gold choice's text
    if kind == "perplexity":
        return {"text": text + task.config.target_delimiter + str(target) if text else str(target)}
    return {"prompt": text, "target": task.config.target_delimiter + str(target)}
