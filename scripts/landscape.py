"""Loss landscape of a period checkpoint: a 2-D loss slice, sharpness, and a forgetting estimate.

    uv run python -m scripts.landscape RUN_DIR [--period all|K|NAME] [--data eval|train] [--data-period NAME]
                                               [--grid 11] [--span 1.0] [--max-examples 64] ...

* 2-D slice (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets",
  https://arxiv.org/abs/1712.09913): L(a, b) = loss(w + a*d1 + b*d2) on a grid a, b in [-span, span],
  where w are the method's trainable parameters (adapters for LoRA, all weights for full_ft) and
  d1, d2 are random Gaussian directions with *filter-wise normalisation*: each filter (row along
  dim 0) of a direction is rescaled to the norm of the same filter of w. As in the paper, 1-D
  parameters (norm scales, biases) get a zero direction unless --include-1d. A filter whose weights
  are zero gets a zero direction (so a freshly initialised LoRA B matrix does not move).
* Metrics over the grid: center loss (at w), max, min, std, range (max - min), and the max
  curvature: the largest eigenvalue of the finite-difference Hessian of L(a, b) over the interior
  grid points (second derivative in the (a, b) coordinates, i.e. along the normalised directions).
* Sharpness: the top eigenvalue of the empirical Fisher F = 1/N sum_i g_i g_i^T in the trainable
  subspace (g_i = gradient of example i's mean token NLL) by power iteration, F v = 1/N G^T (G v).
* Forgetting estimate (Mirzadeh et al. 2020, "Understanding the Role of Training Regimes in
  Continual Learning", https://arxiv.org/abs/2010.04495): moving from w_{k-1} to w_k raises the loss
  of period k-1 by about 0.5 * (w_k - w_{k-1})^T H (w_k - w_{k-1}) <= 0.5 * lambda_max * ||w_k - w_{k-1}||^2,
  with lambda_max the top eigenvalue of period k-1's Fisher at w_{k-1} (Fisher as the Gauss-Newton
  stand-in for the Hessian). Computed for k >= 2 (period 1 has no earlier period to forget).

The loss is the mean over examples of each example's mean token NLL, on the items of one period
(a task, for a task stream; --data-period, default the checkpoint's own):
  --data eval  (alias probes): the items the period is scored on, the NLL of the gold answer given the
               prompt. Temporal: each probe's " " + value given its prompt (what evaluate.py's logprob
               scores; storage probes only, as the storage metrics). Stream: each eval item's target given its prompt, whatever
               the task's scorer (multiple choice: the gold choice; perplexity: the held-out text; code:
               the reference body).
  --data train (alias passages): the period's training items with the training loss's own mask
               (Workload.tokenize: temporal passages, every token; stream items, the completion
               only unless the task says loss_on: all).
Results go to ``periods/<k>-<name>/landscape/`` (landscape.json, contour.png, surface.png and their own
manifest.json), staged and committed by rename, so a report never reads
half of them; the period's own manifest tolerates the extra subdir.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python scripts/landscape.py` puts scripts/, not the repo, on sys.path
    sys.path.insert(0, str(REPO_ROOT))

from scripts.command import (BadInput, Parser, check_stop, command, exit_quietly, prepare,  # noqa: E402
                             storage_refused, uninterruptible)

if __name__ == "__main__":
    prepare()  # quiet libraries, stop flag: before torch is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

from artifacts import (RunDir, StorageError, atomic_write_json, commit_dir, read_manifest,  # noqa: E402
                       read_regular_text, staging_dir, verify_manifest, write_manifest)
from artifacts.rundir import LANDSCAPE_DIR, LANDSCAPE_FILE  # noqa: E402
from training.period_model import PeriodModel, load_period_model, load_run_config  # noqa: E402
from training.seeding import derive_seed  # noqa: E402
from training.workload import StreamWorkload, Workload, read_workload  # noqa: E402

LANDSCAPE_SCHEMA_VERSION = 1
# Above this many bytes of stored per-example gradients, the Fisher matvec recomputes them instead.
_MAX_GRAD_BYTES = 1 << 30


# ------------------------------------------------------------------------------------------
# data and loss


@dataclass
class Examples:
    ids: torch.Tensor  # (N, L) right-padded
    attention: torch.Tensor  # (N, L)
    target_mask: torch.Tensor  # (N, L): 1 where the token is a loss target

    def __len__(self) -> int:
        return self.ids.shape[0]

    def slice(self, start: int, stop: int) -> Examples:
        return Examples(self.ids[start:stop], self.attention[start:stop], self.target_mask[start:stop])


# --data: the kind-neutral names and the temporal benchmark's own, which say the same thing
DATA_KINDS = {"eval": "eval", "probes": "eval", "train": "train", "passages": "train"}


def _stage(bench: Workload, data_period: str):
    if data_period not in bench.stage_names:
        what = "task" if isinstance(bench, StreamWorkload) else "period"
        raise BadInput(f"--data-period {data_period!r} is not a {what} of this run; valid: "
                         f"{', '.join(bench.stage_names)}")
    return bench.stages[bench.stage_names.index(data_period)]


def _eval_pairs(bench: Workload, data_period: str) -> list[tuple[str, str]]:
    """(prompt, gold answer) of the items the period is scored on; the answer is what gets the loss."""
    if isinstance(bench, StreamWorkload):
        task = bench.stream.tasks[bench.stage_names.index(data_period)]
        return [(x.prompt, x.target) for x in task.eval]
    period = _stage(bench, data_period).period
    return [(p.prompt, " " + p.value) for p in period.probes if p.family == "storage"]


def build_examples(pm: PeriodModel, data: str, data_period: str, max_examples: int, seed: int) -> Examples:
    """The loss's examples: one period's (a stream: one task's) eval items, the gold answer given the
    prompt (data eval/probes), or its training items under the training loss's mask (train/passages)."""
    if data not in DATA_KINDS:
        raise BadInput(f"data must be one of {', '.join(DATA_KINDS)} (got {data!r})")
    stage = _stage(pm.bench, data_period)
    tok = pm.tokenizer
    seqs: list[tuple[list[int], list[int]]] = []
    if DATA_KINDS[data] == "eval":
        for prompt_text, answer in _eval_pairs(pm.bench, data_period):
            prompt = list(tok(prompt_text, add_special_tokens=False)["input_ids"]) if prompt_text else []
            gold = list(tok(answer, add_special_tokens=False)["input_ids"])
            mask = [0] * len(prompt) + [1] * len(gold)
            if not prompt:  # nothing to condition the first token on
                mask[0] = 0
            seqs.append((prompt + gold, mask))
    else:
        encoded = pm.bench.tokenize(tok, stage, [p + c for p, c in stage.pairs], pm.cfg.train.max_seq_len)
        masked = encoded.num_masked or [0] * len(encoded.token_ids)
        seqs = [(ids, [0] * max(1, m) + [1] * (len(ids) - max(1, m)))
                for ids, m in zip(encoded.token_ids, masked)]
    seqs = [(ids, m) for ids, m in seqs if sum(m)]
    if not seqs:
        raise BadInput(f"{data_period} has no {data} items to compute a loss on")
    order = np.random.default_rng(seed).permutation(len(seqs))[:max_examples]
    seqs = [seqs[i] for i in sorted(order.tolist())]
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    tgt = torch.zeros((len(seqs), width), dtype=torch.float32)
    for row, (s, m) in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
        att[row, :len(s)] = 1
        tgt[row, :len(m)] = torch.tensor(m, dtype=torch.float32)
    return Examples(ids.to(pm.device), att.to(pm.device), tgt.to(pm.device))


def per_example_loss(model: torch.nn.Module, ex: Examples) -> torch.Tensor:
    """(N,) mean NLL over each example's target tokens."""
    logits = model(input_ids=ex.ids, attention_mask=ex.attention).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    token_logp = logp.gather(-1, ex.ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = ex.target_mask[:, 1:]
    return -(token_logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, ex: Examples, batch_size: int = 64) -> float:
    total = 0.0
    for start in range(0, len(ex), batch_size):
        total += float(per_example_loss(model, ex.slice(start, start + batch_size)).sum())
    return total / len(ex)


# ------------------------------------------------------------------------------------------
# directions and the 2-D slice


def trainable_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def filter_normalized_direction(params: list[torch.Tensor], generator: torch.Generator,
                                include_1d: bool = False) -> list[torch.Tensor]:
    """Gaussian direction, each filter (slice along dim 0) scaled to the norm of the same filter of w."""
    out = []
    for p in params:
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device)
        w = p.detach().float()
        if p.dim() <= 1:
            if include_1d:
                d = d * (w.norm() / (d.norm() + 1e-10))
            else:
                d = torch.zeros_like(d)
        else:
            d_rows = d.reshape(d.shape[0], -1)
            w_rows = w.reshape(w.shape[0], -1)
            scale = w_rows.norm(dim=1, keepdim=True) / (d_rows.norm(dim=1, keepdim=True) + 1e-10)
            d = (d_rows * scale).reshape(p.shape)
        out.append(d.to(p.dtype))
    return out


@torch.no_grad()
def loss_grid(model: torch.nn.Module, params: list[torch.nn.Parameter], d1: list[torch.Tensor],
              d2: list[torch.Tensor], coords: np.ndarray, ex: Examples) -> np.ndarray:
    """L[i, j] = loss(w + coords[i] * d1 + coords[j] * d2); the parameters are restored afterwards."""
    origin = [p.detach().clone() for p in params]
    grid = np.zeros((len(coords), len(coords)))
    try:
        for i, a in enumerate(coords):
            for j, b in enumerate(coords):
                for p, w, u, v in zip(params, origin, d1, d2):
                    p.copy_(w + float(a) * u + float(b) * v)
                grid[i, j] = mean_loss(model, ex)
    finally:
        for p, w in zip(params, origin):
            p.copy_(w)
    return grid


def grid_metrics(grid: np.ndarray, coords: np.ndarray, center_loss: float) -> dict[str, float | None]:
    """Center, max, min, std, range, and the largest finite-difference Hessian eigenvalue over the grid."""
    out: dict[str, float | None] = {"center_loss": center_loss, "max_loss": float(grid.max()),
                                    "min_loss": float(grid.min()), "std_loss": float(grid.std()),
                                    "loss_range": float(grid.max() - grid.min()), "max_curvature": None,
                                    "center_curvature": None}
    n = len(coords)
    if n < 3:
        return out
    h = float(coords[1] - coords[0])
    best, center = -math.inf, None
    for i in range(1, n - 1):
        for j in range(1, n - 1):
            lxx = (grid[i + 1, j] - 2 * grid[i, j] + grid[i - 1, j]) / h**2
            lyy = (grid[i, j + 1] - 2 * grid[i, j] + grid[i, j - 1]) / h**2
            lxy = (grid[i + 1, j + 1] - grid[i + 1, j - 1] - grid[i - 1, j + 1] + grid[i - 1, j - 1]) / (4 * h**2)
            top = float(np.linalg.eigvalsh(np.array([[lxx, lxy], [lxy, lyy]]))[-1])
            best = max(best, top)
            if abs(coords[i]) < h / 2 and abs(coords[j]) < h / 2:
                center = top
    out["max_curvature"] = best
    out["center_curvature"] = center
    return out


# ------------------------------------------------------------------------------------------
# Fisher top eigenvalue


def per_example_grads(model: torch.nn.Module, params: list[torch.nn.Parameter], ex: Examples) -> torch.Tensor:
    """(N, P) gradient of each example's mean token NLL w.r.t. the flattened trainable parameters."""
    rows = []
    for i in range(len(ex)):
        loss = per_example_loss(model, ex.slice(i, i + 1)).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                               for g, p in zip(grads, params)]))
    return torch.stack(rows)


def fisher_top_eigenvalue(model: torch.nn.Module, params: list[torch.nn.Parameter], ex: Examples,
                          iters: int = 50, tol: float = 1e-4, seed: int = 0) -> tuple[float, int]:
    """Top eigenvalue of F = 1/N G^T G by power iteration; returns (lambda, iterations used).

    G is kept in memory when it fits in _MAX_GRAD_BYTES; otherwise every matvec recomputes the
    per-example gradients one example at a time (slow but bounded memory).
    """
    num_params = sum(p.numel() for p in params)
    stored = len(ex) * num_params * 4 <= _MAX_GRAD_BYTES
    g_all = per_example_grads(model, params, ex) if stored else None

    def matvec(v: torch.Tensor) -> torch.Tensor:
        if g_all is not None:
            return g_all.T @ (g_all @ v) / len(ex)
        acc = torch.zeros_like(v)
        for i in range(len(ex)):
            g = per_example_grads(model, params, ex.slice(i, i + 1))[0]
            acc += g * float(g @ v)
        return acc / len(ex)

    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(num_params, generator=gen).to(params[0].device)
    v /= v.norm()
    lam = 0.0
    for it in range(1, iters + 1):
        w = matvec(v)
        new_lam = float(v @ w)
        norm = float(w.norm())
        if norm == 0.0:
            return 0.0, it
        v = w / norm
        if it > 1 and abs(new_lam - lam) <= tol * max(abs(new_lam), 1e-12):
            return new_lam, it
        lam = new_lam
    return lam, iters


# ------------------------------------------------------------------------------------------
# the job


@dataclass
class Settings:
    data: str = "probes"  # eval/probes (gold answer given the prompt) or train/passages (training items)
    data_period: str = ""  # whose items (a period, or a stream's task); "" = the checkpoint's own (the first for base)
    grid: int = 11  # grid points per axis
    span: float = 1.0  # coordinates run over [-span, span] along each normalised direction
    max_examples: int = 64  # examples in the slice's loss
    fisher_examples: int = 32  # examples in the Fisher (one backward pass each)
    power_iters: int = 50  # power-iteration budget (stops earlier at relative change < 1e-4)
    seed: int = 0  # directions, example subset and power-iteration start
    include_1d: bool = False  # give 1-D parameters (norms, biases) a direction too

    def validate(self) -> None:
        problems = []
        if self.grid < 3:
            problems.append(f"--grid must be >= 3 (got {self.grid})")
        if not (math.isfinite(self.span) and self.span > 0):  # NaN passes `<= 0` and would commit a NaN grid
            problems.append(f"--span must be a finite number > 0 (got {self.span})")
        for name in ("max_examples", "fisher_examples", "power_iters"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.data not in DATA_KINDS:
            problems.append(f"--data must be one of {', '.join(DATA_KINDS)} (got {self.data!r})")
        if problems:
            raise BadInput(problems)


def _own_data_period(pm: PeriodModel) -> str:
    return pm.name if pm.index >= 1 else pm.bench.period_names[0]


def _flat_state(pm: PeriodModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in trainable_params(pm.model)}


def _fisher_at(pm: PeriodModel, s: Settings, data_period: str) -> float:
    ex = build_examples(pm, s.data, data_period, s.fisher_examples, s.seed)
    params = [p for _, p in trainable_params(pm.model)]
    lam, _ = fisher_top_eigenvalue(pm.model, params, ex, iters=s.power_iters, seed=s.seed)
    return lam


@dataclass
class JobCache:
    """What a job over consecutive periods carries from period k-1 to period k."""

    lambdas: dict[int, float] = field(default_factory=dict)  # k -> lambda_max at w_k on period k's data
    last_state: tuple[int, dict[str, torch.Tensor]] | None = None  # (k, trainable state of w_k)


def _previous_lambda(run_dir: Path, k: int, s: Settings, cache: JobCache, device: str) -> tuple[float, str]:
    """lambda_max of period k-1's Fisher at w_{k-1}: from this job, from k-1's landscape.json, or computed."""
    if k - 1 in cache.lambdas:
        return cache.lambdas[k - 1], "computed in this job"
    pm = load_period_model(run_dir, k - 1, device)
    stored_dir = pm.directory / LANDSCAPE_DIR
    if verify_manifest(stored_dir)[0]:
        prev = json.loads(read_regular_text(stored_dir / LANDSCAPE_FILE))
        ps = prev.get("settings", {})
        same = all(ps.get(key) == getattr(s, key) for key in ("data", "fisher_examples", "power_iters", "seed"))
        lam = (prev.get("metrics") or {}).get("fisher_top_eigenvalue")
        if same and ps.get("data_period") == pm.name and lam is not None:
            return float(lam), f"periods/{pm.directory.name}/{LANDSCAPE_DIR}"
    return _fisher_at(pm, s, _own_data_period(pm)), "computed in this job"


def run_landscape(run_dir: str | Path, period: str | int, s: Settings, device: str = "auto",
                  cache: JobCache | None = None, log: Any = print) -> dict[str, Any]:
    """Compute and commit periods/<k>-<name>/landscape/ for one period; returns landscape.json's content."""
    s.validate()
    run_dir = Path(run_dir)
    cache = JobCache() if cache is None else cache
    started = time.time()
    pm = load_period_model(run_dir, period, device)
    data_period = s.data_period or _own_data_period(pm)
    ex = build_examples(pm, s.data, data_period, s.max_examples, s.seed)
    named = trainable_params(pm.model)
    if not named:
        raise BadInput(f"{pm.directory}: the method has no trainable parameters to perturb")
    params = [p for _, p in named]
    gen = torch.Generator().manual_seed(derive_seed(s.seed, "landscape"))
    d1 = filter_normalized_direction(params, gen, s.include_1d)
    d2 = filter_normalized_direction(params, gen, s.include_1d)
    coords = np.linspace(-s.span, s.span, s.grid)
    center = mean_loss(pm.model, ex)
    grid = loss_grid(pm.model, params, d1, d2, coords, ex)
    metrics = grid_metrics(grid, coords, center)

    # Sharpness at this checkpoint on its own period's data (what the next period's estimate uses).
    own_period = _own_data_period(pm)
    lam = _fisher_at(pm, s, own_period)
    cache.lambdas[pm.index] = lam
    metrics["fisher_top_eigenvalue"] = lam

    forgetting: dict[str, Any] = {"from_period": None, "lambda_prev": None, "lambda_source": None}
    metrics["delta_w_norm"] = None
    metrics["forgetting_estimate"] = None
    state = _flat_state(pm)
    if pm.index >= 2:
        if cache.last_state is not None and cache.last_state[0] == pm.index - 1:
            prev_state = cache.last_state[1]
        else:
            prev_state = _flat_state(load_period_model(run_dir, pm.index - 1, device))
        if set(prev_state) == set(state) and all(prev_state[n].shape == state[n].shape for n in state):
            delta_sq = float(sum(((state[n] - prev_state[n]) ** 2).sum() for n in state))
            lam_prev, source = _previous_lambda(run_dir, pm.index, s, cache, device)
            metrics["delta_w_norm"] = math.sqrt(delta_sq)
            metrics["forgetting_estimate"] = 0.5 * lam_prev * delta_sq
            forgetting = {"from_period": pm.bench.period_names[pm.index - 2], "lambda_prev": lam_prev,
                          "lambda_source": source}
        else:
            forgetting["note"] = "trainable parameters changed shape between periods; no estimate"
    else:
        forgetting["note"] = "no earlier trained period to forget" if pm.index == 1 else "base model"

    cache.last_state = (pm.index, state)
    result = {
        "schema_version": LANDSCAPE_SCHEMA_VERSION, "run_id": run_dir.name, "method": pm.cfg.method.name,
        "period_index": pm.index, "period_name": pm.name,
        "settings": {**vars(s), "data_period": data_period}, "fisher_data_period": own_period,
        "coords": coords.tolist(), "loss_grid": grid.tolist(), "metrics": metrics, "forgetting": forgetting,
        "num_examples": len(ex), "num_trainable_params": sum(p.numel() for p in params),
        "elapsed_s": round(time.time() - started, 3),
    }
    _commit(pm, result, coords, grid)
    log(f"landscape {run_dir.name} {pm.index}-{pm.name}: center {center:.4f} range {metrics['loss_range']:.4f} "
        f"lambda_max {lam:.4g} forgetting estimate {metrics['forgetting_estimate']}")
    return result


def _commit(pm: PeriodModel, result: dict[str, Any], coords: np.ndarray, grid: np.ndarray) -> None:
    final = pm.directory / LANDSCAPE_DIR
    tmp = staging_dir(final)
    try:
        atomic_write_json(tmp / LANDSCAPE_FILE, result)
        title = f"{result['run_id']} · {pm.index}-{pm.name} · {result['settings']['data']} of " \
                f"{result['settings']['data_period']}"
        plot_contour(coords, grid, tmp / "contour.png", title)
        plot_surface(coords, grid, tmp / "surface.png", title)
        manifest = read_manifest(pm.directory) or {}
        write_manifest(tmp, {"kind": "landscape", "run_id": result["run_id"], "period_index": pm.index,
                             "period_name": pm.name, "trainable_sha256": manifest.get("trainable_sha256"),
                             "settings": result["settings"]})
        with uninterruptible():  # a stop meanwhile takes effect before the next period
            commit_dir(tmp, final)
    except Exception as exc:
        # asked before the staging goes: removing it frees the space whose lack made the write fail
        refused = None if isinstance(exc, (BadInput, StorageError)) else storage_refused(exc, tmp.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if refused is not None:  # matplotlib and torch write through their own error types
            raise StorageError(refused, final) from exc
        raise
    except BaseException:  # a stop or Ctrl-C: the staging goes, the committed period is unchanged
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plot_contour(coords: np.ndarray, grid: np.ndarray, path: Path, title: str) -> None:
    from eval_and_metrics.plots import subplots

    fig, ax = subplots(figsize=(4.4, 3.8))
    a, b = np.meshgrid(coords, coords, indexing="ij")
    levels = np.linspace(grid.min(), grid.max(), 16) if grid.max() > grid.min() else 1
    cs = ax.contourf(b, a, grid, levels=levels, cmap="viridis")
    ax.contour(b, a, grid, levels=levels, colors="white", linewidths=0.4)
    ax.plot([0], [0], marker="*", color="red", ms=10)
    fig.colorbar(cs, ax=ax, label="loss")
    ax.set_xlabel("direction 2")
    ax.set_ylabel("direction 1")
    ax.set_title(title, fontsize=7)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def plot_surface(coords: np.ndarray, grid: np.ndarray, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 3.8))
    ax = fig.add_subplot(projection="3d")
    a, b = np.meshgrid(coords, coords, indexing="ij")
    ax.plot_surface(b, a, grid, cmap="viridis", linewidth=0, antialiased=True)
    ax.set_xlabel("direction 2")
    ax.set_ylabel("direction 1")
    ax.set_zlabel("loss")
    ax.set_title(title, fontsize=7)
    fig.savefig(path, dpi=90, bbox_inches="tight")


@command("landscape")
def main(argv: list[str]) -> int:
    p = Parser(prog="python -m scripts.landscape", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="one run directory")
    p.add_argument("--period", default="all", help="all (every committed period), an index (0 = base) or a name")
    defaults = Settings()
    p.add_argument("--data", choices=list(DATA_KINDS), default=defaults.data,
                   help="eval (= probes): the gold answers of the items a period is scored on; train (= passages): "
                        "its training items under the training loss (default: %(default)s)")
    p.add_argument("--data-period", default="", help="the period (a stream: the task) whose items give the loss "
                   "(default: the checkpoint's own; the first for the base model)")
    p.add_argument("--grid", type=int, default=defaults.grid)
    p.add_argument("--span", type=float, default=defaults.span)
    p.add_argument("--max-examples", type=int, default=defaults.max_examples)
    p.add_argument("--fisher-examples", type=int, default=defaults.fisher_examples)
    p.add_argument("--power-iters", type=int, default=defaults.power_iters)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--include-1d", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Settings(data=args.data, data_period=args.data_period, grid=args.grid, span=args.span,
                 max_examples=args.max_examples, fisher_examples=args.fisher_examples, power_iters=args.power_iters,
                 seed=args.seed, include_1d=args.include_1d)
    run_dir = Path(args.run_dir)
    s.validate()
    if not run_dir.is_dir():
        raise BadInput(f"{run_dir} is not a directory (give a run directory, e.g. runs/<run-id>)")
    load_run_config(run_dir)  # a config.yaml that is not one: one line here, not a traceback later
    run = RunDir(run_dir)
    bench = read_workload(run.data)
    if s.data_period:
        _stage(bench, s.data_period)
    names = ["base"] + bench.period_names
    if args.period == "all":
        targets = run.committed_prefix(names)  # only the committed prefix: a later period may still be training
    else:
        targets = [run.resolve_period(names, args.period)[0]]
    if not targets:
        raise BadInput(f"{run_dir} has no committed period yet")
    cache = JobCache()
    for k in targets:
        check_stop()  # a stop during the last period's commit: that period is done, the next is not begun
        run_landscape(run_dir, k, s, args.device, cache=cache)
    return 0


if __name__ == "__main__":
    exit_quietly(main())  # a stop signal during teardown must not kill a finished process
