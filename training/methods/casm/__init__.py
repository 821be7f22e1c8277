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
period (so only the date decides), and by the LM loss through the straight-through soft gates (a hard top-1 alone would get no
gradient).

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

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from data.fields import Range
from data.schema import Period, Probe
from eval_and_metrics.metrics import routing_accuracy
from training.batching import PeriodData, pad
from training.methods.base import Method, MethodContext
from training.methods.casm.registry import TemplateParser, build_registry
from training.methods.smf import (MemoryOptions, ProductKeyMemory, SparseSlotUpdater, attach_memories,
                                  decoder_layers, install_mask_hook, load_memory_state_dict, memory_state_dict,
                                  value_group)
from training.seeding import derive_seed

ROUTER_ATTR = "casm_router"


@dataclass
class CasmOptions(MemoryOptions):
    # decoder layer whose input the router reads (capped at the first memory layer). Early layers keep a
    # date's tokens close to their lexical identity, so routing learnt on training wordings transfers
    # to unseen ones; mid-network states made the router overfit the training templates.
    router_layer: Annotated[int, Range(0, 1023)] = 2
    router_hidden: Annotated[int, Range(1, 65536)] = 64  # hidden width of the router MLP
    router_lr: Annotated[float, Range(0, 100)] = 3e-3  # learning rate of the router
    # weight of the router cross-entropy added to the LM loss
    router_loss_weight: Annotated[float, Range(0, 1e6)] = 1.0
    # Scale of the straight-through term that lets the LM loss reach the router (0 = off). Off by default:
    # with teacher-forced gates it only ever says "the newest bank helped" (no older period is in the
    # batch to disagree), which on SmolLM2 pulled every query to the latest period.
    router_lm_weight: Annotated[float, Range(0, 1e6)] = 0.0
    # stored passages of earlier periods rehearsed by the router per micro-batch
    router_replay: Annotated[int, Range(0, 1_000_000)] = 16
    # passages per period the router rehearses, each re-dated to every period
    router_replay_per_period: Annotated[int, Range(0, 1_000_000)] = 64
    # full-batch steps on the whole rehearsal set at each period end (0 = off)
    router_fit_steps: Annotated[int, Range(0, 1_000_000)] = 200
    router_fit_lr: Annotated[float, Range(0, 100)] = 1e-2  # learning rate of that period-end fit
    skip_restated: bool = True  # drop passages that only restate a fact's active value
    # When a period changes a fact, also train the earlier version's evidence passages rewritten to this
    # period's date and new value (training text alone: the registry's parse), so the new version is
    # reachable from the wordings the old one was stored under (issue 10). On SmolLM2 (2018 -> 2020, one
    # seed) plasticity 0.083 -> 0.333 and ACC 0.098 -> 0.205 at the same forgetting (0.042, smf's);
    # docs/methods/casm.md has the numbers and why part of the gain is the current probes' wording.
    rewrite_evidence: bool = True
    # slot indices recorded per fact version in the registry
    slots_per_version: Annotated[int, Range(1, 4096)] = 8

    def validate(self) -> list[str]:  # type: ignore[override]
        return MemoryOptions.validate(self, "casm")


def rewritten_evidence(registry: dict[str, Any], period: str, texts: list[str]) -> list[str]:
    """For every fact whose new version starts in `period`: the previous version's evidence passages
    with their period name and old value replaced by `period` and the new value. A passage that does
    not name its period and its value exactly once (as whole words) is left out, as is one already in
    `texts`. Order: registry order (facts sorted), then evidence order, so it is deterministic."""
    out: list[str] = []
    seen = set(texts)
    for fact in registry["facts"]:
        versions = fact["versions"]
        for prev, new in zip(versions, versions[1:]):
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


class _CaptureDone(Exception):
    """Raised by the router hook to end a forward that only collects router inputs."""


class PeriodRouter(nn.Module):
    """Per-token distribution over periods from the query so far.

    Input: the hidden states entering the first memory layer, positions 0..t. A learned score picks
    which earlier positions matter (causal attention pooling with one learned query; it starts as a
    plain causal mean), and an MLP classifies [x_t ; pooled_t]. Pooling matters: the period is one
    token somewhere in the query, and the state at the last token carries it only diluted.
    """

    def __init__(self, hidden_size: int, width: int, num_periods: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.score = nn.Linear(hidden_size, 1)
        self.inp = nn.Linear(2 * hidden_size, width)
        self.out = nn.Linear(width, num_periods)
        with torch.no_grad():
            self.score.weight.zero_()  # uniform weights: a causal mean to begin with
            self.score.bias.zero_()
            self.inp.weight.copy_(torch.randn(width, 2 * hidden_size, generator=gen) / (2 * hidden_size) ** 0.5)
            self.inp.bias.zero_()
            self.out.weight.zero_()  # uniform start: no period favoured
            self.out.bias.zero_()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, d), mask: (B, L) 1 = real token -> logits (B, L, num_periods)."""
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        length = x.shape[1]
        scores = self.score(x).squeeze(-1)  # (B, L)
        allowed = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        allowed = allowed.unsqueeze(0).expand(x.shape[0], -1, -1)
        if mask is not None:
            allowed = allowed & mask.bool().unsqueeze(1)
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=x.device)  # never an empty row
        attn = scores.unsqueeze(1).expand(-1, length, -1).masked_fill(~allowed, float("-inf"))
        pooled = torch.softmax(attn, dim=-1) @ x
        return self.out(F.gelu(self.inp(torch.cat([x, pooled], dim=-1))))


def _period_mention(text: str, names: list[str]) -> tuple[int, int] | None:
    """(index of the period named first in the text, char offset where the mention ends)."""
    best: tuple[int, int, int] | None = None
    for i, name in enumerate(names):
        m = re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), m.end(), i)
    return None if best is None else (best[2], best[1])


def _cat_padded(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate two rehearsal sets along passages, right-padding the narrower one."""
    width = max(a["x"].shape[1], b["x"].shape[1])
    fill = {"x": 0, "mask": 0, "target": -100}

    def pad(t: torch.Tensor, key: str) -> torch.Tensor:
        extra = width - t.shape[1]
        if extra == 0:
            return t
        shape = (t.shape[0], extra, *t.shape[2:])
        return torch.cat([t, torch.full(shape, fill[key], dtype=t.dtype)], dim=1)

    return {k: torch.cat([pad(a[k], k), pad(b[k], k)]) for k in ("x", "mask", "target")}


class ContradictionAwareSparseMemory(Method):
    name = "casm"
    counts_in_forward = True
    # train.pack is refused: smf's per-row slot counts (see smf.py), and batch["texts"] lines its items up
    # with the rows of the batch
    packs = False
    leaves_parameters_unused = True  # the router trains from the second period on
    config_cls = CasmOptions
    # its registry parses dated fact statements out of the passages, and its router routes by period
    benchmarks = ("temporal",)

    def __init__(self, cfg: CasmOptions, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.period_names = list(ctx.period_names)
        self.memories: dict[int, ProductKeyMemory] = {}
        self.router: PeriodRouter | None = None
        self.updater: SparseSlotUpdater | None = None
        self.current = 0  # 1-based index of the period being (or last) trained; 0 = none yet
        self.log: list[list[Any]] = []  # [[period name, [passage texts]], ...]: the registry's source
        self.slots: dict[str, Any] = {}
        self.registry: dict[str, Any] = build_registry([], self.period_names)
        # Router rehearsal set, rebuilt from the text log (never checkpointed): inputs (N, L, d) in the model's
        # dtype, token mask (N, L), targets (N, L) with -100 where a position has none.
        self.replay: dict[str, torch.Tensor] | None = None
        self.micro_count = 0
        self._logits: torch.Tensor | None = None  # router logits of the last forward (training)
        self._route: torch.Tensor | None = None  # hard route of the last forward
        self._capture: list[torch.Tensor] | None = None
        self._history: tuple[torch.Tensor, torch.Tensor] | None = None  # router inputs so far (KV-cache decoding)
        self._stop_after_capture = False  # scans that only need router inputs end the forward there

    # -- model surgery ---------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        num = len(self.period_names)
        self.memories = attach_memories(model, self.cfg, num_banks=num, seed=self.ctx.seed, section="casm")
        install_mask_hook(model, self.memories)
        self.updater = SparseSlotUpdater(self.memories, self.cfg.top_t)
        hidden = int(model.config.hidden_size)
        ref = next(iter(self.memories.values())).values[0]
        self.router = PeriodRouter(hidden, self.cfg.router_hidden, num,
                                   derive_seed(self.ctx.seed, "casm", "router")).to(ref.device)
        for p in self.router.parameters():
            p.requires_grad_(False)
        model.add_module(ROUTER_ATTR, self.router)
        # The route must be known before the first memory reads it: the router layer is at most that one.
        self.router_layer = min(self.cfg.router_layer, min(self.memories))
        decoder_layers(model)[self.router_layer].register_forward_pre_hook(self._route_hook, with_kwargs=True)
        # the router pools over the whole row: a packed row would let one choice steer another's route
        decoder_layers(model)[self.router_layer].mixes_positions = True
        return model

    def _route_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        assert self.router is not None
        x = (args[0] if args else kwargs["hidden_states"]).detach()
        if self._capture is not None:
            self._capture.append(x.float())
            if self._stop_after_capture:
                raise _CaptureDone()
        avail = self.current
        if avail == 0:  # nothing trained yet: every bank is empty, read none
            for mem in self.memories.values():
                mem.gates = x.new_zeros(*x.shape[:-1], 0)
            self._logits = self._route = None
            return
        full_x, full_mask = self._router_inputs(x)
        # periods not trained yet cannot be routed to; keep only the positions of this forward. The route
        # picks the banks a token reads, an address like the slots' (ProductKeyMemory.lookup): float32
        # outside autocast, so training under bf16 routes as evaluation does.
        with torch.autocast(x.device.type, enabled=False):
            logits = self.router(full_x, full_mask)[:, -x.shape[1]:, :avail]
        probs = torch.softmax(logits, dim=-1)
        route = probs.argmax(-1)
        banks = torch.arange(avail, device=x.device)
        hard = (banks <= route.unsqueeze(-1)).float()
        if module.training and torch.is_grad_enabled():
            # Train: bank b <= k on (this passage belongs to period k), plus the straight-through term
            # soft - stop_grad(soft) so the LM loss also reaches the router; soft_b = P(route >= b).
            soft = probs.flip(-1).cumsum(-1).flip(-1)
            teacher = torch.ones_like(soft)  # avail == current period: every bank up to k is on
            gates = teacher + self.cfg.router_lm_weight * (soft - soft.detach())
            self._logits = logits
        else:
            gates = hard
            self._logits = None
        self._route = route
        for mem in self.memories.values():
            mem.gates = gates

    def _router_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The router's view of the whole query: under a KV cache a forward only carries the new
        tokens, so the inputs of the earlier steps of the same generation are kept and prepended."""
        first = next(iter(self.memories.values()))
        mask, past = first.token_mask, first.past_len
        new_mask = None if mask is None else mask[:, -x.shape[1]:]
        history = self._history
        if (past > 0 and history is not None and history[0].shape[0] == x.shape[0]
                and history[0].shape[1] == past and not torch.is_grad_enabled()):
            full_x = torch.cat([history[0], x.float()], dim=1)
            if new_mask is None:
                new_mask = torch.ones(x.shape[:2], dtype=history[1].dtype, device=x.device)
            full_mask = torch.cat([history[1], new_mask.to(history[1].device)], dim=1)
        else:
            full_x = x.float()
            full_mask = new_mask if new_mask is not None else torch.ones(x.shape[:2], dtype=torch.long,
                                                                         device=x.device)
        # Only inference forwards continue a generation; a training forward never keeps history.
        self._history = None if torch.is_grad_enabled() else (full_x, full_mask)
        return full_x, full_mask

    # -- period hooks ----------------------------------------------------------------------
    def on_period_start(self, model: nn.Module, period: Period, texts: list[str]) -> list[str]:
        self.current = period.index
        self.log = [entry for entry in self.log if entry[0] != period.name] + [[period.name, list(texts)]]
        self._rebuild_registry()
        # what the router rehearses while this period trains: earlier periods' passages, re-dated
        self.replay = self._rehearsal_set(model, [p for p, _ in self.log if p != period.name], period.index)
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
        return [value_group(values, self.cfg, self.ctx.lr),
                {"params": list(self.router.parameters()), "lr": self.cfg.router_lr}]

    def extra_loss(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        self.micro_count += 1
        if self.current < 2 or self._logits is None or not self.cfg.router_loss_weight:
            return None  # with one period there is nothing to choose between
        logits = self._logits
        where, labels = self._current_targets(batch, logits)
        rows = [logits[where]] if where.any() else []
        targets = [labels] if where.any() else []
        if self.replay is not None and self.cfg.router_replay:
            assert self.router is not None
            # seeded by the micro-batch itself (the loop's micro_seed), not by how many this process has seen:
            # under several ranks each sees only its share, and the draw must not depend on that
            gen = torch.Generator().manual_seed(derive_seed(self.ctx.seed, "casm", "replay",
                                                            batch.get("micro_seed", self.micro_count)))
            idx = torch.randint(len(self.replay["x"]), (self.cfg.router_replay,), generator=gen)
            dev = logits.device
            target = self.replay["target"][idx].to(dev)
            old = self.router(self.replay["x"][idx].to(dev).float(), self.replay["mask"][idx].to(dev))
            rows.append(old[..., :self.current][target >= 0])
            targets.append(target[target >= 0])
        if not rows:
            return None
        return self.cfg.router_loss_weight * F.cross_entropy(torch.cat(rows), torch.cat(targets))

    def _current_targets(self, batch: dict[str, Any], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask of token positions after the period named in each passage, and that period's index.

        Positions before the mention cannot know the period, so they get no routing target.
        """
        mask = torch.zeros(logits.shape[:2], dtype=torch.bool)
        label_map = torch.zeros(logits.shape[:2], dtype=torch.long)
        attention = batch.get("attention_mask")
        # one copy to the host, not a GPU synchronisation per position
        allowed = attention.bool().cpu().tolist() if attention is not None else None
        for row, text in enumerate(batch.get("texts", [])):
            for pos, label in self._positions_after_mention(text, logits.shape[1]):
                if allowed is None or allowed[row][pos]:
                    mask[row, pos] = True
                    label_map[row, pos] = label
        return mask.to(logits.device), label_map[mask].to(logits.device)

    def _positions_after_mention(self, text: str, width: int) -> list[tuple[int, int]]:
        mention = _period_mention(text, self.period_names[:self.current])
        if mention is None:
            return []
        label, end = mention
        enc = self.ctx.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        out = [(pos, label) for pos, (start, _) in enumerate(offsets) if start >= end and pos < width]
        if len(offsets) < width:
            out.append((len(offsets), label))  # the EOS the trainer appends
        return out

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
        self.replay = self._rehearsal_set(model, [p for p, _ in self.log], period.index)
        self._fit_router()
        self.slots.update(slots)
        self._rebuild_registry()

    def _rehearsal_set(self, model: nn.Module, periods: list[str], upto: int) -> dict[str, torch.Tensor] | None:
        """Router inputs of the logged passages of `periods`, each re-dated to every period 1..upto.

        The date is the only thing that should decide the route, yet a later period has few passages,
        all about its changed facts: trained on them alone, the router learns the subjects. Putting
        every period's name into the same passages (target = the name now in the text) leaves the date
        as the only signal. Text only; deterministic (an evenly spaced subset of each period's log).
        """
        if upto < 2 or not periods:
            return None
        names = self.period_names[:upto]
        texts: list[str] = []
        for name in periods:
            logged = next(t for p, t in self.log if p == name)
            keep = self.cfg.router_replay_per_period
            if len(logged) > keep:
                logged = [logged[int(i)] for i in torch.linspace(0, len(logged) - 1, keep).round().long()]
            for text in logged:
                mention = _period_mention(text, self.period_names)
                if mention is None:
                    continue
                start = mention[1] - len(self.period_names[mention[0]])
                texts.extend(text[:start] + other + text[mention[1]:] for other in names)
        return self._router_inputs_of(model, texts) if texts else None

    def _text_batches(self, texts: list[str], size: int = 32, left: bool = False
                      ) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
        """(texts, input_ids, attention_mask) in chunks of `size`, tokenised as the trainer does."""
        tok = self.ctx.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        for start in range(0, len(texts), size):
            chunk = texts[start:start + size]
            ids, mask = pad([list(tok(t, add_special_tokens=False)["input_ids"]) for t in chunk], pad_id, left)
            yield chunk, ids, mask

    @torch.no_grad()
    def _router_inputs_of(self, model: nn.Module, texts: list[str]) -> dict[str, torch.Tensor]:
        """(inputs, mask, targets) of the router for these texts; the forward stops at the router."""
        was_training = model.training
        model.eval()
        out: dict[str, torch.Tensor] | None = None
        self._stop_after_capture = True
        stream_dtype = model.get_input_embeddings().weight.dtype
        try:
            for chunk, ids, mask in self._text_batches(texts):
                self._capture = []
                try:
                    model(input_ids=ids.to(self.ctx.device), attention_mask=mask.to(self.ctx.device))
                except _CaptureDone:
                    pass
                target = torch.full(mask.shape, -100, dtype=torch.long)
                for row, text in enumerate(chunk):
                    for pos, label in self._positions_after_mention(text, int(mask[row].sum())):
                        target[row, pos] = label
                # in the residual stream's own dtype, so nothing is lost (bf16 on a GPU, fp32 here): fp16
                # overflows past 65,504, and the residual streams of large models carry activations that size
                part = {"x": self._capture[0].to(stream_dtype).cpu(), "mask": mask, "target": target}
                out = part if out is None else _cat_padded(out, part)
        finally:
            self._capture = None
            self._stop_after_capture = False
            self._history = None
            model.train(was_training)
        assert out is not None
        return out

    def _fit_router(self) -> None:
        """Consolidate the router on every period's stored passages, classes weighted equally.

        A later period may have only a handful of optimizer steps (only changed facts are trained), too
        few for the router to learn a new period next to the old ones. The rehearsal set holds the router
        inputs of all periods so far, so a short full-batch fit settles it; deterministic (no sampling).
        """
        if self.replay is None or self.current < 2 or not self.cfg.router_fit_steps:
            return
        assert self.router is not None
        dev = self.router.out.weight.device
        x = self.replay["x"].to(dev).float()
        mask = self.replay["mask"].to(dev)
        target = self.replay["target"].to(dev)
        counts = torch.bincount(target[target >= 0], minlength=self.current).float()
        weight = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), counts)
        params = list(self.router.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=self.cfg.router_fit_lr)
        with torch.enable_grad():
            for _ in range(self.cfg.router_fit_steps):
                logits = self.router(x, mask)[..., :self.current]
                loss = F.cross_entropy(logits[target >= 0], target[target >= 0], weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for p in params:
            p.requires_grad_(False)
            p.grad = None

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
            for chunk, ids, mask in self._text_batches(texts):
                model(input_ids=ids.to(self.ctx.device), attention_mask=mask.to(self.ctx.device))
                for row, text in enumerate(chunk):
                    key = by_text.get(text)
                    if key is None:
                        continue
                    skey = f"{period.name}|{key[0]}|{key[1]}"
                    n = int(mask[row].sum())
                    for layer, mem in self.memories.items():
                        idx, w = mem.last_lookup
                        acc = weight_by_key.setdefault(skey, {}).setdefault(layer, torch.zeros(mem.num_slots))
                        acc.index_add_(0, idx[row, :n].reshape(-1).cpu(), w[row, :n].reshape(-1).float().cpu())
        finally:
            for mem in self.memories.values():
                mem.keep_lookup = False
                mem.last_lookup = None
            self._history = None
            model.train(was_training)
        slots: dict[str, Any] = {}
        for skey, per_layer in weight_by_key.items():
            entry: dict[str, Any] = {"bank": period.name, "layers": {}}
            for layer, acc in per_layer.items():
                written = self.memories[layer].values[bank].detach().abs().sum(-1).cpu() > 0
                acc = acc * written  # only slots this period's bank actually holds content in
                top = torch.sort(-acc, stable=True).indices[:self.cfg.slots_per_version]
                entry["layers"][str(layer)] = [int(i) for i in top if acc[i] > 0]
            slots[skey] = entry
        return slots

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def route_prompts(self, model: nn.Module, prompts: list[str], batch_size: int = 64) -> list[int]:
        """0-based period index chosen for each prompt, read at its last token (the query alone)."""
        if self.current == 0:
            return []
        was_training = model.training
        model.eval()
        out: list[int] = []
        try:
            # left padding, as in generation: the last column is the end of every query
            for _, ids, mask in self._text_batches(prompts, batch_size, left=True):
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                model(input_ids=ids.to(self.ctx.device), attention_mask=mask.to(self.ctx.device),
                      position_ids=position_ids.to(self.ctx.device))
                assert self._route is not None
                out.extend(int(r) for r in self._route[:, -1].cpu())
        finally:
            model.train(was_training)
        return out

    def eval_extras(self, model: nn.Module, probes: list[Probe]) -> dict[str, Any]:
        summary = {k: self.registry.get(k) for k in ("num_facts", "num_versions", "num_contradictions")}
        if self.current == 0:
            return {"routing_accuracy": None, "routed": None, "registry_summary": summary, "registry": self.registry}
        routes = self.route_prompts(model, [p.prompt for p in probes])
        routed = {p.id: self.period_names[r] for p, r in zip(probes, routes)}
        seen = [p for p in probes if self.period_names.index(p.period) < self.current]
        return {"routing_accuracy": routing_accuracy(routed, probes),
                "routing_accuracy_seen": routing_accuracy(routed, seen),
                "routed": routed, "registry_summary": summary, "registry": self.registry}

    # -- state -----------------------------------------------------------------------------
    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = memory_state_dict(model)
        state.update({f"{ROUTER_ATTR}.{n}": p.detach().clone() for n, p in self.router.named_parameters()})
        return state

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        assert self.router is not None
        extra = tuple(f"{ROUTER_ATTR}.{n}" for n, _ in self.router.named_parameters())
        load_memory_state_dict(model, state, self.name, extra)

    def state_dict(self) -> dict[str, Any]:
        assert self.updater is not None
        return {"current": self.current, "log": [[p, list(t)] for p, t in self.log], "slots": dict(self.slots),
                "registry": self.registry, "access": self.updater.state_dict(), "micro_count": self.micro_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.updater is not None
        self.current = int(state["current"])
        self.log = [[p, list(t)] for p, t in state["log"]]
        self.slots = dict(state["slots"])
        self.registry = state["registry"]
        self.updater.load_state_dict(state["access"])
        self.micro_count = int(state["micro_count"])
