"""The speed subpackage's one entry point (`speed.apply`): each option asked for is put in and nothing else, every
prerequisite is checked before anything changes, and importing it registers nothing."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from conftest import four_layer_model, run_cli
from peft_agnews import speed
from peft_agnews.config import TrainConfig
from peft_agnews.errors import UsageError
from peft_agnews.model import apply_lora
from peft_agnews.speed.dropout import ATTENTION, PCG64Dropout
from peft_agnews.speed.frozen_prefix import FrozenPrefixLayers


def layer_list(model) -> torch.nn.ModuleList:
    return model.get_base_model().roberta.encoder.layer


def untouched(model) -> bool:
    """No speed option is in `model`: torch's dropout, SDPA, the plain layer list and layer forward."""
    base = model.get_base_model()
    return (not any(isinstance(m, PCG64Dropout) for m in model.modules())
            and base.config._attn_implementation != ATTENTION
            and type(layer_list(model)) is torch.nn.ModuleList
            and "forward" not in vars(layer_list(model)[-1]))


def test_apply_puts_in_each_option_asked_for_and_nothing_else():
    options = dict(lora_layers="top1", gradient_checkpointing=False, attn_implementation="sdpa", model_dropout=0.0)
    model = four_layer_model(**options)
    model.get_base_model().config._attn_implementation = "sdpa"  # built in code, not loaded
    assert speed.apply(model, TrainConfig(**options, dropout_generator="torch", frozen_prefix=False)) is None
    assert untouched(model)
    cfg = TrainConfig(**options, first_token_last_layer=True)  # pcg64 and the frozen prefix are the defaults
    prefix = speed.apply(model, cfg)
    assert isinstance(prefix, FrozenPrefixLayers) and layer_list(model) is prefix and prefix.depth == 3
    assert all(type(m) is PCG64Dropout for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.get_base_model().config._attn_implementation == ATTENTION
    assert "forward" in vars(prefix[-1])  # the last layer's forward replaced on the instance


@pytest.mark.parametrize("options, num_processes, local_world_size, message", [
    ({"lora_layers": "all"}, 1, None, "--cache_frozen_prefix needs frozen bottom layers"),
    ({"lora_layers": "top1", "frozen_prefix": False}, 1, None, "--cache_frozen_prefix needs frozen bottom layers"),
    ({"lora_layers": "top1", "model_dropout": 0.1}, 1, None, "--cache_frozen_prefix needs dropout off in the frozen"),
    ({"lora_layers": "top1"}, 4, "2", "--cache_frozen_prefix shares its files between the processes of one machine"),
])
def test_cache_prerequisites_are_checked_before_anything_changes(options, num_processes, local_world_size, message,
                                                                  monkeypatch):
    if local_world_size:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    else:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    model = four_layer_model(gradient_checkpointing=False, **options)
    cfg = TrainConfig(cache_frozen_prefix=True, gradient_checkpointing=False, lora_dropout=0.0, **options)
    with pytest.raises(UsageError, match=message):
        speed.apply(model, cfg, num_processes)
    assert untouched(model)


def test_cache_prerequisites_hold_on_one_machine_of_several_processes(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = TrainConfig(cache_frozen_prefix=True, lora_layers="top1", model_dropout=0.0, gradient_checkpointing=False)
    assert isinstance(speed.apply(four_layer_model(lora_layers="top1"), cfg, num_processes=2), FrozenPrefixLayers)


def test_first_token_layer_needs_a_bert_style_encoder():
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=4)
    cfg = TrainConfig(first_token_last_layer=True, lora_target_modules=["q_lin", "v_lin"], gradient_checkpointing=False)
    model = apply_lora(DistilBertForSequenceClassification(config), cfg)
    with pytest.raises(UsageError, match="--first_token_last_layer needs a BERT-style encoder"):
        speed.apply(model, cfg)
    assert not any(isinstance(m, PCG64Dropout) for m in model.modules())


def test_importing_the_speed_modules_registers_nothing_until_pcg64_is_used():
    code = """
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
before = (set(ALL_ATTENTION_FUNCTIONS.valid_keys()), set(ALL_MASK_ATTENTION_FUNCTIONS.valid_keys()))
import peft_agnews.speed, peft_agnews.speed.dropout as dropout
after_import = (set(ALL_ATTENTION_FUNCTIONS.valid_keys()), set(ALL_MASK_ATTENTION_FUNCTIONS.valid_keys()))
assert after_import == before and dropout.ATTENTION not in after_import[0], after_import
import torch
dropout.use_pcg64_dropout(torch.nn.Sequential(torch.nn.Dropout(0.1)))
assert dropout.ATTENTION in ALL_ATTENTION_FUNCTIONS.valid_keys()
assert dropout.ATTENTION in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys()
print("ok")
"""
    proc = run_cli([sys.executable, "-c", code], timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_compiling_on_a_cpu_without_a_cxx_compiler_is_refused_before_anything_changes(monkeypatch):
    """inductor builds CPU kernels with a C++ compiler: without one the run would fail at its first step."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/g++"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = TrainConfig(torch_compile=True, gradient_checkpointing=False)
    model = four_layer_model(gradient_checkpointing=False)
    with pytest.raises(UsageError, match=r"--torch_compile on a CPU needs a C\+\+ compiler .*install g\+\+"):
        speed.apply(model, cfg)
    assert untouched(model)
