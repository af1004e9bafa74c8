"""Pinned numbers (as torchtune's recipe tests do): a short run of the reference recipe on the tiny model must
reproduce stored losses and accuracies.

Equivalence tests compare two runs and cannot see a change that moves every run alike (a loss scaled differently,
a schedule off by one step, a different batch order or LoRA init); this one can. The run: the reference recipe
(`TrainConfig` defaults: LoRA r=8, alpha 16, dropout 0.2, lora_only bias on query+value, AdamW with weight decay
0.01, clipping 1.0, linear schedule with 10% warmup, gradient checkpointing, seed 37) sized by
`conftest.tiny_train_args` (micro-batch 16 x 2 accumulation, lr 5e-3, 12 steps) with the recipe's LoRA dropout,
forced to fp32 on CPU, dropout masks from the default `--dropout_generator pcg64` (refreshed when it became the
default: the masks' random stream changed, nothing else; and when evaluations stopped drawing from the generator
the masks come from: steps 7-12 moved, steps 1-6 and the step-6 evaluation did not).

Measured spread: 1 vs 2 threads and AVX-512 vs AVX2 kernels moved losses by at most 2e-7 relative, so the
tolerance (1e-5 relative) is tight. When a change moves these numbers on purpose, say why in the commit and
refresh them with `python tests/test_regression.py` (prints the values to paste below).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model, tiny_train_args

PINNED = {
    "train_loss": [
        1.3877549171447754, 1.3873486518859863, 1.37098228931427, 1.3114012479782104, 1.2666125297546387,
        1.1891131401062012, 1.1587506532669067, 1.0971004962921143, 1.0553103685379028, 1.049048662185669,
        1.001372218132019, 1.0091261863708496,
    ],
    "eval": [(6, 35 / 48, 1.1585615873336792), (12, 35 / 48, 0.9968855977058411)],  # (step, accuracy, loss)
    "best_step": 6,
    "test_accuracy": 86 / 120,
    "test_loss": 1.157622218132019,
    "trainable_params": 3364,
}
RTOL = 1e-5


def recipe_args(model_dir: Path, train_file: Path, test_file: Path, out: Path) -> list[str]:
    return tiny_train_args(model_dir, train_file, out, test_file=test_file, mixed_precision="no", logging_steps=1,
                           lora_dropout=0.2)


def observed(out: Path) -> dict:
    """The pinned quantities, read from a finished run's metrics.jsonl and results.json."""
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    return {
        "train_loss": [e["train/loss"] for e in events if "train/loss" in e],
        "eval": [(e["step"], e["eval/accuracy"], e["eval/loss"]) for e in events if "eval/accuracy" in e],
        **{key: results[key] for key in ("best_step", "test_accuracy", "test_loss", "trainable_params")},
    }


@pytest.fixture(scope="module")
def pinned_model_dir(tmp_path_factory) -> Path:
    """The conftest tiny model, built on one thread so its weights do not depend on the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_tiny_model(tmp_path_factory.mktemp("pinned-tiny-roberta"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_reference_recipe_reproduces_pinned_losses_and_accuracy(
    threads, pinned_model_dir, synthetic_train_csv, synthetic_test_csv, tmp_path
):
    from peft_agnews.train import cli

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert cli(recipe_args(pinned_model_dir, synthetic_train_csv, synthetic_test_csv, tmp_path)) == 0
    finally:
        torch.set_num_threads(before)
    got = observed(tmp_path)
    assert got["trainable_params"] == PINNED["trainable_params"]
    assert got["train_loss"] == pytest.approx(PINNED["train_loss"], rel=RTOL)
    assert [(step, acc) for step, acc, _ in got["eval"]] == [(step, acc) for step, acc, _ in PINNED["eval"]]
    assert [loss for *_, loss in got["eval"]] == pytest.approx([loss for *_, loss in PINNED["eval"]], rel=RTOL)
    assert got["best_step"] == PINNED["best_step"]
    assert got["test_accuracy"] == PINNED["test_accuracy"]
    assert got["test_loss"] == pytest.approx(PINNED["test_loss"], rel=RTOL)
    # The model card reports this run's numbers: the pinned best step and validation accuracy.
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert f"| validation (best step 6 of 12) | 48 | {35 / 48:.4f} |" in card
    assert f"| test (`{synthetic_test_csv}`) | 120 | {86 / 120:.4f} |" in card


if __name__ == "__main__":  # refresh PINNED: print the numbers this code produces now
    import tempfile

    from conftest import synthetic_rows, write_canonical_csv
    from peft_agnews.train import cli

    root = Path(tempfile.mkdtemp())
    torch.set_num_threads(1)
    model_dir = build_tiny_model(root / "tiny")
    train_file = write_canonical_csv(root / "train.csv", synthetic_rows(480, seed=1))  # = synthetic_train_csv
    test_file = write_canonical_csv(root / "test.csv", synthetic_rows(120, seed=2))  # = synthetic_test_csv
    assert cli(recipe_args(model_dir, train_file, test_file, root / "run")) == 0
    print(json.dumps(observed(root / "run"), indent=1), file=sys.stderr)
