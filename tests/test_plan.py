"""plan: optimizer steps, epochs, warmup and effective batch for any process count and accumulation."""

from __future__ import annotations

from accelerate import Accelerator

from peft_agnews.config import TrainConfig
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
