"""Parallelism changes nothing: one global batch of 32 split as 1x32, 1x(8x4 accumulation) and 2 DDP ranks x 16
trains the same LoRA weights, on the same rows, with the same learning-rate sequence and evaluation accuracy."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import BatchSampler

from accelerate.data_loader import BatchSamplerShard
from conftest import accelerate_launch, tiny_train_args
from peft_agnews.batching import LengthGroupedSampler
from peft_agnews.config import TrainConfig
from peft_agnews.errors import UsageError
from peft_agnews.plan import Plan
from peft_agnews.train import cli

STEPS = 4
GLOBAL_BATCH = 32
# (micro-batch, accumulation, processes) splits of the same global batch of 32.
LAYOUTS = [(32, 1, 1), (8, 4, 1), (16, 1, 2), (4, 2, 4)]


def rows_per_step(lengths: list[int], micro: int, accumulation: int, processes: int) -> list[set[int]]:
    """The rows each optimizer step trains on, as Accelerate shards the loader: rank r gets batches r, r+P, ..."""
    sampler = LengthGroupedSampler(lengths, micro * accumulation * processes, seed=37)
    sampler.set_epoch(1)
    per_rank = [list(BatchSamplerShard(BatchSampler(sampler, micro, False), processes, r)) for r in range(processes)]
    steps = len(per_rank[0]) // accumulation
    return [
        {i for rank in per_rank for batch in rank[k * accumulation : (k + 1) * accumulation] for i in batch}
        for k in range(steps)
    ]


def test_every_split_of_the_global_batch_trains_on_the_same_rows_per_step():
    lengths = [int(x) for x in torch.randint(5, 120, (1024,), generator=torch.Generator().manual_seed(0))]
    reference = rows_per_step(lengths, *LAYOUTS[0])
    assert len(reference) == 1024 // GLOBAL_BATCH and all(len(s) == GLOBAL_BATCH for s in reference)
    for layout in LAYOUTS[1:]:
        assert rows_per_step(lengths, *layout) == reference, layout
    # The check is not vacuous: another global batch gives other steps.
    assert rows_per_step(lengths, 16, 1, 1)[:2] != reference[:2]


@pytest.mark.parametrize(
    "global_batch, processes, cap, expected",
    [(128, 1, 32, (32, 4)), (128, 2, 32, (32, 2)), (128, 8, 32, (16, 1)), (32, 2, 32, (16, 1)), (32, 1, 8, (8, 4)),
     (96, 4, 16, (12, 2)), (30, 1, 16, (15, 2))],
)
def test_global_batch_is_split_into_micro_batch_and_accumulation(global_batch, processes, cap, expected):
    cfg = TrainConfig(global_batch_size=global_batch, per_device_train_batch_size=cap).for_processes(processes)
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == expected
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * processes == global_batch


def test_global_batch_that_does_not_split_over_the_processes_is_refused():
    with pytest.raises(UsageError, match="cannot be split over 4 processes; choose a multiple of 4"):
        TrainConfig(global_batch_size=30).for_processes(4)
    assert TrainConfig(per_device_train_batch_size=16).for_processes(4).gradient_accumulation_steps == 4


@pytest.mark.parametrize("examples", [432, 108_000, 1001])
def test_optimizer_steps_and_warmup_do_not_depend_on_the_process_count(examples):
    plans = []
    for processes in (1, 2, 4, 8):
        cfg = TrainConfig(global_batch_size=128, per_device_train_batch_size=32, num_train_epochs=3)
        accelerator = SimpleNamespace(num_processes=processes, mixed_precision="no")
        plan = Plan.build(cfg.for_processes(processes), examples, 100, accelerator)
        assert plan.effective_batch == 128
        plans.append((plan.steps_per_epoch, plan.total_steps, plan.warmup_steps, plan.num_epochs))
    assert len(set(plans)) == 1 and plans[0][0] == -(-examples // 128)


@pytest.fixture(scope="module")
def layouts(no_dropout_model_dir, synthetic_train_csv, tmp_path_factory):
    """Three runs of the same recipe (fp32, dropout off, 4 optimizer steps of 32 rows): output folders by name."""
    common = dict(max_train_steps=STEPS, eval_steps=STEPS, logging_steps=1, save_steps=0, mixed_precision="no",
                  lora_dropout=0.0)
    runs = {}
    for name, micro, accumulation in (("1x32", 32, 1), ("1x8x4", 8, 4)):
        out = tmp_path_factory.mktemp(name)
        argv = tiny_train_args(no_dropout_model_dir, synthetic_train_csv, out, per_device_train_batch_size=micro,
                               gradient_accumulation_steps=accumulation, **common)
        assert cli(argv) == 0
        runs[name] = out
    # Two gloo ranks; the micro-batch (16) and accumulation (1) are derived from --global_batch_size.
    out = tmp_path_factory.mktemp("2x16")
    proc = accelerate_launch("cpu_ddp.yaml", tiny_train_args(
        no_dropout_model_dir, synthetic_train_csv, out, global_batch_size=GLOBAL_BATCH, per_device_train_batch_size=32,
        **common))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "effective batch 32 (= 16 per device x 1 accumulation x 2 process(es))" in proc.stdout + proc.stderr
    runs["2x16"] = out
    return runs


def events(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


@pytest.mark.slow
def test_layouts_end_with_the_same_lora_weights(layouts, no_dropout_model_dir):
    reference = load_file(layouts["1x32"] / "adapter" / "adapter_model.safetensors")
    lora_b = [name for name in reference if "lora_B" in name]
    assert lora_b and all(reference[n].abs().max() > 1e-3 for n in lora_b), "LoRA B must have moved from zero"
    for name in ("1x8x4", "2x16"):
        weights = load_file(layouts[name] / "adapter" / "adapter_model.safetensors")
        assert weights.keys() == reference.keys()
        worst = max((relative_error(weights[k], reference[k]), k) for k in reference)
        print(f"{name}: worst relative difference {worst[0]:.2e} ({worst[1]})")
        assert worst[0] < 1e-5, f"{name}: {worst[1]} differs by {worst[0]:.2e} (relative)"


@pytest.mark.slow
def test_layouts_have_the_same_lr_schedule_loss_and_eval_accuracy(layouts):
    reference = events(layouts["1x32"])
    lrs = [e["train/lr"] for e in reference if "train/lr" in e]
    assert len(lrs) == STEPS and len(set(lrs)) > 1
    ref_eval = [e for e in reference if "eval/accuracy" in e]
    ref_loss = [e["train/loss"] for e in reference if "train/loss" in e]
    for name in ("1x8x4", "2x16"):
        logged = events(layouts[name])
        assert [e["train/lr"] for e in logged if "train/lr" in e] == lrs, name
        assert [e["train/loss"] for e in logged if "train/loss" in e] == pytest.approx(ref_loss, rel=1e-5), name
        evals = [e for e in logged if "eval/accuracy" in e]
        assert [e["step"] for e in evals] == [e["step"] for e in ref_eval] == [STEPS]
        assert evals[0]["eval/accuracy"] == ref_eval[0]["eval/accuracy"], name
        assert evals[0]["eval/loss"] == pytest.approx(ref_eval[0]["eval/loss"], rel=1e-5), name
        results = json.loads((layouts[name] / "results.json").read_text())
        assert results["global_step"] == STEPS
