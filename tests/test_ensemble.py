"""`peft-agnews ensemble`: the members' averaged probabilities, as typed and under `accelerate launch`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import accelerate_launch, direct_logits, run_cli
from peft_agnews.config import TrainConfig
from peft_agnews.model import load_base_model


@pytest.mark.slow
def test_ensemble_averages_the_members_probabilities(mean_head_adapters, tiny_model_dir):
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

    dirs = [str(d) for d in mean_head_adapters]
    members = [by_hand(d) for d in dirs]
    assert not torch.allclose(members[0], members[1])  # two different adapters...
    torch.testing.assert_close(members[0].sum(-1), torch.ones(3))
    with accelerator_session() as accelerator:  # ...scored in batches of 2 (padded), in input order
        probs = ensemble_probabilities(EnsembleArgs(adapter_dirs=dirs, test_file="unused", per_device_eval_batch_size=2),
                                       texts, accelerator)
    torch.testing.assert_close(probs, (members[0] + members[1]) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ensemble_runs_as_typed_and_under_accelerate_launch(mean_head_adapters, synthetic_test_csv):
    """`peft-agnews ensemble` (the console script) and `accelerate launch peft_agnews/ensemble.py` on 2 processes
    print the same accuracy; each row is scored once."""
    args = ["--adapter_dirs", *map(str, mean_head_adapters), "--test_file", str(synthetic_test_csv), "--batch_size", "16"]
    typed = run_cli([str(Path(sys.executable).with_name("peft-agnews")), "ensemble", *args], timeout=300)
    assert typed.returncode == 0, typed.stdout + typed.stderr
    result = json.loads(typed.stdout.strip().splitlines()[-1])
    assert result["adapters"] == 2 and result["examples"] == 120 and result["accuracy"] > 0.5
    launched = accelerate_launch("cpu_ddp.yaml", args, script="peft_agnews/ensemble.py")
    assert launched.returncode == 0, launched.stdout[-3000:]
    lines = [line for line in launched.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0]) == result  # printed once, by the main process


def test_ensemble_refuses_adapters_of_different_heads(mean_head_adapters, tmp_path, capsys):
    import shutil

    from peft_agnews.ensemble import cli as ensemble

    other = tmp_path / "other"
    shutil.copytree(mean_head_adapters[0], other)
    (other / "head.json").unlink()
    assert ensemble(["--adapter_dirs", str(mean_head_adapters[0]), str(other), "--test_file", "x.csv"]) == 2
    assert "differ in classifier head" in capsys.readouterr().err
