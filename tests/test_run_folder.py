"""Training's --output_dir: a run writes only into a folder that is new, empty or a run's own; resuming and
--overwrite_output_dir act only on a run's own folder; a replacement marks the folder unfinished before it removes
anything, and an interrupted one is finished by --resume_from_checkpoint latest or refused with the commands that
clean it, never left as a folder that mixes two runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, accelerate_launch, tiny_train_args
from peft_agnews.train import cli


def run_args(model_dir: Path, train_csv: Path, out: Path, **overrides) -> list[str]:
    return tiny_train_args(model_dir, train_csv, out, **{"max_train_steps": 6, "eval_steps": 3, **overrides})


def logged_steps(out: Path) -> set[int]:
    return {json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()}


def last_error(capsys) -> str:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")][-1]


@pytest.fixture
def users_folder(tmp_path) -> Path:
    """A folder of someone's own files whose names a run also writes."""
    out = tmp_path / "mine"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "notes.txt").write_text("mine\n")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    return out


@pytest.mark.slow
def test_resuming_into_a_folder_without_a_checkpoint_keeps_the_non_empty_guard(users_folder, tiny_model_dir,
                                                                                synthetic_train_csv):
    """`--resume_from_checkpoint latest` into a folder with no checkpoint replaced the user's adapter/ and
    metrics.jsonl with no flag."""
    argv = run_args(tiny_model_dir, synthetic_train_csv, users_folder, resume_from_checkpoint="latest")
    proc = accelerate_launch("cpu.yaml", argv)
    assert proc.returncode != 0
    assert (f"error: --output_dir {users_folder} is not empty (adapter, metrics.jsonl) and holds no peft-agnews "
            "training run") in proc.stdout + proc.stderr
    assert (users_folder / "adapter" / "notes.txt").read_text() == "mine\n"
    assert (users_folder / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in users_folder.iterdir()) == ["adapter", "metrics.jsonl"]


def test_overwrite_never_applies_to_a_folder_a_run_did_not_create(users_folder, tiny_model_dir, synthetic_train_csv,
                                                                  capsys):
    assert cli(run_args(tiny_model_dir, synthetic_train_csv, users_folder, overwrite_output_dir="true")) == 2
    assert "holds no peft-agnews training run" in last_error(capsys)
    assert (users_folder / "adapter" / "notes.txt").read_text() == "mine\n"


def test_overwrite_replaces_only_what_a_run_writes(tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(run_args(tiny_model_dir, synthetic_train_csv, out, save_steps=2, max_train_steps=8, logging_steps=2)) == 0
    (out / "eval_test.json").write_text("{}\n")  # evaluate's default report, and a user's note
    (out / "notes.txt").write_text("keep me\n")
    # The stale temporary files a killed run leaves beside its plots and adapter.
    (out / ".training_curves.png.0123456789ab.tmp").write_bytes(b"half a png")
    (out / ".adapter.0123456789ab.tmp").mkdir()
    capsys.readouterr()
    assert cli(run_args(tiny_model_dir, synthetic_train_csv, out, logging_steps=3, overwrite_output_dir="true")) == 0
    assert "removed the earlier run's checkpoints, results.json, adapter" in capsys.readouterr().out
    assert not (out / "checkpoints").exists(), "the old run's checkpoints are gone; the new run wrote none"
    assert logged_steps(out) == {3, 6} and json.loads((out / "results.json").read_text())["global_step"] == 6
    assert (out / "eval_test.json").read_text() == "{}\n" and (out / "notes.txt").read_text() == "keep me\n"
    assert not list(out.glob(".*.tmp")), "stale temporary files of a killed run are swept"
    assert json.loads((out / ".peft-agnews-output").read_text())["command"] == "train"


def test_an_interrupted_replacement_is_refused_or_finished_never_mixed(tiny_model_dir, synthetic_train_csv, tmp_path,
                                                                       monkeypatch, capsys):
    """Killed after the old run's checkpoints and results.json were removed, before its other files: the folder
    must not pass for the old run, nor mix it into the new one."""
    import peft_agnews.files as files

    out = tmp_path / "run"
    assert cli(run_args(tiny_model_dir, synthetic_train_csv, out, save_steps=2, max_train_steps=8, logging_steps=2)) == 0
    real_rename = files.os.rename
    moved = []

    def killed_after_two(src, dst):
        if len(moved) == 2:
            raise KeyboardInterrupt("killed")  # nothing below catches it, as nothing survives a SIGKILL
        moved.append(Path(src).name)
        return real_rename(src, dst)

    monkeypatch.setattr(files.os, "rename", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        cli(run_args(tiny_model_dir, synthetic_train_csv, out, logging_steps=3, overwrite_output_dir="true"))
    monkeypatch.undo()
    assert moved == ["checkpoints", "results.json"]
    assert (out / "adapter").is_dir() and not (out / "results.json").exists() and not (out / "checkpoints").exists()
    # Neither a fresh run nor the old run's own options can take it as theirs without saying so.
    assert cli(run_args(tiny_model_dir, synthetic_train_csv, out, logging_steps=3)) == 2
    err = last_error(capsys)
    assert f"--output_dir {out} holds an unfinished run (" in err
    assert "continue it with --resume_from_checkpoint latest, or start over with --overwrite_output_dir true" in err
    assert cli(run_args(tiny_model_dir, synthetic_train_csv, out, logging_steps=3, resume_from_checkpoint="latest")) == 0
    assert logged_steps(out) == {3, 6}, "only the new run's events"
    results = json.loads((out / "results.json").read_text())
    assert results["global_step"] == 6 and results["best_step"] in (3, 6)


@pytest.mark.slow
def test_a_killed_overwrite_is_finished_by_latest(tiny_model_dir, synthetic_train_csv, tmp_path):
    """SIGKILL as soon as the replacement has begun (the old results.json is gone); then `latest` finishes the new
    run. Old run: 8 steps, rank 8, checkpoints at 2/4/6/8; new run: 6 steps, rank 4, checkpoints at 3/6."""
    out = tmp_path / "run"
    assert cli(run_args(tiny_model_dir, synthetic_train_csv, out, save_steps=2, max_train_steps=8, logging_steps=2)) == 0
    new = run_args(tiny_model_dir, synthetic_train_csv, out, save_steps=3, logging_steps=3, lora_r=4,
                   max_train_steps=6)
    proc = subprocess.Popen([sys.executable, "peft_agnews/train.py", *new, "--overwrite_output_dir", "true"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while (out / "results.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()
    old_checkpoints = {f"step_{s}" for s in (2, 4, 8)}
    assert not old_checkpoints & {p.name for p in (out / "checkpoints").glob("step_*")}
    code = subprocess.run([sys.executable, "peft_agnews/train.py", *new, "--resume_from_checkpoint", "latest"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stdout[-2000:] + code.stderr[-2000:]
    assert logged_steps(out) <= {3, 6} and json.loads((out / "results.json").read_text())["global_step"] == 6
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_the_output_folder_is_never_inside_or_around_an_input(tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = sorted(p.name for p in model.iterdir())
    assert cli(run_args(model, synthetic_train_csv, model / "run")) == 2
    assert f"--output_dir {model / 'run'} lies inside the input --model_name_or_path {model}" in last_error(capsys)
    assert cli(run_args(model, synthetic_train_csv, tmp_path)) == 2
    assert f"--output_dir {tmp_path} contains the input --model_name_or_path {model}" in last_error(capsys)
    assert sorted(p.name for p in model.iterdir()) == before, "nothing written into the model's folder"
