"""Command line: parse, validate everything, then run one method after another.

All validation (config, data files, model source, method options) happens before any run directory
is created, so bad input exits 2 with nothing written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Any, NoReturn

import torch

from artifacts import LockHeldError, RunDir, StorageError, UnsafePathError, UnsafeStateError, commit_dir, staging_dir
from data import DataError
from eval_and_metrics.retention import RetentionError, RetentionTrack, load_retention
from eval_and_metrics.retention import summary_columns as retention_columns
from training.config import ConfigError, RunConfig, build_run_configs, describe, load_tree
from training.distributed import RendezvousFailed, World, close_world, engine_peer_lost, init_world, world_from_env
from training.methods import METHODS, capability_problems
from training.models import check_model_source, enable_checkpointing, model_skeleton, resolve_dtype, resolve_precision
from training.restore import build_model_and_method
from training.run import human_bytes, open_run, run_dir_of
from training.seeding import use_deterministic
from training.signals import (
    EXIT_ABORTED,
    EXIT_BAD_INPUT,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_RESUME,
    EXIT_STORAGE,
    EXIT_UNTRUSTED,
    StopFlag,
    StopRequested,
)
from training.strategies import STRATEGIES, resolve_strategy, strategy_problems
from training.trainer import Trainer
from training.workload import Workload, load_workload


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit 2, like every other bad input
        raise ConfigError([message])


def make_parser() -> argparse.ArgumentParser:
    epilog = "config keys for --set (section.key = default):\n" + "\n".join(describe(RunConfig))
    p = _Parser(
        prog="main.py",
        description="Train one or more continual-learning methods through a sequence "
        "of periods, evaluating every period after each.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file (default: configs/<mode>.yaml)")
    p.add_argument("--mode", choices=["real", "synthetic"], help="real: pretrained model; synthetic: tiny model")
    p.add_argument("--method", help=f"one of {', '.join(METHODS)}; or a,b; or all")
    p.add_argument("--model", help="HF hub id or local directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--benchmark", help="temporalwiki (generated) or a path to benchmark files")
    p.add_argument("--stream", help="a task stream YAML (configs/streams/, docs/streams.md) instead of --benchmark")
    p.add_argument("--seed", type=int)
    p.add_argument("--run-root", help="directory holding run directories (default runs/)")
    p.add_argument("--run-id", help="run directory name (default: derived from benchmark, method, seed, config)")
    p.add_argument("--quantize", choices=["none", "4bit"], help="4bit: bitsandbytes NF4 (CUDA only)")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any config key; repeatable"
    )
    return p


def parse_configs(argv: list[str]) -> list[RunConfig]:
    args = make_parser().parse_args(argv)
    flags = {
        "mode": args.mode,
        "method.name": args.method,
        "model.name": args.model,
        "data.benchmark": args.benchmark,
        "data.stream": args.stream,
        "seed": args.seed,
        "run_root": args.run_root,
        "run_id": args.run_id,
        "model.quantize": args.quantize,
    }
    tree = load_tree(args.config, args.mode, flags, args.set)
    return build_run_configs(tree, METHODS)


def run_one(
    cfg: RunConfig, workload: Workload, stop: StopFlag, world: World = World(), retention: RetentionTrack | None = None
) -> dict[str, Any]:
    # train.threads holds for this run only: a caller of main() in-process (a notebook, a test, the next
    # method of `--method a,b`) gets its own thread count back, which float sums depend on
    threads = torch.get_num_threads()
    try:
        return _run_one(cfg, workload, stop, world, retention)
    finally:
        torch.set_num_threads(threads)


def _run_one(
    cfg: RunConfig, workload: Workload, stop: StopFlag, world: World, retention: RetentionTrack | None
) -> dict[str, Any]:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    with stop.immediately():  # loading writes nothing to the run; a stop ends it at once
        loaded, method, model = build_model_and_method(cfg, workload)
        if cfg.train.gradient_checkpointing:
            enable_checkpointing(model)
    # Rank 0 creates (or reopens) and locks the run directory; the others only read it, after it exists.
    lock = None
    with world.main_first():
        if world.is_main:
            paths, lock = open_run(cfg, workload, world_info(cfg, world, loaded.device))  # short atomic writes
    paths = RunDir(run_dir_of(cfg))
    try:
        if world.any(bool(stop)):
            raise StopRequested(f"{stop.signal_name or 'a stop on another rank'} before training started")
        if world.is_main:
            print(
                f"run {paths.root}  method={cfg.method.name} model={loaded.source}"
                + (f" ranks={world.size}" if world.active else ""),
                file=sys.stderr,
            )
        if world.is_main and loaded.source == "synthetic" and not paths.tokenizer.exists():
            staging = staging_dir(paths.tokenizer)
            loaded.tokenizer.save_pretrained(staging)
            commit_dir(staging, paths.tokenizer)
        trainer = Trainer(
            cfg,
            paths,
            model,
            loaded.tokenizer,
            loaded.device,
            method,
            workload,
            stop,
            log=lambda m: print(m, file=sys.stderr),
            world=world,
            retention=retention,
        )
        results = trainer.run()
    finally:
        if lock is not None:
            lock.release()
    results["run_dir"] = str(paths.root)
    return results


def world_info(cfg: RunConfig, world: World, device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """How the run is spread (run.json): the global batch is the config's; the per-rank share follows.
    And how it computes: train.mixed_precision resolved on this device (auto leaves no trace in the
    config, so that CPU runs keep their run ids) and the dtype of the frozen weights."""
    return {
        "world_size": world.size,
        "strategy": resolve_strategy(cfg.train.strategy, world),
        "global_batch_micro_batches": cfg.train.grad_accum,
        "max_tokens_per_micro_batch": cfg.train.max_tokens_per_batch,
        "per_rank_micro_batches": -(-cfg.train.grad_accum // world.size),
        "mixed_precision": resolve_precision(cfg.train.mixed_precision, cfg.model, device),
        "model_dtype": str(resolve_dtype(cfg.model, device)).removeprefix("torch."),
    }


def format_summary(all_results: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """The closing table; `columns` are (dotted key into results.json's metrics, label)."""

    def fmt(v: Any) -> str:
        return "   -  " if v is None else f"{v:6.3f}"

    def get(metrics: dict[str, Any], dotted: str) -> Any:
        for key in dotted.split("."):
            metrics = metrics.get(key) if isinstance(metrics, dict) else None  # type: ignore[assignment]
        return metrics

    head = f"{'method':<10} " + " ".join(f"{label:>7}" for _, label in columns)
    lines = [head, "-" * len(head)]
    for res in all_results:
        m = res["metrics"]
        lines.append(f"{res['method']:<10} " + " ".join(f"{fmt(get(m, key)):>7}" for key, _ in columns))
    lines.append("")
    lines.extend(f"{res['method']:<10} {res['run_dir']}" for res in all_results)
    return "\n".join(lines)


def main(argv: list[str] | None = None, stop: StopFlag | None = None) -> int:
    """Run the CLI; `stop` is a StopFlag installed earlier by main.py (else installed here)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    owns_stop = stop is None
    stop = stop if stop is not None else StopFlag().install()
    try:
        return _main(argv, stop)
    finally:
        # main.py's flag stays installed to the end: a signal after the last run must not kill a
        # process that has finished its work (the wrapper would then count it as failed).
        if owns_stop:
            stop.uninstall()


def _main(argv: list[str], stop: StopFlag) -> int:
    """Every failure a user can cause or meet ends here in one line per problem and a documented exit
    code (docs/design.md, "Exit codes"); only a bug in the toolkit itself shows a traceback."""
    started = time.time()
    current: RunConfig | None = None
    all_results = []
    world = world_from_env()  # who we are (from the launcher's environment); the group is joined below
    if not world.is_main:
        _quiet()
    try:
        with stop.immediately():
            configs = parse_configs(argv)
            use_deterministic(any(cfg.train.deterministic for cfg in configs))  # before anything starts CUDA
            workload = load_workload(configs[0].data)
            for line in workload.warnings:
                print("warning: " + " ".join(line.splitlines()), file=sys.stderr)
            # the eval section is the same for every method of one command: one retention track for all
            retention = _load_retention(configs[0].eval.retention)
            for cfg in configs:
                check_model_source(cfg.model, cfg.mode)
            # Every method's options are checked against the model's structure before the first run
            # starts, so a bad option for the third method does not leave two finished runs behind.
            skeleton = model_skeleton(configs[0].model, configs[0].mode, workload)
            problems = [p for cfg in configs for p in METHODS[cfg.method.name].check(cfg.method.options, skeleton)]
            for cfg in configs:  # what a method supports (benchmark, strategy, checkpointing, ...) it declares
                strategy = resolve_strategy(cfg.train.strategy, world)  # an unknown one is strategy_problems'
                problems += capability_problems(cfg, workload.kind, strategy if strategy in STRATEGIES else None)
            problems += [p for cfg in configs for p in strategy_problems(cfg.train, world)]
            if problems:
                raise ConfigError(problems)
            # every rank validated the same input the same way; now they meet
            world = init_world(
                configs[0].model.device, configs[0].train.collective_timeout_s, configs[0].train.rendezvous_timeout_s
            )
        for cfg in configs:
            current = cfg
            all_results.append(run_one(cfg, workload, stop, world, retention))
    except ConfigError as exc:
        return _fail(EXIT_BAD_INPUT, *exc.problems)
    except DataError as exc:
        return _fail(EXIT_BAD_INPUT, *exc.problems)
    except LockHeldError as exc:
        return _fail(EXIT_LOCKED, str(exc))
    except StopRequested as exc:
        if _SPEAKS[0]:
            print(
                f"stopped: {exc}; everything committed or checkpointed is kept, run the same command again to "
                f"resume (exit {EXIT_RESUME})",
                file=sys.stderr,
            )
        return EXIT_RESUME
    except StorageError as exc:
        return _fail(EXIT_STORAGE, storage_message(exc, current))
    except (UnsafeStateError, UnsafePathError) as exc:
        return _fail(EXIT_UNTRUSTED, str(exc))
    except KeyboardInterrupt:
        print(
            f"\naborted by a second Ctrl-C: the last step checkpoint and every committed period are kept, the "
            f"steps since are lost; run the same command again to resume (exit {EXIT_ABORTED})",
            file=sys.stderr,
        )
        return EXIT_ABORTED
    except RendezvousFailed as exc:
        # every rank says it, not rank 0 alone: each met it on its own, and rank 0 may be the one missing
        print(
            f"error: {exc}; the run's files are untouched, run the same command again to resume (exit {EXIT_RESUME})",
            file=sys.stderr,
        )
        return EXIT_RESUME
    except RuntimeError as exc:  # last: LockHeldError is a RuntimeError too, and a bug is re-raised from here
        # another rank died (killed, out of memory, node lost): this one stops without writing anything;
        # the last committed period and step checkpoint stay valid, so a rerun resumes from them. Seen by the
        # loop's own collectives (PeerLost) or by the engine's, inside DDP's backward or FSDP's gathers
        # (DistBackendError under NCCL, gloo's transport error on CPU)
        lost = engine_peer_lost(exc)
        if lost is None:
            raise
        return _fail(EXIT_RESUME, f"{lost}; the last checkpoint is intact, run the same command again to resume")
    finally:
        close_world()
    if world.is_main:
        print(format_summary(all_results, workload.summary_columns + retention_columns(retention)))
        if workload.summary_legend:
            print(workload.summary_legend)
        print(f"\n{len(all_results)} run(s) done in {time.time() - started:.0f}s; metric formulas: docs/metrics.md")
    return EXIT_OK


_SPEAKS = [True]


def _load_retention(spec: str) -> RetentionTrack | None:
    if not spec:
        return None
    try:
        return load_retention(spec)
    except RetentionError as exc:
        raise ConfigError(exc.problems) from None


def _quiet() -> None:
    """Ranks other than 0 print nothing: rank 0 speaks for the run (errors included: every rank meets the
    same ones). Their stderr stays open for a traceback, which only a bug produces."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- stays open for the life of the process
    _SPEAKS[0] = False


def _fail(code: int, *lines: str) -> int:
    for line in lines if _SPEAKS[0] else ():
        print("error: " + " ".join(line.splitlines()), file=sys.stderr)
    return code


def storage_message(exc: StorageError, cfg: RunConfig | None) -> str:
    """One line: what failed where, how much it needed, what is safe, what to do."""
    needed = f", needed {human_bytes(exc.num_bytes)}" if exc.num_bytes else ""
    probe = exc.path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f", {human_bytes(shutil.disk_usage(probe).free)} free"
    except OSError:
        free = ""
    last = "nothing is committed yet"
    if cfg is not None:
        committed = RunDir(run_dir_of(cfg)).committed_periods()
        if committed:
            last = f"the last committed period is {committed[-1]}"
    return (
        f"cannot write {exc.path}: {exc.strerror}{needed}{free}; {last} and stays intact. Free space (or "
        f"fix the permissions, or pick another --run-root) and run the same command again to resume "
        f"(exit {EXIT_STORAGE})"
    )
