"""The frozen prefix: with LoRA only on the top layers (--lora_layers), the embeddings and the layers below the
lowest trained one hold no trainable parameter. They run under `torch.no_grad()`: no activations are kept for
backward, and backward (gradient checkpointing's recompute included) stops at the first trained layer.
With --cache_frozen_prefix, the prefix output of a training example is read from a PrefixCache once computed, in
place of the embeddings' output (so the embeddings are skipped too).

The split happens inside the encoder's own forward (masks, heads and PEFT untouched): its layer list is replaced
by a FrozenPrefixLayers holding the same modules under the same names, whose iteration yields one step that runs
the prefix, then the trained layers. The state dict, hence the saved adapter, is that of the plain model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from datasets import Dataset
from peft import PeftModel

from peft_agnews.config import TrainConfig
from peft_agnews.data import fingerprint_rows
from peft_agnews.speed.prefix_cache import ROWS_KEY, PrefixCache, cache_bytes, tokens_digest, weights_digest


class FrozenPrefixLayers(torch.nn.ModuleList):
    """An encoder's layer list whose first `depth` layers run as one step without autograd (or from `cache`)."""

    def __init__(self, modules=None, depth: int = 0) -> None:
        super().__init__(modules)
        self.depth = depth
        self.cache: PrefixCache | None = None
        self.rows: torch.Tensor | None = None  # the rows of the batch in flight, set by a pre-hook on the model
        self.from_cache = False  # the embeddings' stand-in returned the batch's cached prefix output
        # The dtype of the embeddings' output, which a cache read stands in for: asked at each read, since the base
        # may be cast after the prefix is installed (--half_precision_base holds it in bf16).
        self.embeddings_dtype: Callable[[], torch.dtype] = lambda: torch.float32

    def __iter__(self) -> Iterator:
        if not self.depth:
            return super().__iter__()
        return iter([self._run_prefix, *list(super().__iter__())[self.depth:]])

    def _run_prefix(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.from_cache:  # already the prefix output (embed_or_read_cache)
            self.from_cache = False
            return hidden_states
        rows, self.rows = self.rows, None
        with torch.no_grad():
            for layer in list(super().__iter__())[: self.depth]:
                hidden_states = layer(hidden_states, *args, **kwargs)
        if self.cache is not None and rows is not None:
            # Every epoch, first included, sees the stored (autocast-dtype) values: the same inputs each time.
            hidden_states = self.cache.write(rows, hidden_states)
        return hidden_states

    def embed_or_read_cache(self, embed: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        """The embeddings' forward; when the cache holds every row of the batch, the cached prefix output instead.

        Reading the cache here skips the embeddings too: nothing but the prefix reads their output, apart from
        the attention-mask builder, which needs only its shape and dtype (the same). The prefix then passes it on.
        """
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if self.cache is not None and self.rows is not None and input_ids is not None:
            cached = self.cache.read(self.rows, input_ids.shape[1])
            if cached is not None:
                self.rows, self.from_cache = None, True
                return cached.to(device=input_ids.device, dtype=self.embeddings_dtype())
        return embed(*args, **kwargs)


def _encoder_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """The bare encoder (`model.roberta`, `model.bert`, ...) under the task head and the PEFT wrapper."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return getattr(base, getattr(base, "base_model_prefix", ""), None)


def encoder_layer_list(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The `<encoder>.encoder.layer` list of BERT-style encoders (RoBERTa, BERT, MiniLM, ...); None for others."""
    layers = getattr(getattr(_encoder_model(model), "encoder", None), "layer", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def frozen_depth(model: torch.nn.Module) -> int:
    """How many bottom layers, with the embeddings under them, hold no trainable parameter (0: none can skip)."""
    layers = encoder_layer_list(model)
    embeddings = getattr(_encoder_model(model), "embeddings", None)
    if layers is None or embeddings is None or _trains(embeddings):
        return 0
    return next((i for i, layer in enumerate(layers) if _trains(layer)), len(layers))


def prefix_modules(model: torch.nn.Module, depth: int) -> list[torch.nn.Module]:
    """The modules whose weights decide the prefix output: the embeddings and the first `depth` layers."""
    return [_encoder_model(model).embeddings, *list(encoder_layer_list(model)._modules.values())[:depth]]


def enable_frozen_prefix(model: PeftModel) -> FrozenPrefixLayers | None:
    """Run the frozen prefix without autograd (exact: the same outputs and gradients as the plain model).

    Returns the installed layer list (None when nothing is frozen below the trained layers). A pre-hook on `model`
    takes the batch's row indices (`ROWS_KEY`, present when the loader carries them) out of the forward's
    arguments for the cache.
    """
    depth = frozen_depth(model)
    layers = encoder_layer_list(model)
    if depth == 0 or layers is None:
        return None
    prefix_layers = FrozenPrefixLayers(list(layers._modules.values()), depth)
    encoder_model = _encoder_model(model)
    encoder_model.encoder.layer = prefix_layers
    embeddings = encoder_model.embeddings
    prefix_layers.embeddings_dtype = lambda: next(embeddings.parameters()).dtype
    embeddings.forward = partial(prefix_layers.embed_or_read_cache, embeddings.forward)

    def take_rows(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        prefix_layers.rows, prefix_layers.from_cache = kwargs.pop(ROWS_KEY, None), False
        return args, kwargs

    model.register_forward_pre_hook(take_rows, with_kwargs=True)
    return prefix_layers


def describe_prefix(prefix: FrozenPrefixLayers, cfg: TrainConfig, lengths: list[int], hidden_size: int,
                    dtype: torch.dtype, folder: Path) -> str:
    """The plan's line on the prefix: its depth and, with the cache, the cache's size and place."""
    line = f"frozen prefix: embeddings + layers 0-{prefix.depth - 1} of {len(prefix)} run without autograd"
    if cfg.cache_frozen_prefix:
        line += (f"; cache {cache_bytes(lengths, hidden_size, dtype) / 1e9:.2f} GB ({sum(lengths):,} tokens x "
                 f"{hidden_size} x {dtype.itemsize} B, {str(dtype).removeprefix('torch.')}) in {folder}, "
                 f"limit {cfg.frozen_prefix_cache_max_gb:g} GB")
    return line


def attach_cache(prefix: FrozenPrefixLayers, model: PeftModel, cfg: TrainConfig, train: Dataset, tokenized: Dataset,
                 dtype: torch.dtype, folder: Path, accelerator: Accelerator) -> PrefixCache:
    """Open (reuse or build) the cache of `prefix` for the training split and let the prefix read it (its
    prerequisites: `speed.check_prerequisites`)."""
    modules = prefix_modules(model, prefix.depth)
    config = model.get_base_model().config
    key = {
        "model": cfg.model_name_or_path,
        "model_config": hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest(),
        "prefix_weights": weights_digest(modules),
        "depth": prefix.depth,
        "dtype": str(dtype),
        "max_length": cfg.max_length,
        "rows": fingerprint_rows(train["text"], train["label"]),
        "tokens": tokens_digest(tokenized["input_ids"]),
    }
    prefix.cache = PrefixCache.open(folder, key, list(tokenized["length"]), config.hidden_size, dtype, accelerator,
                                    cfg.frozen_prefix_cache_max_gb)
    return prefix.cache


def _trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())
