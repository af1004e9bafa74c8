"""Accuracy options: each one's wiring (loss, trainable set, schedule), budget-aware rank selection, ensembling,
and the recipes in recipes/."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, RobertaConfig, RobertaForSequenceClassification

from conftest import REPO, accelerate_launch, direct_logits, run_cli, tiny_train_args
from peft_agnews.config import TrainConfig, parse_config
from peft_agnews.errors import UsageError
from peft_agnews.model import (
    ALL_LINEAR_TARGETS,
    apply_lora,
    count_parameters,
    load_base_model,
    lora_trainable_count,
    optimizer_param_groups,
    trainable_breakdown,
)
from peft_agnews.objectives import classification_loss, symmetric_kl
from peft_agnews.speed.frozen_prefix import frozen_depth
from peft_agnews.train import cli

RECIPES = REPO / "recipes"
OPTIONS_OFF = {
    "lora_rank_pattern": [], "use_rslora": False, "use_dora": False, "classifier_head": "model",
    "head_learning_rate": None, "label_smoothing": 0.0, "rdrop_alpha": 0.0, "lr_scheduler_type": "linear",
    "model_dropout": None,
}
BATCH = {
    "input_ids": torch.tensor([[0, 5, 9, 12, 2], [0, 7, 30, 2, 1], [0, 11, 2, 1, 1]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
    "labels": torch.tensor([0, 3, 1]),
}


def tiny(tiny_model_dir, **overrides):
    options = {"lora_dropout": 0.0, "gradient_checkpointing": False, **overrides}
    cfg = TrainConfig(model_name_or_path=str(tiny_model_dir), **options)
    torch.manual_seed(0)
    return apply_lora(load_base_model(cfg), cfg)


def roberta_base_config(vocab_size: int = 1000) -> RobertaConfig:
    # roberta-base's shape (12 x 768, FFN 3072); the trainable count does not depend on the vocabulary size.
    return RobertaConfig(vocab_size=vocab_size, num_labels=4)


# --- config -------------------------------------------------------------------------------------------------

def test_every_new_option_is_off_by_default_and_reference_yaml_is_the_defaults():
    defaults = parse_config([])
    assert {k: getattr(defaults, k) for k in OPTIONS_OFF} == OPTIONS_OFF
    assert defaults.lora_r == 8 and isinstance(defaults.lora_r, int)
    assert parse_config(["--config", str(RECIPES / "reference.yaml")]) == defaults


@pytest.mark.parametrize("text,expected", [("auto", "auto"), ("AUTO", "auto"), ("16", 16)])
def test_lora_r_takes_an_integer_or_auto(text, expected):
    assert parse_config(["--lora_r", text]).lora_r == expected


@pytest.mark.parametrize("argv,message", [
    (["--lora_r", "big"], "neither an integer nor 'auto'"),
    (["--lora_r", "0"], "--lora_r must be >= 1"),
    (["--lora_rank_pattern", "output.dense:4"], "not MODULE=RANK"),
    (["--label_smoothing", "1.0"], "--label_smoothing"),
    (["--rdrop_alpha", "-1"], "--rdrop_alpha"),
])
def test_bad_new_options_are_refused_with_the_fix(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_config(argv)


# --- the trainable set --------------------------------------------------------------------------------------

def lora_modules(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_more_target_modules_and_per_module_ranks(tiny_model_dir):
    model = tiny(tiny_model_dir, lora_r=4, lora_target_modules=["query", "key", "value", "attention.output.dense",
                                                                "intermediate.dense"],
                 lora_rank_pattern=["intermediate.dense=2"])
    ranks = {n.split("layer.")[-1][2:]: m.r["default"] for n, m in lora_modules(model).items()}
    assert ranks == {"attention.self.query": 4, "attention.self.key": 4, "attention.self.value": 4,
                     "attention.output.dense": 4, "intermediate.dense": 2}
    breakdown = trainable_breakdown(model)
    assert breakdown["LoRA A+B on intermediate.dense"] == 2 * 2 * (32 + 64)  # 2 layers x rank 2 x (in + out)
    assert sum(breakdown.values()) == count_parameters(model)[0]


def test_unknown_rank_pattern_module_is_refused(tiny_model_dir):
    with pytest.raises(UsageError, match=r"\['q_proj'\] not found"):
        tiny(tiny_model_dir, lora_rank_pattern=["q_proj=2"])


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_model_dir):
    plain = next(iter(lora_modules(tiny(tiny_model_dir, lora_r=4, lora_alpha=16)).values()))
    rs = next(iter(lora_modules(tiny(tiny_model_dir, lora_r=4, lora_alpha=16, use_rslora=True)).values()))
    assert plain.scaling["default"] == 16 / 4 and rs.scaling["default"] == 16 / math.sqrt(4)


def test_dora_adds_one_magnitude_per_output_feature(tiny_model_dir):
    plain, dora = tiny(tiny_model_dir), tiny(tiny_model_dir, use_dora=True)
    assert count_parameters(dora)[0] - count_parameters(plain)[0] == 2 * 2 * 32  # 2 layers x (query, value) x 32
    assert trainable_breakdown(dora)["DoRA magnitude on attention.self.query"] == 2 * 32


@pytest.mark.parametrize("head", ["first_token", "mean"])
def test_pooled_linear_head_is_one_linear_and_pools_as_named(tiny_model_dir, head):
    model = tiny(tiny_model_dir, classifier_head=head).eval()
    assert trainable_breakdown(model)["classifier head"] == 32 * 4 + 4
    hidden = model.get_base_model().roberta(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"])[0]
    if head == "first_token":
        pooled = hidden[:, 0]
    else:
        mask = BATCH["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    linear = model.get_base_model().classifier.modules_to_save["default"].out
    logits = model(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"]).logits
    torch.testing.assert_close(logits, linear(pooled))


def test_mean_head_ignores_padding(tiny_model_dir):
    model = tiny(tiny_model_dir, classifier_head="mean").eval()
    short = model(input_ids=torch.tensor([[0, 5, 9, 2]]), attention_mask=torch.ones(1, 4, dtype=torch.long)).logits
    padded = model(input_ids=torch.tensor([[0, 5, 9, 2, 1, 1]]), attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]])).logits
    torch.testing.assert_close(short, padded)


# --- the loss -----------------------------------------------------------------------------------------------

def test_default_loss_is_the_models_own(tiny_model_dir):
    model = tiny(tiny_model_dir).eval()
    assert torch.equal(classification_loss(model, BATCH), model(**BATCH).loss)


def test_label_smoothing_changes_the_loss_as_defined(tiny_model_dir):
    model = tiny(tiny_model_dir).eval()
    logits = model(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"]).logits
    smoothed = classification_loss(model, BATCH, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, F.cross_entropy(logits, BATCH["labels"], label_smoothing=0.1))
    assert not torch.isclose(smoothed, F.cross_entropy(logits, BATCH["labels"]))


def test_rdrop_adds_the_kl_between_two_dropout_passes(tiny_model_dir):
    model = tiny(tiny_model_dir)  # the base's hidden dropout (0.1) differs between the two passes in train mode
    model.eval()  # no dropout: both passes agree, the KL is zero and the loss is the plain cross-entropy
    torch.testing.assert_close(classification_loss(model, BATCH, rdrop_alpha=4.0), model(**BATCH).loss)
    model.train()  # dropout on: the passes differ and the KL term raises the loss above the pure CE part
    torch.manual_seed(1)
    with_kl = classification_loss(model, BATCH, rdrop_alpha=100.0)
    torch.manual_seed(1)
    without = classification_loss(model, BATCH, rdrop_alpha=1e-12)
    assert with_kl > without + 1e-3
    p, q = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    expected = (F.softmax(p, -1) * (F.log_softmax(p, -1) - F.log_softmax(q, -1))).sum()
    torch.testing.assert_close(symmetric_kl(p, q), expected)  # symmetric pair: both directions are equal


# --- optimizer and schedules ---------------------------------------------------------------------------------

def test_head_learning_rate_puts_exactly_the_head_in_its_own_groups(tiny_model_dir):
    model = tiny(tiny_model_dir)
    default = optimizer_param_groups(model, 0.01)
    assert all("lr" not in g for g in default)
    groups = optimizer_param_groups(model, 0.01, head_learning_rate=3e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    head = [names[id(p)] for g in groups if g.get("lr") == 3e-3 for p in g["params"]]
    rest = [names[id(p)] for g in groups if "lr" not in g for p in g["params"]]
    assert head and all("classifier" in n for n in head) and not any("classifier" in n for n in rest)
    assert len(head) + len(rest) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("schedule", ["cosine", "one_cycle"])
def test_schedules_warm_up_then_decay(tiny_model_dir, schedule):
    from peft_agnews.plan import Plan, make_scheduler

    model = tiny(tiny_model_dir)
    cfg = TrainConfig(lr_scheduler_type=schedule, learning_rate=1e-3, head_learning_rate=2e-3, warmup_ratio=0.2)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, 0.0, cfg.head_learning_rate), lr=cfg.learning_rate)
    plan = Plan(10, 1, 1, 10, 10, 10, 2, 1, 1, 1, 1, "no")
    scheduler = make_scheduler(cfg, optimizer, plan)
    lrs = []
    for _ in range(plan.total_steps):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    adapter, head = [lr[0] for lr in lrs], [lr[-1] for lr in lrs]
    peak = max(range(10), key=adapter.__getitem__)
    assert peak == 2 and adapter[peak] == pytest.approx(1e-3) and head[peak] == pytest.approx(2e-3)
    assert adapter[0] < adapter[peak] and adapter[-1] < 0.2 * adapter[peak]


# --- budget-aware rank ---------------------------------------------------------------------------------------

def test_lora_r_auto_picks_the_largest_rank_that_fits():
    cfg = TrainConfig(lora_r="auto", lora_target_modules=list(ALL_LINEAR_TARGETS), classifier_head="mean",
                      gradient_checkpointing=False)
    model = apply_lora(RobertaForSequenceClassification(roberta_base_config()), cfg)
    rank = model.peft_config["default"].r
    count = count_parameters(model)[0]
    # per layer and rank: q, k, v, attention output (768+768 each) + intermediate and output (768+3072 each)
    assert count == 12 * rank * (4 * 1536 + 2 * 3840) + 12 * (4 * 768 + 3072 + 768) + 768 * 4 + 4
    assert count <= 1_000_000 < lora_trainable_count(roberta_base_config(), RobertaForSequenceClassification, cfg, rank + 1)
    assert rank == 5


def test_lora_r_auto_refuses_a_budget_nothing_fits():
    cfg = TrainConfig(lora_r="auto", max_trainable_params=10_000, gradient_checkpointing=False)
    with pytest.raises(UsageError, match="even --lora_r 1 exceeds --max_trainable_params 10,000"):
        apply_lora(RobertaForSequenceClassification(RobertaConfig(vocab_size=100, num_hidden_layers=2, num_labels=4)), cfg)


def test_dry_run_shows_the_per_module_arithmetic(tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    args = tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "run", lora_r="auto",
                           max_trainable_params=2000, dry_run="true")
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "(auto: largest that fits), budget 2,000" in out
    rows = {line.split("  ")[1].strip(): int(line.split()[-1].replace(",", ""))
            for line in out.splitlines() if line.startswith("  ")}
    total = int(out.split("trainable parameters: ")[1].split()[0].replace(",", ""))
    assert set(rows) == {"biases", "LoRA A+B on attention.self.query", "LoRA A+B on attention.self.value",
                         "classifier head"}
    assert sum(rows.values()) == total <= 2000
    assert not (tmp_path / "run").exists()


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


# --- ensembling ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, synthetic_train_csv, tmp_path_factory) -> list[Path]:
    dirs = []
    for seed, head in ((1, "mean"), (2, "mean")):
        out = tmp_path_factory.mktemp(f"member{seed}")
        assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, seed=seed, classifier_head=head,
                                   max_train_steps=6, eval_steps=6, gradient_checkpointing="false")) == 0
        dirs.append(out / "adapter")
    return dirs


@pytest.mark.slow
def test_ensemble_averages_the_members_probabilities(two_adapters, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from peft_agnews.ensemble import EnsembleArgs, ensemble_probabilities
    from peft_agnews.model import replace_head
    from peft_agnews.runtime import accelerator_session

    texts = ["goal season coach", "shares profit bank fell sharply", "rain"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def by_hand(adapter_dir):  # each member loaded the plain PEFT way, its head built first, one text at a time
        base = load_base_model(TrainConfig(model_name_or_path=str(tiny_model_dir)))
        replace_head(base, "mean")
        return direct_logits(PeftModel.from_pretrained(base, adapter_dir), tokenizer, texts).softmax(-1)

    dirs = [str(d) for d in two_adapters]
    members = [by_hand(d) for d in dirs]
    assert not torch.allclose(members[0], members[1])  # two different adapters...
    torch.testing.assert_close(members[0].sum(-1), torch.ones(3))
    with accelerator_session() as accelerator:  # ...scored in batches of 2 (padded), in input order
        probs = ensemble_probabilities(EnsembleArgs(adapter_dirs=dirs, test_file="unused", per_device_eval_batch_size=2),
                                       texts, accelerator)
    torch.testing.assert_close(probs, (members[0] + members[1]) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ensemble_runs_as_typed_and_under_accelerate_launch(two_adapters, synthetic_test_csv):
    """`peft-agnews ensemble` (the console script) and `accelerate launch peft_agnews/ensemble.py` on 2 processes
    print the same accuracy; each row is scored once."""
    args = ["--adapter_dirs", *map(str, two_adapters), "--test_file", str(synthetic_test_csv), "--batch_size", "16"]
    typed = run_cli([str(Path(sys.executable).with_name("peft-agnews")), "ensemble", *args], timeout=300)
    assert typed.returncode == 0, typed.stdout + typed.stderr
    result = json.loads(typed.stdout.strip().splitlines()[-1])
    assert result["adapters"] == 2 and result["examples"] == 120 and result["accuracy"] > 0.5
    launched = accelerate_launch("cpu_ddp.yaml", args, script="peft_agnews/ensemble.py")
    assert launched.returncode == 0, launched.stdout[-3000:]
    lines = [line for line in launched.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0]) == result  # printed once, by the main process


def test_ensemble_refuses_adapters_of_different_heads(two_adapters, tmp_path, capsys):
    import shutil

    from peft_agnews.ensemble import cli as ensemble

    other = tmp_path / "other"
    shutil.copytree(two_adapters[0], other)
    (other / "head.json").unlink()
    assert ensemble(["--adapter_dirs", str(two_adapters[0]), str(other), "--test_file", "x.csv"]) == 2
    assert "differ in classifier head" in capsys.readouterr().err


# --- model dropout --------------------------------------------------------------------------------------------

def test_model_dropout_sets_every_dropout_and_zero_makes_training_forwards_deterministic(tiny_model_dir):
    default = tiny(tiny_model_dir).train()
    assert any(m.p > 0 for m in default.modules() if isinstance(m, torch.nn.Dropout))  # the base has dropout...
    inputs = {k: v for k, v in BATCH.items() if k != "labels"}
    assert not torch.equal(default(**inputs).logits, default(**inputs).logits)  # ...so two passes differ
    off = tiny(tiny_model_dir, model_dropout=0.0, classifier_head="mean").train()
    rates = [m.p for m in off.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates and set(rates) == {0.0}  # hidden, attention and head dropout alike (LoRA dropout is --lora_dropout)
    torch.testing.assert_close(off(**inputs).logits, off(**inputs).logits, rtol=0, atol=0)
    assert {m.p for m in tiny(tiny_model_dir, model_dropout=0.3).modules() if isinstance(m, torch.nn.Dropout)} == {0.3}


@pytest.mark.parametrize("argv", [["--model_dropout", "1"], ["--model_dropout", "-0.1"], ["--lora_dropout", "1.5"]])
def test_dropout_rates_outside_0_1_are_refused(argv):
    with pytest.raises(UsageError, match="must be in \\[0, 1\\)"):
        parse_config(argv)


# --- a non-default head outside training ----------------------------------------------------------------------

def test_evaluate_and_predict_load_an_adapter_with_its_recorded_head(two_adapters, tiny_model_dir):
    from peft import PeftModel

    from peft_agnews.loading import ModelArgs, load_classifier
    from peft_agnews.model import replace_head

    assert json.loads((two_adapters[0] / "head.json").read_text()) == {"classifier_head": "mean"}
    loaded = load_classifier(ModelArgs(adapter_dir=str(two_adapters[0]))).model
    assert type(loaded.base_model.model.classifier.original_module).__name__ == "PooledLinearHead"
    inputs = {k: v for k, v in BATCH.items() if k != "labels"}
    # Reference: the head built by hand, then plain PEFT loading (what the README tells users to do).
    base = load_base_model(TrainConfig(model_name_or_path=str(tiny_model_dir)))
    replace_head(base, "mean")
    by_hand = PeftModel.from_pretrained(base, two_adapters[0]).eval()
    with torch.inference_mode():
        torch.testing.assert_close(loaded(**inputs).logits, by_hand(**inputs).logits)


def test_model_card_loading_snippet_runs_as_written_for_a_custom_head(two_adapters):
    """The card's Python snippet, pasted with the folder filled in, builds the head and loads the adapter."""
    from peft_agnews.loading import ModelArgs, load_classifier

    card = (two_adapters[0] / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0].replace("<this folder>", str(two_adapters[0]))
    assert 'replace_head(base, "mean")' in snippet
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102 (our own generated card)
    inputs = {k: v for k, v in BATCH.items() if k != "labels"}
    with torch.inference_mode():
        torch.testing.assert_close(namespace["model"](**inputs).logits,
                                   load_classifier(ModelArgs(adapter_dir=str(two_adapters[0]))).model(**inputs).logits)


def test_export_copies_the_head_choice_and_merge_refuses_a_custom_head(two_adapters, tmp_path, capsys):
    from peft_agnews.export import cli as export_cli
    from peft_agnews.loading import ModelArgs, load_classifier

    copy = tmp_path / "copy"
    assert export_cli(["--adapter_dir", str(two_adapters[0]), "--output_dir", str(copy)]) == 0
    assert json.loads((copy / "head.json").read_text()) == {"classifier_head": "mean"}
    inputs = {k: v for k, v in BATCH.items() if k != "labels"}
    with torch.inference_mode():
        torch.testing.assert_close(load_classifier(ModelArgs(adapter_dir=str(copy))).model(**inputs).logits,
                                   load_classifier(ModelArgs(adapter_dir=str(two_adapters[0]))).model(**inputs).logits)
    merged = tmp_path / "merged"
    assert export_cli(["--adapter_dir", str(two_adapters[0]), "--merge", "--output_dir", str(merged)]) == 2
    assert "--merge needs the base class's own head" in capsys.readouterr().err and not merged.exists()


def test_a_damaged_head_json_is_one_clear_error(two_adapters, tmp_path, capsys):
    import shutil

    from peft_agnews.evaluate import cli as evaluate_cli

    damaged = tmp_path / "adapter"
    shutil.copytree(two_adapters[0], damaged)
    (damaged / "head.json").write_text('{"classifier_head": "attention"}')
    assert evaluate_cli(["--adapter_dir", str(damaged), "--test_file", "unused.csv"]) == 2
    err = capsys.readouterr().err
    assert "head.json is damaged" in err and "Traceback" not in err


# --- every recipe's adapter is a standard one -----------------------------------------------------------------

# Each recipe's head and LoRA settings on the tiny model of its base's architecture (MiniLM is a BERT).
RECIPE_ARCH = {"reference.yaml": "roberta", "best.yaml": "roberta", "proxy-minilm.yaml": "bert", "fast.yaml": "roberta",
               "proxy-fast.yaml": "bert"}
# The tiny models have 2 layers: the fast recipes' top-layer LoRA (top6 / top3) becomes the top one of them.
# The fast recipes on the 2-layer tiny models: LoRA on the top layer, whose attention (like the real recipes' lowest
# trained layer) gets none.
TOP1_FEED_FORWARD_ONLY = ["--lora_layers", "top1", "--lora_exclude_modules",
                          *[f"layer.1.attention.{name}" for name in ("self.query", "self.key", "self.value", "output.dense")]]
RECIPE_SHRINK = {"fast.yaml": TOP1_FEED_FORWARD_ONLY, "proxy-fast.yaml": TOP1_FEED_FORWARD_ONLY}
PLAIN_TEXTS = ["Striker scores late goal as coach praises season", "Shares of the bank fell after earnings report",
               "Minister meets rebels at border summit"]
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


@pytest.fixture(scope="module")
def recipe_runs(tiny_model_dir, tiny_bert_dir, synthetic_train_csv, tmp_path_factory) -> dict[str, Path]:
    """A few-step training run of each recipe file on the tiny model of its architecture (lazily, per recipe)."""
    runs: dict[str, Path] = {}

    def run(recipe: str) -> Path:
        if recipe not in runs:
            base = tiny_bert_dir if RECIPE_ARCH[recipe] == "bert" else tiny_model_dir
            out = tmp_path_factory.mktemp(recipe.split(".")[0])
            argv = ["--config", str(RECIPES / recipe),
                    *tiny_train_args(base, synthetic_train_csv, out, max_train_steps=4, eval_steps=4,
                                     gradient_checkpointing="false", mixed_precision="no"),
                    *RECIPE_SHRINK.get(recipe, [])]
            with pytest.MonkeyPatch.context() as patch:  # the proxy recipe names its base through $MINILM_DIR
                patch.setenv("MINILM_DIR", str(base))
                assert cli(argv) == 0
            runs[recipe] = out
        return runs[recipe]

    return run


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


@pytest.mark.parametrize("recipe", ["reference.yaml", "proxy-minilm.yaml"])
def test_the_model_cards_loading_snippet_runs_as_written_and_names_the_labels(recipe, recipe_runs):
    import subprocess
    import sys

    adapter = recipe_runs(recipe) / "adapter"
    card = (adapter / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0].replace("<this folder>", str(adapter))
    assert "AutoPeftModelForSequenceClassification" in snippet and "label2id=label2id" in snippet
    check = "\nimport sys\nassert 'peft_agnews' not in sys.modules\nprint(model.config.id2label, tokenizer('x').input_ids)\n"
    done = subprocess.run([sys.executable, "-c", snippet + check], capture_output=True, text=True, timeout=300,
                          cwd=adapter)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "{0: 'World', 1: 'Sports', 2: 'Business', 3: 'Sci/Tech'}" in done.stdout


@pytest.mark.parametrize("recipe", ["best.yaml", "proxy-minilm.yaml"])
def test_recipe_adapter_merges_and_classifies_with_label_names_in_a_pipeline(recipe, recipe_runs, tmp_path):
    from transformers import pipeline

    from peft_agnews.export import cli as export_cli
    from peft_agnews.loading import ModelArgs, load_classifier

    adapter = recipe_runs(recipe) / "adapter"
    merged = tmp_path / "merged"
    assert export_cli(["--adapter_dir", str(adapter), "--merge", "--output_dir", str(merged)]) == 0
    results = pipeline("text-classification", model=str(merged), device="cpu")(PLAIN_TEXTS)
    ours = load_classifier(ModelArgs(adapter_dir=str(adapter)))
    with torch.inference_mode():
        probs = ours.model(**ours.tokenizer(PLAIN_TEXTS, padding=True, return_tensors="pt")).logits.softmax(-1)
    assert [r["label"] for r in results] == [ours.label_names[i] for i in probs.argmax(-1)]
    assert [r["score"] for r in results] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)


def test_model_output_head_trains_only_the_heads_output_linear_and_saves_the_rest(tiny_model_dir):
    from peft import get_peft_model_state_dict

    full, cheap = tiny(tiny_model_dir), tiny(tiny_model_dir, classifier_head="model_output")
    assert trainable_breakdown(full)["classifier head"] == 32 * 32 + 32 + 32 * 4 + 4  # dense + out_proj
    assert trainable_breakdown(cheap)["classifier head"] == 32 * 4 + 4  # out_proj only
    trained = {n for n, p in cheap.named_parameters() if p.requires_grad and "classifier" in n}
    assert trained == {f"base_model.model.classifier.modules_to_save.default.out_proj.{k}" for k in ("weight", "bias")}
    # The frozen dense is saved with the adapter: a fresh base draws roberta's classifier.dense anew.
    saved = {k for k in get_peft_model_state_dict(cheap) if "classifier" in k}
    assert saved == {f"base_model.model.classifier.{m}.{k}" for m in ("dense", "out_proj") for k in ("weight", "bias")}


def test_the_reference_count_is_unchanged_and_best_keeps_rank_5_with_the_standard_head():
    reference = apply_lora(RobertaForSequenceClassification(roberta_base_config()),
                           parse_config(["--config", str(RECIPES / "reference.yaml"), "--gradient_checkpointing", "false"]))
    assert count_parameters(reference)[0] == 907_012
    best_cfg = parse_config(["--config", str(RECIPES / "best.yaml"), "--gradient_checkpointing", "false"])
    best = apply_lora(RobertaForSequenceClassification(roberta_base_config()), best_cfg)
    assert best_cfg.classifier_head == "model_output"
    assert (best.peft_config["default"].r, count_parameters(best)[0]) == (5, 915_460)
    assert trainable_breakdown(best)["classifier head"] == 3_076


@pytest.mark.parametrize("head", ["first_token", "mean"])
def test_a_custom_head_run_warns_at_start_that_plain_peft_cannot_load_it(head, tiny_model_dir, synthetic_train_csv,
                                                                         tmp_path, capsys):
    args = tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "run", classifier_head=head, dry_run="true")
    assert cli(args) == 0
    err = capsys.readouterr().err
    assert f"warning: --classifier_head {head} is a research head: plain PEFT cannot load" in err
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "run", dry_run="true")) == 0
    assert "research head" not in capsys.readouterr().err


def test_fast_recipe_fits_the_budget_on_roberta_base_with_a_cached_bottom_half(shared_data):
    cfg = parse_config(["--config", str(REPO / "recipes" / "fast.yaml")])
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
    fast = parse_config(["--config", str(REPO / "recipes" / "proxy-fast.yaml")])
    # Measured before the proxy recipe moved to the `model_output` head (LoRA on pooler.dense too): the model's
    # own head, fully trained, and LoRA on the six encoder Linear kinds.
    overrides = ["--classifier_head", "model", "--lora_layers", "top3", "--cache_frozen_prefix", "true",
                 "--lora_target_modules", *ALL_LINEAR_TARGETS,
                 "--first_token_last_layer", "true", "--attn_implementation", "eager",
                 "--lora_exclude_modules", *[f"layer.3.attention.{name}" for name in
                                             ("self.query", "self.key", "self.value", "output.dense")]]
    assert fast == parse_config(["--config", str(REPO / "recipes" / "proxy-minilm.yaml"), *overrides])
