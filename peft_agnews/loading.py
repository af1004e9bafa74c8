"""Load a trained classifier for inference (an adapter on its base, or a merged model) (scoring.py scores text with it).

Shared by evaluate, predict, export and ensemble: the model options are declared here (`ModelArgs`; those training
also has take their defaults and checks from config.py), every mismatch between an adapter and the model it is
loaded on becomes one UsageError, and scoring runs on any number of processes with each row counted once.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from peft_agnews.config import MULTI_LABEL, LogLevel, option, shared_option_problems, training_option
from peft_agnews.errors import UsageError, first_line
from peft_agnews.artifacts import LABELS_FILE, read_label_names, read_multi_label_threshold
from peft_agnews.files import check_writable
from peft_agnews.model import load_classification_model, load_pretrained_tokenizer, read_head_choice, replace_head

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class ModelArgs:
    """Which trained classifier to load (shared by evaluate, predict and export)."""

    adapter_dir: str | None = option(None, "Adapter folder written by training (<output_dir>/adapter).")
    model_name_or_path: str | None = option(
        None, "Base model for --adapter_dir (default: the one named in its adapter_config.json), or a merged model alone."
    )
    label_names: list[str] | None = option(None, "Class names in id order (default: labels.json or the model config).")
    per_device_eval_batch_size: int = training_option("per_device_eval_batch_size", "Rows per batch per process.")
    max_length: int = training_option("max_length", "Truncate inputs to this many tokens (use the training value).")
    num_threads: int = training_option("num_threads")
    multi_label_threshold: float | None = option(
        None, "Multi-label classifiers: predict a class at sigmoid probability >= this (default: the training "
        "run's, saved in labels.json, else 0.5).",
    )
    log_level: LogLevel = training_option("log_level")

    def __post_init__(self) -> None:
        if not self.adapter_dir and not self.model_name_or_path:
            raise UsageError("give --adapter_dir (a trained adapter) or --model_name_or_path (a merged model)")
        problems = shared_option_problems(self)
        if problems:
            raise UsageError(problems[0])


@dataclass
class Classifier:
    """A model in eval mode with its tokenizer and class names; `multi_label_threshold` is set for a multi-label
    classifier (a sigmoid per class) and None for a single-label one (softmax)."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    label_names: list[str]
    base_model: str
    multi_label_threshold: float | None = None


def load_classifier(args: ModelArgs) -> Classifier:
    """The adapter on its base (checked to fit) or a merged model, with tokenizer, label names and (multi-label)
    threshold."""
    classifier = _load_adapter(Path(args.adapter_dir), args) if args.adapter_dir else _load_merged(args)
    if args.multi_label_threshold is not None:
        if classifier.multi_label_threshold is None:
            raise UsageError("--multi_label_threshold applies to multi-label classifiers; this one picks one class "
                             "per row (labels.json / its config has no multi_label_classification problem_type)")
        classifier.multi_label_threshold = args.multi_label_threshold
    return classifier


def _saved_threshold(folder: Path) -> float | None:
    """labels.json's multi-label threshold, checked (None: a single-label classifier)."""
    try:
        threshold = read_multi_label_threshold(folder)
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise damaged(folder / LABELS_FILE, first_line(err)) from None
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 < threshold < 1):
        raise damaged(folder / LABELS_FILE, f"multi_label_threshold is {threshold!r}, not a number in (0, 1)")
    return threshold


def _load_merged(args: ModelArgs) -> Classifier:
    model = _from_pretrained(args.model_name_or_path, "--model_name_or_path")
    names = args.label_names or [model.config.id2label[i] for i in range(model.config.num_labels)]
    if len(names) != model.config.num_labels:
        raise UsageError(
            f"{len(names)} label names given but {args.model_name_or_path} has {model.config.num_labels} outputs; "
            "pass one name per class to --label_names"
        )
    tokenizer = load_pretrained_tokenizer(args.model_name_or_path, "--model_name_or_path")
    threshold = None
    if model.config.problem_type == MULTI_LABEL:
        saved = Path(args.model_name_or_path)
        threshold = (_saved_threshold(saved) if saved.is_dir() else None) or 0.5
    return Classifier(model.eval(), tokenizer, list(names), base_model=args.model_name_or_path,
                      multi_label_threshold=threshold)


def _load_adapter(adapter_dir: Path, args: ModelArgs) -> Classifier:
    if not (adapter_dir / ADAPTER_CONFIG).is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise UsageError(
            f"{adapter_dir} is not an adapter folder (no {ADAPTER_CONFIG} / {ADAPTER_WEIGHTS}); "
            "pass the adapter/ folder written by training, or a merged model with --model_name_or_path"
        )
    adapter_config = read_adapter_config(adapter_dir)
    trained_on = adapter_config.get("base_model_name_or_path")
    base_name = args.model_name_or_path or trained_on
    if not base_name:
        raise UsageError(f"{adapter_dir / ADAPTER_CONFIG} names no base model; pass it with --model_name_or_path")
    names = args.label_names or _saved_label_names(adapter_dir)
    threshold = _saved_threshold(adapter_dir)
    # The Hub revision training used (--model_revision), for the base it names; AutoPeftModel does the same.
    revision = {"revision": adapter_config["revision"]} if adapter_config.get("revision") and base_name == trained_on else {}
    base = _from_pretrained(
        base_name,
        "--model_name_or_path" if args.model_name_or_path else f"base_model_name_or_path in {adapter_dir / ADAPTER_CONFIG}",
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        **({"problem_type": MULTI_LABEL} if threshold is not None else {}),
        **revision,
    )
    # A head other than the base class's own (recorded in head.json by training) must be built before loading.
    replace_head(base, read_head_choice(adapter_dir))
    check_adapter_fits(base, adapter_dir, base_name, trained_on, len(names))
    if trained_on and Path(trained_on).name != Path(base_name).name:
        # Shapes fit, but a same-shaped base with other weights cannot be told apart: say what was assumed.
        print(f"warning: adapter {adapter_dir} was trained on {trained_on}; loading it on {base_name}", file=sys.stderr)
    try:
        model = PeftModel.from_pretrained(base, adapter_dir)
    except (RuntimeError, TypeError, ValueError, KeyError) as err:  # not foreseen above: keep PEFT's first line
        raise UsageError(f"adapter {adapter_dir} does not load on {base_name}: {first_line(err)}") from None
    return Classifier(model.eval(), load_pretrained_tokenizer(adapter_dir, "--adapter_dir"), list(names),
                      base_model=base_name, multi_label_threshold=threshold)


def damaged(file: Path, detail: str) -> UsageError:
    return UsageError(f"{file} is damaged ({detail}); restore it from the training run's adapter folder")


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json, checked where PEFT itself would fail late or obscurely (it accepts `"r": "eight"`)."""
    file = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise damaged(file, f"not JSON: {first_line(err)}") from None
    if not isinstance(config, dict):
        raise damaged(file, "not a JSON object")
    for key, kinds in {"r": (int,), "lora_alpha": (int, float)}.items():
        value = config.get(key)
        if key in config and (isinstance(value, bool) or not isinstance(value, kinds) or value <= 0):
            raise damaged(file, f"{key} is {value!r}, not a positive number")
    return config


def _saved_label_names(adapter_dir: Path) -> list[str]:
    if not (adapter_dir / LABELS_FILE).is_file():
        raise UsageError(f"{adapter_dir} has no {LABELS_FILE}; pass the class names with --label_names")
    try:
        names = read_label_names(adapter_dir)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise damaged(adapter_dir / LABELS_FILE, f"expected {{\"id2label\": {{\"0\": name, ...}}}}: {first_line(err)}") from None
    if len(names) < 2 or not all(isinstance(name, str) for name in names):
        raise damaged(adapter_dir / LABELS_FILE, "fewer than two class names, or names that are not strings")
    return names


def check_adapter_fits(
    base: PreTrainedModel, adapter_dir: Path, base_name: str, trained_on: str | None, num_labels: int
) -> None:
    """Raise a UsageError unless every saved adapter tensor has a place of the right shape in `base`.

    PEFT would otherwise fail with a KeyError or a page of size mismatches (another architecture), or, for a
    label-count mismatch, a size-mismatch error on the classifier head.
    """
    params = dict(base.named_parameters())
    modules = dict(base.named_modules())
    problems, head_rows = [], None
    try:
        weights = safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt")
    except (OSError, SafetensorError) as err:
        raise damaged(adapter_dir / ADAPTER_WEIGHTS, first_line(err)) from None
    with weights:
        for key in weights.keys():
            shape = list(weights.get_slice(key).get_shape())
            name = key.removeprefix(PEFT_PREFIX)
            if ".lora_A." in name or ".lora_B." in name:
                module = modules.get(name.split(".lora_")[0])
                if not isinstance(module, torch.nn.Linear):
                    problems.append(f"the base has no Linear layer {name.split('.lora_')[0]}")
                elif ".lora_A." in name and shape[1] != module.in_features:
                    problems.append(f"{name} expects {shape[1]} inputs, the base layer has {module.in_features}")
                elif ".lora_B." in name and shape[0] != module.out_features:
                    problems.append(f"{name} gives {shape[0]} outputs, the base layer has {module.out_features}")
                continue
            target = params.get(name.replace(".base_layer.", "."))
            if target is None:
                problems.append(f"the base has no parameter {name}")
            elif list(target.shape) != shape:
                if target.shape[0] == num_labels and shape[0] != num_labels and target.shape[1:] == tuple(shape[1:]):
                    head_rows = shape[0]
                problems.append(f"{name} has shape {shape}, the base has {list(target.shape)}")
    if head_rows is not None:
        raise UsageError(
            f"label count mismatch: the adapter's classifier head has {head_rows} outputs but {num_labels} label "
            f"names were given ({adapter_dir / LABELS_FILE} or --label_names); use the adapter's own label names"
        )
    if problems:
        origin = f"; it was trained on {trained_on}" if trained_on and trained_on != base_name else ""
        raise UsageError(
            f"adapter {adapter_dir} does not fit base model {base_name}{origin}: {problems[0]} "
            f"({len(problems)} mismatched tensors); pass the adapter's base model with --model_name_or_path"
        )


def _from_pretrained(name: str, flag: str, **kwargs) -> PreTrainedModel:
    verbosity = hf_logging.get_verbosity()
    if kwargs:  # a base for an adapter: its load report would list the head as missing, which the adapter supplies
        hf_logging.set_verbosity_error()
    try:
        return load_classification_model(name, flag, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def check_output_path(path: Path, overwrite: bool, folder: bool = False) -> None:
    """Refuse to replace an existing output unless asked, and an output location that cannot be written (checked
    before any scoring); outputs are then written via a temp path + rename (see `files.atomic_write`)."""
    if path.exists() and path.is_dir() != folder:
        raise UsageError(f"{path} exists and is not a {'folder' if folder else 'file'}; choose another path")
    if path.exists() and not overwrite:
        raise UsageError(f"{path} already exists; choose another path or pass --overwrite")
    check_writable(path.parent, "output path")
