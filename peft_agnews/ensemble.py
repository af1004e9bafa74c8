"""Ensembling at prediction time: average the class probabilities of several adapters on one shared base.

    python -m peft_agnews.ensemble --adapter_dirs A B C --test_file test.csv

Each member is the base + one adapter (LoRA weights, trained biases, its own head), loaded in turn: PEFT cannot
hold several adapters that train biases (the reference's `lora_bias: lora_only`) on one base, so members are
scored one after another and only one copy of the base is in memory at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from peft_agnews.data import read_labelled_file
from peft_agnews.errors import UsageError
from peft_agnews.artifacts import read_label_names
from peft_agnews.loading import ModelArgs, load_classifier
from peft_agnews.model import read_head_choice


def check_members(adapter_dirs: list[str]) -> tuple[str, list[str], str]:
    """(base model, label names, head) shared by every adapter; adapters of different bases cannot be averaged."""
    dirs = [Path(d) for d in adapter_dirs]
    for d in dirs:
        if not (d / "adapter_config.json").is_file():
            raise UsageError(f"{d} is not an adapter folder (no adapter_config.json); pass the run's output_dir/adapter")
    bases = {json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"] for d in dirs}
    labels = {tuple(read_label_names(d)) for d in dirs}
    heads = {read_head_choice(d) for d in dirs}
    for what, values in (("base model", bases), ("label names", labels), ("classifier head", heads)):
        if len(values) > 1:
            raise UsageError(f"the adapters differ in {what} ({sorted(map(str, values))}); ensemble adapters of one base")
    return bases.pop(), list(labels.pop()), heads.pop()


@torch.inference_mode()
def predict_probabilities(model: torch.nn.Module, encoded: dict[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """Softmax probabilities, shape (examples, classes)."""
    return torch.cat([
        model(**{k: v[i : i + batch_size] for k, v in encoded.items()}).logits.float().softmax(-1)
        for i in range(0, len(encoded["input_ids"]), batch_size)
    ])


def ensemble_probabilities(adapter_dirs: list[str], encoded: dict[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """Mean over the adapters of their probabilities (members must share base, labels and head)."""
    check_members(adapter_dirs)
    # Each member with the loader evaluate/predict use (base, recorded head, adapter), one at a time.
    total = sum(predict_probabilities(load_classifier(ModelArgs(adapter_dir=d)).model, encoded, batch_size)
                for d in adapter_dirs)
    return total / len(adapter_dirs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Accuracy of the probability-averaged ensemble of adapters.")
    parser.add_argument("--adapter_dirs", nargs="+", required=True, help="Adapter folders (a run's output_dir/adapter).")
    parser.add_argument("--test_file", required=True, help="Labelled file (canonical AG News CSV, or text,label).")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        _, label_names, _ = check_members(args.adapter_dirs)
        data = read_labelled_file(args.test_file, label_names)
        tokenizer = AutoTokenizer.from_pretrained(args.adapter_dirs[0])
        encoded = dict(tokenizer(list(data["text"]), padding=True, truncation=True, max_length=args.max_length,
                                 return_tensors="pt"))
        encoded.pop("token_type_ids", None)
        probs = ensemble_probabilities(args.adapter_dirs, encoded, args.batch_size)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    accuracy = (probs.argmax(-1) == torch.tensor(data["label"])).double().mean().item()
    print(json.dumps({"adapters": len(args.adapter_dirs), "examples": len(data), "accuracy": accuracy}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
