"""Model cards (README.md) for a trained adapter and a merged export, and the end-of-training report.

The card says what the model is (base, classes), how it was made (recipe, trainable parameters, data), how well it
does and on which split, what it is for, and how to load it. The YAML header is the Hub's model-card metadata
(huggingface_hub's `ModelCardData`): the base model's Hub id (never a local path), the dataset, the license, the
tags PEFT's own card gives an adapter, and `model-index` with the validation and test results.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from peft_agnews.config import TrainConfig
from peft_agnews.files import atomic_write
from peft_agnews.heads import HEADS, ours
from peft_agnews.hub import base_license, hub_id

CARD_FILE = "README.md"
TAGS = ["text-classification", "lora", "peft-agnews"]
# PEFT tags an adapter `base_model:adapter:<base>`; a local base folder must not appear there either.
ADAPTER_TAG = "base_model:adapter:"


def _header(data: ModelCardData) -> str:
    return f"---\n{data.to_yaml()}\n---\n"


def merged_card_data(base_model: str) -> ModelCardData:
    """A merged model's metadata: a Transformers text classifier on the base (named only by a Hub id)."""
    return ModelCardData(base_model=hub_id(base_model), library_name="transformers", pipeline_tag="text-classification",
                         tags=TAGS, metrics=["accuracy", "f1"])


def _data_source(cfg: TrainConfig, file: str | None) -> tuple[str, str | None]:
    """(dataset id or file name for model-index, the Hub dataset id or None) of the data a split came from."""
    if file:
        return Path(file).name, None
    hub = cfg.dataset_name if cfg.dataset_name and not Path(cfg.dataset_name).expanduser().exists() else None
    return (hub or Path(str(cfg.dataset_name)).name), hub


def adapter_card_data(cfg: TrainConfig, results: dict, validation: dict, peft_tags: list[str] = (),
                      license: str | None = None) -> ModelCardData:
    """The adapter card's metadata: PEFT's tags (from the card its save_pretrained wrote) merged with ours,
    `base_model` the Hub id, the Hub dataset trained on, `license`, and model-index with every split's results."""
    base = hub_id(cfg.model_name_or_path)
    tags = [t for t in peft_tags if not t.startswith(ADAPTER_TAG)] + ([ADAPTER_TAG + base] if base else []) + TAGS
    train_name, train_hub = _data_source(cfg, cfg.train_file)
    splits = [("validation", *_data_source(cfg, cfg.validation_file or cfg.train_file),
               {k: validation[k] for k in ("accuracy", "f1_macro", "loss")})]
    if "test_accuracy" in results:
        splits.append(("test", *_data_source(cfg, cfg.test_file), {k: results[f"test_{k}"] for k in ("accuracy", "f1_macro", "loss")}))
    metrics = {"accuracy": ("accuracy", "Accuracy"), "f1_macro": ("f1", "Macro F1"), "loss": ("loss", "Cross-entropy loss")}
    eval_results = [
        EvalResult(task_type="text-classification", task_name="Text Classification", dataset_type=name,
                   dataset_name=name, dataset_config=cfg.dataset_config_name if hub else None, dataset_split=split,
                   metric_type=metrics[key][0], metric_name=f"{split.capitalize()} {metrics[key][1].lower()}",
                   metric_value=round(float(value), 6), **({"metric_config": "macro"} if key == "f1_macro" else {}))
        for split, name, hub, values in splits for key, value in values.items()
    ]
    return ModelCardData(
        base_model=base, library_name="peft", pipeline_tag="text-classification", license=license,
        datasets=[train_hub] if train_hub else None, tags=list(dict.fromkeys(tags)), metrics=["accuracy", "f1"],
        model_name=cfg.hub_model_id or Path(cfg.output_dir).name, eval_results=eval_results,
    )


def _metrics_table(rows: list[tuple[str, dict]], multi_label: bool = False) -> str:
    if multi_label:  # accuracy: every class of the row right (subset accuracy)
        lines = ["| split | examples | micro-F1 | macro-F1 | subset accuracy | loss |", "|---|---|---|---|---|---|"]
        lines += [f"| {split} | {m['num_examples']} | {m['f1_micro']:.4f} | {m['f1_macro']:.4f} | {m['accuracy']:.4f} "
                  f"| {m['loss']:.4f} |" for split, m in rows]
        return "\n".join(lines)
    lines = ["| split | examples | accuracy | macro-F1 | loss |", "|---|---|---|---|---|"]
    for split, m in rows:
        lines.append(f"| {split} | {m['num_examples']} | {m['accuracy']:.4f} | {m['f1_macro']:.4f} | {m['loss']:.4f} |")
    return "\n".join(lines)


def _per_class_table(report: dict) -> str:
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, s in report["per_class"].items():
        lines.append(f"| {name} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | {s['support']} |")
    return "\n".join(lines)


def _intended_use(label_names: list[str], max_length: int, multi_label_threshold: float | None = None) -> str:
    decision = "Every input gets one of these classes, also text that fits none" if multi_label_threshold is None else (
        f"Every input gets each class whose sigmoid probability is at least {multi_label_threshold}: several, or none")
    return (
        "## Intended use and limitations\n\n"
        f"Topic classification of short English news text (headline + description) into {len(label_names)} "
        f"classes: {', '.join(label_names)}. {decision}; "
        f"inputs are truncated to {max_length} tokens. Accuracy is measured on the splits above only; expect lower "
        "scores on other sources, periods or styles of text. Not for decisions about people."
    )


def adapter_card(cfg: TrainConfig, results: dict, validation: dict, lora_rank: int,
                 metadata: ModelCardData | None = None) -> str:
    """The README.md written into <output_dir>/adapter at the end of training. `lora_rank` is the rank the run
    used (the one chosen when `--lora_r auto`); `metadata` the header (default: `adapter_card_data`'s without PEFT's
    tags or a license)."""
    names = cfg.resolved_label_names()
    trainable, total = results["trainable_params"], results["total_params"]
    data = f"`{cfg.train_file}`" if cfg.train_file else f"the Hub dataset `{cfg.dataset_name}` ({cfg.train_split_name} split)"
    held_out = validation["source"]  # where the validation rows came from (data.load_splits_and_validation_source)
    rows = [(f"validation (best step {results['best_step']} of {results['global_step']})", validation)]
    if "test_accuracy" in results:
        test = {key[5:]: value for key, value in results.items() if key.startswith("test_")}
        source = f"`{cfg.test_file}`" if cfg.test_file else f"the `{cfg.dataset_name}` {cfg.test_split_name} split"
        rows.append((f"test ({source})", {**test, "num_examples": results["test_examples"]}))
    effective = cfg.effective_batch(results["num_processes"])
    head = HEADS[cfg.classifier_head].card
    rank_note = " (auto: the largest that fits the budget)" if cfg.lora_r == "auto" else ""
    if cfg.lora_rank_pattern:
        rank_note += f" (per module: {', '.join(cfg.lora_rank_pattern)})"
    excluded = f" except {', '.join(f'`{m}`' for m in cfg.lora_exclude_modules)}" if cfg.lora_exclude_modules else ""
    header = _header(metadata or adapter_card_data(cfg, results, validation, license=cfg.license))
    threshold = cfg.multi_label_threshold if cfg.multi_label else None
    best = f"{'highest' if cfg.greater_is_better else 'lowest'} validation {cfg.metric_for_best_model}"
    if cfg.metric_for_best_model == "accuracy" and cfg.greater_is_better and not cfg.multi_label:
        best = "best validation accuracy"  # the reference recipe's wording
    return f"""{header}
# LoRA text classifier on {cfg.model_name_or_path}

A LoRA adapter (with its classification head) for `{cfg.model_name_or_path}` that sorts text into
{len(names)} classes: {", ".join(f"{i} = {n}" for i, n in enumerate(names))}. Made with peft-agnews.

## Results

{_metrics_table(rows, cfg.multi_label)}

Per class on the validation split (the adapter saved is the one with the {best}):

{_per_class_table(validation)}

## Training recipe

- Base model: `{cfg.model_name_or_path}`; LoRA r={lora_rank}{rank_note}, alpha={cfg.lora_alpha}, dropout={cfg.lora_dropout},
  bias=`{cfg.lora_bias}`, on {", ".join(f"`{m}`" for m in cfg.lora_target_modules)}{excluded}; {head} trained.
- Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%).
- AdamW, learning rate {cfg.learning_rate}, weight decay {cfg.weight_decay}, gradient clipping {cfg.max_grad_norm};
  {cfg.lr_scheduler_type} schedule with {_warmup(cfg)} warmup{_optimizer_note(cfg)}.
- Batch {cfg.per_device_train_batch_size} per process x {cfg.gradient_accumulation_steps} accumulation x
  {results["num_processes"]} process(es) = {effective}; {results["global_step"]} optimizer steps;
  precision `{results["mixed_precision"]}`; max length {cfg.max_length} tokens; seed {cfg.seed}.

## Data

- Training: {data}.
- Validation: {held_out}.{f"{chr(10)}- Test: `{cfg.test_file}`." if cfg.test_file else ""}

{_intended_use(names, cfg.max_length, threshold)}

## How to use

{_how_to_use(cfg.model_name_or_path, names, cfg.classifier_head, threshold)}
"""


def _warmup(cfg: TrainConfig) -> str:
    """The warmup as the run set it: --warmup_steps (a count or a fraction) or --warmup_ratio."""
    if cfg.warmup_steps >= 1:
        return f"{int(cfg.warmup_steps)} steps of"
    return f"{cfg.warmup_steps or cfg.warmup_ratio:.0%}"


def _optimizer_note(cfg: TrainConfig) -> str:
    """What differs from PyTorch's AdamW defaults (betas 0.9/0.999, epsilon 1e-8, not fused), if anything."""
    notes = [f"betas ({cfg.adam_beta1}, {cfg.adam_beta2})" if (cfg.adam_beta1, cfg.adam_beta2) != (0.9, 0.999) else "",
             f"epsilon {cfg.adam_epsilon}" if cfg.adam_epsilon != 1e-8 else "",
             "fused kernel" if cfg.optim == "adamw_torch_fused" else ""]
    notes = [note for note in notes if note]
    return f"; AdamW {', '.join(notes)}" if notes else ""


def _how_to_use(base_model: str, names: list[str], head: str, multi_label_threshold: float | None = None) -> str:
    commands = """```bash
peft-agnews predict --adapter_dir <this folder> --input_file texts.csv --output_file predictions.csv
peft-agnews evaluate --adapter_dir <this folder> --test_file labelled.csv
""" + ("" if ours(head) else "peft-agnews export --adapter_dir <this folder> --merge --output_dir merged   # standalone model\n") + "```"
    labels = f"""labels = {names!r}
id2label, label2id = dict(enumerate(labels)), {{name: i for i, name in enumerate(labels)}}"""
    # Multi-label: transformers' problem_type makes the model's loss a per-class binary cross-entropy.
    problem = "" if multi_label_threshold is None else ', problem_type="multi_label_classification"'
    base = f"""base = AutoModelForSequenceClassification.from_pretrained(
    "{base_model}", num_labels={len(names)}, id2label=id2label, label2id=label2id{problem})"""
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
    "<this folder>", num_labels={len(names)}, id2label=id2label, label2id=label2id{problem}).eval()
# Or with the base from anywhere:
{base}
model = PeftModel.from_pretrained(base, "<this folder>").eval()
tokenizer = AutoTokenizer.from_pretrained("<this folder>")
{_multi_label_use(multi_label_threshold)}```"""


def _multi_label_use(threshold: float | None) -> str:
    """Multi-label: how to turn the logits into classes (empty for single-label, whose argmax is the class)."""
    if threshold is None:
        return ""
    return f"""# Several classes per text: a sigmoid per class, each class predicted at probability >= {threshold}
probs = model(**tokenizer(["Stocks rallied after the earnings report"], return_tensors="pt")).logits.sigmoid()
predicted = [[labels[i] for i, p in enumerate(row) if p >= {threshold}] for row in probs.tolist()]
"""


def merged_card(base_model: str, adapter_dir: Path, label_names: list[str], max_length: int,
                multi_label_threshold: float | None = None) -> str:
    """The README.md of a merged export (LoRA folded into the base weights); `multi_label_threshold` for a
    multi-label classifier."""
    source = adapter_dir / CARD_FILE
    call = """classify("Stocks rallied after the earnings report")  # [{'label': '...', 'score': ...}]""" if (
        multi_label_threshold is None) else (
        """classify("Stocks rallied after the earnings report", top_k=None)  # every class, sigmoid scores\n"""
        f"# (config.problem_type is multi_label_classification): the classes scoring >= {multi_label_threshold} apply")
    origin = f"Training details and scores: see the adapter's card (`{source}`)." if source.is_file() else ""
    return f"""{_header(merged_card_data(base_model))}
# Merged LoRA text classifier on {base_model}

`{base_model}` with the LoRA adapter `{adapter_dir}` merged into its weights (`merge_and_unload`): a plain
Transformers model, no PEFT needed. Classes: {", ".join(f"{i} = {n}" for i, n in enumerate(label_names))}.
{origin}

{_intended_use(label_names, max_length, multi_label_threshold)}

## How to use

```python
from transformers import pipeline
classify = pipeline("text-classification", model="<this folder>")
{call}
```
"""


def write_card(folder: Path, text: str) -> None:
    """Write README.md via a temporary file and a rename."""
    with atomic_write(folder / CARD_FILE) as handle:
        handle.write(text)


def write_adapter_card(adapter_dir: Path, cfg: TrainConfig, results: dict, validation: dict) -> None:
    """The saved adapter's model card (README.md), replacing the one PEFT's save_pretrained wrote but keeping its
    tags, with the rank it was trained with (cfg.lora_r may be 'auto': the adapter's own config holds the rank
    chosen) and the license (--license, else the base model's)."""
    rank = json.loads((adapter_dir / "adapter_config.json").read_text())["r"]
    card = adapter_dir / CARD_FILE
    peft_tags = (ModelCard.load(card).data.tags or []) if card.is_file() else []
    license = cfg.license or base_license(cfg.model_name_or_path)
    data = adapter_card_data(cfg, results, validation, peft_tags, license)
    write_card(adapter_dir, adapter_card(cfg, results, validation, rank, data))
