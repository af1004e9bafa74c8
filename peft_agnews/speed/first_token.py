"""The last encoder layer for the first token only (--first_token_last_layer): all a [CLS] head reads."""

from __future__ import annotations

from functools import partial

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import eager_attention_forward

from peft_agnews.speed.frozen_prefix import encoder_layer_list

# The parts of a BERT-style encoder layer (RoBERTa, BERT, MiniLM, ...) that the first-token forward calls.
LAYER_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output", "intermediate",
               "output")


def bert_style_last_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The encoder's last layer when it is BERT-style (it has every part in LAYER_PARTS); None otherwise."""
    layers = encoder_layer_list(model)
    last = list(layers._modules.values())[-1] if layers is not None else None
    try:
        for part in LAYER_PARTS if last is not None else ():
            last.get_submodule(part)
    except AttributeError:
        return None
    return last


def first_token_last_layer(model: torch.nn.Module) -> None:
    """Compute the last encoder layer for the first token only (--first_token_last_layer).

    The head reads nothing else (a head with `first_token_only` in `heads.HEADS`, checked with the options), so the
    other tokens' outputs of that layer are dead work: only their keys and values are needed (the first token attends
    to them). The same logits and gradients. The layer (`bert_style_last_layer`, checked by
    `speed.check_prerequisites`) keeps its weights and names; only its forward is replaced on this instance.
    """
    last = bert_style_last_layer(model)
    last.forward = partial(_first_token_forward, last)


def _first_token_forward(layer: torch.nn.Module, hidden_states: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
    """BertLayer.forward (self-attention, then feed-forward) with queries and outputs for position 0 only."""
    heads, first = layer.attention.self, hidden_states[:, :1]
    batch = hidden_states.shape[0]

    def split(states: torch.Tensor) -> torch.Tensor:  # (batch, tokens, hidden) -> (batch, heads, tokens, head size)
        return states.view(batch, -1, heads.num_attention_heads, heads.attention_head_size).transpose(1, 2)

    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :1]  # (batch, 1, queries, keys): the first query's row
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(heads.config._attn_implementation, eager_attention_forward)
    context, _ = attend(heads, split(heads.query(first)), split(heads.key(hidden_states)),
                        split(heads.value(hidden_states)), attention_mask,
                        dropout=heads.dropout.p if heads.training else 0.0, scaling=heads.scaling)
    attended = layer.attention.output(context.reshape(batch, 1, -1), first)
    return layer.output(layer.intermediate(attended), attended)
