"""Write the run's deliverables atomically: a folder or file appears complete, or not at all."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from peft_agnews.model import save_head_choice

LABELS_FILE = "labels.json"


def save_adapter(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    label_names: list[str],
    out_dir: Path,
    state_dict: dict[str, Any] | None = None,
    classifier_head: str = "model",
) -> None:
    """Adapter weights (safetensors) + adapter config + tokenizer + label names (+ head.json for a non-default
    `classifier_head`), swapped in as one rename.

    `state_dict`: the model's full state dict when it had to be gathered first (sharded training, see train.py);
    PEFT keeps only the adapter and head entries of it."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(tmp)
    write_json(tmp / LABELS_FILE, {"id2label": dict(enumerate(label_names))})
    save_head_choice(tmp, classifier_head)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON via a temporary file and a rename, so readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_label_names(adapter_dir: Path) -> list[str]:
    """The class names saved next to an adapter, in label-id order."""
    id2label = json.loads((adapter_dir / LABELS_FILE).read_text())["id2label"]
    return [id2label[str(i)] for i in range(len(id2label))]
