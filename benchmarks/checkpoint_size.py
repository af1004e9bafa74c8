"""Checkpoint size and save time: our adapter checkpoint vs a plain `accelerator.save_state`, for roberta-base
with the reference LoRA recipe (random-init weights; the numbers depend only on the shapes). Ours is measured when
the step is the best so far (no best.safetensors), when an earlier step was (best.safetensors written), and as the
next checkpoint of a run, whose unchanged files (tokenizer, labels) are hard links to the previous one's.

    python benchmarks/checkpoint_size.py [--config /path/to/roberta-base/config.json] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

from peft_agnews.artifacts import write_adapter_companions
from peft_agnews.checkpointing import Checkpointer, adapter_weights
from peft_agnews.config import TrainConfig
from peft_agnews.model import apply_lora, count_parameters, optimizer_param_groups

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "data" / "roberta-base-tokenizer" / "config.json"


def folder_size(path: Path, shared: set[int] = frozenset()) -> int:
    """Bytes of the files under `path`, leaving out those whose inode is in `shared` (hard links to files counted
    elsewhere)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.stat().st_ino not in shared)


def inodes(path: Path) -> set[int]:
    return {f.stat().st_ino for f in path.rglob("*") if f.is_file()}


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
    tokenizer = AutoTokenizer.from_pretrained(Path(opts.config).parent)
    companions = partial(write_adapter_companions, tokenizer=tokenizer, label_names=cfg.resolved_label_names())
    checkpointer = Checkpointer(accelerator, model, Path(tempfile.mkdtemp()), keep=0, run_shape={}, fresh=True,
                                companions=companions)
    best = adapter_weights(accelerator.unwrap_model(model))

    def ours(best_step: int) -> Callable[[Path], Path]:
        def save(d: Path) -> Path:
            checkpointer.folder, checkpointer.last_saved = d, None
            return checkpointer.save(2, {"best_step": best_step}, best)
        return save

    rows = [("plain accelerator.save_state", plain_b, plain_b, plain_s)]
    for label, best_step in (("ours, best at this step", 2), ("ours, best at an earlier step", 1)):
        seconds, size = timed_saves(ours(best_step), opts.repeats)
        rows.append((label, size, size, seconds))
    with tempfile.TemporaryDirectory() as tmp:  # the next checkpoint of a run: unchanged files are links
        checkpointer.folder, checkpointer.last_saved = Path(tmp), None
        first = checkpointer.save(1, {"best_step": 1}, best)
        started = time.perf_counter()
        second = checkpointer.save(2, {"best_step": 1}, best)
        seconds = time.perf_counter() - started
        rows.append(("ours, next checkpoint of the run", folder_size(second), folder_size(second, inodes(first)), seconds))
    print(f"roberta-base + LoRA reference recipe: {trainable:,} trainable of {total:,} parameters")
    print(f"{'checkpoint':<36}{'files':>12}{'new on disk':>14}{'save time':>12}")
    for label, size, new, seconds in rows:
        print(f"{label:<36}{size / 2**20:>8.1f} MiB{new / 2**20:>10.1f} MiB{seconds:>10.2f} s")


if __name__ == "__main__":
    main()
