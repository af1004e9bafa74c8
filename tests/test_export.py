"""export: a merged model equal to the adapter (logits within 1e-5), loadable by Transformers and its pipeline with
label names; the adapter copy (a research head's head.json too, which --merge refuses); the recipes' adapters merge."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from conftest import LABELS, PLAIN_TEXTS, direct_logits, load_adapter_directly, synthetic_rows, toy_batch
from peft_agnews.export import cli, main

TEXTS = [f"{t} {d}" for _, t, d in synthetic_rows(12, seed=11)]
BATCH = toy_batch()


@pytest.fixture(scope="module")
def merged_dir(trained_adapter_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "merged"
    return main(["--adapter_dir", str(trained_adapter_run / "adapter"), "--merge", "--output_dir", str(out)])


def test_merged_model_gives_the_adapters_logits(trained_adapter_run, tiny_model_dir, merged_dir):
    adapter_model, tokenizer = load_adapter_directly(trained_adapter_run / "adapter", tiny_model_dir)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir)
    assert type(merged).__name__ == "RobertaForSequenceClassification"  # plain Transformers, no PEFT wrapper
    assert not any("lora" in name for name, _ in merged.named_parameters())
    reference = direct_logits(adapter_model, tokenizer, TEXTS)
    logits = direct_logits(merged, AutoTokenizer.from_pretrained(merged_dir), TEXTS)
    assert torch.allclose(logits, reference, atol=1e-5), (logits - reference).abs().max()
    # The comparison is not vacuous: the LoRA update changed the base weights.
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=4).state_dict()
    key = "roberta.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(merged.state_dict()[key], base[key])


def test_merged_folder_is_safetensors_with_label_names_and_a_card(merged_dir):
    names = {p.name for p in merged_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= names
    assert not any(n.endswith(".bin") or n.startswith("adapter_") for n in names)
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(LABELS)}
    assert config["label2id"] == {n: i for i, n in enumerate(LABELS)}
    card = (merged_dir / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "text-classification"
    assert 'pipeline("text-classification"' in card


def test_pipeline_returns_label_names(merged_dir, trained_adapter_run, tiny_model_dir):
    classify = pipeline("text-classification", model=str(merged_dir), device="cpu")
    results = classify(TEXTS)
    assert {r["label"] for r in results} <= set(LABELS)
    adapter_model, tokenizer = load_adapter_directly(trained_adapter_run / "adapter", tiny_model_dir)
    expected = direct_logits(adapter_model, tokenizer, TEXTS).softmax(-1)
    assert [r["label"] for r in results] == [LABELS[i] for i in expected.argmax(-1)]
    assert [r["score"] for r in results] == pytest.approx(expected.max(-1).values.tolist(), abs=1e-5)


def test_adapter_copy_keeps_weights_labels_and_card(trained_adapter_run, tmp_path):
    out = main(["--adapter_dir", str(trained_adapter_run / "adapter"), "--output_dir", str(tmp_path / "copy")])
    source = trained_adapter_run / "adapter"
    for name in ("adapter_model.safetensors", "labels.json", "README.md"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name


def test_existing_output_dir_is_refused_and_offline_push_is_refused(trained_adapter_run, merged_dir, tmp_path, capsys):
    before = sorted(p.name for p in merged_dir.iterdir())
    adapter = str(trained_adapter_run / "adapter")
    assert cli(["--adapter_dir", adapter, "--merge", "--output_dir", str(merged_dir)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in merged_dir.iterdir()) == before
    push = ["--adapter_dir", adapter, "--output_dir", str(tmp_path / "p"), "--push_to_hub"]
    assert cli(push) == 2 and "--hub_model_id" in capsys.readouterr().err
    assert cli([*push, "--hub_model_id", "me/model"]) == 2  # tests run with HF_HUB_OFFLINE=1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and not (tmp_path / "p").exists()


# --- a research head; the recipes' adapters merge ---------------------------------------------------------------

def test_export_copies_the_head_choice_and_merge_refuses_a_custom_head(mean_head_adapters, tmp_path, capsys):
    from peft_agnews.export import cli as export_cli
    from peft_agnews.loading import ModelArgs, load_classifier

    copy = tmp_path / "copy"
    assert export_cli(["--adapter_dir", str(mean_head_adapters[0]), "--output_dir", str(copy)]) == 0
    assert json.loads((copy / "head.json").read_text()) == {"classifier_head": "mean"}
    inputs = {k: v for k, v in BATCH.items() if k != "labels"}
    with torch.inference_mode():
        torch.testing.assert_close(load_classifier(ModelArgs(adapter_dir=str(copy))).model(**inputs).logits,
                                   load_classifier(ModelArgs(adapter_dir=str(mean_head_adapters[0]))).model(**inputs).logits)
    merged = tmp_path / "merged"
    assert export_cli(["--adapter_dir", str(mean_head_adapters[0]), "--merge", "--output_dir", str(merged)]) == 2
    assert "--merge needs the base class's own head" in capsys.readouterr().err and not merged.exists()


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
