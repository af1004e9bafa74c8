"""Model cards (README.md) for a trained adapter and a merged export, and the end-of-training report.

The card says what the model is (base, classes), how it was made (recipe, trainable parameters, data), how well it
does and on which split, what it is for, and how to load it. The YAML header is the Hub's model-card metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCardData

from peft_agnews.config import TrainConfig
from peft_agnews.files import atomic_write
from peft_agnews.heads import HEADS, ours

CARD_FILE = "README.md"


def _header(base_model: str, library: str, label_names: list[str]) -> str:
    data = ModelCardData(
        base_model=base_model,
        library_name=library,
        pipeline_tag="text-classification",
        tags=["text-classification", "lora", "peft-agnews"],
        metrics=["accuracy", "f1"],
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _metrics_table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| split | examples | accuracy | macro-F1 | loss |", "|---|---|---|---|---|"]
    for split, m in rows:
        lines.append(f"| {split} | {m['num_examples']} | {m['accuracy']:.4f} | {m['f1_macro']:.4f} | {m['loss']:.4f} |")
    return "\n".join(lines)


def _per_class_table(report: dict) -> str:
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, s in report["per_class"].items():
        lines.append(f"| {name} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | {s['support']} |")
    return "\n".join(lines)


def _intended_use(label_names: list[str], max_length: int) -> str:
    return (
        "## Intended use and limitations\n\n"
        f"Topic classification of short English news text (headline + description) into {len(label_names)} "
        f"classes: {', '.join(label_names)}. Every input gets one of these classes, also text that fits none; "
        f"inputs are truncated to {max_length} tokens. Accuracy is measured on the splits above only; expect lower "
        "scores on other sources, periods or styles of text. Not for decisions about people."
    )


def adapter_card(cfg: TrainConfig, results: dict, validation: dict, lora_rank: int) -> str:
    """The README.md written into <output_dir>/adapter at the end of training. `lora_rank` is the rank the run
    used (the one chosen when `--lora_r auto`)."""
    names = cfg.resolved_label_names()
    trainable, total = results["trainable_params"], results["total_params"]
    data = f"`{cfg.train_file}`" if cfg.train_file else f"the Hub dataset `{cfg.dataset_name}` (train split)"
    held_out = validation["source"]  # where the validation rows came from (data.load_splits_and_validation_source)
    rows = [(f"validation (best step {results['best_step']} of {results['global_step']})", validation)]
    if "test_accuracy" in results:
        test = {key: results[f"test_{key}"] for key in ("accuracy", "f1_macro", "loss")}
        source = f"`{cfg.test_file}`" if cfg.test_file else f"the `{cfg.dataset_name}` test split"
        rows.append((f"test ({source})", {**test, "num_examples": results["test_examples"]}))
    effective = cfg.effective_batch(results["num_processes"])
    head = HEADS[cfg.classifier_head].card
    rank_note = " (auto: the largest that fits the budget)" if cfg.lora_r == "auto" else ""
    if cfg.lora_rank_pattern:
        rank_note += f" (per module: {', '.join(cfg.lora_rank_pattern)})"
    excluded = f" except {', '.join(f'`{m}`' for m in cfg.lora_exclude_modules)}" if cfg.lora_exclude_modules else ""
    return f"""{_header(cfg.model_name_or_path, "peft", names)}
# LoRA text classifier on {cfg.model_name_or_path}

A LoRA adapter (with its classification head) for `{cfg.model_name_or_path}` that sorts text into
{len(names)} classes: {", ".join(f"{i} = {n}" for i, n in enumerate(names))}. Made with peft-agnews.

## Results

{_metrics_table(rows)}

Per class on the validation split (the adapter saved is the one with the best validation accuracy):

{_per_class_table(validation)}

## Training recipe

- Base model: `{cfg.model_name_or_path}`; LoRA r={lora_rank}{rank_note}, alpha={cfg.lora_alpha}, dropout={cfg.lora_dropout},
  bias=`{cfg.lora_bias}`, on {", ".join(f"`{m}`" for m in cfg.lora_target_modules)}{excluded}; {head} trained.
- Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%).
- AdamW, learning rate {cfg.learning_rate}, weight decay {cfg.weight_decay}, gradient clipping {cfg.max_grad_norm};
  {cfg.lr_scheduler_type} schedule with {cfg.warmup_ratio:.0%} warmup.
- Batch {cfg.per_device_train_batch_size} per process x {cfg.gradient_accumulation_steps} accumulation x
  {results["num_processes"]} process(es) = {effective}; {results["global_step"]} optimizer steps;
  precision `{results["mixed_precision"]}`; max length {cfg.max_length} tokens; seed {cfg.seed}.

## Data

- Training: {data}.
- Validation: {held_out}.{f"{chr(10)}- Test: `{cfg.test_file}`." if cfg.test_file else ""}

{_intended_use(names, cfg.max_length)}

## How to use

{_how_to_use(cfg.model_name_or_path, names, cfg.classifier_head)}
"""


def _how_to_use(base_model: str, names: list[str], head: str) -> str:
    commands = """```bash
peft-agnews predict --adapter_dir <this folder> --input_file texts.csv --output_file predictions.csv
peft-agnews evaluate --adapter_dir <this folder> --test_file labelled.csv
""" + ("" if ours(head) else "peft-agnews export --adapter_dir <this folder> --merge --output_dir merged   # standalone model\n") + "```"
    labels = f"""labels = {names!r}
id2label, label2id = dict(enumerate(labels)), {{name: i for i, name in enumerate(labels)}}"""
    base = f"""base = AutoModelForSequenceClassification.from_pretrained(
    "{base_model}", num_labels={len(names)}, id2label=id2label, label2id=label2id)"""
    if ours(head):
        return f"""{commands}

Trained with the research head `--classifier_head {head}` (`head.json`): plain PEFT cannot load this adapter; build
the head with peft-agnews first.

```python
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from peft_agnews import replace_head
{labels}
{base}
replace_head(base, "{head}")
model = PeftModel.from_pretrained(base, "<this folder>").eval()
tokenizer = AutoTokenizer.from_pretrained("<this folder>")
```"""
    return f"""{commands}

```python
from peft import AutoPeftModelForSequenceClassification, PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
{labels}
# One line, with the base named in adapter_config.json:
model = AutoPeftModelForSequenceClassification.from_pretrained(
    "<this folder>", num_labels={len(names)}, id2label=id2label, label2id=label2id).eval()
# Or with the base from anywhere:
{base}
model = PeftModel.from_pretrained(base, "<this folder>").eval()
tokenizer = AutoTokenizer.from_pretrained("<this folder>")
```"""


def merged_card(base_model: str, adapter_dir: Path, label_names: list[str], max_length: int) -> str:
    """The README.md of a merged export (LoRA folded into the base weights)."""
    source = adapter_dir / CARD_FILE
    origin = f"Training details and scores: see the adapter's card (`{source}`)." if source.is_file() else ""
    return f"""{_header(base_model, "transformers", label_names)}
# Merged LoRA text classifier on {base_model}

`{base_model}` with the LoRA adapter `{adapter_dir}` merged into its weights (`merge_and_unload`): a plain
Transformers model, no PEFT needed. Classes: {", ".join(f"{i} = {n}" for i, n in enumerate(label_names))}.
{origin}

{_intended_use(label_names, max_length)}

## How to use

```python
from transformers import pipeline
classify = pipeline("text-classification", model="<this folder>")
classify("Stocks rallied after the earnings report")  # [{{'label': '...', 'score': ...}}]
```
"""


def write_card(folder: Path, text: str) -> None:
    """Write README.md via a temporary file and a rename."""
    with atomic_write(folder / CARD_FILE) as handle:
        handle.write(text)


def write_adapter_card(adapter_dir: Path, cfg: TrainConfig, results: dict, validation: dict) -> None:
    """The saved adapter's model card (README.md), with the rank it was trained with (cfg.lora_r may be 'auto':
    the adapter's own config holds the rank chosen)."""
    rank = json.loads((adapter_dir / "adapter_config.json").read_text())["r"]
    write_card(adapter_dir, adapter_card(cfg, results, validation, rank))
