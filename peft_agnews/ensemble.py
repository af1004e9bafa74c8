"""Score the probability-averaged ensemble of several adapters of one base on a labelled file.

    peft-agnews ensemble --adapter_dirs RUN1/adapter RUN2/adapter --test_file test.csv
    python -m peft_agnews.ensemble ...        accelerate launch peft_agnews/ensemble.py ...

Each member is the base + one adapter (LoRA weights, trained biases, its own head), loaded in turn: PEFT cannot
hold several adapters that train biases (the reference's `lora_bias: lora_only`) on one base, so members are
scored one after another and only one copy of the base is in memory at a time. Scoring is that of evaluate
(length-sorted batches, any number of processes, each row once); the accuracy is printed as one JSON line.
Multi-label members (one threshold, saved in their labels.json) average their sigmoid probabilities; the line then
also holds micro- and macro-F1, and the accuracy is subset accuracy.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from peft_agnews.artifacts import read_label_names, read_multi_label_threshold
from peft_agnews.cli import parse_args
from peft_agnews.config import LogLevel, option, shared_option_problems, training_option
from peft_agnews.console import log_level
from peft_agnews.data import read_labelled_file
from peft_agnews.labels import multi_hot
from peft_agnews.errors import UsageError, run_command
from peft_agnews.loading import ADAPTER_CONFIG, ModelArgs, load_classifier
from peft_agnews.metrics import multi_label_metrics
from peft_agnews.scoring import score_texts
from peft_agnews.model import read_head_choice
from peft_agnews.runtime import accelerator_session


@dataclass
class EnsembleArgs:
    adapter_dirs: list[str] | None = option(None, "Adapter folders to average (each a run's output_dir/adapter).")
    test_file: str | None = option(None, "Labelled file: canonical AG News CSV, or CSV/JSONL/Parquet with text,label.")
    per_device_eval_batch_size: int = training_option(
        "per_device_eval_batch_size", "Rows per batch per process.", aliases=["--batch_size"]
    )
    max_length: int = training_option("max_length", "Truncate inputs to this many tokens (use the training value).")
    num_threads: int = training_option("num_threads")
    label_separator: str = training_option("label_separator")
    log_level: LogLevel = training_option("log_level")

    def __post_init__(self) -> None:
        if not self.adapter_dirs or not self.test_file:
            raise UsageError("give the adapters with --adapter_dirs A B ... and the labelled file with --test_file")
        problems = shared_option_problems(self)
        if problems:
            raise UsageError(problems[0])

    def member(self, adapter_dir: str) -> ModelArgs:
        """The options evaluate would take to score one member."""
        return ModelArgs(adapter_dir=adapter_dir, per_device_eval_batch_size=self.per_device_eval_batch_size,
                         max_length=self.max_length, num_threads=self.num_threads, log_level=self.log_level)


def check_members(adapter_dirs: list[str]) -> tuple[str, list[str], str, float | None]:
    """(base model, label names, head, multi-label threshold or None) shared by every adapter; adapters of
    different bases, classes, heads or problem types cannot be averaged."""
    dirs = [Path(d) for d in adapter_dirs]
    for d in dirs:
        if not (d / ADAPTER_CONFIG).is_file():
            raise UsageError(f"{d} is not an adapter folder (no {ADAPTER_CONFIG}); pass the run's output_dir/adapter")
    bases = {json.loads((d / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] for d in dirs}
    labels = {tuple(read_label_names(d)) for d in dirs}
    heads = {read_head_choice(d) for d in dirs}
    thresholds = {read_multi_label_threshold(d) for d in dirs}
    for what, values in (("base model", bases), ("label names", labels), ("classifier head", heads),
                         ("multi-label threshold (None: single-label)", thresholds)):
        if len(values) > 1:
            raise UsageError(f"the adapters differ in {what} ({sorted(map(str, values))}); ensemble adapters of one base")
    return bases.pop(), list(labels.pop()), heads.pop(), thresholds.pop()


def ensemble_probabilities(args: EnsembleArgs, texts: list[str], accelerator: Accelerator) -> torch.Tensor:
    """Mean over the members of their class probabilities (softmax; multi-label: sigmoid), shape (texts, classes)
    in input order, on every process (members must share base, labels, head and problem type)."""
    multi_label = check_members(args.adapter_dirs)[3] is not None
    total = None
    for number, adapter_dir in enumerate(args.adapter_dirs, start=1):
        member = args.member(adapter_dir)
        logits, _ = score_texts(load_classifier(member), texts, None, accelerator, member,
                                progress=f"member {number}/{len(args.adapter_dirs)}")
        probs = logits.float().sigmoid() if multi_label else logits.softmax(-1)
        total = probs if total is None else total + probs
    return total / len(args.adapter_dirs)


def main(argv: Sequence[str] | None = None) -> dict:
    (args,) = parse_args((EnsembleArgs,), argv, description=__doc__.splitlines()[0])
    with log_level(args.log_level):
        return ensemble(args)


def ensemble(args: EnsembleArgs) -> dict:
    """Score the members' averaged probabilities on --test_file; the main process prints the result line."""
    _, label_names, _, threshold = check_members(args.adapter_dirs)
    separator = None if threshold is None else args.label_separator
    with accelerator_session(args.num_threads) as accelerator:
        with accelerator.main_process_first():  # the main process fills the datasets cache, the others read it
            data = read_labelled_file(args.test_file, label_names, separator)
        probs = ensemble_probabilities(args, list(data["text"]), accelerator)
        result = {"adapters": len(args.adapter_dirs), "examples": len(data)}
        if threshold is None:
            result["accuracy"] = (probs.argmax(-1) == torch.tensor(data["label"])).double().mean().item()
        else:  # the averaged probabilities as logits (sigmoid^-1): the metrics of evaluate
            truth = torch.tensor(multi_hot(list(data["label"]), len(label_names)))
            scores = multi_label_metrics(torch.logit(probs.double(), eps=1e-7), truth, threshold)
            result.update({key: scores[key] for key in ("accuracy", "f1_micro", "f1_macro")}, threshold=threshold)
        if accelerator.is_main_process:
            print(json.dumps(result))
        accelerator.wait_for_everyone()
    return result


def cli(argv: Sequence[str] | None = None) -> int:
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
