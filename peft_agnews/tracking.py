"""Run tracking: every scalar goes to `<output_dir>/metrics.jsonl` and to the trackers `--report_to` names (W&B,
TensorBoard, MLflow: Accelerate's trackers, chosen and set up in trackers.py).

The files in `<output_dir>` hold everything the W&B run shows, so nothing depends on the service:
`run_config.json` (the logged config), `metrics.jsonl` (every logged scalar, on the optimizer-step axis),
`confusion_matrices.jsonl` (one matrix per evaluation), `misclassified.jsonl` (the end-of-run table),
`results.json` (the summary) and `adapter/` (the artifact).
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator

from peft_agnews.config import TrainConfig
from peft_agnews.artifacts import write_json
from peft_agnews.files import append_line, atomic_write
from peft_agnews.trackers import (
    flat_config, mlflow_store, project_name, resolve_trackers, resolve_wandb_mode, tracker_init_kwargs, wandb_log_model,
)

VERSIONED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "wandb")


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def describe_run(cfg: TrainConfig, accelerator: Accelerator, **sections: dict[str, Any]) -> dict[str, Any]:
    """The config a run logs: every resolved option, the Accelerate state, library versions, plus `sections`
    (e.g. parameter counts, dataset sizes, the step plan) as nested groups."""
    state = {
        "distributed_type": str(accelerator.distributed_type.value),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        "device": str(accelerator.device),
    }
    return {**cfg.to_dict(), "accelerate": state, "versions": library_versions(), **sections}


def class_key(name: str) -> str:
    """A class name usable inside a metric key: 'Sci/Tech' -> 'Sci_Tech' (a '/' would start a new W&B section)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class ThroughputMeter:
    """Samples and (non-padding) tokens per second since the last report, summed over all processes.

    Time spent inside `paused()` (evaluation, checkpoints) is left out. Token counts stay on the device until a
    report, so counting costs no host sync per micro-batch."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.samples = 0
        self.tokens = torch.zeros((), dtype=torch.long, device=accelerator.device)
        self.started = time.perf_counter()
        self.excluded = 0.0

    def update(self, batch: dict[str, torch.Tensor]) -> None:
        self.samples += len(batch["labels"])  # rows (multi-label labels have a column per class)
        self.tokens += batch["attention_mask"].sum()

    @contextmanager
    def paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - began

    def report(self) -> dict[str, float]:
        """Rates since the last report (collective: every process must call it), then start a new window."""
        local = torch.stack([torch.tensor(self.samples, device=self.accelerator.device), self.tokens])
        samples, tokens = self.accelerator.reduce(local, "sum").tolist()
        elapsed = max(time.perf_counter() - self.started - self.excluded, 1e-9)
        self.samples, self.started, self.excluded = 0, time.perf_counter(), 0.0
        self.tokens.zero_()
        return {"train/samples_per_second": samples / elapsed, "train/tokens_per_second": tokens / elapsed}


class RunLogger:
    """Writes events to files in `output_dir` (main process only) and forwards them to the Accelerate trackers."""

    def __init__(self, accelerator: Accelerator, output_dir: Path) -> None:
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.path = output_dir / "metrics.jsonl"
        self.mode: str | None = None
        self.trackers: list[str] = []
        self.log_model = "false"
        self.run_name: str | None = None

    def start(
        self, cfg: TrainConfig, run_config: dict[str, Any], resume_run_ids: dict[str, str] | None = None,
        resume_step: int | None = None,
    ) -> None:
        """Open the tracker runs (if any) with `run_config` (see `describe_run`), and start the metrics files.

        A fresh run starts them empty. A run resumed at `resume_step` keeps their events up to that step (later
        ones were logged after the checkpoint and will be logged again; TensorBoard purges them likewise), and
        `resume_run_ids` (the earlier runs' `run_ids`, saved in the checkpoint) reopen those W&B and MLflow runs, so
        each shows one continuous run."""
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for path in (self.path, self.output_dir / "confusion_matrices.jsonl"):
                keep = [] if resume_step is None or not path.exists() else [
                    line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= resume_step
                ]
                with atomic_write(path) as handle:
                    handle.write("".join(keep))
            write_json(self.output_dir / "run_config.json", run_config)
        self.trackers = resolve_trackers(cfg)
        self.mode = resolve_wandb_mode(cfg) if "wandb" in self.trackers else None
        self.log_model = wandb_log_model() if self.mode else "false"
        self.run_name = cfg.run_name
        if not self.trackers:
            return
        kwargs = tracker_init_kwargs(cfg, self.output_dir, resume_run_ids or {}, resume_step)
        if "mlflow" in self.trackers and self.accelerator.is_main_process:
            import mlflow

            chosen = os.environ.get("MLFLOW_TRACKING_URI")
            mlflow.set_tracking_uri(mlflow_store(self.output_dir)[0])
            if chosen is None:  # set_tracking_uri exports it too: a later run in this process picks its own store
                os.environ.pop("MLFLOW_TRACKING_URI", None)
        self.accelerator.init_trackers(project_name(cfg), init_kwargs=kwargs)
        if not self.accelerator.is_main_process:
            return
        # W&B keeps the nested config; TensorBoard's hparams and MLflow's params are flat scalars.
        for tracker in self.accelerator.trackers:
            tracker.store_init_configuration(run_config if tracker.name == "wandb" else flat_config(run_config))
            if tracker.name == "tensorboard":
                tracker.tracker.add_text("config", json.dumps(run_config, indent=1))

    def _tracker(self, name: str) -> Any:
        """Accelerate's tracker `name` on the main process of a run reporting to it, else None."""
        if name not in self.trackers or not self.accelerator.is_main_process:
            return None
        return self.accelerator.get_tracker(name)

    @property
    def wandb_run(self) -> Any:
        """The live `wandb.Run` on the main process of a W&B-tracked run, else None."""
        tracker = self._tracker("wandb")
        return tracker.tracker if tracker is not None else None

    @property
    def run_id(self) -> str | None:
        """The W&B run id (main process of a tracked run)."""
        run = self.wandb_run
        return run.id if run is not None else None

    @property
    def run_ids(self) -> dict[str, str]:
        """The W&B and MLflow run ids (main process), to store in checkpoints and pass back to `start`."""
        mlflow = self._tracker("mlflow")
        ids = {"wandb": self.run_id, "mlflow": mlflow.tracker.info.run_id if mlflow is not None else None}
        return {name: run_id for name, run_id in ids.items() if run_id}

    def log(self, metrics: dict[str, float], step: int, media: dict[str, Any] | None = None) -> None:
        """Log scalars at `step` (optimizer steps); `media` (charts, tables) goes to W&B only, with them."""
        self.accelerator.log(metrics, step=step)
        if media and self.wandb_run is not None:
            self._tracker("wandb").log(media, step=step)
        if self.accelerator.is_main_process:
            self._append(self.path, {"step": step, "time": time.time(), **metrics})

    def log_evaluation(self, split: str, metrics: dict[str, Any], label_names: list[str], step: int) -> dict[str, float]:
        """Log `classification_metrics` output as `<split>/...` scalars (per-class F1 as `<split>/f1_<class>`)
        and a confusion-matrix chart (single-label). Returns the scalars."""
        scalars = {f"{split}/{k}": v for k, v in metrics.items() if k != "num_examples" and not isinstance(v, list)}
        for name, f1 in zip(label_names, metrics["f1_per_class"]):
            scalars[f"{split}/f1_{class_key(name)}"] = f1
        matrix = metrics.get("confusion_matrix")  # none for multi-label class sets
        media = {}
        if self.wandb_run is not None and matrix is not None:
            media[f"{split}/confusion_matrix"] = confusion_chart(matrix, label_names, f"{split} confusion matrix, step {step}")
        self.log(scalars, step, media)
        if self.accelerator.is_main_process and matrix is not None:
            record = {"step": step, "split": split, "labels": label_names, "matrix": matrix}
            self._append(self.output_dir / "confusion_matrices.jsonl", record)
        return scalars

    def log_table(self, key: str, rows: list[dict[str, Any]], step: int) -> None:
        """A W&B table under `key` at `step`, also written to `<output_dir>/<last part of key>.jsonl`."""
        if not self.accelerator.is_main_process:
            return
        path = self.output_dir / f"{key.rsplit('/', 1)[-1]}.jsonl"
        with atomic_write(path) as handle:
            handle.write("".join(json.dumps(row) + "\n" for row in rows))
        if self.wandb_run is not None and rows:
            import wandb

            columns = list(rows[0])
            table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
            self._tracker("wandb").log({key: table}, step=step)

    def finish_run(self, summary: dict[str, Any], adapter_dir: Path, metadata: dict[str, Any], step: int) -> None:
        """The run summary to every tracker (W&B's summary; TensorBoard scalars and MLflow metrics named
        `results/<key>` at `step`), the adapter to MLflow's artifacts and, with WANDB_LOG_MODEL end or checkpoint,
        to W&B. Main process."""
        numbers = {f"results/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))}
        for name in ("tensorboard", "mlflow"):
            if self._tracker(name) is not None:
                self._tracker(name).log(numbers, step=step)
        if self._tracker("mlflow") is not None:
            self._tracker("mlflow").log_artifacts(str(adapter_dir), artifact_path="adapter")
        run = self.wandb_run
        if run is None:
            return
        run.summary.update(summary)
        if self.log_model != "false":
            self._log_model_artifact(adapter_dir, {**summary, **metadata}, aliases=["final_model", "best"])

    def log_checkpoint(self, folder: Path, step: int, epoch: float) -> None:
        """With WANDB_LOG_MODEL=checkpoint, upload the checkpoint just written (a loadable adapter), aliased as the
        Trainer's integration aliases its checkpoints. Main process."""
        if self.log_model == "checkpoint" and self.wandb_run is not None:
            aliases = [f"epoch_{round(epoch, 2)}", f"checkpoint_global_step_{step}"]
            self._log_model_artifact(folder, {"step": step, "epoch": epoch}, aliases)

    def _log_model_artifact(self, folder: Path, metadata: dict[str, Any], aliases: list[str]) -> None:
        """`folder` as a new version of the run's `model-<run id>` artifact (`model-<run name>` with --run_name),
        type model: the Trainer's names."""
        import wandb

        run = self.wandb_run
        name = f"model-{re.sub(r'[^A-Za-z0-9_.-]', '_', self.run_name) if self.run_name else run.id}"
        artifact = wandb.Artifact(name, type="model", metadata=metadata)
        artifact.add_dir(str(folder))
        run.log_artifact(artifact, aliases=aliases)

    @staticmethod
    def _append(path: Path, record: dict[str, Any]) -> None:
        append_line(path, json.dumps(record))


def confusion_chart(matrix: list[list[int]], label_names: list[str], title: str) -> Any:
    """W&B's confusion-matrix chart, fed the (true, predicted) pairs that the count matrix stands for."""
    import wandb

    y_true = [t for t, row in enumerate(matrix) for p, count in enumerate(row) for _ in range(count)]
    preds = [p for row in matrix for p, count in enumerate(row) for _ in range(count)]
    return wandb.plot.confusion_matrix(y_true=y_true, preds=preds, class_names=label_names, title=title)
