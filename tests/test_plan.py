"""plan: optimizer steps, epochs, warmup and effective batch for any process count and accumulation; the schedules."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from conftest import tiny_lora_model
from peft_agnews.config import TrainConfig
from peft_agnews.model import optimizer_param_groups
from peft_agnews.plan import Plan


def test_plan_counts_optimizer_steps_for_any_process_count():
    class Fake:
        num_processes = 2
        mixed_precision = "no"

    cfg = TrainConfig(per_device_train_batch_size=32, gradient_accumulation_steps=4, num_train_epochs=6)
    plan = Plan.build(cfg, train_examples=108_000, eval_examples=12_000, accelerator=Fake())
    # 3375 batches of 32 -> 1688 per process -> 422 optimizer steps per epoch.
    assert (plan.batches_per_process, plan.steps_per_epoch, plan.total_steps) == (1688, 422, 2532)
    assert plan.warmup_steps == 254 and plan.effective_batch == 256
    single = Plan.build(cfg, 108_000, 12_000, Accelerator(cpu=True))
    assert (single.steps_per_epoch, single.total_steps, single.effective_batch) == (844, 5064, 128)


def test_the_plan_line_says_when_compile_time_is_reported_apart():
    cfg = TrainConfig(per_device_train_batch_size=32)
    eager = Plan.build(cfg, 1000, 100, Accelerator(cpu=True)).describe(10, 100)
    compiled = Plan.build(TrainConfig(per_device_train_batch_size=32, torch_compile=True), 1000, 100,
                          Accelerator(cpu=True)).describe(10, 100)
    assert "torch.compile" not in eager
    assert compiled.endswith("; torch.compile: the first steps compile (compile time reported apart in results.json)")


@pytest.mark.parametrize("schedule", ["cosine", "one_cycle"])
def test_schedules_warm_up_then_decay(tiny_model_dir, schedule):
    from peft_agnews.plan import Plan, make_scheduler

    model = tiny_lora_model(tiny_model_dir)
    cfg = TrainConfig(lr_scheduler_type=schedule, learning_rate=1e-3, head_learning_rate=2e-3, warmup_ratio=0.2)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, 0.0, cfg.head_learning_rate), lr=cfg.learning_rate)
    plan = Plan(10, 1, 1, 10, 10, 10, 2, 1, 1, 1, 1, "no")
    scheduler = make_scheduler(cfg, optimizer, plan)
    lrs = []
    for _ in range(plan.total_steps):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    adapter, head = [lr[0] for lr in lrs], [lr[-1] for lr in lrs]
    peak = max(range(10), key=adapter.__getitem__)
    assert peak == 2 and adapter[peak] == pytest.approx(1e-3) and head[peak] == pytest.approx(2e-3)
    assert adapter[0] < adapter[peak] and adapter[-1] < 0.2 * adapter[peak]
