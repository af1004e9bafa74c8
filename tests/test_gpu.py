"""On a CUDA GPU: training in bf16 and fp16 autocast, SDPA attention, torch.compile, checkpoints and exact resume.

Marked `gpu`; skipped on machines without CUDA (CI has none): `benchmarks/gpu_check.sh` runs them on a GPU. With
PEFT_AGNEWS_GPU_TESTS_ON_CPU=1 they run on the CPU instead, which is how the check script's own test exercises its
steps without a GPU (the assertions hold on either device).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import load_adapter_directly, tiny_train_args
from peft_agnews.train import cli

ON_CPU = os.environ.get("PEFT_AGNEWS_GPU_TESTS_ON_CPU") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() and not ON_CPU, reason="needs a CUDA GPU"),
]
DEVICE = "cpu" if ON_CPU and not torch.cuda.is_available() else "cuda"


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [e["train/loss"] for e in events(out) if "train/loss" in e]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="fp16 autocast is for GPUs: on the CPU the trainer refuses it (test_train.py)"))])
def test_training_runs_on_the_device_in_mixed_precision(precision, tiny_model_dir, synthetic_train_csv, tmp_path):
    out = tmp_path / precision
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, mixed_precision=precision,
                               max_train_steps=24, logging_steps=1)) == 0
    ran = json.loads((out / "run_config.json").read_text())
    assert ran["accelerate"]["device"].startswith(DEVICE) and results(out)["mixed_precision"] == precision
    assert all(torch.isfinite(torch.tensor(losses(out))))
    assert losses(out)[-1] < losses(out)[0] - 0.1
    model, _ = load_adapter_directly(out / "adapter", tiny_model_dir)  # the adapter is fp32, device-independent
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_sdpa_attention_scores_as_eager_attention(tiny_model_dir, synthetic_train_csv, tmp_path):
    """The default kernel (SDPA, fused on GPUs) and plain matmul-softmax attention compute the same model."""
    runs = {}
    for kernel in ("sdpa", "eager"):
        runs[kernel] = tmp_path / kernel
        assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, runs[kernel], attn_implementation=kernel,
                                   model_dropout=0.0, logging_steps=1)) == 0
    assert losses(runs["sdpa"]) == pytest.approx(losses(runs["eager"]), rel=1e-4)
    assert results(runs["sdpa"])["best_eval_accuracy"] == results(runs["eager"])["best_eval_accuracy"]


def test_compiled_training_on_the_device_follows_eager(tiny_model_dir, synthetic_train_csv, tmp_path):
    torch._dynamo.reset()
    common = {"mixed_precision": "bf16", "model_dropout": 0.0, "lora_dropout": 0.0, "logging_steps": 1}
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, eager, **common)) == 0
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, compiled, torch_compile="true", **common)) == 0
    assert losses(compiled) == pytest.approx(losses(eager), rel=2e-2)
    assert 1 <= results(compiled)["compiled_graphs"] <= 8


def test_resume_on_the_device_continues_the_run(tiny_model_dir, synthetic_train_csv, tmp_path):
    """Dropout on (the device's own generator, whose state the checkpoint holds): a run resumed from step 5 logs
    the losses and exports the adapter of the uninterrupted run (to float tolerance: GPU kernels may sum in
    another order)."""
    options = {"mixed_precision": "bf16", "lora_dropout": 0.2, "model_dropout": 0.1, "max_train_steps": 10,
               "eval_steps": 5, "save_steps": 5, "save_total_limit": 0, "logging_steps": 1}
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, reference, **options)) == 0
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, resumed,
                               resume_from_checkpoint=reference / "checkpoints" / "step_5", **options)) == 0
    assert losses(resumed)[-5:] == pytest.approx(losses(reference)[-5:], rel=1e-4)
    got, want = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (resumed, reference))
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in got) <= 1e-4
    assert results(resumed)["best_step"] == results(reference)["best_step"]
