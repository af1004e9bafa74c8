"""The adapter's model card (`model_card.py`): its numbers are the run's, and its loading snippet runs as written."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import LABELS, toy_batch

BATCH = toy_batch()


def test_model_card_loading_snippet_runs_as_written_for_a_custom_head(mean_head_adapters):
    """The card's Python snippet, pasted with the folder filled in, builds the head and loads the adapter."""
    from peft_agnews.loading import ModelArgs, load_classifier

    card = (mean_head_adapters[0] / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0].replace("<this folder>", str(mean_head_adapters[0]))
    assert 'replace_head(base, "mean")' in snippet
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102 (our own generated card)
    inputs = {k: v for k, v in BATCH.items() if k != "labels"}
    with torch.inference_mode():
        torch.testing.assert_close(namespace["model"](**inputs).logits,
                                   load_classifier(ModelArgs(adapter_dir=str(mean_head_adapters[0]))).model(**inputs).logits)


@pytest.mark.parametrize("recipe", ["reference.yaml", "proxy-minilm.yaml"])
def test_the_model_cards_loading_snippet_runs_as_written_and_names_the_labels(recipe, recipe_runs):
    import subprocess
    import sys

    adapter = recipe_runs(recipe) / "adapter"
    card = (adapter / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0].replace("<this folder>", str(adapter))
    assert "AutoPeftModelForSequenceClassification" in snippet and "label2id=label2id" in snippet
    check = "\nimport sys\nassert 'peft_agnews' not in sys.modules\nprint(model.config.id2label, tokenizer('x').input_ids)\n"
    done = subprocess.run([sys.executable, "-c", snippet + check], capture_output=True, text=True, timeout=300,
                          cwd=adapter)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "{0: 'World', 1: 'Sports', 2: 'Business', 3: 'Sci/Tech'}" in done.stdout


def test_training_writes_a_model_card(trained_adapter_run):
    card = (trained_adapter_run / "adapter" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    results = json.loads((trained_adapter_run / "results.json").read_text())
    validation = json.loads((trained_adapter_run / "eval_validation.json").read_text())
    assert header["library_name"] == "peft" and "base_model" not in header  # a local base is not a Hub id
    assert f"Trainable parameters: 3,364 of {results['total_params']:,}" in card  # LoRA r=8 on the tiny model
    assert "LoRA r=8, alpha=16" in card and "`query`" in card and "`value`" in card
    assert f"validation (best step {results['best_step']} of 8)" in card
    assert f"| {validation['num_examples']} | {results['best_eval_accuracy']:.4f} |" in card
    assert "train.csv" in card  # the data it was trained on
    for section in ("## Results", "## Training recipe", "## Data", "## Intended use and limitations", "## How to use"):
        assert section in card
    assert validation["accuracy"] == pytest.approx(results["best_eval_accuracy"])  # the card's numbers are the run's


def test_card_reports_each_split_it_was_measured_on():
    from peft_agnews.config import TrainConfig
    from peft_agnews.model_card import adapter_card

    cfg = TrainConfig(model_name_or_path="roberta-base", train_file="train.csv", test_file="test.csv")
    results = {"trainable_params": 907_012, "total_params": 125_555_720, "best_step": 400, "global_step": 600,
               "num_processes": 2, "mixed_precision": "fp16", "test_accuracy": 0.9, "test_f1_macro": 0.89,
               "test_loss": 0.3, "test_examples": 7600}
    validation = {"accuracy": 0.91, "f1_macro": 0.905, "loss": 0.28, "num_examples": 1043,
                  "per_class": {n: {"precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 260} for n in LABELS},
                  "source": "the `validation` split of `my/dataset`"}
    card = adapter_card(cfg, results, validation, lora_rank=8)
    assert "- Validation: the `validation` split of `my/dataset`." in card and "stratified" not in card
    assert "| validation (best step 400 of 600) | 1043 | 0.9100 | 0.9050 | 0.2800 |" in card
    assert "| test (`test.csv`) | 7600 | 0.9000 | 0.8900 | 0.3000 |" in card
    assert "Trainable parameters: 907,012 of 125,555,720 (0.72%)" in card
    assert "x 2 process(es) = 256" in card.replace("\n  ", " ")


def test_card_names_the_rank_that_auto_chose_and_the_head():
    from peft_agnews.config import TrainConfig
    from peft_agnews.model_card import adapter_card

    cfg = TrainConfig(model_name_or_path="roberta-base", train_file="train.csv", lora_r="auto", classifier_head="mean")
    results = {"trainable_params": 915_460, "total_params": 125_555_720, "best_step": 4, "global_step": 8,
               "num_processes": 1, "mixed_precision": "no"}
    validation = {"accuracy": 0.5, "f1_macro": 0.5, "loss": 1.0, "num_examples": 8,
                  "per_class": {n: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2} for n in LABELS},
                  "source": "a stratified 10% split of the training data (seed 37)"}
    card = adapter_card(cfg, results, validation, lora_rank=5)
    assert "LoRA r=5 (auto: the largest that fits the budget), alpha=16" in card and "r=auto" not in card
    assert "a `mean` pooling head (one Linear) trained" in card
    assert 'replace_head(base, "mean")' in card  # the loading snippet builds the head before PeftModel loads
