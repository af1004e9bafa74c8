"""--first_token_last_layer: the last layer computed for the first token only gives the same logits and gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import four_layer_model, toy_batch
from peft_agnews.config import TrainConfig, parse_config
from peft_agnews.errors import UsageError
from peft_agnews.heads import HEADS
from peft_agnews.speed.first_token import first_token_last_layer
from peft_agnews.speed.frozen_prefix import enable_frozen_prefix

BATCH = toy_batch()


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("lora_layers", ["top2", "all"])
def test_last_layer_for_the_first_token_only_gives_the_same_logits_and_gradients(kernel, lora_layers):
    """The model head reads only the first token's final state: the last layer computed for that token alone
    (keys and values still from every token, padding masked) is the same function of the trained weights."""
    results = []
    for first_token in (False, True):
        model = four_layer_model(lora_layers=lora_layers, gradient_checkpointing=False, attn_implementation=kernel)
        model.get_base_model().config._attn_implementation = kernel  # built in code, not loaded
        enable_frozen_prefix(model)
        if first_token:
            first_token_last_layer(model)
        widths = []  # tokens reaching the last layer's feed-forward
        model.get_base_model().roberta.encoder.layer[3].intermediate.register_forward_pre_hook(
            lambda _, args: widths.append(args[0].shape[1]))
        model.train()
        out = model(**BATCH)
        assert widths == [1 if first_token else BATCH["input_ids"].shape[1]]
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain_logits, plain_grads), (logits, grads) = results
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and any("layer.3" in n and "lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_last_layer_for_the_first_token_only_needs_a_head_that_reads_only_the_first_token():
    """Checked once, when the options are read (before any data or model is loaded), as the head registry says:
    every way of making a config (flags, YAML, code, a replace) passes through that check."""
    message = "--first_token_last_layer needs a head that reads only the first token .*, not 'mean'"
    with pytest.raises(UsageError, match=message):
        parse_config(["--first_token_last_layer", "true", "--classifier_head", "mean"])
    with pytest.raises(UsageError, match=message):
        dataclasses.replace(TrainConfig(first_token_last_layer=True), classifier_head="mean")
    for name, head in HEADS.items():
        if head.first_token_only:
            assert TrainConfig(first_token_last_layer=True, classifier_head=name).classifier_head == name
        else:
            with pytest.raises(UsageError, match="needs a head that reads only the first token"):
                TrainConfig(first_token_last_layer=True, classifier_head=name)
