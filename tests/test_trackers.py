"""Choosing and setting up the trackers (trackers.py): --report_to and the trackers' own environment variables,
each run as a user runs it and read back with the tracker's own reader (W&B: test_tracking.read_offline_run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import run_cli, tiny_train_args
from test_tracking import offline_runs, read_offline_run
from peft_agnews.config import parse_config
from peft_agnews.trackers import flat_config, resolve_trackers
from peft_agnews.train import cli


def model_artifacts(run_dir: Path) -> list:
    return [a for a in read_offline_run(run_dir)["artifacts"] if a.type == "model"]


def test_all_means_every_installed_tracker_and_flat_config_is_scalars(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_trackers(parse_config(["--report_to", "all"])) == ["wandb", "tensorboard", "mlflow"]
    assert resolve_trackers(parse_config(["--report_to", "none"])) == []
    assert resolve_trackers(parse_config(["--report_to", "mlflow", "--wandb_mode", "disabled"])) == ["mlflow"]
    assert resolve_trackers(parse_config([])) == ["wandb"], "the default stays W&B alone"
    assert flat_config({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": "x"}) == {"a.b": 1, "a.c": "[1, 2]", "d": "null", "e": "x"}


@pytest.mark.slow
def test_legacy_report_to_values_work_with_a_one_line_note(tiny_model_dir, synthetic_train_csv, tmp_path):
    argv = tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "out", report_to="offline", dry_run="true")
    proc = run_cli([sys.executable, "peft_agnews/train.py", *argv])
    assert proc.returncode == 0, proc.stdout[-3000:]
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: --report_to")]
    assert notes == ["note: --report_to offline is now written --report_to wandb --wandb_mode offline "
                     "(the old form still works)"]


@pytest.mark.slow
def test_wandb_dir_is_honoured_and_no_model_is_uploaded_unless_asked(tiny_model_dir, synthetic_train_csv, tmp_path,
                                                                     monkeypatch):
    """WANDB_DIR: W&B's files go there, not into the run folder; WANDB_LOG_MODEL unset: no model artifact (the
    Trainer's default)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.delenv("WANDB_LOG_MODEL", raising=False)
    out = tmp_path / "out"
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, report_to="wandb", max_train_steps=4,
                               eval_steps=2)) == 0
    assert not (out / "wandb").exists()
    (run_dir,) = offline_runs(tmp_path / "wandb-dir")
    run = read_offline_run(run_dir)
    assert run["summary"]["best_step"] == json.loads((out / "results.json").read_text())["best_step"]
    assert model_artifacts(run_dir) == []


@pytest.mark.slow
def test_wandb_log_model_checkpoint_uploads_each_checkpoint_then_the_adapter(tiny_model_dir, synthetic_train_csv,
                                                                             tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_LOG_MODEL", "checkpoint")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "out"
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, report_to="wandb", save_steps=6)) == 0
    (run_dir,) = offline_runs(out)
    run_id = read_offline_run(run_dir)["run"].run_id
    artifacts = model_artifacts(run_dir)
    assert [a.name for a in artifacts] == [f"model-{run_id}"] * 3  # the Trainer's name and type
    # 14 optimizer steps per epoch (432 rows, batch 16, accumulation 2); W&B adds `latest` to the newest version.
    assert [sorted(a.aliases) for a in artifacts] == [["checkpoint_global_step_6", "epoch_0.43", "latest"],
                                                      ["checkpoint_global_step_12", "epoch_0.86", "latest"],
                                                      ["best", "final_model", "latest"]]
    files = {entry.path for entry in artifacts[0].manifest.contents}
    assert {"adapter_config.json", "adapter_model.safetensors", "labels.json", "trainer_state.json"} <= files


@pytest.mark.slow
def test_mlflow_tracking_uri_is_honoured(tiny_model_dir, synthetic_train_csv, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "my-experiment")
    monkeypatch.chdir(tmp_path)  # with a user's store, artifacts go where MLflow puts them: ./mlruns
    out = tmp_path / "out"
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, report_to="mlflow", max_train_steps=2,
                               eval_steps=2)) == 0
    assert not (out / "mlflow.db").exists()
    import os

    assert os.environ["MLFLOW_TRACKING_URI"] == uri, "the user's choice stays"
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("my-experiment").experiment_id])
    assert run.data.metrics["eval/accuracy"] == json.loads((out / "results.json").read_text())["best_eval_accuracy"]
