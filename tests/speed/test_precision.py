"""speed/precision.py: frozen Linear weights cast once under autocast (same logits), and `--half_precision_base`
(the frozen base in bf16 without autocast, everything trained in fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import load_adapter_directly, run_cli, tiny_train_args
from peft_agnews.config import TrainConfig
from peft_agnews.model import apply_lora, load_base_model
from peft_agnews.speed.precision import cast_frozen_linear_weights, hold_base_in_half
from peft_agnews.train import cli


def lora_model(tiny_model_dir):
    cfg = TrainConfig(model_name_or_path=str(tiny_model_dir), lora_dropout=0.0)
    torch.manual_seed(0)
    return apply_lora(load_base_model(cfg), cfg)


def test_casting_frozen_weights_to_bf16_leaves_autocast_math_unchanged(tiny_model_dir):
    """Autocast would cast each frozen Linear weight to bf16 on every call; casting once gives identical logits."""
    reference = lora_model(tiny_model_dir).eval()
    cast = lora_model(tiny_model_dir).eval()
    assert cast_frozen_linear_weights(cast, torch.bfloat16) > 0
    assert all(p.dtype == torch.float32 for p in cast.parameters() if p.requires_grad)
    assert any(p.dtype == torch.bfloat16 for p in cast.parameters() if not p.requires_grad)
    batch = {"input_ids": torch.tensor([[0, 5, 9, 12, 2], [0, 7, 30, 2, 1]]), "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 1, 0]])}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(reference(**batch).logits, cast(**batch).logits)


@pytest.mark.parametrize("bias, head", [("lora_only", "model"), ("all", "model_output"), ("none", "mean")])
def test_frozen_base_is_bf16_and_everything_trained_stays_fp32(bias, head, tiny_model_dir):
    cfg = TrainConfig(model_name_or_path=str(tiny_model_dir), lora_bias=bias, classifier_head=head,
                      gradient_checkpointing=False, mixed_precision="bf16")
    model = apply_lora(load_base_model(cfg), cfg).train()
    assert hold_base_in_half(model) > 0
    for name, param in model.named_parameters():
        in_head = "modules_to_save" in name or "original_module" in name
        want = torch.float32 if param.requires_grad or in_head else torch.bfloat16
        assert param.dtype == want, name
    batch = {"input_ids": torch.randint(4, 40, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    logits = model(**batch).logits  # no autocast: the base computes in bf16 by its own dtype
    assert logits.dtype == torch.float32
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained.values())
    biases = [n for n in trained if n.endswith("bias") and "modules_to_save" not in n]
    assert bool(biases) == (bias != "none")
    assert all(trained[n].grad.abs().sum() > 0 for n in biases)  # the fp32 bias reaches the bf16 computation


# The cached recipes' speed features (proxy-fast.yaml): 30 steps run past the first epoch, so the later steps read
# the frozen prefix's output from its cache.
CACHED_PREFIX = {"lora_layers": "top1", "cache_frozen_prefix": "true", "first_token_last_layer": "true",
                 "attn_implementation": "eager", "model_dropout": 0.0, "max_train_steps": 30, "eval_steps": 15}


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, CACHED_PREFIX], ids=["plain", "frozen-prefix-cache-first-token"])
def test_half_precision_base_trains_like_autocast_and_saves_an_fp32_adapter(options, tiny_model_dir,
                                                                           synthetic_train_csv, tmp_path):
    autocast, half = tmp_path / "autocast", tmp_path / "half"
    common = {"mixed_precision": "bf16", "logging_steps": 1, **options}
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, autocast, **common)) == 0
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, half, half_precision_base="true", **common)) == 0

    def losses(out):
        return [e["train/loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "train/loss" in e]

    assert losses(half) == pytest.approx(losses(autocast), rel=2e-2)
    assert losses(half)[-1] < losses(half)[0] - 0.1
    assert json.loads((half / "results.json").read_text())["mixed_precision"] == "bf16"
    model, _ = load_adapter_directly(half / "adapter", tiny_model_dir)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_half_precision_base_without_bf16_is_refused_before_anything_is_written(tiny_model_dir, synthetic_train_csv,
                                                                                tmp_path):
    out = tmp_path / "run"
    done = run_cli(["peft-agnews", "train", *tiny_train_args(tiny_model_dir, synthetic_train_csv, out,
                                                             half_precision_base="true", mixed_precision="no")])
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        "error: --half_precision_base needs bf16, but this run computes in fp32; pass --mixed_precision bf16 (slow on "
        "a CPU without bf16 instructions) or drop --half_precision_base"]
    assert not out.exists()
