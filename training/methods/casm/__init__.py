"""casm: contradiction-aware sparse memory. Versioned product-key memory + a fact registry + a
period router, so that old and new values of a fact coexist and a dated query reaches its own version.

Builds on sparse memory finetuning (Lin et al. 2025, https://arxiv.org/abs/2510.15103) and product-key
memory (Lample et al. 2019, https://arxiv.org/abs/1907.05242). Design and reasoning: docs/methods/casm.md.

    h_out = FFN(x) + sum_{b=1..T} g_b(x) * Mem_b(x)        Mem_b: value table b over shared, frozen keys
    g_b   = 1[b <= route(x)]   (eval: hard;  train: 1[b <= k] + soft_b - stop_grad(soft_b))
    soft_b = sum_{tau >= b} p(tau | x),   p = softmax(router(x)) over the periods trained so far

Each period k writes only its own value table (bank k), with smf's TF-IDF top-t sparse updates, while the
banks of earlier periods are frozen and active, so bank k learns a delta over the earlier versions. A slot
index is an address; bank b holds that address's content as of period b. The router reads the hidden
states that enter the first memory layer, up to the current token (the query alone; a learned causal
attention pooling finds the date wherever it sits, and the inputs of earlier decoding steps are kept so
this also holds under a KV cache), and picks a period tau; the banks 1..tau are summed. "In 2018, ..."
therefore reads the memory exactly as it was after 2018, and "In 2024, ..." reads every version up to
2024, the latest override on top. The router is trained by cross-entropy towards the period named in
each training passage (after the mention), rehearsed on earlier periods' passages re-dated to every
period (so only the date decides), and by the LM loss through the straight-through soft gates (a hard
top-1 alone would get no gradient). The router and its training live in training/methods/casm/router.py;
the memory banks are training/methods/memory (shared with smf).

The registry (training/methods/casm/registry.py) parses the passage text alone into (subject, wording,
value) statements, detects contradictions with the active version, and records every version with
valid_from / valid_until, parent, contradiction links, evidence and the memory slots that hold it. It
is rebuilt from its text log every period and travels in state_dict()["registry"] (JSON-safe) and in
eval_extras()["registry"], which the trainer writes to periods/<k>-<name>/eval/scores.json.

Hooks: prepare (memories with one bank per period, router, hooks), on_period_start (parse passages,
update the registry, drop passages that restate an active value), trainable_parameters (bank k + router),
extra_loss (router cross-entropy incl. rehearsal), after_backward (TF-IDF top-t
slot mask, as smf), on_period_end (router rehearsal inputs and slot assignment), eval_extras
(routing accuracy from the prompts alone, routed versions, registry). Checkpoints: memory tensors and
router (trainable_state_dict); registry (with its text log, from which the router's rehearsal set is
rebuilt) and access statistics (state_dict).
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import torch
from torch import nn

from data.schema import Period, Probe
from eval_and_metrics.metrics import routing_accuracy
from training.batching import PeriodData
from training.methods.base import MICRO_SEED, TEXTS, Method, MethodContext
from training.methods.casm.options import CasmOptions
from training.methods.casm.registry import TemplateParser, build_registry
from training.methods.casm.router import ROUTER_ATTR, PeriodRouter, PeriodRouting
from training.methods.memory import (
    ProductKeyMemory,
    SparseSlotUpdater,
    attach_memories,
    install_mask_hook,
    load_memory_state_dict,
    memory_state_dict,
    value_group,
)

__all__ = ["ROUTER_ATTR", "CasmOptions", "ContradictionAwareSparseMemory", "rewritten_evidence"]


def rewritten_evidence(registry: dict[str, Any], period: str, texts: list[str]) -> list[str]:
    """For every fact whose new version starts in `period`: the previous version's evidence passages
    with their period name and old value replaced by `period` and the new value. A passage that does
    not name its period and its value exactly once (as whole words) is left out, as is one already in
    `texts`. Order: registry order (facts sorted), then evidence order, so it is deterministic."""
    out: list[str] = []
    seen = set(texts)
    for fact in registry["facts"]:
        versions = fact["versions"]
        for prev, new in itertools.pairwise(versions):
            if new["valid_from"] != period:
                continue
            for old_period, evidence in prev["evidence"].items():
                for text in evidence:
                    moved = _replace_once(_replace_once(text, old_period, period), prev["value"], new["value"])
                    if moved is not None and moved not in seen:
                        seen.add(moved)
                        out.append(moved)
    return out


def _replace_once(text: str | None, old: str, new: str) -> str | None:
    if text is None:
        return None
    pattern = re.compile(r"(?<!\w)" + re.escape(old) + r"(?!\w)")
    if len(pattern.findall(text)) != 1:
        return None
    return pattern.sub(lambda _: new, text)


class ContradictionAwareSparseMemory(Method):
    name = "casm"
    gradient_checkpointing = False  # counts memory reads in the forward (step_counters), as smf
    # train.pack is refused: smf's per-row slot counts (see smf.py), and TEXTS lines its items up with the
    # rows of the batch
    packs = False
    # the router's targets come from each row's text (the period it names); its rehearsal draw is seeded
    # by the micro-batch
    batch_inputs = frozenset({TEXTS, MICRO_SEED})
    leaves_parameters_unused = True  # the router trains from the second period on
    config_cls = CasmOptions
    # its registry parses dated fact statements out of the passages, and its router routes by period
    benchmarks = ("temporal",)

    def __init__(self, cfg: CasmOptions, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.period_names = list(ctx.period_names)
        self.memories: dict[int, ProductKeyMemory] = {}
        self.routing = PeriodRouting(cfg, ctx, self.period_names)
        self.updater: SparseSlotUpdater | None = None
        self.log: list[list[Any]] = []  # [[period name, [passage texts]], ...]: the registry's source
        self.slots: dict[str, Any] = {}
        self.registry: dict[str, Any] = build_registry([], self.period_names)
        self.micro_count = 0

    @property
    def current(self) -> int:
        """1-based index of the period being (or last) trained; 0 = none yet. The router's, which routes
        only to periods trained so far."""
        return self.routing.current

    @current.setter
    def current(self, value: int) -> None:
        self.routing.current = value

    @property
    def router(self) -> PeriodRouter | None:
        return self.routing.router

    # -- model surgery ---------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        num = len(self.period_names)
        self.memories = attach_memories(model, self.cfg, num_banks=num, seed=self.ctx.seed, section="casm")
        install_mask_hook(model, self.memories)
        self.updater = SparseSlotUpdater(self.memories, self.cfg.top_t)
        self.routing.attach(model, self.memories)
        return model

    # -- period hooks ----------------------------------------------------------------------
    def on_period_start(self, model: nn.Module, period: Period, texts: list[str]) -> list[str]:
        self.current = period.index
        self.log = [entry for entry in self.log if entry[0] != period.name] + [[period.name, list(texts)]]
        self._rebuild_registry()
        # what the router rehearses while this period trains: earlier periods' passages, re-dated
        self.routing.replay = self.routing.rehearsal_set(
            model, self.log, [p for p, _ in self.log if p != period.name], period.index
        )
        if self.cfg.rewrite_evidence:
            texts = texts + rewritten_evidence(self.registry, period.name, texts)
        if not self.cfg.skip_restated:
            return texts
        restated: set[str] = set()
        for fact in self.registry["facts"]:
            for version in fact["versions"]:
                if period.name in version["confirmed_in"] and version["valid_from"] != period.name:
                    restated.update(version["evidence"].get(period.name, []))
        kept = [t for t in texts if t not in restated]
        return kept or texts  # a period that only restates facts still trains (nothing would break)

    def _rebuild_registry(self) -> None:
        parser = TemplateParser(self.period_names)
        statements, unparsed = parser.parse_corpus([(p, t) for p, t in self.log])
        self.registry = build_registry(statements, self.period_names, self.slots)
        self.registry["unparsed"] = unparsed

    def trainable_parameters(self, model: nn.Module) -> list[dict[str, Any]]:
        assert self.router is not None and self.updater is not None
        bank = self.current - 1
        values = []
        for _, mem in sorted(self.memories.items()):
            for b, table in enumerate(mem.values):
                table.requires_grad_(b == bank)
            values.append(mem.values[bank])
        for p in self.router.parameters():
            p.requires_grad_(True)
        self.updater.start_recording()
        return [
            value_group(values, self.cfg, self.ctx.lr),
            {"params": list(self.router.parameters()), "lr": self.cfg.router_lr},
        ]

    def extra_loss(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        self.micro_count += 1
        # the rehearsal draw is seeded by the micro-batch itself (the loop's micro_seed), not by how many this
        # process has seen: under several ranks each sees only its share, and the draw must not depend on that
        return self.routing.loss(batch, batch.get(MICRO_SEED, self.micro_count))

    def step_counters(self, model: nn.Module) -> list[torch.Tensor]:
        return self.updater.counters() if self.updater is not None else []

    def after_backward(self, model: nn.Module) -> None:
        assert self.updater is not None
        bank = self.current - 1
        self.updater.after_backward(lambda i: bank)

    def on_period_end(self, model: nn.Module, period: Period, data: PeriodData) -> None:
        assert self.updater is not None and self.router is not None
        self.updater.stop_recording()
        for p in self.router.parameters():
            p.requires_grad_(False)
        slots = self._scan_period(model, period)
        self.routing.replay = self.routing.rehearsal_set(model, self.log, [p for p, _ in self.log], period.index)
        self.routing.fit()
        self.slots.update(slots)
        self._rebuild_registry()

    @torch.no_grad()
    def _scan_period(self, model: nn.Module, period: Period) -> dict[str, Any]:
        """The memory slots (of this period's bank) that hold each version stated in this period."""
        texts = next(t for p, t in self.log if p == period.name)
        by_text: dict[str, tuple[str, str]] = {}
        for fact in self.registry["facts"]:
            for version in fact["versions"]:
                for t in version["evidence"].get(period.name, []):
                    by_text[t] = (fact["subject"], version["value"])
        bank = period.index - 1
        was_training = model.training
        model.eval()
        weight_by_key: dict[str, dict[int, torch.Tensor]] = {}
        for mem in self.memories.values():
            mem.keep_lookup = True
        try:
            for chunk, ids, mask in self.routing.text_batches(texts):
                model(input_ids=ids.to(self.ctx.device), attention_mask=mask.to(self.ctx.device))
                for row, text in enumerate(chunk):
                    key = by_text.get(text)
                    if key is None:
                        continue
                    skey = f"{period.name}|{key[0]}|{key[1]}"
                    n = int(mask[row].sum())
                    for layer, mem in self.memories.items():
                        assert mem.last_lookup is not None  # keep_lookup: every forward above stored it
                        idx, w = mem.last_lookup
                        acc = weight_by_key.setdefault(skey, {}).setdefault(layer, torch.zeros(mem.num_slots))
                        acc.index_add_(0, idx[row, :n].reshape(-1).cpu(), w[row, :n].reshape(-1).float().cpu())
        finally:
            for mem in self.memories.values():
                mem.keep_lookup = False
                mem.last_lookup = None
            self.routing.forget_history()
            model.train(was_training)
        slots: dict[str, Any] = {}
        for skey, per_layer in weight_by_key.items():
            entry: dict[str, Any] = {"bank": period.name, "layers": {}}
            for layer, acc in per_layer.items():
                written = self.memories[layer].values[bank].detach().abs().sum(-1).cpu() > 0
                acc = acc * written  # only slots this period's bank actually holds content in
                top = torch.sort(-acc, stable=True).indices[: self.cfg.slots_per_version]
                entry["layers"][str(layer)] = [int(i) for i in top if acc[i] > 0]
            slots[skey] = entry
        return slots

    # -- evaluation ------------------------------------------------------------------------

    def eval_extras(self, model: nn.Module, probes: list[Probe]) -> dict[str, Any]:
        summary = {k: self.registry.get(k) for k in ("num_facts", "num_versions", "num_contradictions")}
        if self.current == 0:
            return {"routing_accuracy": None, "routed": None, "registry_summary": summary, "registry": self.registry}
        routes = self.routing.route_prompts(model, [p.prompt for p in probes])
        routed = {p.id: self.period_names[r] for p, r in zip(probes, routes)}
        seen = [p for p in probes if self.period_names.index(p.period) < self.current]
        return {
            "routing_accuracy": routing_accuracy(routed, probes),
            "routing_accuracy_seen": routing_accuracy(routed, seen),
            "routed": routed,
            "registry_summary": summary,
            "registry": self.registry,
        }

    # -- state -----------------------------------------------------------------------------
    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        assert self.router is not None  # prepare() attached it
        state = memory_state_dict(model)
        state.update({f"{ROUTER_ATTR}.{n}": p.detach().clone() for n, p in self.router.named_parameters()})
        return state

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        assert self.router is not None
        extra = tuple(f"{ROUTER_ATTR}.{n}" for n, _ in self.router.named_parameters())
        load_memory_state_dict(model, state, self.name, extra)

    def state_dict(self) -> dict[str, Any]:
        assert self.updater is not None
        return {
            "current": self.current,
            "log": [[p, list(t)] for p, t in self.log],
            "slots": dict(self.slots),
            "registry": self.registry,
            "access": self.updater.state_dict(),
            "micro_count": self.micro_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.updater is not None
        self.current = int(state["current"])
        self.log = [[p, list(t)] for p, t in state["log"]]
        self.slots = dict(state["slots"])
        self.registry = state["registry"]
        self.updater.load_state_dict(state["access"])
        self.micro_count = int(state["micro_count"])
