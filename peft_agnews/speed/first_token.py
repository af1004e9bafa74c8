"""The last encoder layer for the first token only (--first_token_last_layer): all a [CLS] head reads."""

from __future__ import annotations

from functools import partial

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import eager_attention_forward

from peft_agnews.config import FIRST_TOKEN_HEADS, first_token_head_problem
from peft_agnews.errors import UsageError
from peft_agnews.speed.frozen_prefix import encoder_layer_list


def first_token_last_layer(model: torch.nn.Module, classifier_head: str) -> None:
    """Compute the last encoder layer for the first token only (--first_token_last_layer).

    The head reads nothing else, so the other tokens' outputs of that layer are dead work: only their keys and
    values are needed (the first token attends to them). The same logits and gradients; on the MiniLM proxy the
    layer then cost ~0.15 of its full self (EXPERIMENTS.md). The layer keeps its weights and names; only its
    forward is replaced on this instance.
    """
    if classifier_head not in FIRST_TOKEN_HEADS:
        raise UsageError(first_token_head_problem(classifier_head))
    layers = encoder_layer_list(model)
    last = list(layers._modules.values())[-1] if layers is not None else None
    parts = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output", "intermediate",
             "output")
    try:
        for part in parts if last is not None else ():
            last.get_submodule(part)
    except AttributeError:
        last = None
    if last is None:
        raise UsageError("--first_token_last_layer needs a BERT-style encoder (RoBERTa, BERT, MiniLM, ...)")
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
