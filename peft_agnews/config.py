"""The one typed training config. Its defaults ARE the reference recipe.

Every option is declared once, here: the command line (`--help` included), the YAML loader (`--config FILE`)
and the config logged to W&B all read these fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

from peft_agnews.errors import UsageError, first_line

AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
# Heads that read only the first token's final hidden state ([CLS] / <s>): BERT's pooler, roberta's head, ours.
FIRST_TOKEN_HEADS = ("model", "model_output", "first_token")

# Options a resumed run may change: they move no weight. Every other option is recorded in each checkpoint and
# must match on resume (the data files are checked by a fingerprint of their rows instead of their paths).
RESUMABLE_OPTIONS = (
    "train_file", "validation_file", "dataset_name", "test_file", "per_device_eval_batch_size",
    "eval_steps", "save_steps", "logging_steps", "save_total_limit", "early_stopping_patience",
    "resume_from_checkpoint", "output_dir", "overwrite_output_dir", "dry_run", "max_trainable_params",
    "gradient_checkpointing", "cast_frozen_weights", "attn_implementation",
    # Where and how fast the same math runs, and what is scored at the end: threads, the frozen prefix run under
    # no_grad and its cache, the last layer for the first token only (all exact), the dataset's test split.
    "num_threads", "frozen_prefix", "cache_frozen_prefix", "frozen_prefix_cache_max_gb", "first_token_last_layer",
    "evaluate_test_split",
    "report_to", "wandb_project", "wandb_entity", "wandb_group", "wandb_tags", "run_name",
)


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field declaring one command-line option: its default and the help text `--help` shows (the one
    way options are declared, in TrainConfig and in the other commands' option dataclasses)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults reproduce the reference recipe on roberta-base + AG News."""

    # Model
    model_name_or_path: str = option("roberta-base", "Base model: a Hub id or a local folder.")
    tokenizer_name: str | None = option(None, "Tokenizer: a Hub id or local folder (default: the model's).")
    # Data
    dataset_name: str | None = option("ag_news", "Hub dataset (or a local dataset folder), used when --train_file is not given.")
    dataset_config_name: str | None = option(None, "Configuration of --dataset_name (for datasets that have several).")
    text_column_names: list[str] = option(
        ["text"], "Column(s) of --dataset_name holding the text; several are joined with a space (e.g. title description)."
    )
    label_column_name: str = option("label", "Column of --dataset_name holding the class.")
    evaluate_test_split: bool = option(
        True, "Score the best adapter on --dataset_name's 'test' split at the end, when it has one."
    )
    train_file: str | None = option(None, "Local training file: canonical AG News CSV, or CSV/JSONL/Parquet with text,label.")
    validation_file: str | None = option(None, "Local validation file (default: a stratified split of train).")
    test_file: str | None = option(None, "Labelled test file: the best adapter is scored on it at the end.")
    label_names: list[str] | None = option(
        None, "Class names, in label-id order (default: the dataset's ClassLabel names, else AG News's four: "
        + " ".join(AG_NEWS_LABELS) + ")."
    )
    validation_split: float = option(0.1, "Fraction of train held out (stratified) when no validation file is given.")
    max_length: int = option(128, "Truncate inputs to this many tokens.")
    group_by_length: bool = option(True, "Batch rows of similar length together (shuffled length groups).")
    max_train_samples: int | None = option(None, "Keep only this many training rows (for quick runs).")
    max_eval_samples: int | None = option(None, "Keep only this many validation rows (for quick runs).")
    # LoRA
    lora_r: str = option(
        "8", "LoRA rank, or 'auto': the largest rank whose exact trainable count fits --max_trainable_params."
    )
    lora_alpha: int = option(16, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = option(0.2, "Dropout on the LoRA input.")
    model_dropout: float | None = option(
        None, "Set every dropout inside the base model and head (hidden, attention, classifier) to this rate; "
        "unset keeps the model's own. 0 (with --lora_dropout 0) made CPU steps 1.2-1.6x faster (BENCHMARKS.md).",
    )
    dropout_generator: Literal["torch", "pcg64"] = option(
        "pcg64", "What draws the dropout masks (model, head, LoRA, attention probabilities): torch's CPU generator, "
        "or pcg64 (the default: one seed per mask from torch's generator, bits from numpy's PCG64; keep probability quantised "
        "to 2^-16; CPU only, GPUs keep torch's): faster CPU steps, see BENCHMARKS.md.",
    )
    lora_bias: Literal["none", "all", "lora_only"] = option("lora_only", "Which biases to train.")
    lora_target_modules: list[str] = option(["query", "value"], "Module names that get LoRA adapters.")
    lora_layers: str = option(
        "all",
        "Transformer layers that get LoRA: 'all', 'topK' (the K layers nearest the head, e.g. top2) or indices "
        "such as '4,5'. The embeddings and the layers below the lowest trained one then run without autograd.",
    )
    lora_exclude_modules: list[str] = option(
        [], "Modules matching --lora_target_modules that get no LoRA, named by a dotted suffix as PEFT's "
        "exclude_modules matches them (e.g. layer.3.attention.self.query). With --lora_layers topK, LoRA on only the "
        "feed-forward of the lowest trained layer lets backward stop there (recipes/proxy-fast.yaml).",
    )
    lora_rank_pattern: list[str] = option(
        [], "Per-module ranks as MODULE=RANK (e.g. intermediate.dense=4); other targets use --lora_r."
    )
    use_rslora: bool = option(False, "Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r.")
    use_dora: bool = option(False, "DoRA: learn a magnitude per output feature on top of the LoRA direction.")
    classifier_head: Literal["model", "model_output", "first_token", "mean"] = option(
        "model",
        "Head: 'model' trains the base class's own head in full (roberta: 593,668 parameters); 'model_output' "
        "keeps that head but trains only its output Linear (roberta: 3,076; inner layers stay as initialised and "
        "are saved with the adapter). Both load with plain PEFT. Research options that plain PEFT cannot load: "
        "'first_token' / 'mean', one Linear over the first token / the masked mean of the last hidden states.",
    )
    max_trainable_params: int = option(1_000_000, "Refuse to train more parameters than this.")
    gradient_checkpointing: bool = option(True, "Recompute activations in backward to save memory.")
    frozen_prefix: bool = option(
        True, "Run the frozen prefix (embeddings and the layers below --lora_layers) without autograd: same "
        "results, no backward through it; false runs the plain model.",
    )
    cache_frozen_prefix: bool = option(
        False,
        "With --lora_layers leaving a frozen prefix: compute its output once per training example, keep it under "
        "output_dir/prefix_cache, and read it in later epochs (needs dropout 0 there: --model_dropout 0).",
    )
    frozen_prefix_cache_max_gb: float = option(20.0, "Refuse to build a frozen-prefix cache larger than this (GB).")
    first_token_last_layer: bool = option(
        False, "Compute the last encoder layer for the first token only (its keys and values still for every token): "
        "the heads 'model', 'model_output' and 'first_token' read nothing else. Same results, less work.",
    )
    # Optimisation
    learning_rate: float = option(1e-4, "AdamW peak learning rate.")
    weight_decay: float = option(0.01, "AdamW weight decay (not applied to biases and LayerNorm).")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this (0 turns clipping off).")
    per_device_train_batch_size: int = option(32, "Training micro-batch per process.")
    per_device_eval_batch_size: int = option(64, "Evaluation batch per process.")
    gradient_accumulation_steps: int = option(4, "Micro-batches per optimizer step.")
    global_batch_size: int | None = option(
        None,
        "Fix the effective batch (examples per optimizer step) whatever the process count: the micro-batch becomes "
        "the largest divisor of global/processes up to --per_device_train_batch_size, and accumulation fills the "
        "rest (--gradient_accumulation_steps is then ignored).",
    )
    num_train_epochs: float = option(6.0, "Passes over the training split.")
    max_train_steps: int | None = option(None, "Stop after this many optimizer steps (overrides epochs).")
    head_learning_rate: float | None = option(None, "Learning rate of the classifier head (default: --learning_rate).")
    lr_scheduler_type: Literal["linear", "cosine", "constant_with_warmup", "one_cycle"] = option(
        "linear", "Learning-rate schedule ('one_cycle': PyTorch OneCycleLR, warmup = --warmup_ratio)."
    )
    label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy (0: off).")
    rdrop_alpha: float = option(
        0.0, "R-Drop: weight of the symmetric KL between two dropout passes of each batch (0: off; doubles compute)."
    )
    warmup_ratio: float = option(0.1, "Fraction of optimizer steps spent warming up.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = option(
        "auto", "Precision: 'auto' takes fp16/bf16 from an Accelerate config or launcher flag, else picks bf16 on GPUs "
        "that support it, fp16 on older GPUs, bf16 on CPUs with AVX512-BF16 or AMX, fp32 otherwise; 'no' forces fp32.",
    )
    num_threads: int = option(
        0, "CPU threads per process; 0: $OMP_NUM_THREADS if you set it, else the physical cores divided among the "
        "processes on this machine (launchers' injected OMP_NUM_THREADS=1 is ignored).",
    )
    cast_frozen_weights: bool = option(
        True, "Under fp16/bf16, keep the frozen base Linear weights in that dtype (same math, no per-step casts)."
    )
    attn_implementation: Literal["auto", "sdpa", "eager"] = option(
        "auto", "Attention kernel (transformers' attn_implementation): 'auto' is the library's choice (sdpa); "
        "'eager' (plain matmul + softmax) has a ~2x faster backward than sdpa's on CPU at short lengths (EXPERIMENTS.md).",
    )
    torch_compile: bool = option(
        False, "Compile the encoder's layers with torch.compile (inductor) for training and evaluation: the same "
        "math in fused kernels, after a one-off compile (its time and graph count are reported).",
    )
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = option(
        None, "torch.compile mode (implies --torch_compile true); unset: 'default'.",
    )
    half_precision_base: bool = option(
        False, "Hold the frozen base (weights and activations) in bf16 and run it without autocast; LoRA and head "
        "weights, gradients and optimizer state stay fp32. Needs bf16 (--mixed_precision bf16, or auto resolving "
        "to it). Changes rounding, hence results.",
    )
    seed: int = option(37, "Seed for the split, the batch order, dropout and LoRA init.")
    # Schedule of side effects
    eval_steps: int = option(200, "Evaluate on validation every N optimizer steps (and at the end).")
    save_steps: int = option(200, "Write a training checkpoint every N optimizer steps (0: never).")
    logging_steps: int = option(50, "Log train loss and learning rate every N optimizer steps.")
    save_total_limit: int = option(2, "Keep this many newest checkpoints plus the best one (0: keep all).")
    resume_from_checkpoint: str | None = option(
        None, "Continue a stopped run: 'latest' (newest complete checkpoint in output_dir, if any) or a checkpoint folder."
    )
    early_stopping_patience: int = option(0, "Stop after N evaluations without a better validation accuracy (0: off).")
    output_dir: str = option("outputs/agnews-lora", "Where the adapter, metrics and checkpoints go.")
    overwrite_output_dir: bool = option(False, "Allow writing into an output_dir that already holds a finished run.")
    # Tracking
    report_to: Literal["wandb", "online", "offline", "disabled", "none"] = option(
        "wandb",
        "W&B mode. 'wandb': $WANDB_MODE if set, else online with an API key, offline without; "
        "'online'/'offline' force that mode; 'disabled'/'none': no tracking.",
    )
    wandb_project: str | None = option(None, "W&B project (default: $WANDB_PROJECT, else peft-agnews).")
    wandb_entity: str | None = option(
        None, "W&B entity, a user or team (default: $WANDB_ENTITY, else the key's default entity)."
    )
    wandb_group: str | None = option(None, "W&B group: gathers related runs (a sweep, repeated seeds) in the UI.")
    wandb_tags: list[str] = option([], "W&B tags (space- or comma-separated).")
    run_name: str | None = option(None, "W&B run name.")
    dry_run: bool = option(False, "Build data and model, print the plan, write nothing, exit.")

    def __post_init__(self) -> None:
        # W&B sweep agents pass lists as one `--name=a,b` argument.
        self.lora_target_modules = _split_commas(self.lora_target_modules)
        self.lora_exclude_modules = _split_commas(self.lora_exclude_modules)
        self.wandb_tags = _split_commas(self.wandb_tags)
        self.text_column_names = _split_commas(self.text_column_names)
        self.output_dir = _expand_env(self.output_dir, "--output_dir")
        self.model_name_or_path = _expand_env(self.model_name_or_path, "--model_name_or_path")
        self.lora_r = _parse_rank(self.lora_r)
        if self.torch_compile_mode is not None:  # as TrainingArguments: a mode asks for compilation
            self.torch_compile = True
        self.lora_layers = str(self.lora_layers).strip().lower().replace(" ", "")
        self.lora_rank_pattern = _split_commas(self.lora_rank_pattern)
        rank_pattern_dict(self.lora_rank_pattern)  # validates MODULE=RANK
        # A NaN passes every comparison below as False, and inf makes no sense for any float option.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"invalid config: --{f.name} must be a finite number, got {value}")
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
            (self.frozen_prefix or not self.cache_frozen_prefix, "--cache_frozen_prefix needs --frozen_prefix true"),
            (not self.first_token_last_layer or self.classifier_head in FIRST_TOKEN_HEADS,
             first_token_head_problem(self.classifier_head)),
            (self.eval_steps >= 1 and self.logging_steps >= 1, "--eval_steps and --logging_steps must be >= 1"),
            (self.save_steps >= 0, "--save_steps must be >= 0 (0 turns checkpoints off)"),
            (self.save_total_limit >= 0, "--save_total_limit must be >= 0 (0 keeps every checkpoint)"),
            (self.early_stopping_patience >= 0, "--early_stopping_patience must be >= 0 (0 turns it off)"),
            (len(self.text_column_names) >= 1, "--text_column_names needs at least one column"),
            (self.train_file is not None or self.dataset_name, "give --train_file or --dataset_name"),
        ]
        problems = [message for ok, message in checks if not ok] + shared_option_problems(self)
        if problems:
            raise UsageError(f"invalid config: {problems[0]}")

    def resolved_label_names(self, dataset_names: list[str] | None = None) -> list[str]:
        """The class names: --label_names, else the dataset's ClassLabel names, else AG News's."""
        return list(self.label_names or dataset_names or AG_NEWS_LABELS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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


def first_token_head_problem(classifier_head: str) -> str:
    """Why --first_token_last_layer cannot go with `classifier_head` (one that reads more than the first token)."""
    return (f"--first_token_last_layer needs a head that reads only the first token "
            f"(--classifier_head {' / '.join(FIRST_TOKEN_HEADS)}), not {classifier_head!r}")


def training_option(name: str, help: str | None = None, **kwargs: Any) -> Any:
    """An inference command's option that training also has: TrainConfig's default, and its help unless `help`
    says what differs for inference."""
    declared = TrainConfig.__dataclass_fields__[name]
    return option(declared.default, help or declared.metadata["help"], **kwargs)


def shared_option_problems(options: Any) -> list[str]:
    """What is wrong with the options training and inference share (max_length, per_device_eval_batch_size,
    label_names where taken, num_threads), checked alike for TrainConfig and the inference commands' options."""
    names = getattr(options, "label_names", None)
    checks = [
        (options.per_device_eval_batch_size >= 1, "--per_device_eval_batch_size must be >= 1"),
        (options.max_length >= 8, "--max_length must be >= 8"),
        (names is None or len(names) >= 2, "--label_names needs at least two classes"),
        (names is None or len(set(names)) == len(names), "--label_names must be distinct"),
        (options.num_threads >= 0, "--num_threads must be >= 0 (0: all physical cores)"),
    ]
    return [message for ok, message in checks if not ok]


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


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(TrainConfig, description="Fine-tune a sequence classifier with LoRA under Accelerate.")
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
            raise UsageError(f"config file {path}: {name} must be a value or a list of values, got {value!r}")
        tokens_of_option = [f"--{name}", *(str(item) for item in items)]
        try:
            parser.parse_args(tokens_of_option)
        except argparse.ArgumentError as err:
            raise UsageError(f"config file {path}: {name}: {value!r}: {err.message}") from None
        tokens += tokens_of_option
    return tokens, nulls


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML options file, refusing unknown keys so a typo never silently falls back to a default."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file not found: {path} (pass an existing YAML file to --config)")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UsageError(f"config file {path} is not valid YAML: {first_line(err)}") from None
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
