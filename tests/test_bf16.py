"""The GPU-emulation layer: what a CUDA run does in bf16, reproduced on CPU.

On CUDA the model loads in bfloat16 (model.dtype auto) and train.mixed_precision auto is bf16 autocast.
These tests load the tiny synthetic model with model.dtype=bfloat16 on CPU, which runs the same dtype
paths: trainable weights must be float32 master weights that move at the presets' learning rates, the
memories' slot addresses must not depend on autocast, 4-bit is refused exactly for configurations that
train the backbone, and a real model is loaded straight onto its device.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from data import DataConfig
from tests.conftest import comparable, only_run_dir, read_results, train_records, signal_after_steps
from training import cli, models, trainer
from training.batching import collate
from training.config import ModelConfig, RunConfig
from training.distributed import World
from training.methods import METHODS, capability_problems
from training.methods.adapted import AdaptedOptions
from training.methods.memory import MemoryOptions, ProductKeyMemory, attach_memories
from training.models import master_weights, resolve_precision, training_autocast
from training.optimizers import OPTIMIZERS
from training.restore import build_model_and_method
from training.workload import load_workload

# The real preset's learning rates (configs/real.yaml: train.lr 2e-4, adapters 2e-3) on the tiny model in bf16.
BF16 = ["--config", "configs/real.yaml", "--mode", "synthetic", "--set", "data.num_facts=8",
        "--set", "model.dtype=bfloat16", "--set", "train.mixed_precision=bf16", "--set", "train.progress=false"]
# every method as registered, and every regulariser also with `on: full` at train.lr (the hardest case:
# backbone weights of |w| ~ 0.1-1 under an update of 2e-4)
ON_FULL = [n for n, m in METHODS.items() if issubclass(m.config_cls, AdaptedOptions)]
MATRIX = [(n, None) for n in METHODS] + [(n, "full") for n in ON_FULL]


def _config(name: str, on: str | None, *extra: str) -> RunConfig:
    sets = ["--set", f"method.{name}.on={on}", "--set", f"method.{name}.lr=0"] if on else []
    return cli.parse_configs([*BF16, "--method", name, *sets, *extra])[0]


@pytest.fixture(scope="module")
def workload():
    return load_workload(_config("lora", None).data)


@pytest.mark.parametrize(("name", "on"), MATRIX, ids=[f"{n}-{o or 'default'}" for n, o in MATRIX])
def test_bf16_model_trains_float32_weights_that_move_at_preset_lr(name, on, workload):
    """The trainer's order: build (prepare + master weights), period start (+ master weights), optimizer,
    then steps under bf16 autocast. Every trainable tensor is float32 and nearly every element with a
    gradient moves in every step; before, a bf16 weight of |w| >= 0.0625 rounded an update of 2e-4 away."""
    cfg = _config(name, on)
    loaded, method, model = build_model_and_method(cfg, workload)
    stage = workload.stages[0]
    texts = method.on_period_start(model, stage.period, [p + c for p, c in stage.pairs])
    master_weights(model)
    data = workload.tokenize(loaded.tokenizer, stage, texts, cfg.train.max_seq_len)
    batch = collate(data.token_ids[:6], loaded.tokenizer.pad_token_id)
    batch["texts"] = data.texts[:6]
    groups = method.trainable_parameters(model)
    params = [p for g in groups for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    assert params and all(p.dtype == torch.float32 for p in params), \
        {names[id(p)]: p.dtype for p in params if p.dtype != torch.float32}
    if not METHODS[name].trains_backbone(cfg.method.options):
        assert any(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad), \
            "the frozen backbone keeps model.dtype (bf16 saves the memory LoRA is for)"
    optimizer = OPTIMIZERS[cfg.train.optimizer](groups, cfg.train)
    precision = resolve_precision(cfg.train.mixed_precision, cfg.model, loaded.device)
    assert precision == "bf16"
    model.train()
    worst: dict[str, float] = {}
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        with training_autocast(precision, loaded.device):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            loss = out.loss + (method.extra_loss(model, batch, out) or 0)
        loss.backward()
        method.after_backward(model)
        before = {id(p): p.detach().clone() for p in params}
        grads = {id(p): p.grad.detach().clone() for p in params if p.grad is not None}
        optimizer.step()
        method.after_optimizer_step(model)
        for p in params:
            if id(p) not in grads or not bool((grads[id(p)] != 0).any()):
                continue
            live = grads[id(p)] != 0
            moved = float((p.detach() != before[id(p)])[live].float().mean())
            worst[names[id(p)]] = min(worst.get(names[id(p)], 1.0), moved)
    assert worst, "no trainable element got a gradient"
    stuck = {n: round(f, 3) for n, f in worst.items() if f < 0.99}
    assert not stuck, f"share of elements with a gradient that moved, per tensor: {stuck}"
    state = [s for s in optimizer.state.values() for s in s.values() if isinstance(s, torch.Tensor) and s.dim()]
    assert all(s.dtype == torch.float32 for s in state), "AdamW's moments follow the float32 master weights"


def test_master_weights_leave_a_float32_model_untouched():
    """CPU float32 runs keep their numbers: nothing to convert, the very same tensors stay."""
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model[1].requires_grad_(False)
    ids = [id(p.data) for p in model.parameters()]
    assert master_weights(model) == 0
    assert [p.dtype for p in model.parameters()] == [torch.float32] * 4
    model.to(torch.bfloat16)
    assert master_weights(model) == 2  # the Linear's two tensors; the frozen norm stays bf16
    assert [p.dtype for p in model.parameters()] == [torch.float32] * 2 + [torch.bfloat16] * 2
    assert ids  # the float32 case above converted nothing


def test_mixed_precision_auto_resolves_per_device_and_leaves_the_run_id_alone():
    """auto = bf16 autocast on a bf16 model (CUDA's default), none on CPU float32; auto and none leave no
    key in the saved config, so every existing CPU run keeps its run id, and run.json records the choice."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", ModelConfig(), cpu) == "none"
    assert resolve_precision("auto", ModelConfig(), cuda) == "bf16"
    assert resolve_precision("auto", ModelConfig(dtype="bfloat16"), cpu) == "bf16"
    assert resolve_precision("auto", ModelConfig(dtype="float32"), cuda) == "none"
    assert resolve_precision("none", ModelConfig(), cuda) == "none"
    default, none = RunConfig(), RunConfig()
    assert default.train.mixed_precision == "auto"
    none.train.mixed_precision = "none"
    assert "mixed_precision" not in default.to_dict()["train"]
    assert default.config_hash() == none.config_hash()
    info = cli.world_info(default, World(), cuda)
    assert (info["mixed_precision"], info["model_dtype"]) == ("bf16", "bfloat16")
    assert cli.world_info(default, World())["mixed_precision"] == "none"


def test_trainables_a_method_adds_at_a_period_start_train_in_float32(tmp_path, monkeypatch):
    """A method may add its trainables per period (olora's and per_task's adapters): the loop makes them
    float32 before the optimizer is built, whatever dtype the method created them in."""
    from training.methods.lora import LoRA

    class GrowsInBf16(LoRA):
        def on_period_start(self, model: nn.Module, period, texts: list[str]) -> list[str]:
            model.register_parameter(f"grown_{period.index}", nn.Parameter(torch.zeros(4, dtype=torch.bfloat16)))
            return texts

    seen: list[set[torch.dtype]] = []
    adamw = trainer.OPTIMIZERS["adamw"]

    def recording(groups, train):
        seen.append({p.dtype for g in groups for p in g["params"]})
        return adamw(groups, train)

    monkeypatch.setitem(METHODS, "lora", GrowsInBf16)
    monkeypatch.setitem(trainer.OPTIMIZERS, "adamw", recording)
    assert cli.main(["--mode", "synthetic", "--set", "data.num_facts=8", "--set", "train.epochs=1",
                     "--set", "train.progress=false", "--method", "lora", "--run-root", str(tmp_path)]) == 0
    assert seen and all(dtypes == {torch.float32} for dtypes in seen), seen


# -- the memories' addresses ---------------------------------------------------------------------


def test_memory_lookup_reads_the_same_slots_under_bf16_autocast():
    """Training (autocast bf16) and evaluation (no autocast) must address the same slots; before, the
    query and key products ran in bf16 in training and the top-k differed."""
    torch.manual_seed(0)
    mem = ProductKeyMemory(64, MemoryOptions(num_keys=128, top_k=32), num_banks=1, seed=3,
                           dtype=torch.float32, device=torch.device("cpu"))
    x = torch.randn(4, 16, 64)
    plain = mem.lookup(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = mem.lookup(x)
    assert torch.equal(plain[0], mixed[0])
    assert torch.equal(plain[1], mixed[1])


def test_casm_route_is_the_same_under_bf16_autocast(workload):
    """casm's router picks the banks a token reads: under autocast it must route as evaluation does."""
    cfg = _config("casm", None, "--set", "model.dtype=float32")
    _, method, model = build_model_and_method(cfg, workload)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained router, not the uniform one prepare starts from
        for p in method.router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    method.current = len(workload.stages)
    ids = torch.randint(4, 60, (8, 24), generator=gen)
    model.eval()
    routes = []
    for enabled in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            model(input_ids=ids)
        routes.append(method.routing._route.clone())
    assert torch.equal(routes[0], routes[1])


@pytest.mark.parametrize("name", ["smf", "casm"])
def test_memories_are_float_even_on_a_packed_4bit_layer(name, workload):
    """Under 4-bit the MLP's weights are packed uint8 bytes; a memory created in their dtype cannot even
    require grad. The memories are float32 whatever the layer holds."""
    from training.models import build_synthetic

    model, tok = build_synthetic(ModelConfig(), workload, seed=0)
    for layer in model.model.layers:
        w = layer.mlp.gate_proj.weight
        layer.mlp.gate_proj.weight = nn.Parameter(torch.zeros(w.numel() // 2, 1, dtype=torch.uint8),
                                                  requires_grad=False)
    if name == "smf":
        memories = attach_memories(model, METHODS[name].config_cls(), 1, 0, name)
    else:
        cfg = _config(name, None)
        ctx = SimpleNamespace(tokenizer=tok, device=torch.device("cpu"), seed=0, lr=1e-3,
                              period_names=workload.period_names)
        method = METHODS[name](cfg.method.options, ctx)
        method.prepare(model)
        memories = method.memories
    for mem in memories.values():
        assert {p.dtype for p in mem.parameters()} == {torch.float32}


# -- 4-bit refusals, per configuration --------------------------------------------------------------

QUANT = [(n, on) for n, m in METHODS.items() for on in (["lora", "full"] if issubclass(m.config_cls, AdaptedOptions)
                                                          else [None])]


@pytest.mark.parametrize(("name", "on"), QUANT, ids=[f"{n}-{o or 'own'}" for n, o in QUANT])
def test_4bit_is_refused_exactly_when_the_configuration_trains_the_backbone(name, on):
    """Decided at config time (no CUDA needed): full_ft and every `on: full` train packed NF4 weights."""
    sets = ["--set", f"method.{name}.on={on}"] if on else []
    cfg = cli.parse_configs(["--mode", "synthetic", "--method", name, "--quantize", "4bit", *sets])[0]
    problems = capability_problems(cfg)
    trains_backbone = name == "full_ft" or on == "full"
    assert bool(problems) == trains_backbone, problems
    if problems:
        assert len(problems) == 1 and "\n" not in problems[0] and name in problems[0]
    cfg.model.quantize = "none"
    assert capability_problems(cfg) == []


def test_4bit_refusal_is_one_line_and_exit_2_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "check_model_source", lambda cfg, mode: None)  # as on a CUDA node
    code = cli.main(["--mode", "synthetic", "--set", "data.num_facts=8", "--method", "ewc", "--quantize", "4bit",
                     "--set", "method.ewc.on=full", "--run-root", str(tmp_path / "runs")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4bit" in err[0] and "on: full" in err[0]
    assert not (tmp_path / "runs").exists()


# -- FSDP2 mixed precision, device placement ------------------------------------------------------


def test_fsdp_shards_float32_weights_with_a_bf16_compute_and_fp32_reduce_policy(monkeypatch):
    from torch.distributed import fsdp

    from training.strategies import FSDP

    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: calls.append(kw))
    model = nn.Sequential(nn.Linear(2, 2))
    FSDP(World(), torch.device("cpu"), precision="bf16").prepare(model)
    policies = {c["mp_policy"] for c in calls}
    assert len(calls) >= 1 and len(policies) == 1
    policy = policies.pop()
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    calls.clear()
    FSDP(World(), torch.device("cpu"), precision="none").prepare(model)
    assert calls and all("mp_policy" not in c for c in calls)


def test_real_model_is_loaded_straight_onto_its_gpu(monkeypatch, tmp_path):
    """Each rank asks from_pretrained for its own device, so no full copy sits in host memory per rank."""
    seen = {}

    class Stub(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.generation_config = SimpleNamespace(pad_token_id=None)

        def to(self, *args, **kwargs):  # a CUDA move would fail here; it must be a no-op anyway
            seen["to"] = kwargs
            return self

    def from_pretrained(where, **kwargs):
        seen.update(kwargs)
        return Stub()

    monkeypatch.setattr(models, "resolve_device", lambda cfg: torch.device("cuda", 1))
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained",
                        lambda where, **kw: SimpleNamespace(pad_token_id=0, eos_token="</s>"))
    models.load_model(ModelConfig(name=str(tmp_path)), "real", None, 0)
    assert seen["device_map"] == {"": 1} and seen["dtype"] == torch.bfloat16


# -- resume in bf16 -------------------------------------------------------------------------------

TINY_BF16 = ["--mode", "synthetic", "--set", "data.num_facts=8", "--set", "train.epochs=2",
             "--set", "train.max_batch_size=4", "--set", "train.progress=false",
             "--set", "model.dtype=bfloat16", "--set", "train.mixed_precision=bf16"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full_ft", "smf"])
def test_bf16_signal_mid_period_then_resume_equals_uninterrupted(name, tmp_path: Path, monkeypatch):
    """The contract's resume test with the model in bf16 and autocast: the float32 master weights and
    moments, saved and restored, reproduce the uninterrupted run."""
    ref_root, root = tmp_path / "ref", tmp_path / "run"
    assert cli.main([*TINY_BF16, "--method", name, "--run-root", str(ref_root)]) == 0
    ref_dir = only_run_dir(ref_root)
    ref_steps = train_records(ref_dir)
    num_before = sum(1 for r in ref_steps if r["period"] < 2)
    restore_step = signal_after_steps(monkeypatch, num_before + 1)
    assert cli.main([*TINY_BF16, "--method", name, "--run-root", str(root)]) == 75
    restore_step()
    run_dir = only_run_dir(root)
    assert cli.main([*TINY_BF16, "--method", name, "--run-root", str(root)]) == 0
    assert comparable(read_results(run_dir)) == comparable(read_results(ref_dir))
    assert train_records(run_dir) == ref_steps
