"""The CPU speed machinery: less work per training step for the same model, behind one entry point.

`apply(model, cfg, num_processes, precision)` is called by `train.build_model` once LoRA is in place. It checks the
prerequisites of every speed option asked for (`check_prerequisites`), then puts them into the model:

| option | module | what it does | results |
|---|---|---|---|
| `--dropout_generator pcg64` | `dropout.py` | dropout masks from numpy's PCG64, one seed per mask from torch's generator | another random stream (keep probability quantised to 2^-16); GPUs keep torch's |
| `--frozen_prefix` | `frozen_prefix.py` | the embeddings and the layers below the lowest trained one run without autograd | unchanged |
| `--cache_frozen_prefix` | `prefix_cache.py` | that prefix's output per training example kept on disk, read in later epochs | unchanged |
| `--first_token_last_layer` | `first_token.py` | the last layer computed for the first token only (all the head reads) | unchanged |
| `--cast_frozen_weights` | `precision.py` | under fp16/bf16 autocast, the frozen Linear weights stored in that dtype once | unchanged |
| `--half_precision_base` | `precision.py` | the frozen base held in bf16 and run without autocast; trained weights fp32 | other rounding |
| `--torch_compile` | `compilation.py` | the encoder's layers compiled in place with torch.compile (inductor) | float reassociation; with dropout, other masks |

The returned frozen prefix is what train needs later: `describe_prefix` (the plan's line) and `attach_cache` (once
the run writes files, i.e. not under --dry_run). Nothing is registered or changed at import time. A prerequisite
that needs only the options (a head that reads only the first token, `heads.first_token_problem`) is checked when
the options are read; the rest, which need the model or the launch, here. Measurements: docs/speed.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import PeftModel

from peft_agnews.config import TrainConfig
from peft_agnews.errors import UsageError
from peft_agnews.hardware import spans_machines
from peft_agnews.speed.compilation import CompileStats, compile_layers, cpu_compiler_problem
from peft_agnews.speed.dropout import use_pcg64_dropout
from peft_agnews.speed.first_token import bert_style_last_layer, first_token_last_layer
from peft_agnews.speed.frozen_prefix import (
    FrozenPrefixLayers,
    attach_cache,
    describe_prefix,
    enable_frozen_prefix,
    frozen_depth,
    prefix_modules,
)
from peft_agnews.speed.precision import cast_frozen_linear_weights, hold_base_in_half
from peft_agnews.speed.prefix_cache import CACHE_DIR

__all__ = ["CACHE_DIR", "CompileStats", "FrozenPrefixLayers", "apply", "attach_cache", "check_prerequisites",
           "describe_prefix"]
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def apply(model: PeftModel, cfg: TrainConfig, num_processes: int = 1, precision: str = "no",
          say: Callable[[str], None] = print) -> FrozenPrefixLayers | None:
    """Put `cfg`'s speed options into `model` (in place) after checking their prerequisites; returns the frozen prefix
    (None when there is none or --frozen_prefix is false). `num_processes`: the run's, for the cache's one-machine
    check; `precision`: what the run computes in ('no', 'fp16', 'bf16'); `say`: where the lines about what was
    done go."""
    check_prerequisites(model, cfg, num_processes, precision)
    if cfg.dropout_generator == "pcg64":
        use_pcg64_dropout(model)  # after LoRA: PEFT's lora_dropout layers exist only then
    prefix = enable_frozen_prefix(model) if cfg.frozen_prefix else None
    if cfg.first_token_last_layer:
        first_token_last_layer(model)
    if cfg.half_precision_base:
        cast = hold_base_in_half(model, HALF[precision])
        say(f"half-precision base: {cast} frozen tensors held in bf16, run without autocast; LoRA and head in fp32")
    elif precision in HALF and cfg.cast_frozen_weights:
        cast_frozen_linear_weights(model, HALF[precision])
    if cfg.torch_compile:  # last: graphs are traced at first use, from the model as it is then
        compiled = compile_layers(model, cfg.torch_compile_mode)
        say(f"torch.compile: {compiled} module(s) compiled in place (inductor, mode "
            f"{cfg.torch_compile_mode or 'default'}); their graphs compile on first use")
    return prefix


def check_prerequisites(model: PeftModel, cfg: TrainConfig, num_processes: int = 1, precision: str = "no") -> None:
    """Raise UsageError when a speed option asked for cannot work on this model, launch and precision.

    --cache_frozen_prefix needs a frozen prefix (--frozen_prefix true and LoRA on the top layers only), no dropout in
    it (its output must be the same every epoch) and one machine (every process maps the same files);
    --first_token_last_layer needs a BERT-style encoder; --half_precision_base needs bf16; --torch_compile on a
    CPU needs a C++ compiler.
    """
    if cfg.half_precision_base and precision != "bf16":
        raise UsageError(f"--half_precision_base needs bf16, but this run computes in "
                         f"{'fp32' if precision == 'no' else precision}; pass --mixed_precision bf16 (slow on a CPU "
                         "without bf16 instructions) or drop --half_precision_base")
    if cfg.torch_compile and not torch.cuda.is_available() and (problem := cpu_compiler_problem()):
        raise UsageError(f"--torch_compile on a CPU needs a C++ compiler for inductor's kernels ({problem}); install "
                         "g++ (or set CXX to one), or drop --torch_compile")
    if cfg.cache_frozen_prefix:
        depth = frozen_depth(model) if cfg.frozen_prefix else 0
        if depth == 0:
            raise UsageError("--cache_frozen_prefix needs frozen bottom layers: pass --lora_layers topK with K below "
                             "the model's layer count (and no trainable embeddings), and --frozen_prefix true")
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for part in prefix_modules(model, depth)
               for m in part.modules()):
            raise UsageError("--cache_frozen_prefix needs dropout off in the frozen layers (their output must be the "
                             "same every epoch); pass --model_dropout 0")
        if spans_machines(num_processes):
            raise UsageError("--cache_frozen_prefix shares its files between the processes of one machine; "
                             "drop it for multi-machine runs")
    if cfg.first_token_last_layer and bert_style_last_layer(model) is None:
        raise UsageError("--first_token_last_layer needs a BERT-style encoder (RoBERTa, BERT, MiniLM, ...)")
