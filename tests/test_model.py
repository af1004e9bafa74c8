"""LoRA wiring: the exact trainable count, the budget, target validation, gradient flow (the preflight), the accuracy
options' trainable sets (more targets, per-module ranks, rsLoRA, DoRA, the heads), `--lora_r auto`, `--model_dropout`,
`--lora_layers`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from conftest import (
    LABELS, REPO, four_layer_model, roberta_base_config, tiny_lora_model, tiny_train_args, toy_batch,
)
from peft_agnews.config import TrainConfig
from peft_agnews import speed
from peft_agnews.speed.dropout import ATTENTION
from peft_agnews.errors import UsageError
from peft_agnews.model import (
    ALL_LINEAR_TARGETS,
    GradientFlowError,
    apply_lora,
    check_gradient_flow,
    count_parameters,
    load_base_model,
    lora_layer_indices,
    lora_trainable_count,
    optimizer_param_groups,
    targets_without_lora,
    trainable_breakdown,
)
from peft_agnews.train import cli

REFERENCE_TRAINABLE = 907_012
BATCH = toy_batch()


def roberta_base_shaped(config: RobertaConfig) -> RobertaForSequenceClassification:
    config.num_labels = 4
    return RobertaForSequenceClassification(config)


def test_reference_recipe_trains_907012_parameters_on_roberta_base_shape():
    """12 layers x (query, value) x (A 768x8 + B 8x768 + bias 768) + head (768x768+768 + 768x4+4)."""
    # The count does not depend on the vocabulary size; a small vocab keeps this test light.
    model = apply_lora(roberta_base_shaped(RobertaConfig(vocab_size=1000)), TrainConfig())
    trainable, _ = count_parameters(model)
    assert trainable == REFERENCE_TRAINABLE == 12 * 2 * (768 * 8 * 2 + 768) + (768 * 768 + 768) + (768 * 4 + 4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum("lora_A" in n for n in names) == sum("lora_B" in n for n in names) == 24
    assert any("classifier" in n for n in names)


def test_shared_roberta_base_config_gives_the_same_count(shared_data):
    config = AutoConfig.from_pretrained(shared_data / "roberta-base-tokenizer")
    model = apply_lora(roberta_base_shaped(config), TrainConfig())
    assert count_parameters(model)[0] == REFERENCE_TRAINABLE


def test_budget_overrun_names_the_count_and_the_limit():
    cfg = TrainConfig(lora_r=64, lora_target_modules=["query", "key", "value", "dense"])
    with pytest.raises(UsageError, match=r"trainable parameters exceed --max_trainable_params 1,000,000"):
        apply_lora(roberta_base_shaped(RobertaConfig(vocab_size=1000, num_hidden_layers=4)), cfg)


def test_unknown_target_module_lists_the_available_names(tiny_model_dir):
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=4)
    with pytest.raises(UsageError, match=r"\['q_proj'\] not found.*'query'.*'value'"):
        apply_lora(base, TrainConfig(lora_target_modules=["query", "q_proj"]))


def test_label_names_flow_into_the_model_config(tiny_model_dir):
    model = load_base_model(TrainConfig(model_name_or_path=str(tiny_model_dir)))
    assert model.config.id2label == dict(enumerate(LABELS))
    assert model.config.label2id == {name: i for i, name in enumerate(LABELS)}


def lora_model(tiny_model_dir, **overrides):
    cfg = TrainConfig(model_name_or_path=str(tiny_model_dir), lora_dropout=0.0, **overrides)
    torch.manual_seed(0)
    return apply_lora(load_base_model(cfg), cfg)


def backward_once(model):
    model.train()
    batch = {
        "input_ids": torch.tensor([[0, 5, 9, 12, 2], [0, 7, 30, 2, 1]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
        "labels": torch.tensor([0, 3]),
    }
    model(**batch).loss.backward()


def test_preflight_passes_with_our_gradient_checkpointing(tiny_model_dir):
    model = lora_model(tiny_model_dir, gradient_checkpointing=True)
    backward_once(model)
    check_gradient_flow(model)  # does not raise
    b_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert b_grads and all(g is not None and g.abs().sum() > 0 for g in b_grads)


def test_preflight_catches_the_report_trap_reentrant_checkpointing_starves_lora(tiny_model_dir):
    """The design report's failure: reentrant checkpointing with inputs that do not require grad means autograd
    never reaches the LoRA weights inside checkpointed layers; only the head learns."""
    model = lora_model(tiny_model_dir, gradient_checkpointing=False)
    base = model.get_base_model()
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    base.disable_input_require_grads()
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):  # torch sees it too
        backward_once(model)
    starved = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert starved and all("lora" in n or "bias" in n for n in starved)  # the failure mode is real...
    assert any(p.grad is not None for n, p in model.named_parameters() if "classifier" in n)  # ...head still learns
    with pytest.raises(GradientFlowError, match=r"lora_B.*\(no gradient\)"):  # ...and the preflight stops it
        check_gradient_flow(model)


def test_preflight_flags_zero_and_non_finite_gradients(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    backward_once(model)
    head = next(p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad)
    head.grad.zero_()
    with pytest.raises(GradientFlowError, match="all-zero gradient"):
        check_gradient_flow(model)
    head.grad.fill_(float("nan"))
    with pytest.raises(GradientFlowError, match="non-finite gradient"):
        check_gradient_flow(model)


def test_preflight_stops_a_real_run(tiny_model_dir, synthetic_train_csv, tmp_path, capsys, monkeypatch):
    """The CLI turns a starved run into one error line and exit 2, before any optimizer step is taken."""
    from peft_agnews import model as model_module

    def reentrant_trap(model):
        base = model.get_base_model()
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        base.disable_input_require_grads()

    monkeypatch.setattr(model_module, "enable_gradient_checkpointing", reentrant_trap)
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path)) == 2
    assert "gradient preflight failed" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "adapter").exists()


def test_lora_b_matrices_move_during_training_with_gradient_checkpointing(tiny_model_dir, synthetic_train_csv, tmp_path):
    from safetensors.torch import load_file

    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path, gradient_checkpointing="true")) == 0
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    b_matrices = {k: v for k, v in weights.items() if "lora_B" in k}
    assert len(b_matrices) == 4  # 2 layers x (query, value)
    for name, value in b_matrices.items():
        assert value.abs().max() > 1e-4, f"{name} did not move from its zero init"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["trainable_params"] == 3364


def copy_model(tiny_model_dir, folder, skip=()):
    import shutil

    shutil.copytree(tiny_model_dir, folder, ignore=lambda _, names: [n for n in names if n in skip])
    return folder


def test_model_folder_without_tokenizer_files_is_refused(tiny_model_dir, tmp_path):
    """transformers builds a 5-token tokenizer for such a folder: every text became <s></s> and training 'worked'."""
    from peft_agnews.model import load_tokenizer

    folder = copy_model(tiny_model_dir, tmp_path / "no-tokenizer", skip=("tokenizer.json", "tokenizer_config.json"))
    with pytest.raises(UsageError, match=r"has 5 tokens but the model's vocabulary has \d+: the folder lacks its tokenizer"):
        load_tokenizer(TrainConfig(model_name_or_path=str(folder)))
    # With the tokenizer named separately the same folder trains.
    assert len(load_tokenizer(TrainConfig(model_name_or_path=str(folder), tokenizer_name=str(tiny_model_dir)))) > 5


def test_missing_model_is_named_as_a_model_problem(tmp_path):
    from peft_agnews.model import load_tokenizer

    with pytest.raises(UsageError, match=r"could not load model '.*nowhere'.*check --model_name_or_path"):
        load_tokenizer(TrainConfig(model_name_or_path=str(tmp_path / "nowhere")))


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_model_weights_are_one_error(tiny_model_dir, tmp_path, damage):
    folder = copy_model(tiny_model_dir, tmp_path / "damaged")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2] if damage == "truncated" else b"")
    with pytest.raises(UsageError, match=r"could not load model .*damaged.*check --model_name_or_path"):
        load_base_model(TrainConfig(model_name_or_path=str(folder)))


def test_label_count_other_than_the_saved_heads_is_one_error(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "with-head")
    RobertaForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=4).save_pretrained(folder)
    with pytest.raises(UsageError, match=r"saved classification head for another number of classes than the 3 label"):
        load_base_model(TrainConfig(model_name_or_path=str(folder), label_names=["a", "b", "c"]))


def test_attn_implementation_picks_the_attention_kernel_with_the_same_gradients(tiny_model_dir):
    """Eager attention's backward is ~2x faster than PyTorch's CPU flash-attention backward at AG News lengths
    (EXPERIMENTS.md); both compute the same math, so a run may switch between them."""
    cfgs = {name: TrainConfig(model_name_or_path=str(tiny_model_dir), label_names=LABELS, attn_implementation=name,
                              lora_dropout=0.0, model_dropout=0.0) for name in ("auto", "eager", "sdpa")}
    grads = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        model = apply_lora(load_base_model(cfg), cfg)
        speed.apply(model, cfg)
        # Under the default --dropout_generator pcg64, SDPA runs as its registered variant (plain SDPA without dropout).
        assert model.config._attn_implementation == (ATTENTION if name in ("auto", "sdpa") else name)
        ids = torch.tensor([[0, 5, 6, 7, 2, 1], [0, 8, 9, 2, 1, 1]])
        model(input_ids=ids, attention_mask=(ids != 1).long(), labels=torch.tensor([0, 1])).loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(grads["eager"], grads["sdpa"])
    torch.testing.assert_close(grads["auto"], grads["sdpa"])


# --- --lora_layers and --lora_exclude_modules -------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [("all", None), ("top2", [4, 5]), ("top6", None), ("4, 1", [1, 4]),
                                            ("0,1,2,3,4,5", None)])
def test_lora_layers_resolve_to_layer_indices(spec, expected):
    assert lora_layer_indices(TrainConfig(lora_layers=spec).lora_layers, 6) == expected


@pytest.mark.parametrize("spec", ["top7", "6"])
def test_lora_layers_beyond_the_model_name_its_layer_count(spec):
    with pytest.raises(UsageError, match="asks for layers the model lacks: it has 6"):
        lora_layer_indices(spec, 6)


def test_targets_that_got_no_lora_are_found():
    model = four_layer_model(lora_layers="top1", lora_target_modules=["query", "value", "intermediate.dense"],
                             lora_exclude_modules=["layer.3.attention.self.value"])
    assert targets_without_lora(model, ["query", "value", "intermediate.dense"]) == ["value"]
    assert targets_without_lora(four_layer_model(lora_layers="top1"), ["query", "value"]) == []


def test_unknown_excluded_modules_are_refused():
    with pytest.raises(UsageError, match=r"--lora_exclude_modules \['layer.9.attention.self.query'\] not found"):
        four_layer_model(lora_exclude_modules=["layer.9.attention.self.query"])


# --- the accuracy options: the trainable set, heads, rank 'auto', dropout ---------------------------------------

def lora_modules(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_more_target_modules_and_per_module_ranks(tiny_model_dir):
    model = tiny_lora_model(tiny_model_dir, lora_r=4, lora_target_modules=["query", "key", "value", "attention.output.dense",
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
        tiny_lora_model(tiny_model_dir, lora_rank_pattern=["q_proj=2"])


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_model_dir):
    plain = next(iter(lora_modules(tiny_lora_model(tiny_model_dir, lora_r=4, lora_alpha=16)).values()))
    rs = next(iter(lora_modules(tiny_lora_model(tiny_model_dir, lora_r=4, lora_alpha=16, use_rslora=True)).values()))
    assert plain.scaling["default"] == 16 / 4 and rs.scaling["default"] == 16 / math.sqrt(4)


def test_dora_adds_one_magnitude_per_output_feature(tiny_model_dir):
    plain, dora = tiny_lora_model(tiny_model_dir), tiny_lora_model(tiny_model_dir, use_dora=True)
    assert count_parameters(dora)[0] - count_parameters(plain)[0] == 2 * 2 * 32  # 2 layers x (query, value) x 32
    assert trainable_breakdown(dora)["DoRA magnitude on attention.self.query"] == 2 * 32


@pytest.mark.parametrize("head", ["first_token", "mean"])
def test_pooled_linear_head_is_one_linear_and_pools_as_named(tiny_model_dir, head):
    model = tiny_lora_model(tiny_model_dir, classifier_head=head).eval()
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
    model = tiny_lora_model(tiny_model_dir, classifier_head="mean").eval()
    short = model(input_ids=torch.tensor([[0, 5, 9, 2]]), attention_mask=torch.ones(1, 4, dtype=torch.long)).logits
    padded = model(input_ids=torch.tensor([[0, 5, 9, 2, 1, 1]]), attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]])).logits
    torch.testing.assert_close(short, padded)


def test_model_output_head_trains_only_the_heads_output_linear_and_saves_the_rest(tiny_model_dir):
    from peft import get_peft_model_state_dict

    full, cheap = tiny_lora_model(tiny_model_dir), tiny_lora_model(tiny_model_dir, classifier_head="model_output")
    assert trainable_breakdown(full)["classifier head"] == 32 * 32 + 32 + 32 * 4 + 4  # dense + out_proj
    assert trainable_breakdown(cheap)["classifier head"] == 32 * 4 + 4  # out_proj only
    trained = {n for n, p in cheap.named_parameters() if p.requires_grad and "classifier" in n}
    assert trained == {f"base_model.model.classifier.modules_to_save.default.out_proj.{k}" for k in ("weight", "bias")}
    # The frozen dense is saved with the adapter: a fresh base draws roberta's classifier.dense anew.
    saved = {k for k in get_peft_model_state_dict(cheap) if "classifier" in k}
    assert saved == {f"base_model.model.classifier.{m}.{k}" for m in ("dense", "out_proj") for k in ("weight", "bias")}


def test_head_learning_rate_puts_exactly_the_head_in_its_own_groups(tiny_model_dir):
    model = tiny_lora_model(tiny_model_dir)
    default = optimizer_param_groups(model, 0.01)
    assert all("lr" not in g for g in default)
    groups = optimizer_param_groups(model, 0.01, head_learning_rate=3e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    head = [names[id(p)] for g in groups if g.get("lr") == 3e-3 for p in g["params"]]
    rest = [names[id(p)] for g in groups if "lr" not in g for p in g["params"]]
    assert head and all("classifier" in n for n in head) and not any("classifier" in n for n in rest)
    assert len(head) + len(rest) == sum(p.requires_grad for p in model.parameters())


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


def test_model_dropout_sets_every_dropout_and_zero_makes_training_forwards_deterministic(tiny_model_dir):
    default = tiny_lora_model(tiny_model_dir).train()
    assert any(m.p > 0 for m in default.modules() if isinstance(m, torch.nn.Dropout))  # the base has dropout...
    inputs = {k: v for k, v in BATCH.items() if k != "labels"}
    assert not torch.equal(default(**inputs).logits, default(**inputs).logits)  # ...so two passes differ
    off = tiny_lora_model(tiny_model_dir, model_dropout=0.0, classifier_head="mean").train()
    rates = [m.p for m in off.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates and set(rates) == {0.0}  # hidden, attention and head dropout alike (LoRA dropout is --lora_dropout)
    torch.testing.assert_close(off(**inputs).logits, off(**inputs).logits, rtol=0, atol=0)
    assert {m.p for m in tiny_lora_model(tiny_model_dir, model_dropout=0.3).modules() if isinstance(m, torch.nn.Dropout)} == {0.3}


# --- no model's own code runs unless --trust_remote_code ----------------------------------------------------------

CUSTOM_CODE = """import os, pathlib
pathlib.Path(os.environ["RAN_MARKER"]).write_text("the model's own code ran")
"""


def model_with_its_own_code(tiny_model_dir, folder):
    """The tiny model, but its config names classes in .py files of its folder (an auto_map): loading it runs them
    (each file records that it ran). The classes are the tiny RoBERTa's own, under another model type."""
    copy_model(tiny_model_dir, folder)
    (folder / "configuration_custom.py").write_text(CUSTOM_CODE + """from transformers import RobertaConfig


class CustomConfig(RobertaConfig):
    model_type = "custom-roberta"
""")
    (folder / "modeling_custom.py").write_text(CUSTOM_CODE + """from transformers import RobertaForSequenceClassification
from .configuration_custom import CustomConfig


class CustomForSequenceClassification(RobertaForSequenceClassification):
    config_class = CustomConfig
""")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-roberta", auto_map={
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForSequenceClassification": "modeling_custom.CustomForSequenceClassification"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
def test_a_model_that_ships_its_own_code_is_refused_and_its_code_never_runs(trained_adapter_run, tiny_model_dir,
                                                                            synthetic_train_csv, tmp_path):
    """An adapter whose base folder has modeling_*.py and an auto_map made transformers ask "run the custom code?
    [y/N]" in predict, evaluate and train; answered yes (here: piped), the code ran."""
    import shutil

    custom = model_with_its_own_code(tiny_model_dir, tmp_path / "custom-base")
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_adapter_run / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(custom)}))
    (tmp_path / "in.txt").write_text("goal coach season\nshares profit bank\n")
    ran = tmp_path / "ran"
    env = {**os.environ, "RAN_MARKER": str(ran), "HF_MODULES_CACHE": str(tmp_path / "modules")}

    def command(*argv):
        return subprocess.run([sys.executable, *argv], cwd=REPO, input="y\ny\n", capture_output=True, text=True,
                              env=env, timeout=600)

    predict = ["-m", "peft_agnews.predict", "--adapter_dir", str(adapter), "--input_file", str(tmp_path / "in.txt"),
               "--output_file", str(tmp_path / "out.csv")]
    train = ["-m", "peft_agnews.train",
             *tiny_train_args(custom, synthetic_train_csv, tmp_path / "run", max_train_steps=2, eval_steps=2)]
    for argv in (predict, train):
        proc = command(*argv)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "--trust_remote_code true" in errors[0], proc.stderr[-2000:]
        assert "[y/N]" not in proc.stdout + proc.stderr, "never an interactive question"
        assert not ran.exists(), "the model's own code must not run"
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "run").exists()
    # Asked for, it runs (and the model loads through it).
    proc = command(*predict, "--trust_remote_code", "true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ran.read_text() == "the model's own code ran" and (tmp_path / "out.csv").is_file()
