"""Fault tolerance: exact resume (in-process, after SIGTERM and SIGKILL, 1 and 2 processes), atomic writes,
corrupt checkpoints, early stopping and the non-finite guard, all on the tiny model in fp32 on CPU.

The run shape used throughout: 432 training rows, batch 16, accumulation 2 -> 27 micro-batches and 14 optimizer steps
per epoch on one process (the 14th step has a single micro-batch), 7 per epoch on two; 15 steps in all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_train_args
from peft_agnews.checkpointing import MARKER, resolve_checkpoint
from peft_agnews.errors import EXIT_INTERRUPTED
from peft_agnews.train import cli

STEPS = 15


def args(model_dir: Path, train_csv: Path, out: Path, **overrides) -> list[str]:
    options = {"max_train_steps": STEPS, "eval_steps": 5, "save_steps": 1, "save_total_limit": 0, **overrides}
    return tiny_train_args(model_dir, train_csv, out, **options)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step_{STEPS}" / "adapter_model.safetensors")


def assert_same_run(out: Path, reference: Path) -> None:
    """Same final trainable weights, same exported best adapter, same best step and accuracy."""
    assert max_diff(final_weights(out), final_weights(reference)) <= 1e-6
    adapter = "adapter/adapter_model.safetensors"
    assert max_diff(load_file(out / adapter), load_file(reference / adapter)) <= 1e-6
    got, want = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert (got["global_step"], got["best_step"], got["best_eval_accuracy"]) == (
        want["global_step"], want["best_step"], want["best_eval_accuracy"])


def error_lines(capsys) -> list[str]:
    """The `error:` lines on stderr (a run stopped mid-training prints its error after the unfinished progress bar)."""
    return [line[line.index("error:"):] for line in capsys.readouterr().err.splitlines() if "error:" in line]


def counters(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())["counters"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, synthetic_train_csv, tmp_path_factory) -> Path:
    """An uninterrupted run that keeps a checkpoint at every step."""
    out = tmp_path_factory.mktemp("reference")
    assert cli(args(tiny_model_dir, synthetic_train_csv, out)) == 0
    return out


@pytest.mark.parametrize("step", [5, 13, 14])
def test_resume_from_a_checkpoint_is_exact(step, reference, tiny_model_dir, synthetic_train_csv, tmp_path):
    """Mid-epoch (5), before the epoch's last, partial accumulation window (13), at the epoch's end (14)."""
    checkpoint = reference / "checkpoints" / f"step_{step}"
    assert counters(checkpoint)["batches_in_epoch"] == {5: 10, 13: 26, 14: 27}[step]
    assert cli(args(tiny_model_dir, synthetic_train_csv, tmp_path, resume_from_checkpoint=checkpoint)) == 0
    assert_same_run(tmp_path, reference)


def test_resume_with_pcg64_dropout_masks_is_exact(tiny_model_dir, synthetic_train_csv, tmp_path):
    """The masks' seeds come from torch's generator, whose state every checkpoint saves (dropout on everywhere)."""
    options = {"dropout_generator": "pcg64", "lora_dropout": 0.2, "model_dropout": 0.1}
    reference = tmp_path / "reference"
    assert cli(args(tiny_model_dir, synthetic_train_csv, reference, **options)) == 0
    checkpoint = reference / "checkpoints" / "step_5"
    resumed = tmp_path / "resumed"
    assert cli(args(tiny_model_dir, synthetic_train_csv, resumed, resume_from_checkpoint=checkpoint, **options)) == 0
    assert_same_run(resumed, reference)


@pytest.mark.slow
def test_dataloader_workers_train_the_same_weights_and_resume_exactly(reference, tiny_model_dir, synthetic_train_csv,
                                                                     tmp_path):
    """Workers only collate (the order comes from the seeded sampler, dropout from the training process): a run
    with 2 workers trains the reference's weights, and resuming it mid-epoch with workers is exact."""
    workers = tmp_path / "workers"
    assert cli(args(tiny_model_dir, synthetic_train_csv, workers, dataloader_num_workers=2)) == 0
    assert_same_run(workers, reference)
    resumed = tmp_path / "resumed"
    checkpoint = workers / "checkpoints" / "step_5"
    assert cli(args(tiny_model_dir, synthetic_train_csv, resumed, resume_from_checkpoint=checkpoint,
                    dataloader_num_workers=2)) == 0
    assert_same_run(resumed, reference)


TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md", "labels.json", *TOKENIZER_FILES}
RESUME_FILES = {"optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainer_state.json", MARKER}


def test_checkpoints_are_adapters_holding_only_what_changes(reference):
    """The adapter's weights are written once: the resume state refers to them (best.safetensors only when the
    best step is an earlier one). Unchanged files are hard links to the previous checkpoint's."""
    best_step = json.loads((reference / "results.json").read_text())["best_step"]
    for step in range(1, STEPS + 1):
        checkpoint = reference / "checkpoints" / f"step_{step}"
        names = {p.name for p in checkpoint.iterdir()}
        best = counters(checkpoint)["best_step"]
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if best == 0:  # before the first evaluation (step 5)
            assert state["best_weights"] is None and names == ADAPTER_FILES | RESUME_FILES
        elif best == step:
            assert state["best_weights"] == "adapter_model.safetensors" and names == ADAPTER_FILES | RESUME_FILES
        else:
            assert state["best_weights"] == "best.safetensors" and names == ADAPTER_FILES | RESUME_FILES | {"best.safetensors"}
            assert max_diff(load_file(checkpoint / "best.safetensors"),
                            load_file(reference / "checkpoints" / f"step_{best}" / "adapter_model.safetensors")) == 0
    weights = load_file(reference / "checkpoints" / "step_5" / "adapter_model.safetensors")
    assert weights and all("lora_" in n or "classifier" in n or "bias" in n for n in weights)
    assert not any("word_embeddings" in n for n in weights), "the frozen base stays out"
    first, later = reference / "checkpoints" / "step_1", reference / "checkpoints" / "step_9"
    for name in TOKENIZER_FILES | {"labels.json"}:
        assert (first / name).stat().st_ino == (later / name).stat().st_ino, f"{name} is one file on disk"
    assert (first / "adapter_model.safetensors").stat().st_ino != (later / "adapter_model.safetensors").stat().st_ino
    assert max_diff(load_file(reference / "checkpoints" / f"step_{best_step}" / "adapter_model.safetensors"),
                    load_file(reference / "adapter" / "adapter_model.safetensors")) == 0, "the best step's checkpoint is the exported adapter"


@pytest.mark.slow
def test_a_checkpoint_loads_as_a_plain_peft_adapter_and_with_evaluate(reference, tiny_model_dir, synthetic_test_csv, tmp_path):
    """What a Trainer user does with checkpoint-N: load it with PEFT, or score it with the evaluate command."""
    from conftest import LABELS, direct_logits, load_adapter_directly, run_cli

    best_step = json.loads((reference / "results.json").read_text())["best_step"]
    texts = ["the striker scored a goal in the league", "shares and profit rose at the bank"]
    logits = {}
    for name, folder in (("best", reference / "checkpoints" / f"step_{best_step}"), ("adapter", reference / "adapter"),
                         ("step_3", reference / "checkpoints" / "step_3")):
        model, tokenizer = load_adapter_directly(folder, tiny_model_dir)
        assert model.config.num_labels == 4
        logits[name] = direct_logits(model, tokenizer, texts)
    assert torch.equal(logits["best"], logits["adapter"])
    assert not torch.allclose(logits["step_3"], logits["adapter"]), "an earlier step is another adapter"
    reports = {}
    for name, folder in (("best", reference / "checkpoints" / f"step_{best_step}"), ("adapter", reference / "adapter")):
        out = tmp_path / f"{name}.json"
        proc = run_cli(["peft-agnews", "evaluate", "--adapter_dir", str(folder), "--test_file", str(synthetic_test_csv),
                        "--output_file", str(out)])
        assert proc.returncode == 0, proc.stdout[-3000:]
        reports[name] = json.loads(out.read_text())
    assert reports["best"]["num_examples"] == 120 and sorted(reports["best"]["per_class"]) == sorted(LABELS)
    for key in ("accuracy", "loss", "per_class", "confusion_matrix"):
        assert reports["best"][key] == reports["adapter"][key], key


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_usable(
    reference, tiny_model_dir, synthetic_train_csv, tmp_path, monkeypatch, capsys
):
    import peft.peft_model

    real_save = peft.peft_model.safe_save_file

    def dies_writing_step_4(tensors, filename, *a, **kw):
        if ".tmp-step_4" in str(filename):
            raise OSError("simulated crash in the middle of writing a checkpoint")
        return real_save(tensors, filename, *a, **kw)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", dies_writing_step_4)
    assert cli(args(tiny_model_dir, synthetic_train_csv, tmp_path)) == 2  # was a traceback
    err = error_lines(capsys)
    assert err[0].startswith("error: simulated crash") and "--resume_from_checkpoint latest" in err[0], err
    monkeypatch.undo()
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-step_4", "step_1", "step_2", "step_3"]
    assert not (folder / ".tmp-step_4" / MARKER).exists()
    # A checkpoint without its marker (e.g. half copied by hand) is skipped by `latest` too.
    shutil.copytree(folder / "step_3", folder / "step_9")
    (folder / "step_9" / MARKER).unlink()
    capsys.readouterr()
    assert resolve_checkpoint("latest", folder) == folder / "step_3"
    assert "skipping incomplete checkpoint(s) (interrupted writes): .tmp-step_4, step_9" in capsys.readouterr().out
    # Named explicitly, the incomplete one is a clear error.
    assert cli(args(tiny_model_dir, synthetic_train_csv, tmp_path, resume_from_checkpoint=folder / "step_9")) == 2
    assert f"checkpoint {folder / 'step_9'} is incomplete" in capsys.readouterr().err
    shutil.rmtree(folder / "step_9")

    assert cli(args(tiny_model_dir, synthetic_train_csv, tmp_path, resume_from_checkpoint="latest")) == 0
    assert_same_run(tmp_path, reference)
    assert not (folder / ".tmp-step_4").exists(), "leftovers of interrupted writes are cleaned up"


@pytest.mark.parametrize("file", ["trainer_state.json", "adapter_model.safetensors", "optimizer.bin", "random_states_0.pkl"])
def test_a_corrupt_checkpoint_is_a_clear_error_naming_the_file(
    file, reference, tiny_model_dir, synthetic_train_csv, tmp_path, capsys
):
    checkpoint = tmp_path / "step_5"
    shutil.copytree(reference / "checkpoints" / "step_5", checkpoint)
    data = (checkpoint / file).read_bytes()
    (checkpoint / file).write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert cli(args(tiny_model_dir, synthetic_train_csv, out, resume_from_checkpoint=checkpoint)) == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint file {checkpoint / file} " in err, err
    assert not (out / "results.json").exists()


def test_a_full_disk_is_one_error_line_and_latest_then_resumes(reference, tiny_model_dir, synthetic_train_csv, tmp_path,
                                                              monkeypatch, capsys):
    import errno

    import peft.peft_model

    real_save = peft.peft_model.safe_save_file

    def disk_full_at_step_3(tensors, filename, *a, **kw):
        if ".tmp-step_3" in str(filename):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, *a, **kw)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full_at_step_3)
    assert cli(args(tiny_model_dir, synthetic_train_csv, tmp_path)) == 2
    (err,) = error_lines(capsys)
    assert err.startswith("error: No space left on device: ") and ".tmp-step_3" in err, err
    monkeypatch.undo()
    assert cli(args(tiny_model_dir, synthetic_train_csv, tmp_path, resume_from_checkpoint="latest")) == 0
    assert_same_run(tmp_path, reference)


def test_resume_refuses_other_rows_of_the_same_count_and_changed_hyperparameters(
    reference, tiny_model_dir, synthetic_train_csv, tmp_path, capsys
):
    """Resume used to check the row count only, and took --learning_rate 0.5 --lora_alpha 64 silently (exit 0)."""
    from conftest import synthetic_rows, write_canonical_csv

    checkpoint = reference / "checkpoints" / "step_5"
    same_count = write_canonical_csv(tmp_path / "other.csv", synthetic_rows(480, seed=11))
    assert cli(args(tiny_model_dir, same_count, tmp_path / "a", resume_from_checkpoint=checkpoint)) == 2
    err = capsys.readouterr().err
    assert "other train rows (sha256" in err and "other validation rows" in err, err
    argv = args(tiny_model_dir, synthetic_train_csv, tmp_path / "b", resume_from_checkpoint=checkpoint,
                learning_rate=0.5, lora_alpha=64)
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "--learning_rate 0.005 (now 0.5)" in err and "--lora_alpha 16 (now 64)" in err, err
    # Cadence and tracking may change: listed in config.RESUMABLE_OPTIONS.
    argv = args(tiny_model_dir, synthetic_train_csv, tmp_path / "c", resume_from_checkpoint=checkpoint, eval_steps=3,
                logging_steps=1, save_total_limit=1, per_device_eval_batch_size=7)
    assert cli(argv) == 0


def test_trainer_state_with_wrong_types_is_a_clear_error(reference, tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    checkpoint = tmp_path / "step_5"
    shutil.copytree(reference / "checkpoints" / "step_5", checkpoint)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["counters"]["step"] = "five"
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    assert cli(args(tiny_model_dir, synthetic_train_csv, tmp_path / "out", resume_from_checkpoint=checkpoint)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: checkpoint file {checkpoint / 'trainer_state.json'}") and "counter step is 'five'" in err


def test_latest_names_the_older_checkpoint_when_the_newest_is_corrupt(reference, tiny_model_dir, synthetic_train_csv,
                                                                      tmp_path, capsys):
    out = tmp_path / "out"
    for step in (4, 5):
        shutil.copytree(reference / "checkpoints" / f"step_{step}", out / "checkpoints" / f"step_{step}")
    (out / "checkpoints" / "step_5" / "optimizer.bin").write_bytes(b"garbage")
    assert cli(args(tiny_model_dir, synthetic_train_csv, out, resume_from_checkpoint="latest")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "optimizer.bin is missing or corrupt" in err and f"pass the older {out / 'checkpoints' / 'step_4'}" in err, err


def test_a_checkpoint_of_an_earlier_version_is_refused_in_one_line(reference, tiny_model_dir, synthetic_train_csv,
                                                                   tmp_path, capsys):
    """Checkpoints written before they were adapters (trainable.safetensors, no best_weights key)."""
    checkpoint = tmp_path / "step_5"
    shutil.copytree(reference / "checkpoints" / "step_5", checkpoint)
    (checkpoint / "adapter_model.safetensors").rename(checkpoint / "trainable.safetensors")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["best_weights"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    assert cli(args(tiny_model_dir, synthetic_train_csv, tmp_path / "out", resume_from_checkpoint=checkpoint)) == 2
    (err,) = error_lines(capsys)
    assert f"checkpoint {checkpoint} was written by an earlier version of peft-agnews" in err, err


def test_resuming_a_differently_shaped_run_is_a_clear_error(reference, tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    checkpoint = reference / "checkpoints" / "step_5"
    argv = args(tiny_model_dir, synthetic_train_csv, tmp_path, gradient_accumulation_steps=1, resume_from_checkpoint=checkpoint)
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "differently shaped run" in err and "gradient_accumulation_steps=2 (now 1)" in err, err


def test_early_stopping_ends_training_and_exports_the_best_adapter(tiny_model_dir, synthetic_train_csv, tmp_path):
    argv = args(tiny_model_dir, synthetic_train_csv, tmp_path, max_train_steps=60, eval_steps=2, save_steps=0,
                early_stopping_patience=2)
    assert cli(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["early_stopped"] is True and results["global_step"] < 60
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    accuracies = [(e["step"], e["eval/accuracy"]) for e in evals if "eval/accuracy" in e]
    assert accuracies[-1][0] == results["global_step"]
    assert all(acc <= results["best_eval_accuracy"] for _, acc in accuracies[-2:]), "two evaluations without improvement"
    assert max(acc for _, acc in accuracies) == results["best_eval_accuracy"]
    assert results["best_step"] < results["global_step"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_state(
    tiny_model_dir, synthetic_train_csv, tmp_path, monkeypatch, capsys
):
    """A forward hook turns the 9th training micro-batch's logits into NaN: that is optimizer step 5's first."""
    import peft_agnews.train as train

    real_apply_lora = train.apply_lora

    def poisoned_apply_lora(model, cfg):
        model = real_apply_lora(model, cfg)
        calls = {"n": 0}

        def poison(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] == 9:
                    return output * float("nan")
            return output

        model.base_model.model.classifier.register_forward_hook(poison)
        return model

    monkeypatch.setattr(train, "apply_lora", poisoned_apply_lora)
    assert cli(args(tiny_model_dir, synthetic_train_csv, tmp_path, eval_steps=2, save_steps=2)) == 3
    err = capsys.readouterr().err
    last_good = tmp_path / "checkpoints" / "step_4"
    assert "error: non-finite loss at optimizer step 5" in err and str(last_good) in err, err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_4"]
    for name in ("adapter_model.safetensors", "best.safetensors"):
        if (last_good / name).exists():  # best.safetensors only when step 4 was not the best step
            assert all(torch.isfinite(t).all() for t in load_file(last_good / name).values())
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "adapter").exists()


# Real processes, real signals -----------------------------------------------------------------------------------

def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    marker = out / "checkpoints" / f"step_{step}" / MARKER
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"run ended before checkpoint {step}:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint {step} after {timeout} s"
        time.sleep(0.05)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def worker_pids(out: Path) -> dict[int, int]:
    """rank -> pid of the training processes torchrun started for the run writing to `out` (in their own sessions)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline, environ = (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(out).encode() in cmdline:
            for var in environ.split(b"\0"):
                if var.startswith(b"RANK="):
                    found[int(var[5:])] = int(proc.name)
    return found


def kill_everything(proc: subprocess.Popen, out: Path) -> None:
    for pid in worker_pids(out).values():
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def interrupt_and_resume(command: list[str], out: Path, term_pid) -> tuple[int, str]:
    """Start a run; SIGTERM the process `term_pid(proc)` names after checkpoint 3; resume with `latest`; SIGKILL
    every process after checkpoint 9 (wherever they are: mid-step, mid-accumulation); resume with `latest` again;
    the run must finish. Returns the exit status and output of the SIGTERM'd run."""
    proc = start(command)
    wait_for_checkpoint(proc, out, 3)
    os.kill(term_pid(proc), signal.SIGTERM)
    term_code, term_output = finish(proc)
    assert "stopped by SIGTERM at step" in term_output, term_output[-3000:]
    stopped_at = int(term_output.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 3 <= stopped_at < STEPS
    assert (out / "checkpoints" / f"step_{stopped_at}" / MARKER).is_file(), "the stop wrote a complete checkpoint"

    resume = [*command, "--resume_from_checkpoint", "latest"]
    proc = start(resume)
    wait_for_checkpoint(proc, out, 9)
    kill_everything(proc, out)
    latest = resolve_checkpoint("latest", out / "checkpoints", say=lambda _: None)
    assert 9 <= int(latest.name.split("_")[1]) < STEPS
    assert 0 < counters(latest)["batches_in_epoch"], "the kill landed mid-epoch"

    code, output = finish(start(resume))
    assert code == 0, output[-3000:]
    return term_code, term_output


@pytest.mark.slow
def test_sigterm_and_sigkill_then_resume_is_exact_one_process(reference, tiny_model_dir, synthetic_train_csv, tmp_path):
    command = [sys.executable, "peft_agnews/train.py",
               *args(tiny_model_dir, synthetic_train_csv, tmp_path, save_steps=3, save_total_limit=2)]
    code, output = interrupt_and_resume(command, tmp_path, term_pid=lambda proc: proc.pid)
    assert code == EXIT_INTERRUPTED, output[-3000:]
    assert "continue with --resume_from_checkpoint latest" in output
    assert_same_run(tmp_path, reference)
    # Rotation kept the two newest checkpoints and the best one (if that step was checkpointed: on the
    # --save_steps grid, or the step the SIGTERM stopped at, which can be an evaluation step too).
    best = json.loads((tmp_path / "results.json").read_text())["best_step"]
    stopped_at = int(output.split("stopped by SIGTERM at step ")[1].split(";")[0])
    kept = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert kept == {"step_12", "step_15"} | ({f"step_{best}"} if best % 3 == 0 or best == stopped_at else set()), kept


@pytest.mark.slow
def test_sigterm_to_one_rank_and_sigkill_then_resume_is_exact_two_processes(tiny_model_dir, synthetic_train_csv, tmp_path):
    """SIGTERM reaches rank 1 only: both ranks agree to stop at the same step. Reference: an uninterrupted 2-process run."""
    launch = [sys.executable, "-m", "accelerate.commands.launch",
              "--config_file", str(REPO / "accelerate_configs" / "cpu_ddp.yaml"), "peft_agnews/train.py"]
    reference, out = tmp_path / "reference", tmp_path / "interrupted"
    code, output = finish(start([*launch, *args(tiny_model_dir, synthetic_train_csv, reference, save_steps=3)]))
    assert code == 0, output[-3000:]
    code, output = interrupt_and_resume([*launch, *args(tiny_model_dir, synthetic_train_csv, out, save_steps=3)], out,
                                        term_pid=lambda proc: worker_pids(out)[1])
    assert code != 0 and "exitcode  : 75" in output, output[-3000:]
    assert_same_run(out, reference)
    assert json.loads((out / "results.json").read_text())["num_processes"] == 2


@pytest.mark.slow
def test_resume_continues_the_metrics_log_and_the_same_wandb_run(tiny_model_dir, synthetic_train_csv, tmp_path, monkeypatch):
    """A run stopped after step 12 with its last checkpoint at step 5 resumes from it: metrics.jsonl drops the
    events logged after the checkpoint and continues, and W&B reopens the run id stored in the checkpoint."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    first = tmp_path / "first"
    assert cli(args(tiny_model_dir, synthetic_train_csv, first, report_to="wandb")) == 0
    stopped = tmp_path / "stopped"
    shutil.copytree(first, stopped)
    shutil.rmtree(stopped / "adapter")
    (stopped / "results.json").unlink()
    for checkpoint in (stopped / "checkpoints").glob("step_*"):
        if int(checkpoint.name.split("_")[1]) > 5:
            shutil.rmtree(checkpoint)
    lines = (stopped / "metrics.jsonl").read_text().splitlines(keepends=True)
    (stopped / "metrics.jsonl").write_text("".join(l for l in lines if json.loads(l)["step"] <= 12))

    assert cli(args(tiny_model_dir, synthetic_train_csv, stopped, report_to="wandb", resume_from_checkpoint="latest")) == 0

    def steps(out: Path, key: str) -> list[int]:
        events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [e["step"] for e in events if key in e]

    for key in ("train/loss", "eval/accuracy"):
        assert steps(stopped, key) == steps(first, key)
    assert steps(stopped, "eval/accuracy") == [5, 10, 15]
    runs = sorted((stopped / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({run.name.rsplit("-", 1)[1] for run in runs}) == 1, runs
    assert counters(stopped / "checkpoints" / "step_15")["tracker_run_id"] == runs[0].name.rsplit("-", 1)[1]
