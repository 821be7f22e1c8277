"""The continual-learning loop: evaluate the base model, then train and evaluate period after period.

    run()            row 0 = base eval; for each period not yet committed: run_period(k); results.json
    run_period(k)    on_period_start -> (restore step checkpoint) -> train steps -> end checkpoint
                     -> on_period_end -> evaluate every period's probes -> commit periods/<k>-<name>/
    train_step()     zero_grad, forward, loss (+ method extra loss), backward, after_backward, clip, step

A period is committed only after its evaluation, by a manifest written last. A kill at any point
leaves either the committed period, or a step checkpoint to continue from; the loop reseeds at every
period start and restores RNG, optimizer, scheduler and data position from step checkpoints, so the
resumed run reproduces the uninterrupted one bit for bit on the same hardware.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from artifacts import (
    RunDir,
    StepCheckpoints,
    append_text,
    atomic_write_json,
    atomic_write_text,
    commit_dir,
    read_jsonl,
    read_manifest,
    staging_dir,
    state_sha256,
    verify_manifest,
    write_manifest,
)
from data.schema import Period
from eval_and_metrics.evaluate import Budget, EvalInterrupted
from eval_and_metrics.retention import RETENTION_FILE, RetentionTrack
from training.batching import PeriodData, collate, collate_packed, epoch_batches, model_inputs
from training.checkpointer import Checkpointer, Position, check_free_space
from training.config import RunConfig, step_sleep
from training.distributed import World
from training.methods.base import Method
from training.models import master_weights, resolve_precision, training_autocast
from training.optimizers import OPTIMIZERS, horizon_problem, optimizer_stats
from training.run import slurm_info
from training.seeding import derive_seed, seed_everything
from training.signals import StopFlag, StopRequested
from training.strategies import STRATEGIES, Strategy, micro_rng, resolve_strategy, total_norm
from training.tracking import open_tracker
from training.workload import Stage, Workload

RESULTS_SCHEMA_VERSION = 1


def lr_lambda(total_steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        paths: RunDir,
        model: torch.nn.Module,
        tokenizer: Any,
        device: torch.device,
        method: Method,
        workload: Workload,
        stop: StopFlag,
        log: Callable[[str], None] = print,
        world: World = World(),
        retention: RetentionTrack | None = None,
    ) -> None:
        self.cfg = cfg
        self.paths = paths
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.method = method
        self.work = workload
        self.stop = stop
        # Rank 0 speaks and writes; the others hold the same state and only compute.
        self.world = world
        self.say = log if world.is_main else (lambda message: None)
        # train.mixed_precision resolved for this device and model dtype (auto: bf16 on a bf16 model)
        self.precision = resolve_precision(cfg.train.mixed_precision, cfg.model, device)
        self.strategy: Strategy = STRATEGIES[resolve_strategy(cfg.train.strategy, world)](
            world, device, precision=self.precision
        )
        self.strategy.prepare(model)
        self.wrapped = model  # what the training forward goes through (the strategy's wrapper)
        self.checkpointer = Checkpointer(self.strategy, method, model)  # what a checkpoint holds, saved and loaded
        self.probes = workload.probes
        # eval.retention's held-out tasks, scored beside every row's own evaluation (None: no track)
        self.retention = retention
        self.started_at = time.time()
        self.step_sleep = step_sleep()  # $CLKIT_STEP_SLEEP: tests slow the steps down to stop a run mid-period
        # rank 0 logs to the configured experiment trackers (training/tracking.py); none by default
        self.tracker = open_tracker(
            cfg.track,
            paths.root.name,
            paths.root,
            world.is_main,
            self.say,
            config=cfg.identity_dict(),
            tags=_provenance(paths),
        )

    # -- outer loop ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        stages = self.work.stages
        finished = False
        try:
            done = self._committed_prefix()
            if done >= 1:
                self._load_committed(done)
                self.say(f"resuming after committed period {done}/{len(stages)} ({stages[done - 1].name})")
            if done < 0:
                self._commit_base()
            for stage in stages[max(done, 0) :]:
                self.run_period(stage)
            results = self._write_results()
            finished = True
            return results
        finally:
            self.tracker.close(finished)

    def run_period(self, stage: Stage) -> None:
        k, cfg, period = stage.index, self.cfg, stage.period
        seed_everything(derive_seed(cfg.seed, "period", k))
        self._reset_peak_memory()  # each commit records its own period's peak (the run's cost takes the max)
        texts = self.method.on_period_start(self.model, period, [p + c for p, c in stage.pairs])
        master_weights(self.model)  # a method may add this period's trainables (an adapter) in the backbone's dtype
        data = self.work.tokenize(self.tokenizer, stage, texts, cfg.train.max_seq_len)
        lengths = [len(t) for t in data.token_ids]
        # Every epoch's batch plan up front: bucketing can give epochs slightly different batch counts,
        # and the cosine horizon and the ETA need the exact number of optimizer steps.
        plans = [
            epoch_batches(lengths, cfg.train.max_tokens_per_batch, cfg.train.max_batch_size, cfg.seed, k, e)
            for e in range(cfg.train.epochs)
        ]
        total_steps = sum(math.ceil(len(plan) / cfg.train.grad_accum) for plan in plans)
        params = self.method.trainable_parameters(self.model)
        optimizer = OPTIMIZERS[cfg.train.optimizer](params, cfg.train)
        warmup = min(cfg.train.warmup_steps, int(cfg.train.warmup_max_frac * total_steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, cfg.train.min_lr_ratio))
        ckpts = StepCheckpoints(self.paths.checkpoint_root(k, period.name), keep=cfg.checkpoint.keep)
        if cfg.checkpoint.check_free_space and self.world.is_main:
            check_free_space(ckpts.root, k, params, cfg.checkpoint.keep)
        pos = Position()
        parts = self.checkpointer.step_parts(optimizer, scheduler, pos)  # pos is the data position part
        latest = ckpts.latest_valid()
        if latest is not None:
            self.checkpointer.load(latest[1], parts)
        self._truncate_log(k, pos.step)
        offset = self._step_offset(k)  # the run's global step = offset + the step within this period
        self.tracker.resume_at(offset + pos.step + 1)
        problem = horizon_problem(optimizer, total_steps)
        if problem:
            self.say(f"warning: period {k} ({period.name}): {problem}")
            self._log({"event": "warning", "period": k, "message": problem})
        if latest is not None:
            self._log(
                {"event": "resume", "period": k, "from_step": pos.step, "total_steps": total_steps, **slurm_info()}
            )
            self.say(f"period {k} ({period.name}): resuming from step checkpoint {pos.step}/{total_steps}")

        def save_step() -> None:
            # Every rank takes part in gathering the state (sharded under fsdp); rank 0 writes it, the others
            # wait until it is committed.
            snapshot = self.checkpointer.snapshot(parts)
            if self.world.is_main:
                ckpts.save(
                    pos.step,
                    lambda d: self.checkpointer.write(d, snapshot),
                    {
                        "run_id": self.paths.root.name,
                        "period_index": k,
                        "period_name": period.name,
                        "config_hash": cfg.config_hash(),
                        **slurm_info(),
                        **self._world_info(),
                    },
                )
                self.tracker.flush()  # what the trackers hold up to a checkpoint is never replayed
            self.world.barrier()

        flat_params = [p for g in params for p in g["params"]]
        self.wrapped = self.strategy.wrap(self.model, self.method)
        bar = tqdm(
            total=total_steps,
            initial=pos.step,
            desc=f"{self.method.name} {k}/{len(self.work.stages)} {period.name}",
            disable=not (cfg.train.progress and self.world.is_main),
            dynamic_ncols=True,
            mininterval=1.0,
        )
        last_save, window_tokens, window_start = time.time(), 0, time.time()
        last_step = time.time()
        while pos.epoch < cfg.train.epochs:
            batches = plans[pos.epoch]
            epoch = pos.epoch
            while pos.epoch == epoch:
                group = batches[pos.batch : pos.batch + cfg.train.grad_accum]
                micro = [self._batch(data, idx) for idx in group]
                seeds = [derive_seed(cfg.seed, "micro", k, pos.epoch, pos.batch + i) for i in range(len(group))]
                loss, grad_norm = self.train_step(micro, optimizer, scheduler, flat_params, seeds)
                num_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
                padded = sum(b["attention_mask"].numel() for b in micro)
                pos.batch += len(group)
                pos.step += 1
                pos.tokens += num_tokens
                window_tokens += num_tokens
                tok_s = window_tokens / max(1e-9, time.time() - window_start)
                # each step's wall time, so a run's cost is the sum over the log (resumes keep each step once)
                seconds, last_step = time.time() - last_step, time.time()
                record = {
                    "event": "train",
                    "period": k,
                    "step": pos.step,
                    "global_step": offset + pos.step,
                    "loss": loss,
                    "grad_norm": grad_norm,
                    "seconds": seconds,
                    "lr": scheduler.get_last_lr()[0],
                    "tokens": num_tokens,
                    "padding": 1 - num_tokens / padded,
                    **self.method.step_stats(),
                    **optimizer_stats(optimizer),
                }
                self._log(record)
                if self.tracker.active:
                    self.tracker.log_step(
                        offset + pos.step, record, {"tokens_per_s": tok_s, "memory_bytes": self._peak_memory()}
                    )
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
                bar.update(1)
                if self.step_sleep:
                    time.sleep(self.step_sleep)
                if pos.batch >= len(batches):
                    pos.epoch, pos.batch = pos.epoch + 1, 0
                now = time.time()
                # Both decisions are agreed over the ranks: a signal to any rank, or rank 0's clock, stops or
                # saves all of them at this same step boundary.
                due = bool(
                    (cfg.checkpoint.every_steps and pos.step % cfg.checkpoint.every_steps == 0)
                    or (cfg.checkpoint.every_seconds and now - last_save >= cfg.checkpoint.every_seconds)
                )
                stop = self.world.any(bool(self.stop))
                if stop:
                    self._name_stop()
                if stop or self.world.any(due and self.world.is_main):
                    save_step()
                    last_save = now
                if stop:
                    bar.close()
                    raise StopRequested(f"{self.stop.signal_name} during period {k} at step {pos.step}")
        bar.close()
        self.wrapped = self.model  # releases this period's wrapper
        # The end-of-training checkpoint makes evaluation restartable: a kill during eval redoes the
        # eval from here instead of retraining (or, worse, skipping) the period.
        saved = ckpts.list_steps()
        if not saved or saved[-1][0] != pos.step:
            save_step()
        # The period's gradients and optimizer moments are never read again (each period builds its own
        # optimizer): freed here, they do not sit beside eval's activations and the commit on the GPU.
        self.model.zero_grad(set_to_none=True)
        optimizer.state.clear()
        self.method.on_period_end(self.model, period, data)
        eval_start = time.time()
        results = self._evaluate(f"eval after {period.name}")
        retained = self._evaluate_retention(f"retention after {period.name}")
        extras = self.method.eval_extras(self.model, self.probes)
        self._commit_period(
            period,
            results,
            extras,
            retained=retained,
            train_info={
                "total_steps": total_steps,
                "tokens": pos.tokens,
                "num_texts": len(texts),
                "eval_seconds": time.time() - eval_start,
                "peak_memory_bytes": self._peak_memory(),
            },
        )
        if self.world.is_main:
            ckpts.clear()
        self.world.barrier()

    def train_step(
        self,
        micro: list[dict[str, Any]],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        params: list[torch.nn.Parameter],
        seeds: list[int],
    ) -> tuple[float, float]:
        """One optimizer step over `micro`, the step's micro-batches, dealt round-robin over the ranks
        (training/strategies.py): the summed gradient is the same for any number of ranks."""
        self.model.train()
        optimizer.zero_grad(set_to_none=True)
        world, total = self.world, 0.0
        rounds = math.ceil(len(micro) / world.size)
        for r in range(rounds):
            i = r * world.size + world.rank
            real = i < len(micro)
            batch = micro[i] if real else micro[0]  # a zero-weight stand-in: every rank joins every backward
            inputs = {
                k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in model_inputs(batch).items()
            }
            seed = seeds[i if real else 0]
            # the stand-in's forward must not count as a second read of its micro-batch
            counted = [] if real else [c.clone() for c in self.method.step_counters(self.model)]
            with (
                self.strategy.sync(self.wrapped, last_round=r == rounds - 1),
                micro_rng(seed),
                training_autocast(self.precision, self.device),
            ):
                outputs = self.wrapped(**inputs)
                loss = outputs.loss
                declared = self.method.hook_inputs(micro_seed=seed)  # training/methods/base.py, HOOK_INPUTS
                extra = self.method.extra_loss(self.model, {**batch, **inputs, **declared}, outputs)
                if extra is not None:
                    loss = loss + extra
                ((loss * (self.strategy.grad_factor if real else 0.0)) / len(micro)).backward()
            for before, now in zip(counted, self.method.step_counters(self.model)):
                now.copy_(before)
            if real:
                total += loss.item() / len(micro)
        total = world.sum_float(total)
        world.sum_(self.method.step_counters(self.model))
        self.method.after_backward(self.model)
        if self.cfg.train.max_grad_norm:
            grad_norm = total_norm(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        optimizer.step()
        scheduler.step()
        self.method.after_optimizer_step(self.model)
        return total, grad_norm

    # -- pieces ----------------------------------------------------------------------------
    def _batch(self, data: PeriodData, idx: list[int]) -> dict[str, Any]:
        """Micro-batch `idx` of the plan; with train.pack the same items end to end in one row: no padding at
        all (the plan's budget bounds the items' sum; positions restart per item, so the row may be longer
        than max_seq_len). Rows of max_seq_len were tried: first-fit decreasing left more padding at their
        ends (10% on the bench's smoke passages) than length bucketing does (2-4%). The price: SDPA computes
        the whole square of the row's block-diagonal mask, so attention costs budget/item-length times its
        unpacked FLOPs (docs/benchmarks.md); flash-attention's variable-length path does not."""
        masked = [data.num_masked[i] for i in idx] if data.num_masked else None
        ids = [data.token_ids[i] for i in idx]
        batch: dict[str, Any] = (
            collate_packed(ids, self.tokenizer.pad_token_id, masked)
            if self.cfg.train.pack
            else collate(ids, self.tokenizer.pad_token_id, masked)
        )
        batch.update(self.method.hook_inputs(texts=[data.texts[i] for i in idx]))  # declared hook inputs only
        return batch

    def _evaluate(self, desc: str) -> list[dict[str, Any]]:
        """Every eval item scored once: each rank scores its share of the batches (the same batches one
        process would form), and the rows are put back in one process's order on every rank."""
        return self._scored(
            desc,
            self.work.num_eval_items(),
            lambda **kw: self.work.evaluate(**kw, scope=lambda stage: self.method.eval_scope(self.model, stage)),
        )

    def _evaluate_retention(self, desc: str) -> list[dict[str, Any]] | None:
        """The retention track's items, scored by the model as it stands (no stage scope: they belong to
        no period); None without a track."""
        if self.retention is None:
            return None
        return self._scored(desc, self.retention.num_items(), self.retention.evaluate)

    def _scored(self, desc: str, total: int, evaluate: Callable[..., list[dict[str, Any]]]) -> list[dict[str, Any]]:
        world, shard = self.world, self.strategy.eval_shard()
        share = world.size if shard is world else 1  # rank 0 sees its share of the items, or all of them
        bar = tqdm(
            total=total,
            desc=desc,
            disable=not (self.cfg.train.progress and world.is_main),
            dynamic_ncols=True,
            mininterval=1.0,
        )
        try:
            # the ranks agree on a stop before every batch (shard.agree), so they all leave at the same one
            return evaluate(
                model=self.model,
                tokenizer=self.tokenizer,
                device=self.device,
                batch_size=self.cfg.eval.batch_size,
                max_new_tokens=self.cfg.eval.max_new_tokens,
                should_stop=lambda: bool(self.stop),
                progress=lambda n: bar.update(n * share),
                shard=shard,
                budget=Budget(self.cfg.eval.max_length, self.cfg.eval.max_tokens_per_batch),
            )
        except EvalInterrupted:
            self._name_stop()
            raise StopRequested(f"{self.stop.signal_name} during evaluation") from None
        finally:
            bar.close()

    def _commit_base(self) -> None:
        results = self._evaluate("eval base model")
        retained = self._evaluate_retention("retention base model")
        extras = self.method.eval_extras(self.model, self.probes)
        self._commit_period(
            Period(index=0, name="base", passages=(), probes=()),
            results,
            extras,
            train_info={"peak_memory_bytes": self._peak_memory()},
            retained=retained,
        )

    def _commit_period(
        self,
        period: Period,
        results: list[dict[str, Any]],
        extras: dict[str, Any],
        train_info: dict[str, Any],
        retained: list[dict[str, Any]] | None = None,
    ) -> None:
        snapshot = self.checkpointer.snapshot(self.checkpointer.period_parts())  # a collective under fsdp
        if self.world.is_main:
            self._write_period(period, results, extras, train_info, snapshot, retained)
        self.world.barrier()  # no rank goes on (or reads the commit) before it exists

    def _write_period(
        self,
        period: Period,
        results: list[dict[str, Any]],
        extras: dict[str, Any],
        train_info: dict[str, Any],
        snapshot: dict[str, Any],
        retained: list[dict[str, Any]] | None = None,
    ) -> None:
        final = self.paths.period_dir(period.index, period.name)
        tmp = staging_dir(final)
        self.checkpointer.write(tmp, snapshot)
        trainable = snapshot["trainable"]
        (tmp / "eval").mkdir()
        atomic_write_text(
            tmp / "eval" / "predictions.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in results)
        )
        summary = self.work.row_summary(results)
        scores: dict[str, Any] = {"by_period": summary, "extras": extras}
        if retained is not None and self.retention is not None:
            atomic_write_text(
                tmp / "eval" / RETENTION_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in retained)
            )
            scores["retention"] = self.retention.summary(retained)
        atomic_write_json(tmp / "eval" / "scores.json", scores)
        write_manifest(
            tmp,
            {
                "kind": "period",
                "status": "complete",
                "run_id": self.paths.root.name,
                "method": self.method.name,
                "is_bound": self.method.is_bound,
                "period_index": period.index,
                "period_name": period.name,
                "config_hash": self.cfg.config_hash(),
                "data_fingerprint": self.work.fingerprint,
                "code_version": _code_version(self.paths),
                "metrics": scores,
                "train": train_info,
                "trainable_sha256": state_sha256(trainable),
                "started_at": self.started_at,
                "finished_at": time.time(),
                **slurm_info(),
                **self._world_info(),
            },
        )
        commit_dir(tmp, final)
        step = self._step_offset(period.index) + train_info.get("total_steps", 0)  # where its training ended
        self._log(
            {
                "event": "eval",
                "period": period.index,
                "scores": summary,
                "global_step": step,
                "period_name": period.name,
            }
        )
        self.tracker.log_period(step, period.index, period.name, summary)
        self.say(f"committed {final}")

    def _committed_prefix(self) -> int:
        """Highest k such that periods 0..k are all committed and valid; -1 if not even the base row."""
        done = -1
        names = ["base"] + self.work.stage_names
        for k, name in enumerate(names):
            directory = self.paths.period_dir(k, name)
            if not directory.exists():
                break
            ok, reason = verify_manifest(directory)
            manifest = read_manifest(directory) or {}
            if ok and manifest.get("config_hash") != self.cfg.config_hash():
                ok, reason = False, "config hash differs"
            if not ok:
                self.say(f"warning: {directory} is not a valid commit ({reason}); redoing it")
                break
            done = k
        return done

    def _load_committed(self, k: int) -> None:
        self.checkpointer.load(self.paths.period_dir(k, self.work.stage_names[k - 1]))

    # -- logs and results ------------------------------------------------------------------
    def _name_stop(self) -> None:
        """Every rank calls this once the ranks agreed to stop: a rank that got no signal itself takes the
        name of the one that did, so rank 0 says which signal stopped the run and where."""
        if not self.world.active:
            return
        names = self.world.gather_objects(self.stop.signal_name)
        if not self.stop:
            rank, name = next((r, n) for r, n in enumerate(names) if n)
            self.stop.request(f"{name} on rank {rank}")

    def _world_info(self) -> dict[str, Any]:
        """How the run was spread, recorded with every commit: it must not change the numbers."""
        return {
            "world_size": self.world.size,
            "strategy": self.strategy.name,
            "global_batch_micro_batches": self.cfg.train.grad_accum,
            "per_rank_micro_batches": math.ceil(self.cfg.train.grad_accum / self.world.size),
        }

    def _log(self, record: dict[str, Any]) -> None:
        if self.world.is_main:
            append_text(self.paths.train_log, json.dumps(record, sort_keys=True) + "\n")

    def _truncate_log(self, period: int, step: int) -> None:
        """Drop records a resumed run is about to produce again, so the log never holds duplicates."""
        if not self.world.is_main:
            return
        rows = self.paths.log_rows()

        def keep(r: dict[str, Any]) -> bool:
            p = r.get("period", 0)
            if r.get("event") == "resume":
                return p <= period
            if p < period:
                return True
            return p == period and r.get("event") == "train" and r.get("step", 0) <= step

        kept = [r for r in rows if keep(r)]
        if kept != rows:
            atomic_write_text(self.paths.train_log, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def _write_results(self) -> dict[str, Any]:
        names = ["base"] + self.work.stage_names
        rows_per_row, extras = [], {}
        for k, name in enumerate(names):
            directory = self.paths.period_dir(k, name)
            rows_per_row.append(read_jsonl(directory / "eval" / "predictions.jsonl"))
            scores = json.loads((directory / "eval" / "scores.json").read_text())
            extras[name] = scores.get("extras", {})
        metrics = self.work.derive(rows_per_row)
        if self.retention is not None:
            retained = [
                read_jsonl(self.paths.period_dir(k, name) / "eval" / RETENTION_FILE) for k, name in enumerate(names)
            ]
            metrics["retention"] = self.retention.metrics(retained)
        final = self.strategy.trainable_state(self.method, self.model)
        results = {
            "schema_version": RESULTS_SCHEMA_VERSION,
            "run_id": self.paths.root.name,
            "method": self.method.name,
            "mode": self.cfg.mode,
            "seed": self.cfg.seed,
            "benchmark": self.cfg.data.benchmark,
            "benchmark_name": self.work.name,
            "data_fingerprint": self.work.fingerprint,
            "model": results_model_name(self.cfg),
            "config_hash": self.cfg.config_hash(),
            "periods": self.work.stage_names,
            "metrics": metrics,
            "method_extras": extras,
            "final_state_sha256": state_sha256(final),
            "is_bound": self.method.is_bound,
            "cost": self._cost(names),
            **self.work.result_fields(self.cfg),
        }
        if self.world.is_main:
            atomic_write_json(self.paths.results, results)
            self.tracker.log_final(
                self._step_offset(len(names)),
                metrics,
                [self.paths.results, self.paths.config, self.paths.root / "run.json"],
            )
        self.world.barrier()
        return results

    def _step_offset(self, k: int) -> int:
        """Optimizer steps of the periods before period k (each committed one records its count)."""
        names = ["base"] + self.work.stage_names
        return sum(
            (read_manifest(self.paths.period_dir(j, names[j])) or {}).get("train", {}).get("total_steps", 0)
            for j in range(1, min(k, len(names)))
        )

    def _peak_memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _cost(self, names: list[str]) -> dict[str, Any]:
        """What the run cost: wall time of training steps (from the log) and of evaluations (from the
        manifests), the peak memory of rank 0's process over every commit (each records its process's peak
        so far, so a resumed run reports the most any of its processes used, and a rerun of a finished run
        changes nothing), and the size of one committed period's state."""
        rows = self.paths.log_rows()
        last = self.paths.period_dir(len(names) - 1, names[-1])
        manifests = [read_manifest(self.paths.period_dir(k, n)) or {} for k, n in enumerate(names)]
        peak = (
            max((m.get("train", {}).get("peak_memory_bytes", 0) for m in manifests), default=0) or self._peak_memory()
        )  # runs committed before commits recorded it
        return {
            "train_seconds": sum(r.get("seconds", 0.0) for r in rows if r.get("event") == "train"),
            "eval_seconds": sum(m.get("train", {}).get("eval_seconds", 0.0) for m in manifests),
            "train_tokens": sum(m.get("train", {}).get("tokens", 0) for m in manifests),
            "peak_memory_bytes": peak,
            "peak_memory_kind": "cuda_allocated" if self.device.type == "cuda" else "rss",
            "checkpoint_bytes": sum((last / f).stat().st_size for f in ("trainable.safetensors", "method_state.pt")),
        }


def results_model_name(cfg: RunConfig) -> str:
    """results.json's "model" field: "synthetic" or the model's name. Deliberately not the report's
    display label (eval_and_metrics.report.model_label adds the synthetic sizes and the quantisation):
    this one is part of results.json, whose bytes the runs and their fingerprints pin."""
    if cfg.mode == "synthetic":
        return "synthetic"
    return cfg.model.name or "embedded:SmolLM2-135M-Instruct"


def _provenance(paths: RunDir) -> dict[str, str]:
    """run.json's provenance (code version, host, job) as tracker tags."""
    try:
        meta = json.loads(paths.run_meta.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: str(v) for k, v in meta.items() if not isinstance(v, dict)}


def _code_version(paths: RunDir) -> str:
    try:
        return json.loads(paths.run_meta.read_text()).get("code_version", "unknown")
    except (OSError, json.JSONDecodeError):
        return "unknown"
