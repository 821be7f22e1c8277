"""Score a model on a task stream's eval items without training: the base row of a stream, on its own.

    uv run python scripts/stream_baseline.py --stream mmlu-packaged [--model HF_ID_OR_DIR] [--mode real]
        [--set eval.max_new_tokens=256] [--json OUT.json]

Builds the model exactly as a run does (training/restore.py) and evaluates through the same workload
code as row 0 of every stream run, so the numbers equal that row. Used for the base-model numbers in
docs/results.md; a quick check of a new stream or model before spending a training budget on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from eval_and_metrics.evaluate import Budget  # noqa: E402
from training.config import ConfigError, build_run_configs, load_tree  # noqa: E402
from training.methods import METHODS  # noqa: E402
from training.restore import build_model_and_method  # noqa: E402
from training.workload import load_workload  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/stream_baseline.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--stream", required=True, help="a stream file or a preset name (configs/streams/)")
    p.add_argument("--mode", choices=["real", "synthetic"], default="real")
    p.add_argument("--model", help="HF hub id or local directory (default: the embedded SmolLM2)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--json", help="also write the per-task metrics and per-item rows here")
    args = p.parse_args(argv)
    try:
        tree = load_tree(None, args.mode, {"data.stream": args.stream, "model.name": args.model,
                                           "method.name": "full_ft"}, args.set)
        cfg = build_run_configs(tree, METHODS)[0]
        workload = load_workload(cfg.data)
    except (ConfigError, ValueError) as exc:
        for line in getattr(exc, "problems", None) or [str(exc)]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    loaded, _method, model = build_model_and_method(cfg, workload)
    started = time.time()
    rows = workload.evaluate(model, loaded.tokenizer, loaded.device, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                             should_stop=lambda: False, progress=lambda n: None,
                             budget=Budget(cfg.eval.max_length, cfg.eval.max_tokens_per_batch))
    summary = workload.row_summary(rows)
    print(f"{workload.name}: base model {loaded.source}, {len(rows)} items in {time.time() - started:.0f}s")
    for task, metrics in summary.items():
        print(f"  {task:<28} " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in metrics.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"stream": workload.name, "model": loaded.source,
                                               "summary": summary, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
