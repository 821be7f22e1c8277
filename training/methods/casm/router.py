"""casm's period router: the module that picks, per token, the period whose memory banks a query reads,
and how it learns (docs/methods/casm.md).

    g_b   = 1[b <= route(x)]   (eval: hard;  train: 1[b <= k] + soft_b - stop_grad(soft_b))
    soft_b = sum_{tau >= b} p(tau | x),   p = softmax(router(x)) over the periods trained so far

The router reads the hidden states that enter the first memory layer, up to the current token (a learned
causal attention pooling finds the date wherever it sits; the inputs of earlier decoding steps are kept
so this also holds under a KV cache). It is trained by cross-entropy towards the period named in each
training passage (after the mention), rehearsed on earlier periods' passages re-dated to every period
(so only the date decides), consolidated by a full-batch fit at each period end, and optionally by the
LM loss through the straight-through soft gates. PeriodRouting owns all of that; the method
(training/methods/casm/__init__.py) tells it which period trains and hands it the passage log.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.batching import pad
from training.methods.base import TEXTS, MethodContext
from training.methods.casm.options import CasmOptions
from training.methods.memory import ProductKeyMemory, decoder_layers
from training.seeding import derive_seed

ROUTER_ATTR = "casm_router"


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


def period_mention(text: str, names: list[str]) -> tuple[int, int] | None:
    """(index of the period named first in the text, char offset where the mention ends)."""
    best: tuple[int, int, int] | None = None
    for i, name in enumerate(names):
        m = re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), m.end(), i)
    return None if best is None else (best[2], best[1])


def cat_padded(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


class PeriodRouting:
    """The router of one casm method: attached to the model once (`attach`), it gates the memory banks of
    every forward, adds its cross-entropy to the training loss (`loss`), keeps the rehearsal set of
    earlier periods (`replay`, rebuilt from the passage log, never checkpointed) and fits on it at each
    period end (`fit`). Its parameters travel in the method's trainable state."""

    def __init__(self, cfg: CasmOptions, ctx: MethodContext, period_names: list[str]) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.period_names = period_names
        self.memories: dict[int, ProductKeyMemory] = {}
        self.router: PeriodRouter | None = None
        self.router_layer = 0
        self.current = 0  # 1-based index of the period being (or last) trained; 0 = none yet
        # Router rehearsal set, rebuilt from the text log (never checkpointed): inputs (N, L, d) in the model's
        # dtype, token mask (N, L), targets (N, L) with -100 where a position has none.
        self.replay: dict[str, torch.Tensor] | None = None
        self._logits: torch.Tensor | None = None  # router logits of the last forward (training)
        self._route: torch.Tensor | None = None  # hard route of the last forward
        self._capture: list[torch.Tensor] | None = None
        self._history: tuple[torch.Tensor, torch.Tensor] | None = None  # router inputs so far (KV-cache decoding)
        self._stop_after_capture = False  # scans that only need router inputs end the forward there

    def attach(self, model: nn.Module, memories: dict[int, ProductKeyMemory]) -> PeriodRouter:
        """Add the router (frozen until its first period trains it) and the hook that routes every forward."""
        self.memories = memories
        hf_config: Any = model.config  # a transformers model's config; nn.Module's __getattr__ types it Tensor | Module
        hidden = int(hf_config.hidden_size)
        ref = next(iter(self.memories.values())).values[0]
        self.router = PeriodRouter(
            hidden, self.cfg.router_hidden, len(self.period_names), derive_seed(self.ctx.seed, "casm", "router")
        ).to(ref.device)
        for p in self.router.parameters():
            p.requires_grad_(False)
        model.add_module(ROUTER_ATTR, self.router)
        # The route must be known before the first memory reads it: the router layer is at most that one.
        self.router_layer = min(self.cfg.router_layer, min(self.memories))
        decoder_layers(model)[self.router_layer].register_forward_pre_hook(self._route_hook, with_kwargs=True)
        # the router pools over the whole row: a packed row would let one choice steer another's route
        decoder_layers(model)[self.router_layer].mixes_positions = True  # type: ignore[assignment]  # a plain flag: nn.Module.__setattr__ is typed for tensors and modules
        return self.router

    def forget_history(self) -> None:
        """End a generation: the next forward starts a new query (no KV cache continues it)."""
        self._history = None

    def loss(self, batch: dict[str, Any], seed: int) -> torch.Tensor | None:
        """The router's cross-entropy on this micro-batch (after each passage's period mention) and on
        `router_replay` rehearsed passages drawn with `seed`; None when there is nothing to choose between."""
        if self.current < 2 or self._logits is None or not self.cfg.router_loss_weight:
            return None  # with one period there is nothing to choose between
        logits = self._logits
        where, labels = self._current_targets(batch, logits)
        rows = [logits[where]] if where.any() else []
        targets = [labels] if where.any() else []
        if self.replay is not None and self.cfg.router_replay:
            assert self.router is not None
            gen = torch.Generator().manual_seed(derive_seed(self.ctx.seed, "casm", "replay", seed))
            idx = torch.randint(len(self.replay["x"]), (self.cfg.router_replay,), generator=gen)
            dev = logits.device
            target = self.replay["target"][idx].to(dev)
            old = self.router(self.replay["x"][idx].to(dev).float(), self.replay["mask"][idx].to(dev))
            rows.append(old[..., : self.current][target >= 0])
            targets.append(target[target >= 0])
        if not rows:
            return None
        return self.cfg.router_loss_weight * F.cross_entropy(torch.cat(rows), torch.cat(targets))

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
            logits = self.router(full_x, full_mask)[:, -x.shape[1] :, :avail]
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
        new_mask = None if mask is None else mask[:, -x.shape[1] :]
        history = self._history
        if (
            past > 0
            and history is not None
            and history[0].shape[0] == x.shape[0]
            and history[0].shape[1] == past
            and not torch.is_grad_enabled()
        ):
            full_x = torch.cat([history[0], x.float()], dim=1)
            if new_mask is None:
                new_mask = torch.ones(x.shape[:2], dtype=history[1].dtype, device=x.device)
            full_mask = torch.cat([history[1], new_mask.to(history[1].device)], dim=1)
        else:
            full_x = x.float()
            full_mask = new_mask if new_mask is not None else torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        # Only inference forwards continue a generation; a training forward never keeps history.
        self._history = None if torch.is_grad_enabled() else (full_x, full_mask)
        return full_x, full_mask

    # -- period hooks ----------------------------------------------------------------------

    def _current_targets(self, batch: dict[str, Any], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask of token positions after the period named in each passage, and that period's index.

        Positions before the mention cannot know the period, so they get no routing target.
        """
        mask = torch.zeros(logits.shape[:2], dtype=torch.bool)
        label_map = torch.zeros(logits.shape[:2], dtype=torch.long)
        attention = batch.get("attention_mask")
        # one copy to the host, not a GPU synchronisation per position
        allowed = attention.bool().cpu().tolist() if attention is not None else None
        for row, text in enumerate(batch.get(TEXTS, [])):
            for pos, label in self._positions_after_mention(text, logits.shape[1]):
                if allowed is None or allowed[row][pos]:
                    mask[row, pos] = True
                    label_map[row, pos] = label
        return mask.to(logits.device), label_map[mask].to(logits.device)

    def _positions_after_mention(self, text: str, width: int) -> list[tuple[int, int]]:
        mention = period_mention(text, self.period_names[: self.current])
        if mention is None:
            return []
        label, end = mention
        enc = self.ctx.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        out = [(pos, label) for pos, (start, _) in enumerate(offsets) if start >= end and pos < width]
        if len(offsets) < width:
            out.append((len(offsets), label))  # the EOS the trainer appends
        return out

    def rehearsal_set(
        self, model: nn.Module, log: list[list[Any]], periods: list[str], upto: int
    ) -> dict[str, torch.Tensor] | None:
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
            logged = next(t for p, t in log if p == name)
            keep = self.cfg.router_replay_per_period
            if len(logged) > keep:
                logged = [logged[int(i)] for i in torch.linspace(0, len(logged) - 1, keep).round().long()]
            for text in logged:
                mention = period_mention(text, self.period_names)
                if mention is None:
                    continue
                start = mention[1] - len(self.period_names[mention[0]])
                texts.extend(text[:start] + other + text[mention[1] :] for other in names)
        return self._router_inputs_of(model, texts) if texts else None

    def text_batches(
        self, texts: list[str], size: int = 32, left: bool = False
    ) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
        """(texts, input_ids, attention_mask) in chunks of `size`, tokenised as the trainer does."""
        tok = self.ctx.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        for start in range(0, len(texts), size):
            chunk = texts[start : start + size]
            ids, mask = pad([list(tok(t, add_special_tokens=False)["input_ids"]) for t in chunk], pad_id, left)
            yield chunk, ids, mask

    @torch.no_grad()
    def _router_inputs_of(self, model: nn.Module, texts: list[str]) -> dict[str, torch.Tensor]:
        """(inputs, mask, targets) of the router for these texts; the forward stops at the router."""
        was_training = model.training
        model.eval()
        out: dict[str, torch.Tensor] | None = None
        self._stop_after_capture = True
        stream_dtype = model.get_input_embeddings().weight.dtype  # type: ignore[operator]  # a transformers model's method
        try:
            for chunk, ids, mask in self.text_batches(texts):
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
                out = part if out is None else cat_padded(out, part)
        finally:
            self._capture = None
            self._stop_after_capture = False
            self._history = None
            model.train(was_training)
        assert out is not None
        return out

    def fit(self) -> None:
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
                logits = self.router(x, mask)[..., : self.current]
                loss = F.cross_entropy(logits[target >= 0], target[target >= 0], weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for p in params:
            p.requires_grad_(False)
            p.grad = None

    @torch.no_grad()
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
            for _, ids, mask in self.text_batches(prompts, batch_size, left=True):
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                model(
                    input_ids=ids.to(self.ctx.device),
                    attention_mask=mask.to(self.ctx.device),
                    position_ids=position_ids.to(self.ctx.device),
                )
                assert self._route is not None
                out.extend(int(r) for r in self._route[:, -1].cpu())
        finally:
            model.train(was_training)
        return out
