"""`--torch_compile` (compilation.py): compiled training computes what eager training does, resumes exactly, and
compiles a bounded number of graphs, also with the frozen prefix, its cache and the first-token last layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_train_args
from peft_agnews.train import cli

pytestmark = pytest.mark.slow  # each compiled run compiles (seconds to tens of seconds on 2 cores, cold cache)

NO_DROPOUT = {"model_dropout": 0.0, "lora_dropout": 0.0}
SPEED_FEATURES = {"lora_layers": "top1", "cache_frozen_prefix": "true", "first_token_last_layer": "true",
                  "attn_implementation": "eager"}


@pytest.fixture(autouse=True)
def cold_compiler():
    """Each test's runs start as a fresh process does: dynamo's graphs of earlier tests in this process would
    otherwise be reused (no graph compiled) or fill its per-function recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def train_losses(out: Path) -> list[float]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e["train/loss"] for e in events if "train/loss" in e]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("precision, options, tolerance", [
    ("no", {}, 1e-5),
    ("bf16", {}, 2e-2),  # bf16 rounding in fused kernels differs from eager's op-by-op rounding
    ("no", {**SPEED_FEATURES, "max_train_steps": 30, "eval_steps": 15}, 1e-5),
    ("no", {"gradient_checkpointing": "true"}, 1e-5),
], ids=["fp32", "bf16", "fp32-frozen-prefix-cache-first-token", "fp32-gradient-checkpointing"])
def test_compiled_training_follows_eager(precision, options, tolerance, tiny_model_dir, synthetic_train_csv, tmp_path):
    """The same losses step by step (dropout off: with dropout the compiled graphs draw other mask seeds), the same
    validation accuracy, and a small, counted number of graphs with their compile time reported apart."""
    common = {**NO_DROPOUT, **options, "mixed_precision": precision, "logging_steps": 1}
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, eager, **common)) == 0
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, compiled, torch_compile="true", **common)) == 0
    assert train_losses(compiled) == pytest.approx(train_losses(eager), rel=tolerance)
    assert len(train_losses(compiled)) == int(common.get("max_train_steps", 12))
    got, want = results(compiled), results(eager)
    assert abs(got["best_eval_accuracy"] - want["best_eval_accuracy"]) <= (0 if precision == "no" else 0.05)
    # Training, evaluation and (at the second sequence length) their dynamic-length versions, plus the prefix's
    # no_grad layers and the last layer's own forward when those are on: never one graph per batch shape.
    assert 1 <= got["compiled_graphs"] <= 8, got["compiled_graphs"]
    assert 0 < got["compile_seconds"] < got["train_runtime"]
    assert "compiled_graphs" not in want


def test_resume_under_compile_is_exact(tiny_model_dir, synthetic_train_csv, tmp_path):
    """Dropout on (PCG64 masks seeded inside the compiled graphs): a compiled run resumed from its step-5 checkpoint
    logs the same losses and exports the same adapter as the uninterrupted compiled run."""
    options = {"torch_compile": "true", "lora_dropout": 0.2, "model_dropout": 0.1, "max_train_steps": 10,
               "eval_steps": 5, "save_steps": 5, "save_total_limit": 0, "logging_steps": 1}
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, reference, **options)) == 0
    checkpoint = reference / "checkpoints" / "step_5"
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, resumed, resume_from_checkpoint=checkpoint,
                               **options)) == 0
    assert train_losses(resumed)[-5:] == train_losses(reference)[-5:]
    adapter = "adapter/adapter_model.safetensors"
    got, want = load_file(resumed / adapter), load_file(reference / adapter)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert (results(resumed)["best_step"], results(resumed)["best_eval_accuracy"]) == (
        results(reference)["best_step"], results(reference)["best_eval_accuracy"])


def test_compile_is_recorded_for_resume(tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    """Compiled graphs draw other dropout-mask seeds than eager ones: switching compilation on at resume is refused."""
    out = tmp_path / "run"
    options = {"max_train_steps": 4, "eval_steps": 2, "save_steps": 2}
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, **options)) == 0
    argv = tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "resumed", torch_compile="true",
                           resume_from_checkpoint=out / "checkpoints" / "step_2", **options)
    assert cli(argv) == 2
    assert "--torch_compile False (now True)" in capsys.readouterr().err
