"""LoRA fine-tuning of sequence classifiers under Accelerate (AG News as the reference task).

The public API; everything else is internal and may move:

    TrainConfig, parse_config   the training options (defaults = the reference recipe), from code or an argv list
    run                         train, evaluate and export one run: `run(TrainConfig(train_file=..., output_dir=...))`
    load_classifier, ModelArgs  a trained adapter (or merged model) ready for inference: base, head, tokenizer, labels
    Classifier                  what `load_classifier` returns
    replace_head                build an adapter's non-default head (`head.json`) on a base before
                                `PeftModel.from_pretrained`

Commands: `accelerate launch peft_agnews/train.py`, `peft-agnews <command>` (see README.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Resolved on first use: `import peft_agnews` must not pull in torch, transformers and Accelerate.
_EXPORTS = {
    "TrainConfig": "peft_agnews.config",
    "parse_config": "peft_agnews.config",
    "run": "peft_agnews.train",
    "load_classifier": "peft_agnews.loading",
    "ModelArgs": "peft_agnews.loading",
    "Classifier": "peft_agnews.loading",
    "replace_head": "peft_agnews.model",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from peft_agnews.config import TrainConfig, parse_config
    from peft_agnews.loading import Classifier, ModelArgs, load_classifier
    from peft_agnews.model import replace_head
    from peft_agnews.train import run


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'peft_agnews' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
