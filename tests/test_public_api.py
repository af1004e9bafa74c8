"""The package's public API (`peft_agnews/__init__.py`): the names the README tells users to import."""

from __future__ import annotations

import sys

import pytest
import torch

import peft_agnews
from conftest import LABELS, direct_logits, load_adapter_directly, run_cli, synthetic_rows


def test_import_is_light_and_names_resolve_lazily():
    code = "import sys, peft_agnews; print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))"
    proc = run_cli([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_public_names_are_the_library_objects():
    from peft_agnews import config, loading, model, train

    assert sorted(peft_agnews.__all__) == [
        "Classifier", "ModelArgs", "TrainConfig", "load_classifier", "parse_config", "replace_head", "run",
    ]
    assert peft_agnews.TrainConfig is config.TrainConfig and peft_agnews.parse_config is config.parse_config
    assert peft_agnews.run is train.run
    assert peft_agnews.load_classifier is loading.load_classifier and peft_agnews.ModelArgs is loading.ModelArgs
    assert peft_agnews.Classifier is loading.Classifier and peft_agnews.replace_head is model.replace_head
    assert set(peft_agnews.__all__) <= set(dir(peft_agnews))
    with pytest.raises(AttributeError, match="no attribute 'fit'"):
        peft_agnews.fit  # noqa: B018 (internal names are not re-exported)


def test_readme_loader_gives_the_adapter_as_plain_peft_loads_it(trained_adapter_run, tiny_model_dir):
    """`load_classifier(ModelArgs(adapter_dir=...))`, as the README shows it: base from adapter_config.json, labels
    from labels.json, eval mode, and the logits of loading the adapter by hand with PEFT."""
    from peft_agnews import ModelArgs, load_classifier

    adapter = trained_adapter_run / "adapter"
    classifier = load_classifier(ModelArgs(adapter_dir=str(adapter)))
    assert classifier.label_names == LABELS and not classifier.model.training
    assert classifier.base_model == str(tiny_model_dir)
    texts = [f"{title} {desc}" for _, title, desc in synthetic_rows(8, seed=5)]
    model, tokenizer = load_adapter_directly(adapter, tiny_model_dir)
    torch.testing.assert_close(direct_logits(classifier.model, classifier.tokenizer, texts),
                               direct_logits(model, tokenizer, texts), rtol=0, atol=0)
