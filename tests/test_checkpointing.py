"""Fault tolerance: exact resume (in-process, after SIGTERM and SIGKILL, 1 and 2 processes), atomic writes,
corrupt checkpoints, early stopping and the non-finite guard, all on the tiny model in fp32 on CPU.

The run shape used throughout: 432 training rows, batch 16, accumulation 2 -> 27 micro-batches and 14 optimizer steps
per epoch on one process (the 14th step has a single micro-batch), 7 per epoch on two; 15 steps in all.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli, tiny_train_args
from peft_agnews import checkpointing
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


def record_checksums(checkpoint: Path) -> None:
    """Record the checkpoint's files as they are now in its COMPLETE marker (as written)."""
    digests = {f.name: checkpointing.file_sha256(f) for f in checkpoint.iterdir() if f.name != MARKER}
    (checkpoint / MARKER).write_text(json.dumps({"sha256": digests}))


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
    record_checksums(checkpoint)  # as a buggy writer would have: the types are checked even when the bytes match
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
    (checkpoint / MARKER).write_text("")  # as those versions wrote it: no checksums
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


# --- damaged state is never trusted -----------------------------------------------------------------------------

def flip_a_bit_near_the_end(file: Path) -> None:
    """A bit flip inside the tensor data: the file still loads, with one wrong weight."""
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x10
    file.write_bytes(bytes(data))


def test_checkpoints_record_the_sha256_of_every_file(reference):
    """Every file: the adapter, the hard-linked tokenizer files, best.safetensors when there is one, the resume state."""
    with_best = 0
    for checkpoint in sorted((reference / "checkpoints").iterdir()):
        recorded = json.loads((checkpoint / MARKER).read_text())["sha256"]
        assert set(recorded) == {p.name for p in checkpoint.iterdir()} - {MARKER}
        assert {"adapter_model.safetensors", "tokenizer.json", "optimizer.bin"} <= set(recorded)
        for name, digest in recorded.items():
            assert digest == checkpointing.file_sha256(checkpoint / name), (checkpoint.name, name)
        with_best += "best.safetensors" in recorded
    assert with_best, "some checkpoint keeps an older best step's weights"


@pytest.mark.slow
def test_a_bit_flip_in_the_newest_checkpoints_weights_names_it_and_the_older_one(reference, tiny_model_dir,
                                                                                 synthetic_train_csv, tmp_path):
    """A bit flip in the adapter's weights resumed silently with a wrong weight."""
    out = tmp_path / "out"
    for step in (4, 5):
        shutil.copytree(reference / "checkpoints" / f"step_{step}", out / "checkpoints" / f"step_{step}")
    damaged = out / "checkpoints" / "step_5" / "adapter_model.safetensors"
    flip_a_bit_near_the_end(damaged)
    load_file(damaged)  # still a readable safetensors file
    proc = run_cli([sys.executable, "-m", "peft_agnews.train",
                    *args(tiny_model_dir, synthetic_train_csv, out, resume_from_checkpoint="latest")])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (err,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert err.startswith(f"error: checkpoint file {damaged} is missing or corrupt (its sha256 differs"), err
    assert f"pass the older {out / 'checkpoints' / 'step_4'} instead" in err, err
    assert not (out / "results.json").exists()


# --- the resumable options: each one changed on resume moves no weight, with dropout on ----------------------------

DROPOUT_ON = {"dropout_generator": "pcg64", "lora_dropout": 0.2, "model_dropout": 0.1}
CACHE = {"lora_layers": "top1", "model_dropout": 0.0}  # the cache needs dropout off below the trained layer
# A dataset whose README names its splits (as a Hub dataset's may): train/train_copy and dev/dev_copy name the same
# rows, final other rows (see resume_files).
NAMED_SPLITS = {"train_file": None, "dataset_name": "<named>", "text_column_names": ["title", "description"],
                "label_column_name": "topic", "validation_split_name": "dev", "test_split_name": "final"}
# option -> (its value on resume, the options of the run resumed from); "<copy>" is the run's file at another path.
CHANGED_ON_RESUME = {
    "train_file": ("<copy>", {}),
    "validation_file": ("<copy>", {"validation_file": "<validation>"}),
    "dataset_name": ("<copy>", {"train_file": None, "dataset_name": "<dataset>", "text_column_names": ["title", "description"],
                                "label_column_name": "topic", "evaluate_test_split": "false"}),
    "test_file": ("<test>", {}),
    "evaluate_test_split": ("false", {"train_file": None, "dataset_name": "<dataset>",
                                      "text_column_names": ["title", "description"], "label_column_name": "topic"}),
    "per_device_eval_batch_size": ("7", {}),
    "eval_steps": ("2", {}),
    "save_steps": ("2", {}),
    "logging_steps": ("1", {}),
    "save_total_limit": ("1", {}),
    "early_stopping_patience": ("50", {}),
    "overwrite_output_dir": ("true", {}),
    "max_trainable_params": ("5000", {}),
    "gradient_checkpointing": ("false", {}),
    "cast_frozen_weights": ("false", {"mixed_precision": "bf16"}),
    "trust_remote_code": ("true", {}),
    "num_threads": ("1", {"num_threads": 2}),
    "frozen_prefix": ("false", {"lora_layers": "top1"}),
    "cache_frozen_prefix": ("true", CACHE),
    "frozen_prefix_cache_max_gb": ("0.5", {**CACHE, "cache_frozen_prefix": "true"}),
    "report_to": ("wandb", {}),
    "wandb_mode": ("offline", {"report_to": "wandb", "wandb_mode": "disabled"}),
    "license": ("apache-2.0", {}),
    "eval_strategy": ("no", {}),
    "save_strategy": ("epoch", {}),
    "train_split_name": ("train_copy", NAMED_SPLITS),
    "validation_split_name": ("dev_copy", NAMED_SPLITS),
    "test_split_name": ("dev", NAMED_SPLITS),
    "dataloader_num_workers": ("1", {}),
    "dataloader_pin_memory": ("false", {}),
    "log_level": ("warning", {}),
    "token": ("hf_not_a_real_token", {}),
    "cache_dir": ("<cache>", {}),
}
# Resumable, but not changed above: every resume passes another --output_dir and --resume_from_checkpoint than
# the run it continues; --dry_run trains nothing; the tracker labels only name a run (--report_to is exercised);
# the Hub options act only once training has finished (tests/test_hub.py), and no Hub is reachable here.
NOT_CHANGED = {"output_dir", "resume_from_checkpoint", "dry_run", "wandb_project", "wandb_entity", "wandb_group",
               "wandb_tags", "run_name", "push_to_hub", "hub_model_id", "hub_private_repo"}
RESUME_AT, RESUME_STEPS = 3, 6


def resume_args(model_dir: Path, train_csv: Path, out: Path, **overrides) -> list[str]:
    options = {"max_train_steps": RESUME_STEPS, "eval_steps": 3, "save_steps": 1, "save_total_limit": 0,
               **DROPOUT_ON, **overrides}
    return tiny_train_args(model_dir, options.pop("train_file", train_csv), out, **options)


@pytest.fixture(scope="module")
def resume_files(synthetic_train_csv, synthetic_test_csv, hub_style_dataset, tmp_path_factory) -> dict[str, Path]:
    from conftest import synthetic_rows, write_canonical_csv, write_hub_style_dataset

    folder = tmp_path_factory.mktemp("resume-files")
    validation = write_canonical_csv(folder / "validation.csv", synthetic_rows(64, seed=21))
    named = write_hub_style_dataset(folder / "named", {"train": 480, "dev": 60, "final": 100})
    splits = {"train": "train", "train_copy": "train", "dev": "dev", "dev_copy": "dev", "final": "final"}
    (named / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n" + "".join(
        f"  - split: {split}\n    path: {file}.parquet\n" for split, file in splits.items()) + "---\n")
    files = {"<validation>": validation, "<dataset>": hub_style_dataset, "<test>": synthetic_test_csv,
             "<named>": named, "<cache>": folder / "hf-cache"}
    for option, source in (("train_file", synthetic_train_csv), ("validation_file", validation),
                           ("dataset_name", hub_style_dataset)):
        target = folder / "copies" / option / source.name  # the same rows at another path
        target.parent.mkdir(parents=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)
        files[f"<copy>{option}"] = target
    return files


def resolve(value, files: dict[str, Path], option: str = ""):
    """A CHANGED_ON_RESUME value with its placeholder ("<copy>", "<test>", ...) replaced by the file."""
    if not isinstance(value, str):
        return value
    return files.get(f"{value}{option}", files.get(value, value))


@pytest.fixture(scope="module")
def resumed_from(tiny_model_dir, synthetic_train_csv, resume_files, tmp_path_factory):
    """The uninterrupted run for a set of options (built once per set): checkpoints at every step."""
    runs: dict[str, Path] = {}

    def reference_for(base: dict) -> Path:
        key = json.dumps(base, sort_keys=True)
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp("resume-reference")
            options = {k: resolve(v, resume_files) for k, v in base.items()}
            assert cli(resume_args(tiny_model_dir, synthetic_train_csv, runs[key], **options)) == 0
        return runs[key]

    return reference_for


def final_trainable(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step_{RESUME_STEPS}" / "adapter_model.safetensors")


def test_every_resumable_option_is_exercised():
    from peft_agnews.config import RESUMABLE_OPTIONS

    assert set(CHANGED_ON_RESUME) | NOT_CHANGED == set(RESUMABLE_OPTIONS)


@pytest.mark.slow
@pytest.mark.parametrize("option", sorted(CHANGED_ON_RESUME))
def test_each_resumable_option_changed_on_resume_moves_no_weight(option, resumed_from, resume_files, tiny_model_dir,
                                                                 synthetic_train_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    value, base = CHANGED_ON_RESUME[option]
    reference = resumed_from(base)
    options = {k: resolve(v, resume_files) for k, v in base.items()}
    options[option] = resolve(value, resume_files, option)
    argv = resume_args(tiny_model_dir, synthetic_train_csv, tmp_path / "resumed", **options,
                       resume_from_checkpoint=reference / "checkpoints" / f"step_{RESUME_AT}")
    assert cli(argv) == 0
    assert max_diff(final_trainable(tmp_path / "resumed"), final_trainable(reference)) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("option, value", [("attn_implementation", "eager"), ("first_token_last_layer", "true")])
def test_options_that_move_the_weights_with_dropout_on_are_refused_on_resume(
    option, value, resumed_from, tiny_model_dir, synthetic_train_csv, tmp_path, monkeypatch, capsys
):
    """Both were listed as resumable: --attn_implementation moves where attention-dropout masks come from,
    --first_token_last_layer draws fewer of them."""
    reference = resumed_from({})
    checkpoint = reference / "checkpoints" / f"step_{RESUME_AT}"
    argv = resume_args(tiny_model_dir, synthetic_train_csv, tmp_path / "refused", resume_from_checkpoint=checkpoint,
                       **{option: value})
    assert cli(argv) == 2
    assert f"--{option} " in capsys.readouterr().err
    # Why: past the check, the resumed run ends with other weights than the uninterrupted one.
    monkeypatch.setattr(checkpointing.Checkpointer, "_check_shape", lambda self, path, saved: None)
    argv = resume_args(tiny_model_dir, synthetic_train_csv, tmp_path / "moved", resume_from_checkpoint=checkpoint,
                       **{option: value})
    assert cli(argv) == 0
    assert max_diff(final_trainable(tmp_path / "moved"), final_trainable(reference)) > 1e-5


def test_precision_is_compared_after_auto_is_resolved(tiny_model_dir, synthetic_train_csv, tmp_path, monkeypatch,
                                                      capsys):
    """`--mixed_precision auto` was refused against a checkpoint made with bf16 on a machine where auto is bf16."""
    from peft_agnews import hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)  # auto = bf16 here, whatever the CPU
    first = tmp_path / "bf16"
    options = {"max_train_steps": 4, "eval_steps": 2, "save_steps": 2}
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, first, mixed_precision="bf16", **options)) == 0
    checkpoint = first / "checkpoints" / "step_2"
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "auto", mixed_precision="auto",
                               resume_from_checkpoint=checkpoint, **options)) == 0
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "fp32", mixed_precision="no",
                               resume_from_checkpoint=checkpoint, **options)) == 2
    assert "mixed_precision=bf16 (now no)" in capsys.readouterr().err


# --- one error line and exit 2, or the checkpoint-and-75 path -----------------------------------------------------

@contextlib.contextmanager
def disk_full_after(limit: int):
    """Writes past `limit` bytes fail for real (EFBIG: RLIMIT_FSIZE, which Python keeps from killing it), as they
    would on a full disk, inside whatever library is writing."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_full_disk_inside_safetensors_or_tokenizers_is_one_error_line(tiny_model_dir, synthetic_train_csv, tmp_path,
                                                                        monkeypatch, capsys):
    """safetensors' SafetensorError (a checkpoint) and tokenizers' bare Exception (the adapter's tokenizer) were
    tracebacks with exit status 1."""
    import peft.peft_model

    import peft_agnews.train as train

    real_save = peft.peft_model.safe_save_file  # what PEFT writes a checkpoint's adapter weights with

    def save_on_a_full_disk(tensors, filename, *a, **kw):
        with disk_full_after(100) if ".tmp-step_2" in str(filename) else contextlib.nullcontext():
            return real_save(tensors, filename, *a, **kw)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_on_a_full_disk)
    out = tmp_path / "checkpoint"
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, max_train_steps=4, save_steps=1)) == 2
    (err,) = error_lines(capsys)
    assert err.startswith(f"error: File too large: {out / 'checkpoints' / '.tmp-step_2'}; fix that, then continue "
                          "with --resume_from_checkpoint latest"), err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".tmp-step_2", "step_1"]
    monkeypatch.undo()

    real_load_tokenizer = train.load_tokenizer

    def tokenizer_on_a_full_disk(cfg):
        tokenizer = real_load_tokenizer(cfg)
        real = tokenizer.save_pretrained

        def save_pretrained(folder, *a, **kw):
            with disk_full_after(2000):  # tokenizer.json (~3 KB) is written by the tokenizers library (Rust)
                return real(folder, *a, **kw)

        tokenizer.save_pretrained = save_pretrained
        return tokenizer

    monkeypatch.setattr(train, "load_tokenizer", tokenizer_on_a_full_disk)
    out = tmp_path / "adapter"
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, max_train_steps=2, eval_steps=2)) == 2
    (err,) = error_lines(capsys)
    assert err.startswith("error: File too large: ") and ".adapter." in err, err
    assert not (out / "adapter").exists() and not (out / "results.json").exists()
    assert not list(out.glob(".adapter.*")), "the half-written adapter folder is removed"


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_the_final_test_scoring_checkpoints_and_exits_75(sig, tiny_model_dir, synthetic_train_csv,
                                                                         synthetic_test_csv, tmp_path):
    """SIGINT there was a KeyboardInterrupt traceback (130), SIGTERM a silent 143, and no checkpoint."""
    argv = tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path, max_train_steps=6, eval_steps=3,
                           test_file=synthetic_test_csv)
    driver = (f"import os, signal, sys\nimport peft_agnews.train as train\nreal = train.score_split\n"
              f"def scoring(*a, **k):\n    os.kill(os.getpid(), signal.{sig})\n    return real(*a, **k)\n"
              f"train.score_split = scoring\nsys.exit(train.cli(sys.argv[1:]))\n")
    proc = run_cli([sys.executable, "-c", driver, *argv])
    assert proc.returncode == EXIT_INTERRUPTED, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (f"stopped by {sig} during the final evaluation (training had finished at step 6); checkpoint "
            f"{tmp_path / 'checkpoints' / 'step_6'}; finish with --resume_from_checkpoint latest") in proc.stderr
    assert (tmp_path / "checkpoints" / "step_6" / MARKER).is_file()
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "adapter").exists()
    proc = run_cli([sys.executable, "-m", "peft_agnews.train", *argv, "--resume_from_checkpoint", "latest"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["global_step"] == 6 and results["test_examples"] == 120
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("test/accuracy" in e for e in events) == 1, "the test split is logged once"
