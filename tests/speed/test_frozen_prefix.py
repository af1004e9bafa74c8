"""The frozen prefix (no autograd below the trained layers, `--frozen_prefix`).

Exactness (fp32, dropout off): the prefix mode trains the same adapter as the plain model with the same LoRA layers.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_same_adapter, four_layer_model, toy_batch
from peft_agnews.objectives import classification_loss
from peft_agnews.speed.frozen_prefix import FrozenPrefixLayers, enable_frozen_prefix, frozen_depth

BATCH = toy_batch()


# --- which layers are frozen --------------------------------------------------------------------------------------

def test_lora_goes_only_on_the_chosen_layers_and_the_rest_is_a_frozen_prefix():
    model = four_layer_model(lora_layers="top1", gradient_checkpointing=False)
    lora_layers = {int(n.split("layer.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}
    assert lora_layers == {3}
    assert model.peft_config["default"].layers_to_transform == [3]
    assert frozen_depth(model) == 3
    assert frozen_depth(four_layer_model(gradient_checkpointing=False)) == 0


def test_excluded_modules_get_no_lora_so_backward_stops_inside_the_lowest_trained_layer():
    model = four_layer_model(lora_layers="top2", lora_target_modules=["query", "value", "intermediate.dense"],
                             lora_exclude_modules=["layer.2.attention.self.query,layer.2.attention.self.value"],
                             gradient_checkpointing=False)
    lora = {n.split("layer.")[1].split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert lora == {"2.intermediate.dense", "3.attention.self.query", "3.attention.self.value", "3.intermediate.dense"}
    assert model.peft_config["default"].exclude_modules == {"layer.2.attention.self.query",
                                                            "layer.2.attention.self.value"}
    assert frozen_depth(model) == 2
    enable_frozen_prefix(model)
    layer = model.get_base_model().roberta.encoder.layer[2]
    needs_grad = {}
    for part in ("attention", "intermediate"):
        getattr(layer, part).register_forward_hook(
            lambda _, __, out, part=part: needs_grad.__setitem__(part, out[0].requires_grad if part == "attention"
                                                                 else out.requires_grad))
    classification_loss(model.train(), BATCH).backward()
    # Layer 2's attention holds no LoRA: it runs outside autograd like the prefix, and backward ends in its FFN.
    assert needs_grad == {"attention": False, "intermediate": True}


# --- the prefix mode -----------------------------------------------------------------------------------------

def layer_calls_and_grads(frozen_prefix: bool) -> tuple[list[int], dict[str, torch.Tensor], torch.Tensor]:
    """Forward + backward of one batch with gradient checkpointing on: forward calls per layer, LoRA grads, loss."""
    model = four_layer_model(lora_layers="top2", gradient_checkpointing=True)
    if frozen_prefix:
        assert isinstance(enable_frozen_prefix(model), FrozenPrefixLayers)
    calls = [0] * 4
    layers = model.get_base_model().roberta.encoder.layer
    for i, layer in enumerate(layers._modules.values()):  # a sub-module: checkpointing recomputes `forward`
        layer.attention.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model.train()
    loss = classification_loss(model, BATCH)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return calls, grads, loss.detach()


def test_prefix_runs_once_without_autograd_and_gives_the_plain_models_gradients():
    plain_calls, plain_grads, plain_loss = layer_calls_and_grads(frozen_prefix=False)
    calls, grads, loss = layer_calls_and_grads(frozen_prefix=True)
    # Gradient checkpointing makes the embeddings' output require grad, so the plain model recomputes (and
    # backpropagates through) every layer; the prefix runs once and backward stops at the first LoRA layer.
    assert plain_calls == [2, 2, 2, 2]
    assert calls == [1, 1, 2, 2]
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and any("lora_B" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_prefix_mode_keeps_the_plain_models_state_dict_names():
    model = four_layer_model(lora_layers="top2", gradient_checkpointing=False)
    names = list(model.state_dict())
    enable_frozen_prefix(model)
    assert list(model.state_dict()) == names


def test_nothing_is_frozen_when_every_layer_has_lora():
    assert enable_frozen_prefix(four_layer_model(gradient_checkpointing=False)) is None


# --- end to end (fp32, dropout off): the same adapter with and without the prefix mode -----------------------

@pytest.mark.slow
def test_prefix_mode_trains_the_plain_models_adapter(prefix_runs):
    config = json.loads((prefix_runs("prefix") / "adapter" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]
    assert_same_adapter(prefix_runs("prefix"), prefix_runs("plain"))


