"""The one typed training config. Its defaults ARE the reference recipe.

Every option is declared once, here: the command line (`--help` included), the YAML loader (`--config FILE`)
and the config logged to W&B all read these fields.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import re
import reprlib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub.constants import ENV_VARS_TRUE_VALUES
from transformers import HfArgumentParser

from peft_agnews.errors import UsageError, first_line
from peft_agnews.heads import HEADS, HeadName, classifier_head_help, first_token_problem

AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
# transformers' config.problem_type values for classification (run_classification.py sets them the same way).
SINGLE_LABEL, MULTI_LABEL = "single_label_classification", "multi_label_classification"
# What --metric_for_best_model can name (with or without the Trainer's `eval_` prefix), per problem type.
BEST_MODEL_METRICS = {SINGLE_LABEL: ("accuracy", "f1_macro", "loss"),
                      MULTI_LABEL: ("f1_micro", "f1_macro", "accuracy", "loss")}
# transformers' TrainingArguments log levels; 'passive' leaves the libraries' verbosity as it is.
LogLevel = Literal["debug", "info", "warning", "error", "critical", "passive"]

# Options a resumed run may change: they move no weight, with dropout on (tests/test_checkpointing.py resumes with
# each one changed and compares the weights). Every other option is recorded in each checkpoint and must match on
# resume (the data files are checked by a fingerprint of their rows instead of their paths). Not here, although
# exact without dropout: --attn_implementation (sdpa draws attention-dropout masks in its own kernel, eager through
# the model's nn.Dropout) and --first_token_last_layer (fewer dropout draws in the last layer).
RESUMABLE_OPTIONS = (
    "train_file", "validation_file", "dataset_name", "test_file", "per_device_eval_batch_size",
    "eval_steps", "save_steps", "logging_steps", "save_total_limit", "early_stopping_patience",
    "resume_from_checkpoint", "output_dir", "overwrite_output_dir", "dry_run", "max_trainable_params",
    "gradient_checkpointing", "cast_frozen_weights", "trust_remote_code",
    # Where and how fast the same math runs, and what is scored at the end: threads, the frozen prefix run under
    # no_grad and its cache (both exact), the dataset's test split.
    "num_threads", "frozen_prefix", "cache_frozen_prefix", "frozen_prefix_cache_max_gb", "evaluate_test_split",
    "report_to", "wandb_mode", "wandb_project", "wandb_entity", "wandb_group", "wandb_tags", "run_name",
    # What happens to the adapter once trained: its card's license, the Hub upload.
    "license", "push_to_hub", "hub_model_id", "hub_private_repo",
    # When to evaluate and checkpoint (like eval_steps/save_steps), where the data comes from (rows are
    # fingerprinted), how it is loaded, how much is logged, and the Hub credentials and cache.
    "eval_strategy", "save_strategy", "train_split_name", "validation_split_name", "test_split_name",
    "dataloader_num_workers", "dataloader_pin_memory", "log_level", "token", "cache_dir",
)
# A YAML options file is a few hundred bytes: these limits refuse a hostile one (an "alias bomb": a few hundred
# bytes whose anchors expand to gigabytes) before anything is expanded or quoted.
MAX_CONFIG_BYTES = 256 * 1024
MAX_CONFIG_ALIASES = 64
# Options compared on resume by what they resolve to on this machine and library ('auto' included): the
# checkpoint records the resolved value (train.run_shape).
RESOLVED_OPTIONS = ("mixed_precision", "attn_implementation")


# --report_to values: the Trainer's, and (still accepted, with a note) the W&B modes earlier versions took.
REPORT_TO = ("wandb", "tensorboard", "mlflow", "all", "none")
LEGACY_REPORT_TO = ("online", "offline", "disabled")


# The sections of `--help` (and of docs/configuration.md), in order: name -> (title, what its options are for).
# Every TrainConfig option names one (`option(..., group=...)`).
SECTIONS = {
    "model": ("model", "The base model, its tokenizer and its dropout."),
    "data": ("data", "Where the rows come from, and how they are split, tokenized and batched."),
    "lora": ("LoRA and head", "What is trained: the adapter, the classifier head, the parameter budget."),
    "optimisation": ("optimisation", "The optimizer, batch, schedule, loss, precision and seed."),
    "evaluation": ("evaluation and checkpoints", "When to evaluate and save, where the outputs go, resuming."),
    "tracking": ("tracking", "The train-loss log, the trackers (W&B, TensorBoard, MLflow) and the Hub upload."),
    "speed": ("speed", "Switches for speed or memory: they leave the results unchanged unless their help says what "
              "they change."),
}


def option(default: Any, help: str, group: str | None = None, secret: bool = False, **kwargs: Any) -> Any:
    """A dataclass field declaring one command-line option: its default, the help text `--help` shows and the
    `--help` section (a key of SECTIONS) it is listed in. The one way options are declared, in TrainConfig (where
    every option has a group) and in the other commands' option dataclasses.

    `secret`: a credential (e.g. --token): the field is left out of the dataclass's repr and `masked_dict` masks it,
    so it is never printed, logged or saved."""
    metadata = {"help": help, **({"group": group} if group else {}), **kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), repr=not secret, metadata=metadata)
    return field(default=default, repr=not secret, metadata=metadata)


def masked_dict(options: Any) -> dict[str, Any]:
    """`dataclasses.asdict(options)` with every secret option (see `option`) that is set replaced by `<NAME>`, as
    TrainingArguments.to_dict masks its tokens."""
    values = dataclasses.asdict(options)
    for f in dataclasses.fields(options):
        if not f.repr and values[f.name] is not None:
            values[f.name] = f"<{f.name.upper()}>"
    return values


def mask_secret_arguments(argv: list[str]) -> list[str]:
    """Command-line tokens with the value of every secret TrainConfig option (`--token X`, `--token=X`) replaced
    by `<NAME>`: trackers record the command line (W&B keeps it in the run's metadata)."""
    flags = {f"--{f.name}": f.name for f in dataclasses.fields(TrainConfig) if not f.repr}
    masked = list(argv)
    for i, token in enumerate(masked):
        flag, equals, _ = token.partition("=")
        if flag in flags and equals:
            masked[i] = f"{flag}=<{flags[flag].upper()}>"
        elif token in flags and i + 1 < len(masked):
            masked[i + 1] = f"<{flags[token].upper()}>"
    return masked


class OptionParser(HfArgumentParser):
    """HfArgumentParser that lists each option under the `--help` section its `option(..., group=...)` names
    (options without a group stay in the general list)."""

    def _add_dataclass_arguments(self, dtype: Any) -> None:
        hints = typing.get_type_hints(dtype)
        fields = [f for f in dataclasses.fields(dtype) if f.init]
        used = {f.metadata.get("group") for f in fields}
        sections = {name: self.add_argument_group(title, about) for name, (title, about) in SECTIONS.items()
                    if name in used}
        for f in fields:
            metadata = dict(f.metadata)
            group = metadata.pop("group", None)
            declared = copy.copy(f)  # HfArgumentParser narrows the type in place: leave the dataclass's own field be
            declared.type, declared.metadata = hints[f.name], types.MappingProxyType(metadata)
            self._parse_dataclass_field(sections[group] if group else self, declared)


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults reproduce the reference recipe on roberta-base + AG News."""

    # Model
    model_name_or_path: str = option("roberta-base", "Base model: a Hub id or a local folder.", group="model")
    tokenizer_name: str | None = option(
        None, "Tokenizer: a Hub id or local folder (unset: the model's).", group="model"
    )
    trust_remote_code: bool = option(
        False, "Allow a model or tokenizer that ships its own Python code (an auto_map in its config) to run it; "
        "without it such a model is refused. That code runs on your machine: only for a source you trust.",
        group="model",
    )
    model_dropout: float | None = option(
        None, "Set every dropout inside the base model and head (hidden, attention, classifier) to this rate; unset "
        "keeps the model's own.", group="model",
    )
    model_revision: str = option(
        "main", "Version of the model (and tokenizer) on the Hub: a branch, tag or commit id (ignored for a local "
        "folder); recorded in the adapter's config so loading it picks the same base.", group="model",
    )
    token: str | None = option(
        None, "Hub token for private models and datasets (unset: $HF_TOKEN or the `hf auth login` token). Never "
        "printed, logged or saved; prefer $HF_TOKEN, which no process listing shows.", group="model", secret=True,
    )
    cache_dir: str | None = option(
        None, "Where downloaded models and datasets (and the datasets cache of local files) are kept (unset: the "
        "Hugging Face cache, $HF_HOME).", group="model",
    )
    # Data
    dataset_name: str | None = option(
        "ag_news", "Hub dataset (or a local dataset folder), used when --train_file is not given.", group="data"
    )
    dataset_config_name: str | None = option(
        None, "Configuration of --dataset_name (for datasets that have several).", group="data"
    )
    train_split_name: str = option("train", "Split of --dataset_name to train on.", group="data")
    validation_split_name: str = option(
        "validation", "Split of --dataset_name to select the best adapter on; when the default name is absent, a "
        "stratified --validation_split of the training split is held out instead.", group="data",
    )
    test_split_name: str = option(
        "test", "Split of --dataset_name scored at the end (--evaluate_test_split); the default name may be absent.",
        group="data",
    )
    text_column_names: list[str] = option(
        ["text"], "Column(s) of --dataset_name holding the text; several are joined with a space (e.g. title "
        "description).", group="data",
    )
    label_column_name: str = option("label", "Column of --dataset_name holding the class.", group="data")
    train_file: str | None = option(
        None, "Local training file: canonical AG News CSV, or CSV/JSONL/Parquet with text,label.", group="data"
    )
    validation_file: str | None = option(
        None, "Local validation file (unset: a stratified split of train).", group="data"
    )
    test_file: str | None = option(
        None, "Labelled test file: the best adapter is scored on it at the end.", group="data"
    )
    label_names: list[str] | None = option(
        None, "Class names, in label-id order (unset: the dataset's ClassLabel names, else AG News's four: "
        + " ".join(AG_NEWS_LABELS) + ").", group="data",
    )
    problem_type: Literal["single_label_classification", "multi_label_classification"] = option(
        SINGLE_LABEL, "transformers' problem_type: one class per row (softmax, cross-entropy), or "
        "multi_label_classification: a set of classes per row (a list in JSONL/Parquet, names or ids joined by "
        "--label_separator in CSV), a sigmoid per class and binary cross-entropy (docs/multi-label.md).", group="data",
    )
    multi_label_threshold: float = option(
        0.5, "Multi-label: a class is predicted when its sigmoid probability is at least this.", group="data"
    )
    label_separator: str = option(
        ",", "Multi-label: the separator of several class names or ids in one text field (CSV), e.g. World,Sports.",
        group="data",
    )
    validation_split: float = option(
        0.1, "Fraction of train held out (stratified by class; multi-label: at random) when no validation file is "
        "given.", group="data",
    )
    max_length: int = option(128, "Truncate inputs to this many tokens.", group="data")
    group_by_length: bool = option(
        True, "Batch rows of similar length together (shuffled length groups).", group="data"
    )
    dataloader_num_workers: int = option(
        0, "Worker processes that collate batches (0: in the training process); results are the same for any count.",
        group="data",
    )
    dataloader_pin_memory: bool = option(
        True, "Pin batches in page-locked memory, so their copies to the GPU can overlap compute (no effect on "
        "CPU-only runs).",
        group="data",
    )
    max_train_samples: int | None = option(
        None, "Keep only this many training rows (for quick runs).", group="data"
    )
    max_eval_samples: int | None = option(
        None, "Keep only this many validation rows (for quick runs).", group="data"
    )
    # LoRA and head
    lora_r: str = option(
        "8", "LoRA rank, or 'auto': the largest rank whose exact trainable count fits --max_trainable_params.",
        group="lora",
    )
    lora_alpha: int = option(16, "LoRA alpha (scaling = alpha / r).", group="lora")
    lora_dropout: float = option(0.2, "Dropout on the LoRA input.", group="lora")
    lora_bias: Literal["none", "all", "lora_only"] = option("lora_only", "Which biases to train.", group="lora")
    lora_target_modules: list[str] = option(
        ["query", "value"], "Module names that get LoRA adapters.", group="lora"
    )
    lora_layers: str = option(
        "all", "Transformer layers that get LoRA: 'all', 'topK' (the K layers nearest the head, e.g. top2) or "
        "indices such as '4,5'. The embeddings and the layers below the lowest trained one then hold nothing "
        "trainable (see --frozen_prefix).", group="lora",
    )
    lora_exclude_modules: list[str] = option(
        [], "Modules matching --lora_target_modules that get no LoRA, named by a dotted suffix as PEFT's "
        "exclude_modules matches them (e.g. layer.3.attention.self.query). With --lora_layers topK, LoRA on only the "
        "feed-forward of the lowest trained layer lets backward stop there (recipes/proxy-fast.yaml).", group="lora",
    )
    lora_rank_pattern: list[str] = option(
        [], "Per-module ranks as MODULE=RANK (e.g. intermediate.dense=4); other targets use --lora_r.", group="lora"
    )
    use_rslora: bool = option(
        False, "Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r.", group="lora"
    )
    use_dora: bool = option(
        False, "DoRA: learn a magnitude per output feature on top of the LoRA direction.", group="lora"
    )
    classifier_head: HeadName = option("model", classifier_head_help(), group="lora")
    max_trainable_params: int = option(1_000_000, "Refuse to train more parameters than this.", group="lora")
    # Optimisation
    learning_rate: float = option(1e-4, "AdamW peak learning rate.", group="optimisation")
    head_learning_rate: float | None = option(
        None, "Learning rate of the classifier head (unset: --learning_rate).", group="optimisation"
    )
    weight_decay: float = option(
        0.01, "AdamW weight decay (not applied to biases and LayerNorm).", group="optimisation"
    )
    optim: Literal["adamw_torch", "adamw_torch_fused"] = option(
        "adamw_torch", "Optimizer, named as the Trainer names them: PyTorch's AdamW, or its fused kernel "
        "(adamw_torch_fused; refused on a device without one).", group="optimisation",
    )
    adam_beta1: float = option(0.9, "AdamW beta1: decay rate of the first-moment (mean) estimate.",
                               group="optimisation")
    adam_beta2: float = option(0.999, "AdamW beta2: decay rate of the second-moment (variance) estimate.",
                               group="optimisation")
    adam_epsilon: float = option(1e-8, "AdamW epsilon, added to the denominator for numerical stability.",
                                 group="optimisation")
    max_grad_norm: float = option(
        1.0, "Clip the global gradient norm to this (0 turns clipping off).", group="optimisation"
    )
    per_device_train_batch_size: int = option(32, "Training micro-batch per process.", group="optimisation")
    gradient_accumulation_steps: int = option(4, "Micro-batches per optimizer step.", group="optimisation")
    global_batch_size: int | None = option(
        None, "Fix the effective batch (examples per optimizer step) whatever the process count: the micro-batch "
        "becomes the largest divisor of global/processes up to --per_device_train_batch_size, and accumulation fills "
        "the rest (--gradient_accumulation_steps is then ignored).", group="optimisation",
    )
    num_train_epochs: float = option(6.0, "Passes over the training split.", group="optimisation")
    max_train_steps: int | None = option(
        None, "Stop after this many optimizer steps (overrides epochs).", group="optimisation"
    )
    lr_scheduler_type: Literal["linear", "cosine", "constant_with_warmup", "one_cycle"] = option(
        "linear", "Learning-rate schedule ('one_cycle': PyTorch OneCycleLR, warmup = --warmup_ratio).",
        group="optimisation",
    )
    warmup_ratio: float = option(0.1, "Fraction of optimizer steps spent warming up.", group="optimisation")
    warmup_steps: float = option(
        0, "Warmup optimizer steps; overrides --warmup_ratio when > 0. A value below 1 is a fraction of the steps "
        "(as transformers 5 reads it).", group="optimisation",
    )
    label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy (0: off).", group="optimisation")
    rdrop_alpha: float = option(
        0.0, "R-Drop: weight of the symmetric KL between two dropout passes of each batch (0: off; doubles the "
        "forward and backward work).", group="optimisation",
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = option(
        "auto", "Precision: 'auto' takes fp16/bf16 from an Accelerate config or launcher flag, else picks bf16 on GPUs "
        "that support it, fp16 on older GPUs, bf16 on CPUs with AVX512-BF16 or AMX, fp32 otherwise; 'no' forces "
        "fp32.", group="optimisation",
    )
    seed: int = option(37, "Seed for the split, the batch order, dropout and LoRA init.", group="optimisation")
    # Evaluation and checkpoints
    per_device_eval_batch_size: int = option(64, "Evaluation batch per process.", group="evaluation")
    eval_strategy: Literal["steps", "epoch", "no"] = option(
        "steps", "When to evaluate on validation: every --eval_steps, at the end of every epoch, or 'no' (only after "
        "the last step: the adapter is then the final weights). Every strategy also evaluates after the last step.",
        group="evaluation",
    )
    eval_steps: int = option(
        200, "Evaluate on validation every N optimizer steps (and at the end).", group="evaluation"
    )
    evaluate_test_split: bool = option(
        True, "Score the best adapter on --dataset_name's 'test' split at the end, when it has one.",
        group="evaluation",
    )
    early_stopping_patience: int = option(
        0, "Stop after N evaluations without a better validation --metric_for_best_model (0: off).",
        group="evaluation",
    )
    metric_for_best_model: str | None = option(
        None, "Validation metric that picks the best adapter (and drives early stopping and save_strategy best), with "
        "or without the Trainer's eval_ prefix: accuracy, f1_macro or loss; multi-label also f1_micro (accuracy is "
        "then subset accuracy). Unset: accuracy; multi-label: f1_micro.", group="evaluation",
    )
    greater_is_better: bool | None = option(
        None, "Whether a larger --metric_for_best_model is better (unset, as the Trainer: false for a metric "
        "ending in 'loss', else true).", group="evaluation",
    )
    save_strategy: Literal["steps", "epoch", "no", "best"] = option(
        "steps", "When to write a training checkpoint: every --save_steps, at the end of every epoch, never, or "
        "'best' (whenever the validation --metric_for_best_model improves). A stop signal always writes one.",
        group="evaluation",
    )
    save_steps: int = option(
        200, "Write a training checkpoint every N optimizer steps (0: never).", group="evaluation"
    )
    save_total_limit: int = option(
        2, "Keep this many newest checkpoints plus the best one (0: keep all).", group="evaluation"
    )
    resume_from_checkpoint: str | None = option(
        None, "Continue a stopped run: 'latest' (newest complete checkpoint in output_dir, if any) or a checkpoint "
        "folder.", group="evaluation",
    )
    output_dir: str = option(
        "outputs/agnews-lora", "Where the adapter, metrics and checkpoints go.", group="evaluation"
    )
    overwrite_output_dir: bool = option(
        False, "Replace the run in output_dir (finished or not; never a folder no run created): its files are removed "
        "when this run starts writing, checkpoints first.", group="evaluation",
    )
    dry_run: bool = option(
        False, "Build data and model, print the plan, write nothing, exit.", group="evaluation"
    )
    # Tracking
    logging_steps: int = option(
        50, "Log train loss and learning rate every N optimizer steps.", group="tracking"
    )
    log_level: LogLevel = option(
        "passive", "Python logging level of the main process (the peft_agnews logger, transformers and datasets; "
        "other processes: warning). 'passive' keeps transformers' and datasets' own levels and shows this "
        "package's progress messages (info).", group="tracking",
    )
    report_to: list[str] = option(
        ["wandb"], "Trackers, as the Trainer's --report_to: any of wandb, tensorboard, mlflow (space- or "
        "comma-separated), 'all' (those installed) or 'none'. TensorBoard and MLflow need the [trackers] extra "
        "(docs/tracking.md).", group="tracking",
    )
    wandb_mode: Literal["online", "offline", "disabled"] | None = option(
        None, "W&B mode (unset: $WANDB_MODE if set, else online with an API key, offline without).", group="tracking"
    )
    wandb_project: str | None = option(
        None, "W&B project (unset: $WANDB_PROJECT, else peft-agnews).", group="tracking"
    )
    wandb_entity: str | None = option(
        None, "W&B entity, a user or team (unset: $WANDB_ENTITY, else the key's default entity).", group="tracking"
    )
    wandb_group: str | None = option(
        None, "W&B group: gathers related runs (a sweep, repeated seeds) in the UI.", group="tracking"
    )
    wandb_tags: list[str] = option([], "W&B tags (space- or comma-separated).", group="tracking")
    run_name: str | None = option(None, "Run name in W&B and MLflow.", group="tracking")
    license: str | None = option(
        None, "License in the adapter's model card (unset: the base model's, when its card names one).",
        group="tracking",
    )
    push_to_hub: bool = option(
        False, "Upload the adapter (weights, card, tokenizer, labels) to --hub_model_id at the end (main process; "
        "token from HF_TOKEN or `hf auth login`).", group="tracking",
    )
    hub_model_id: str | None = option(
        None, "Hub repository for --push_to_hub, e.g. user/agnews-roberta-lora.", group="tracking"
    )
    hub_private_repo: bool | None = option(
        None, "Create the --hub_model_id repository private (unset: the Hub's default, public).", group="tracking"
    )
    # Speed
    dropout_generator: Literal["torch", "pcg64"] = option(
        "pcg64", "What draws the dropout masks (model, head, LoRA, attention probabilities): 'torch', torch's CPU "
        "generator, or 'pcg64', one seed per mask from torch's generator and the bits from numpy's PCG64 (keep "
        "probability quantised to 2^-16). Another random stream, the same dropout; GPUs keep torch's either way.",
        group="speed",
    )
    attn_implementation: Literal["auto", "sdpa", "eager"] = option(
        "auto", "Attention kernel (transformers' attn_implementation): 'auto' is the library's choice (sdpa); "
        "'eager' is plain matmul + softmax. The same math; under --dropout_generator pcg64 the attention "
        "probabilities' masks come from PCG64 with sdpa and from torch with eager.", group="speed",
    )
    num_threads: int = option(
        0, "CPU threads per process; 0: $OMP_NUM_THREADS if you set it, else the physical cores divided among the "
        "processes on this machine (launchers' injected OMP_NUM_THREADS=1 is ignored). Results may differ in the "
        "last bits.", group="speed",
    )
    gradient_checkpointing: bool = option(
        True, "Recompute activations in backward instead of keeping them: less memory, more compute, same results.",
        group="speed",
    )
    cast_frozen_weights: bool = option(
        True, "Under fp16/bf16, store the frozen base Linear weights in that dtype once instead of casting them on "
        "every call: same results.", group="speed",
    )
    frozen_prefix: bool = option(
        True, "Run the frozen prefix (the embeddings and the layers below --lora_layers) without autograd: same "
        "results, no backward through it; false runs the plain model.", group="speed",
    )
    cache_frozen_prefix: bool = option(
        False, "Compute the frozen prefix's output once per training example, keep it under output_dir/prefix_cache "
        "and read it in later epochs: same results. Needs a frozen prefix (--lora_layers topK), dropout 0 in it "
        "(--model_dropout 0) and one machine.", group="speed",
    )
    frozen_prefix_cache_max_gb: float = option(
        20.0, "Refuse to build a frozen-prefix cache larger than this (GB).", group="speed"
    )
    first_token_last_layer: bool = option(
        False, "Compute the last encoder layer for the first token only (its keys and values still for every "
        "token): same results for a head that reads only the first token ("
        + ", ".join(name for name, head in HEADS.items() if head.first_token_only) + "), less work.",
        group="speed",
    )
    torch_compile: bool = option(
        False, "Compile the encoder's layers with torch.compile (inductor) for training and evaluation: the same "
        "math in fused kernels after a one-off compile, whose time and graph count results.json reports. With "
        "dropout, the compiled graphs draw other masks than eager ones.", group="speed",
    )
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = option(
        None, "torch.compile mode (setting one implies --torch_compile true); unset: 'default'.", group="speed",
    )
    half_precision_base: bool = option(
        False, "Hold the frozen base (weights and activations) in bf16 and run it without autocast; LoRA and head "
        "weights, gradients and optimizer state stay fp32. Needs bf16 (--mixed_precision bf16, or auto resolving "
        "to it). Other rounding than autocast, hence slightly other results.", group="speed",
    )

    def __post_init__(self) -> None:
        # W&B sweep agents pass lists as one `--name=a,b` argument.
        self.lora_target_modules = _split_commas(self.lora_target_modules)
        self.lora_exclude_modules = _split_commas(self.lora_exclude_modules)
        self.wandb_tags = _split_commas(self.wandb_tags)
        report_to = [self.report_to] if isinstance(self.report_to, str) else self.report_to  # TrainConfig(report_to="none")
        self.report_to = [value.lower() for value in _split_commas(report_to)]
        self.text_column_names = _split_commas(self.text_column_names)
        self.output_dir = _expand_env(self.output_dir, "--output_dir")
        self.model_name_or_path = _expand_env(self.model_name_or_path, "--model_name_or_path")
        self.lora_r = _parse_rank(self.lora_r)
        if self.torch_compile_mode is not None:  # as TrainingArguments: a mode asks for compilation
            self.torch_compile = True
        self.lora_layers = str(self.lora_layers).strip().lower().replace(" ", "")
        self.lora_rank_pattern = _split_commas(self.lora_rank_pattern)
        rank_pattern_dict(self.lora_rank_pattern)  # validates MODULE=RANK
        self.metric_for_best_model, self.greater_is_better = best_model_metric(
            self.metric_for_best_model, self.greater_is_better, self.problem_type)
        # A NaN passes every comparison below as False, and inf makes no sense for any float option.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"invalid config: --{f.name} must be a finite number, got {value}")
        head_problem = first_token_problem(self.classifier_head) if self.first_token_last_layer else None
        checks = [
            (self.learning_rate > 0, "--learning_rate must be > 0"),
            (self.weight_decay >= 0, "--weight_decay must be >= 0"),
            # A negative limit would scale every gradient by a negative factor: gradient ascent.
            (self.max_grad_norm >= 0, "--max_grad_norm must be >= 0 (0 turns clipping off)"),
            (self.lora_alpha > 0, "--lora_alpha must be > 0"),
            (self.per_device_train_batch_size >= 1, "--per_device_train_batch_size must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1"),
            (self.global_batch_size is None or self.global_batch_size >= 1, "--global_batch_size must be >= 1"),
            (self.num_train_epochs > 0, "--num_train_epochs must be > 0"),
            (self.max_train_steps is None or self.max_train_steps >= 1, "--max_train_steps must be >= 1"),
            (0 <= self.warmup_ratio < 1, "--warmup_ratio must be in [0, 1)"),
            (0 < self.validation_split < 1, "--validation_split must be in (0, 1)"),
            (self.lora_r == "auto" or self.lora_r >= 1, "--lora_r must be >= 1 or 'auto'"),
            (0 <= self.label_smoothing < 1, "--label_smoothing must be in [0, 1)"),
            (0 <= self.lora_dropout < 1, "--lora_dropout must be in [0, 1)"),
            (self.model_dropout is None or 0 <= self.model_dropout < 1, "--model_dropout must be in [0, 1)"),
            (self.rdrop_alpha >= 0, "--rdrop_alpha must be >= 0"),
            (self.head_learning_rate is None or self.head_learning_rate > 0, "--head_learning_rate must be > 0"),
            (re.fullmatch(r"all|top[1-9]\d*|\d+(,\d+)*", self.lora_layers) is not None,
             f"--lora_layers {self.lora_layers!r} is not 'all', 'topK' (e.g. top2) or layer indices (e.g. 4,5)"),
            (self.frozen_prefix_cache_max_gb > 0, "--frozen_prefix_cache_max_gb must be > 0"),
            (head_problem is None, head_problem),
            (self.eval_steps >= 1 and self.logging_steps >= 1, "--eval_steps and --logging_steps must be >= 1"),
            (self.save_steps >= 0, "--save_steps must be >= 0 (0 turns checkpoints off)"),
            (self.save_total_limit >= 0, "--save_total_limit must be >= 0 (0 keeps every checkpoint)"),
            (self.early_stopping_patience >= 0, "--early_stopping_patience must be >= 0 (0 turns it off)"),
            (self.eval_strategy != "no" or not self.early_stopping_patience,
             "--early_stopping_patience needs evaluations during training: --eval_strategy steps or epoch"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "--adam_beta1 and --adam_beta2 must be in [0, 1)"),
            (self.adam_epsilon >= 0, "--adam_epsilon must be >= 0"),
            (self.warmup_steps >= 0 and (self.warmup_steps < 1 or self.warmup_steps == int(self.warmup_steps)),
             f"--warmup_steps must be a whole number of steps, or a fraction in [0, 1); got {self.warmup_steps}"),
            (self.dataloader_num_workers >= 0, "--dataloader_num_workers must be >= 0 (0: load in the training process)"),
            (len(self.text_column_names) >= 1, "--text_column_names needs at least one column"),
            (self.train_file is not None or self.dataset_name, "give --train_file or --dataset_name"),
            *report_to_checks(self.report_to),
            *hub_checks(self.push_to_hub, self.hub_model_id),
        ]
        problems = [message for ok, message in checks if not ok] + multi_label_problems(self) + shared_option_problems(self)
        if problems:
            raise UsageError(f"invalid config: {problems[0]}")

    @property
    def multi_label(self) -> bool:
        """Several classes per row (--problem_type multi_label_classification)."""
        return self.problem_type == MULTI_LABEL

    def resolved_label_names(self, dataset_names: list[str] | None = None) -> list[str]:
        """The class names: --label_names, else the dataset's ClassLabel names, else AG News's."""
        return list(self.label_names or dataset_names or AG_NEWS_LABELS)

    def to_dict(self) -> dict[str, Any]:
        """Every option, the secret ones masked (what run_config.json and the trackers record)."""
        return masked_dict(self)

    def resume_critical(self) -> dict[str, Any]:
        """The options a resumed run must share with its checkpoint (all but RESUMABLE_OPTIONS)."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_OPTIONS}

    def effective_batch(self, num_processes: int) -> int:
        """Examples per optimizer step over all processes: per-device batch x accumulation x processes."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * num_processes

    def for_processes(self, num_processes: int) -> TrainConfig:
        """This config with micro-batch and accumulation derived from --global_batch_size for `num_processes`.

        Without --global_batch_size the config is returned unchanged (effective batch = per-device x accumulation
        x processes, so it grows with the process count).
        """
        if self.global_batch_size is None:
            return self
        if self.global_batch_size % num_processes:
            raise UsageError(
                f"--global_batch_size {self.global_batch_size} cannot be split over {num_processes} processes; "
                f"choose a multiple of {num_processes}"
            )
        per_process = self.global_batch_size // num_processes
        micro = max(d for d in range(1, min(self.per_device_train_batch_size, per_process) + 1) if per_process % d == 0)
        return dataclasses.replace(
            self, per_device_train_batch_size=micro, gradient_accumulation_steps=per_process // micro
        )


def report_to_checks(report_to: list[str]) -> list[tuple[bool, str]]:
    """--report_to: known values, at least one, and 'none' alone."""
    unknown = [v for v in report_to if v not in REPORT_TO + LEGACY_REPORT_TO]
    return [
        (not unknown, f"--report_to {' '.join(unknown)}: choose from {', '.join(REPORT_TO)}"),
        (bool(report_to), "--report_to needs a value (none: no tracking)"),
        ("none" not in report_to or len(report_to) == 1, "--report_to none cannot go with other trackers"),
    ]


def hub_checks(push_to_hub: bool, hub_model_id: str | None) -> list[tuple[bool, str]]:
    """--push_to_hub needs a repository and the network: refused before training, not after it."""
    return [
        (not push_to_hub or bool(hub_model_id), "--push_to_hub needs --hub_model_id (the Hub repository to create or update)"),
        (not push_to_hub or not hub_offline(),
         "--push_to_hub needs the network, but HF_HUB_OFFLINE is set; unset it or drop --push_to_hub"),
    ]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it, read when asked, not at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ENV_VARS_TRUE_VALUES


def best_model_metric(metric: str | None, greater_is_better: bool | None, problem_type: str) -> tuple[str, bool]:
    """--metric_for_best_model without the Trainer's optional `eval_` prefix (default: accuracy, multi-label:
    f1_micro) and --greater_is_better (default as the Trainer derives it: false for a metric ending in 'loss')."""
    choices = BEST_MODEL_METRICS[problem_type]
    name = (metric or choices[0]).strip().removeprefix("eval_")
    if name not in choices:
        kind = "multi-label" if problem_type == MULTI_LABEL else "single-label"
        raise UsageError(f"invalid config: --metric_for_best_model {metric!r} is not a {kind} validation metric; "
                         f"use one of {', '.join(choices)} (with or without the eval_ prefix)")
    return name, (not name.endswith("loss")) if greater_is_better is None else greater_is_better


def multi_label_problems(cfg: TrainConfig) -> list[str]:
    """The options that make no sense with several classes per row (they are defined for one softmax class)."""
    if not cfg.multi_label:
        return []
    checks = [
        (not cfg.label_smoothing, "--label_smoothing smooths a single-label cross-entropy; with --problem_type "
         "multi_label_classification leave it at 0"),
        (not cfg.rdrop_alpha, "--rdrop_alpha compares two softmax distributions; with --problem_type "
         "multi_label_classification leave it at 0"),
    ]
    return [message for ok, message in checks if not ok]


def training_option(name: str, help: str | None = None, **kwargs: Any) -> Any:
    """An inference command's option that training also has: TrainConfig's default, and its help unless `help`
    says what differs for inference."""
    declared = TrainConfig.__dataclass_fields__[name]
    return option(declared.default, help or declared.metadata["help"], **kwargs)


def shared_option_problems(options: Any) -> list[str]:
    """What is wrong with the options training and inference share (max_length, per_device_eval_batch_size,
    label_names, multi_label_threshold and label_separator where taken, num_threads), checked alike for TrainConfig
    and the inference commands' options."""
    names = getattr(options, "label_names", None)
    threshold = getattr(options, "multi_label_threshold", None)
    checks = [
        (options.per_device_eval_batch_size >= 1, "--per_device_eval_batch_size must be >= 1"),
        (options.max_length >= 8, "--max_length must be >= 8"),
        (names is None or len(names) >= 2, "--label_names needs at least two classes"),
        (names is None or len(set(names)) == len(names), "--label_names must be distinct"),
        (options.num_threads >= 0, "--num_threads must be >= 0 (0: all physical cores)"),
        (threshold is None or 0 < threshold < 1, "--multi_label_threshold must be in (0, 1)"),
    ]
    return [message for ok, message in checks if not ok] + label_separator_problems(options)


def label_separator_problems(options: Any) -> list[str]:
    """What is wrong with --label_separator, where `options` take it."""
    separator = getattr(options, "label_separator", ",")
    return [] if separator.strip() else ["--label_separator must be a visible character such as , or |"]


def _split_commas(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in str(value).split(",") if part.strip()]


def _parse_rank(value: int | str) -> int | str:
    if isinstance(value, int) or str(value).strip().lower() == "auto":
        return value if isinstance(value, int) else "auto"
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"invalid config: --lora_r {value!r} is neither an integer nor 'auto'") from None


def rank_pattern_dict(entries: list[str]) -> dict[str, int]:
    """`["intermediate.dense=4"]` -> `{"intermediate.dense": 4}` (PEFT's rank_pattern)."""
    pattern = {}
    for entry in entries:
        name, _, rank = entry.partition("=")
        if not name.strip() or not rank.strip().isdigit() or int(rank) < 1:
            raise UsageError(f"invalid config: --lora_rank_pattern entry {entry!r} is not MODULE=RANK (e.g. output.dense=4)")
        pattern[name.strip()] = int(rank)
    return pattern


def _expand_env(value: str, flag: str) -> str:
    """Expand $VARS (e.g. `outputs/sweep/$WANDB_RUN_ID`: one folder per sweep trial); an unset one is an error."""
    expanded = os.path.expandvars(value)
    unset = re.findall(r"\$\{?(\w+)", expanded)
    if unset:
        raise UsageError(f"{flag} {value} uses ${unset[0]}, which is not set; set it or give a literal path")
    return expanded


def build_parser() -> OptionParser:
    parser = OptionParser(TrainConfig, description="Fine-tune a sequence classifier with LoRA under Accelerate.")
    parser.add_argument("--config", default=None, help="YAML file of options; command-line flags override it.")
    return parser


def _allows_none(name: str) -> bool:
    hint = typing.get_type_hints(TrainConfig)[name]
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def yaml_arguments(path: str, values: dict[str, Any]) -> tuple[list[str], dict[str, None]]:
    """YAML options as the command-line tokens a user would type, so they pass the same type and choice checks
    as flags; plus the options set to null (which no flag can express), allowed only where None is a value."""
    parser = build_parser()
    parser.exit_on_error = False  # a bad value raises ArgumentError instead of exiting
    tokens: list[str] = []
    nulls: dict[str, None] = {}
    for name, value in values.items():
        if value is None:
            if not _allows_none(name):
                raise UsageError(f"config file {path}: {name} is null; give it a value or remove the line")
            nulls[name] = None
            continue
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, (dict, list)) or item is None for item in items):
            raise UsageError(f"config file {path}: {name} must be a value or a list of values, got {_short(value)}")
        tokens_of_option = [f"--{name}", *(str(item) for item in items)]
        try:
            parser.parse_args(tokens_of_option)
        except argparse.ArgumentError as err:
            message = err.message if len(err.message) <= 200 else err.message[:200] + "..."
            raise UsageError(f"config file {path}: {name}: {_short(value)}: {message}") from None
        tokens += tokens_of_option
    return tokens, nulls


def _short(value: Any) -> str:
    """`value` as an error message quotes it: nested lists and long strings cut short, never printed whole."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxstring, short.maxother = 2, 4, 60, 60
    return short.repr(value)


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML options file, refusing unknown keys so a typo never silently falls back to a default."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file not found: {path} (pass an existing YAML file to --config)")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise UsageError(f"config file {path} is over {MAX_CONFIG_BYTES // 1024} KiB; an options file is a list of "
                         "option: value lines")
    try:
        text = file.read_text(encoding="utf-8")
        # Count aliases on the event stream, which does not expand them; only then build the values.
        aliases = sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader))
        if aliases > MAX_CONFIG_ALIASES:
            raise UsageError(f"config file {path} uses {aliases} YAML aliases (*name), over {MAX_CONFIG_ALIASES}; "
                             "write the values out")
        values = yaml.safe_load(text) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UsageError(f"config file {path} is not valid YAML: {first_line(err)[:200]}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a mapping of option: value")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"config file {path} has unknown options {unknown}; see --help for the valid names")
    return values


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse `--config FILE` (YAML defaults) and command-line overrides into a TrainConfig."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    tokens: list[str] = []
    if known.config:
        tokens, nulls = yaml_arguments(known.config, load_yaml(known.config))
        parser.set_defaults(**nulls)
    # The file's options come first: a flag given later on the command line wins.
    namespace = parser.parse_args(tokens + list(sys.argv[1:] if argv is None else argv))
    values = {k: v for k, v in vars(namespace).items() if k != "config"}
    return TrainConfig(**values)
