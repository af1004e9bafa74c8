"""Checkpoint size and save time: our adapter-only checkpoint vs a plain `accelerator.save_state`, for roberta-base
with the reference LoRA recipe (random-init weights; the numbers depend only on the shapes).

    python benchmarks/checkpoint_size.py [--config /path/to/roberta-base/config.json] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForSequenceClassification, get_scheduler

from peft_agnews.checkpointing import Checkpointer, trainable_weights
from peft_agnews.config import TrainConfig
from peft_agnews.model import apply_lora, count_parameters, optimizer_param_groups

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "data" / "roberta-base-tokenizer" / "config.json"


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def timed_saves(save, repeats: int) -> tuple[float, int]:
    """(median seconds, bytes) over `repeats` saves into fresh folders."""
    times, size = [], 0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            written = save(Path(tmp))
            times.append(time.perf_counter() - started)
            size = folder_size(written)
    return statistics.median(times), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="a roberta-base config.json")
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()

    cfg = TrainConfig()  # the reference recipe
    base = AutoModelForSequenceClassification.from_config(
        AutoConfig.from_pretrained(opts.config, num_labels=len(cfg.resolved_label_names()))
    )
    model = apply_lora(base, cfg)
    trainable, total = count_parameters(model)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=10, num_training_steps=100)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # One real step so AdamW holds its moment estimates, as in any mid-run checkpoint.
    batch = {"input_ids": torch.randint(3, 1000, (4, 64)), "labels": torch.randint(0, 4, (4,))}
    accelerator.backward(model(**batch).loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()

    plain_s, plain_b = timed_saves(lambda d: Path(accelerator.save_state(str(d / "ckpt"))), opts.repeats)
    checkpointer = Checkpointer(accelerator, model, Path(tempfile.mkdtemp()), keep=0, run_shape={}, fresh=True)
    best = trainable_weights(accelerator.unwrap_model(model))

    def ours(d: Path) -> Path:
        checkpointer.folder = d
        return checkpointer.save(1, {"best_step": 1}, best)

    ours_s, ours_b = timed_saves(ours, opts.repeats)
    print(f"roberta-base + LoRA reference recipe: {trainable:,} trainable of {total:,} parameters")
    print(f"{'checkpoint':<34}{'size':>12}{'save time':>12}")
    print(f"{'plain accelerator.save_state':<34}{plain_b / 2**20:>9.1f} MiB{plain_s:>10.2f} s")
    print(f"{'peft_agnews Checkpointer':<34}{ours_b / 2**20:>9.1f} MiB{ours_s:>10.2f} s")
    print(f"ratio: {plain_b / ours_b:.0f}x smaller, {plain_s / ours_s:.1f}x faster")


if __name__ == "__main__":
    main()
