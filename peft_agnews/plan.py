"""How much work a run does (optimizer steps, epochs, warmup, effective batch), when it evaluates and checkpoints,
its optimizer and its learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from peft_agnews.config import TrainConfig
from peft_agnews.errors import UsageError, first_line


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
    compiled: bool = False  # --torch_compile: graphs compile during the first steps, timed apart

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
            warmup_steps=warmup_steps(cfg, total),
            num_epochs=math.ceil(total / per_epoch),
            effective_batch=cfg.effective_batch(procs),
            per_device_batch=cfg.per_device_train_batch_size,
            accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=mixed_precision or accelerator.mixed_precision,
            num_threads=torch.get_num_threads(),
            test_examples=test_examples,
            compiled=cfg.torch_compile,
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
            + ("; torch.compile: the first steps compile (compile time reported apart in results.json)"
               if self.compiled else "")
        )

    def shape(self, cfg: TrainConfig) -> dict:
        """What a resumed run must share with the checkpointed one for the same batches in the same order."""
        return {
            "train_examples": self.train_examples, "num_processes": self.num_processes,
            "batches_per_process": self.batches_per_process, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "total_steps": self.total_steps, "seed": cfg.seed, "mixed_precision": self.mixed_precision,
        }


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """--warmup_steps when > 0 (a count, or a fraction of the steps below 1, as TrainingArguments.get_warmup_steps
    reads it), else --warmup_ratio of the steps."""
    if cfg.warmup_steps >= 1:
        return int(cfg.warmup_steps)
    return math.ceil((cfg.warmup_steps or cfg.warmup_ratio) * total_steps)


def evaluates_at(cfg: TrainConfig, plan: Plan, step: int) -> bool:
    """Whether --eval_strategy evaluates after optimizer step `step` (every strategy also after the last step)."""
    if step == plan.total_steps:
        return True
    if cfg.eval_strategy == "steps":
        return step % cfg.eval_steps == 0
    return cfg.eval_strategy == "epoch" and step % plan.steps_per_epoch == 0


def saves_at(cfg: TrainConfig, plan: Plan, step: int, improved: bool) -> bool:
    """Whether --save_strategy writes a checkpoint after step `step`; `improved`: this step's evaluation set a new
    best --metric_for_best_model."""
    if cfg.save_strategy == "steps":
        return bool(cfg.save_steps) and step % cfg.save_steps == 0
    if cfg.save_strategy == "epoch":
        return step % plan.steps_per_epoch == 0 or step == plan.total_steps
    return cfg.save_strategy == "best" and improved


def make_optimizer(cfg: TrainConfig, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the parameter groups with --adam_beta1/2 and --adam_epsilon; --optim adamw_torch_fused uses
    PyTorch's fused kernel, refused on a device that has none."""
    fused = {"fused": True} if cfg.optim == "adamw_torch_fused" else {}
    if fused:
        check_fused_adamw(device)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, **fused)


def check_fused_adamw(device: torch.device) -> None:
    """Raise a UsageError unless PyTorch has a fused AdamW step for `device` (one step on a one-element tensor
    there: PyTorch checks the device only when it steps)."""
    param = torch.zeros(1, device=device, requires_grad=True)
    param.grad = torch.zeros(1, device=device)
    try:
        torch.optim.AdamW([param], fused=True).step()
    except (RuntimeError, NotImplementedError) as err:
        raise UsageError(f"--optim adamw_torch_fused: PyTorch has no fused AdamW for device {device.type} "
                         f"({first_line(err)}); use --optim adamw_torch") from None


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
