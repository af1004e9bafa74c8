"""How much work a run does (optimizer steps, epochs, warmup, effective batch) and its learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from peft_agnews.config import TrainConfig


@dataclass
class Plan:
    """How much work the run will do, derived from the data size, process count and accumulation."""

    train_examples: int
    eval_examples: int
    num_processes: int
    batches_per_process: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    num_epochs: int
    effective_batch: int
    per_device_batch: int
    accumulation_steps: int
    mixed_precision: str
    num_threads: int = 1
    test_examples: int = 0

    @classmethod
    def build(
        cls, cfg: TrainConfig, train_examples: int, eval_examples: int, accelerator: Accelerator,
        mixed_precision: str | None = None, test_examples: int = 0,
    ) -> Plan:
        """`mixed_precision`: what the run computes in, when not the Accelerator's autocast (a half-precision base)."""
        procs = accelerator.num_processes
        # Accelerate gives every process the same number of batches (the last ones padded by repetition).
        batches = math.ceil(math.ceil(train_examples / cfg.per_device_train_batch_size) / procs)
        per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
        total = cfg.max_train_steps or math.ceil(cfg.num_train_epochs * per_epoch)
        return cls(
            train_examples=train_examples,
            eval_examples=eval_examples,
            num_processes=procs,
            batches_per_process=batches,
            steps_per_epoch=per_epoch,
            total_steps=total,
            warmup_steps=math.ceil(cfg.warmup_ratio * total),
            num_epochs=math.ceil(total / per_epoch),
            effective_batch=cfg.effective_batch(procs),
            per_device_batch=cfg.per_device_train_batch_size,
            accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=mixed_precision or accelerator.mixed_precision,
            num_threads=torch.get_num_threads(),
            test_examples=test_examples,
        )

    def describe(self, trainable: int, total_params: int) -> str:
        return (
            f"trainable parameters: {trainable:,} of {total_params:,} ({100 * trainable / total_params:.2f}%)\n"
            f"plan: {self.train_examples:,} train / {self.eval_examples:,} validation"
            + (f" / {self.test_examples:,} test" if self.test_examples else "") + " examples; "
            f"{self.num_processes} process(es), effective batch {self.effective_batch} "
            f"(= {self.per_device_batch} per device x {self.accumulation_steps} accumulation x "
            f"{self.num_processes} process(es)); "
            f"{self.total_steps} optimizer steps ({self.steps_per_epoch}/epoch, {self.num_epochs} epoch(s)), "
            f"{self.warmup_steps} warmup; precision {self.mixed_precision}; {self.num_threads} CPU thread(s) per process"
        )

    def shape(self, cfg: TrainConfig) -> dict:
        """What a resumed run must share with the checkpointed one for the same batches in the same order."""
        return {
            "train_examples": self.train_examples, "num_processes": self.num_processes,
            "batches_per_process": self.batches_per_process, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "total_steps": self.total_steps, "seed": cfg.seed, "mixed_precision": self.mixed_precision,
        }


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, plan: Plan):
    """The learning-rate schedule over `plan.total_steps` optimizer steps, per parameter group."""
    if cfg.lr_scheduler_type == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=plan.total_steps,
            # OneCycleLR peaks at step pct_start * total - 1: peak where a linear warmup would (at least step 1).
            pct_start=min(max(plan.warmup_steps + 1, 2) / plan.total_steps, 0.99),
        )
    return get_scheduler(
        cfg.lr_scheduler_type, optimizer, num_warmup_steps=plan.warmup_steps, num_training_steps=plan.total_steps
    )
