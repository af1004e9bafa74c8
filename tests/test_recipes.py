"""The files in recipes/: each fits the budget, reads its base from where it says, and trains an adapter that plain
Transformers + PEFT load (the training runs: `recipe_runs` in conftest.py)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, RobertaForSequenceClassification

from conftest import PLAIN_TEXTS, RECIPE_ARCH, RECIPES, roberta_base_config
from peft_agnews.config import parse_config
from peft_agnews.errors import UsageError
from peft_agnews.model import ALL_LINEAR_TARGETS, apply_lora, count_parameters, trainable_breakdown
from peft_agnews.speed.frozen_prefix import frozen_depth


def test_best_recipe_fits_the_budget_on_roberta_base(shared_data):
    cfg = parse_config(["--config", str(RECIPES / "best.yaml")])
    config = AutoConfig.from_pretrained(shared_data / "roberta-base-tokenizer")
    config.num_labels, config.vocab_size = 4, 1000
    model = apply_lora(RobertaForSequenceClassification(config), cfg)
    assert count_parameters(model)[0] < 1_000_000


def test_proxy_recipe_takes_the_model_dir_from_the_environment(monkeypatch):
    monkeypatch.delenv("MINILM_DIR", raising=False)
    with pytest.raises(UsageError, match=r"\$MINILM_DIR, which is not set"):
        parse_config(["--config", str(RECIPES / "proxy-minilm.yaml")])
    monkeypatch.setenv("MINILM_DIR", "/models/minilm")
    cfg = parse_config(["--config", str(RECIPES / "proxy-minilm.yaml")])
    assert cfg.model_name_or_path == "/models/minilm" and cfg.classifier_head == "model_output"


# --- every recipe's adapter is a standard one -----------------------------------------------------------------

# Run in a fresh interpreter: only Transformers + PEFT, as a user without this package would load the adapter.
PLAIN_LOAD = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
adapter, base_dir, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
id2label = {int(i): name for i, name in json.load(open(f"{adapter}/labels.json"))["id2label"].items()}
base = AutoModelForSequenceClassification.from_pretrained(
    base_dir, num_labels=len(id2label), id2label=id2label, label2id={name: i for i, name in id2label.items()})
model = PeftModel.from_pretrained(base, adapter).eval()
tokenizer = AutoTokenizer.from_pretrained(adapter)
with torch.no_grad():
    logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
# The one-liner: the base named in adapter_config.json, built by PEFT (kwargs reach its from_pretrained).
from peft import AutoPeftModelForSequenceClassification
auto = AutoPeftModelForSequenceClassification.from_pretrained(
    adapter, num_labels=len(id2label), id2label=id2label, label2id={name: i for i, name in id2label.items()}).eval()
with torch.no_grad():
    auto_logits = auto(**tokenizer(texts, padding=True, return_tensors="pt")).logits
assert not any(name.startswith("peft_agnews") for name in sys.modules)
print(json.dumps({"logits": logits.tolist(), "auto_logits": auto_logits.tolist(),
                  "labels": [model.config.id2label[i] for i in logits.argmax(-1).tolist()],
                  "auto_labels": [auto.config.id2label[i] for i in auto_logits.argmax(-1).tolist()]}))
"""


def test_recipe_files_are_the_ones_tested():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(RECIPE_ARCH)


@pytest.mark.parametrize("recipe", sorted(RECIPE_ARCH))
def test_recipe_adapter_loads_with_plain_transformers_and_peft(recipe, recipe_runs, tiny_model_dir, tiny_bert_dir):
    import subprocess
    import sys

    from peft_agnews.loading import ModelArgs, load_classifier

    adapter = recipe_runs(recipe) / "adapter"
    base = tiny_bert_dir if RECIPE_ARCH[recipe] == "bert" else tiny_model_dir
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(adapter), str(base), json.dumps(PLAIN_TEXTS)],
                          capture_output=True, text=True, timeout=300, cwd=adapter)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (adapter / "head.json").exists()  # nothing only peft-agnews could read
    plain = json.loads(done.stdout.strip().splitlines()[-1])
    ours = load_classifier(ModelArgs(adapter_dir=str(adapter)))
    with torch.inference_mode():
        logits = ours.model(**ours.tokenizer(PLAIN_TEXTS, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(torch.tensor(plain["logits"]), logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(plain["auto_logits"]), logits, atol=1e-5, rtol=0)
    assert plain["labels"] == plain["auto_labels"] == [ours.label_names[i] for i in logits.argmax(-1)]
    assert set(plain["labels"]) <= set(ours.label_names) == {"World", "Sports", "Business", "Sci/Tech"}


def test_the_reference_count_is_unchanged_and_best_keeps_rank_5_with_the_standard_head():
    reference = apply_lora(RobertaForSequenceClassification(roberta_base_config()),
                           parse_config(["--config", str(RECIPES / "reference.yaml"), "--gradient_checkpointing", "false"]))
    assert count_parameters(reference)[0] == 907_012
    best_cfg = parse_config(["--config", str(RECIPES / "best.yaml"), "--gradient_checkpointing", "false"])
    best = apply_lora(RobertaForSequenceClassification(roberta_base_config()), best_cfg)
    assert best_cfg.classifier_head == "model_output"
    assert (best.peft_config["default"].r, count_parameters(best)[0]) == (5, 915_460)
    assert trainable_breakdown(best)["classifier head"] == 3_076


def test_fast_recipe_fits_the_budget_on_roberta_base_with_a_cached_bottom_half(shared_data):
    cfg = parse_config(["--config", str(RECIPES / "fast.yaml")])
    config = AutoConfig.from_pretrained(shared_data / "roberta-base-tokenizer")
    config.num_labels, config.vocab_size = 4, 1000
    model = apply_lora(RobertaForSequenceClassification(config), cfg)
    assert count_parameters(model)[0] == 939_268 < 1_000_000
    assert model.peft_config["default"].r == 4 and frozen_depth(model) == 6
    lora_in_layer_6 = {n.split("layer.6.")[1].split(".lora_A")[0] for n, _ in model.named_parameters()
                       if "layer.6." in n and "lora_A" in n}
    assert lora_in_layer_6 == {"intermediate.dense", "output.dense"}  # backward ends in its feed-forward
    assert cfg.cache_frozen_prefix and cfg.model_dropout == 0 and cfg.classifier_head == "model"


def test_proxy_fast_recipe_is_the_proxy_recipe_with_the_measured_levers(monkeypatch):
    """EXPERIMENTS.md measured proxy-minilm.yaml + these overrides (benchmarks/time_to_accuracy.py)."""
    monkeypatch.setenv("MINILM_DIR", "/models/minilm")
    fast = parse_config(["--config", str(RECIPES / "proxy-fast.yaml")])
    # Measured before the proxy recipe moved to the `model_output` head (LoRA on pooler.dense too): the model's
    # own head, fully trained, and LoRA on the six encoder Linear kinds.
    overrides = ["--classifier_head", "model", "--lora_layers", "top3", "--cache_frozen_prefix", "true",
                 "--lora_target_modules", *ALL_LINEAR_TARGETS,
                 "--first_token_last_layer", "true", "--attn_implementation", "eager",
                 "--lora_exclude_modules", *[f"layer.3.attention.{name}" for name in
                                             ("self.query", "self.key", "self.value", "output.dense")]]
    assert fast == parse_config(["--config", str(RECIPES / "proxy-minilm.yaml"), *overrides])
