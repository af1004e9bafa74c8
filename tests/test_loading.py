"""Loading a trained adapter (`loading.load_classifier`): a research head rebuilt from head.json, a damaged one refused."""

from __future__ import annotations

import json

import torch

from conftest import toy_batch
from peft_agnews.config import TrainConfig
from peft_agnews.model import load_base_model

BATCH = toy_batch()


def test_evaluate_and_predict_load_an_adapter_with_its_recorded_head(mean_head_adapters, tiny_model_dir):
    from peft import PeftModel

    from peft_agnews.loading import ModelArgs, load_classifier
    from peft_agnews.model import replace_head

    assert json.loads((mean_head_adapters[0] / "head.json").read_text()) == {"classifier_head": "mean"}
    loaded = load_classifier(ModelArgs(adapter_dir=str(mean_head_adapters[0]))).model
    assert type(loaded.base_model.model.classifier.original_module).__name__ == "PooledLinearHead"
    inputs = {k: v for k, v in BATCH.items() if k != "labels"}
    # Reference: the head built by hand, then plain PEFT loading (what the README tells users to do).
    base = load_base_model(TrainConfig(model_name_or_path=str(tiny_model_dir)))
    replace_head(base, "mean")
    by_hand = PeftModel.from_pretrained(base, mean_head_adapters[0]).eval()
    with torch.inference_mode():
        torch.testing.assert_close(loaded(**inputs).logits, by_hand(**inputs).logits)


def test_a_damaged_head_json_is_one_clear_error(mean_head_adapters, tmp_path, capsys):
    import shutil

    from peft_agnews.evaluate import cli as evaluate_cli

    damaged = tmp_path / "adapter"
    shutil.copytree(mean_head_adapters[0], damaged)
    (damaged / "head.json").write_text('{"classifier_head": "attention"}')
    assert evaluate_cli(["--adapter_dir", str(damaged), "--test_file", "unused.csv"]) == 2
    err = capsys.readouterr().err
    assert "head.json is damaged" in err and "Traceback" not in err
