"""The run's deliverables (the adapter folder, labels.json, JSON reports), written atomically through files.py:
a folder or file appears complete, or not at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from peft_agnews.config import MULTI_LABEL
from peft_agnews.files import atomic_dir, atomic_write
from peft_agnews.model import save_head_choice

LABELS_FILE = "labels.json"


def save_adapter(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    label_names: list[str],
    out_dir: Path,
    state_dict: dict[str, Any] | None = None,
    classifier_head: str = "model",
    multi_label_threshold: float | None = None,
) -> None:
    """Adapter weights (safetensors) + adapter config + tokenizer + label names (+ head.json for a non-default
    `classifier_head`), swapped in as one rename.

    `state_dict`: the model's full state dict when it had to be gathered first (sharded training, see train.py);
    PEFT keeps only the adapter and head entries of it. `multi_label_threshold`: a multi-label classifier; labels.json
    then also records transformers' problem_type and the threshold its predictions use."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
        write_adapter_companions(tmp, tokenizer, label_names, classifier_head, multi_label_threshold)


def write_adapter_companions(folder: Path, tokenizer: PreTrainedTokenizerBase, label_names: list[str],
                             classifier_head: str = "model", multi_label_threshold: float | None = None) -> None:
    """What an adapter folder holds besides PEFT's own files: the tokenizer, labels.json and (for a custom head)
    head.json. Into an existing folder that the caller swaps in atomically (the adapter, a checkpoint)."""
    tokenizer.save_pretrained(folder)
    labels: dict[str, Any] = {"id2label": dict(enumerate(label_names))}
    if multi_label_threshold is not None:
        labels.update(problem_type=MULTI_LABEL, multi_label_threshold=multi_label_threshold)
    write_json(folder / LABELS_FILE, labels)
    save_head_choice(folder, classifier_head)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON via a temporary file and a rename, so readers never see a half-written file."""
    with atomic_write(path) as handle:
        handle.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_label_names(adapter_dir: Path) -> list[str]:
    """The class names saved next to an adapter, in label-id order."""
    id2label = json.loads((adapter_dir / LABELS_FILE).read_text())["id2label"]
    return [id2label[str(i)] for i in range(len(id2label))]


def read_multi_label_threshold(folder: Path) -> float | None:
    """The threshold of a multi-label classifier saved in `folder` (labels.json), None for a single-label one."""
    file = Path(folder) / LABELS_FILE
    labels = json.loads(file.read_text()) if file.is_file() else {}
    return labels.get("multi_label_threshold") if labels.get("problem_type") == MULTI_LABEL else None
