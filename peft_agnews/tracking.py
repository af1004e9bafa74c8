"""Run tracking: every scalar goes to `<output_dir>/metrics.jsonl` and, when enabled, to W&B via Accelerate.

The files in `<output_dir>` hold everything the W&B run shows, so nothing depends on the service:
`run_config.json` (the logged config), `metrics.jsonl` (every logged scalar, on the optimizer-step axis),
`confusion_matrices.jsonl` (one matrix per evaluation), `misclassified.jsonl` (the end-of-run table),
`results.json` (the summary) and `adapter/` (the artifact).
"""

from __future__ import annotations

import configparser
import json
import netrc
import os
import platform
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import torch
from accelerate import Accelerator

from peft_agnews.config import TrainConfig
from peft_agnews.errors import UsageError
from peft_agnews.artifacts import write_json
from peft_agnews.files import append_line, atomic_write

DEFAULT_PROJECT = "peft-agnews"
CLOUD_URL = "https://api.wandb.ai"
# wandb itself still accepts these legacy WANDB_MODE spellings.
MODE_ALIASES = {"dryrun": "offline", "run": "online"}
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "wandb")


def wandb_base_url() -> str:
    """The W&B server: $WANDB_BASE_URL, else the host `wandb login --host` saved in W&B's settings file, else the
    cloud. Read the way wandb reads it, so a self-hosted server's login is found where wandb will look."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    settings = Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser() / "settings"
    parser = configparser.ConfigParser()
    try:
        parser.read(settings)
    except (OSError, configparser.Error):
        return CLOUD_URL
    return parser.get("default", "base_url", fallback=CLOUD_URL)


def wandb_key_configured() -> bool:
    """True when W&B has credentials for its server: WANDB_API_KEY, or a netrc entry ($NETRC, else ~/.netrc) for
    that server's host, as `wandb login [--host]` writes. Only presence is checked; the key is never read out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(wandb_base_url()).netloc
    try:
        return bool(host) and netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> str:
    """WANDB_MODE when set; else online with a key, offline without (an unauthenticated online run hangs ~100 s)."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_key_configured() else "offline")


def resolve_wandb_mode(cfg: TrainConfig) -> str | None:
    """The W&B mode this run uses ('online' or 'offline'), or None when tracking is off.

    `--report_to wandb` follows `wandb_mode()`; `online`/`offline` force a mode; `none`/`disabled` (or
    WANDB_MODE=disabled) turn tracking off."""
    if cfg.report_to in ("none", "disabled"):
        return None
    mode = wandb_mode() if cfg.report_to == "wandb" else cfg.report_to
    mode = MODE_ALIASES.get(mode, mode)
    if mode == "disabled":
        return None
    if mode not in ("online", "offline"):
        raise UsageError(f"WANDB_MODE={mode} is not a W&B mode; use online, offline or disabled")
    if mode == "online" and not wandb_key_configured():
        raise UsageError(
            "W&B online mode needs an API key: set WANDB_API_KEY or run `wandb login`, "
            "or use --report_to offline (and `wandb sync` later)"
        )
    return mode


def tracker_name(cfg: TrainConfig) -> str | None:
    """The Accelerate `log_with` value for this config."""
    return "wandb" if resolve_wandb_mode(cfg) else None


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

    def start(
        self, cfg: TrainConfig, run_config: dict[str, Any], resume_run_id: str | None = None, resume_step: int | None = None
    ) -> None:
        """Open the tracker run (if any) with `run_config` (see `describe_run`), and start the metrics files.

        A fresh run starts them empty. A run resumed at `resume_step` keeps their events up to that step (later
        ones were logged after the checkpoint and will be logged again), and `resume_run_id` (the earlier run's
        `run_id`, saved in the checkpoint) reopens that W&B run, so the dashboard shows one continuous run."""
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for path in (self.path, self.output_dir / "confusion_matrices.jsonl"):
                keep = [] if resume_step is None or not path.exists() else [
                    line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= resume_step
                ]
                with atomic_write(path) as handle:
                    handle.write("".join(keep))
            write_json(self.output_dir / "run_config.json", run_config)
        self.mode = resolve_wandb_mode(cfg)
        if self.mode is None:
            return
        init: dict[str, Any] = {"mode": self.mode, "dir": str(self.output_dir.resolve())}
        # The flags win; unset, W&B's own environment variables apply (Accelerate always passes a project).
        entity = cfg.wandb_entity or os.environ.get("WANDB_ENTITY")
        optional = {"entity": entity, "group": cfg.wandb_group, "name": cfg.run_name, "id": resume_run_id}
        init.update({k: v for k, v in optional.items() if v})
        if cfg.wandb_tags:
            init["tags"] = list(cfg.wandb_tags)
        if resume_run_id:
            init["resume"] = "allow"
        project = cfg.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        self.accelerator.init_trackers(project, config=run_config, init_kwargs={"wandb": init})

    @property
    def wandb_run(self) -> Any:
        """The live `wandb.Run` on the main process of a tracked run, else None."""
        if self.mode is None or not self.accelerator.is_main_process:
            return None
        return self.accelerator.get_tracker("wandb", unwrap=True)

    @property
    def run_id(self) -> str | None:
        """The W&B run id (main process of a tracked run), to store in checkpoints and pass back to `start`."""
        run = self.wandb_run
        return run.id if run is not None else None

    def log(self, metrics: dict[str, float], step: int, media: dict[str, Any] | None = None) -> None:
        """Log scalars at `step` (optimizer steps); `media` (charts, tables) goes to W&B only, with them."""
        self.accelerator.log({**metrics, **(media or {})}, step=step)
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
            self.accelerator.log({key: table}, step=step)

    def finish_run(self, summary: dict[str, Any], adapter_dir: Path, metadata: dict[str, Any]) -> None:
        """Set the run summary and log `adapter_dir` as a model artifact (aliases best, latest). Main process."""
        run = self.wandb_run
        if run is None:
            return
        import wandb

        run.summary.update(summary)
        artifact = wandb.Artifact(f"adapter-{run.id}", type="model", metadata={**summary, **metadata})
        artifact.add_dir(str(adapter_dir))
        run.log_artifact(artifact, aliases=["best", "latest"])

    @staticmethod
    def _append(path: Path, record: dict[str, Any]) -> None:
        append_line(path, json.dumps(record))


def confusion_chart(matrix: list[list[int]], label_names: list[str], title: str) -> Any:
    """W&B's confusion-matrix chart, fed the (true, predicted) pairs that the count matrix stands for."""
    import wandb

    y_true = [t for t, row in enumerate(matrix) for p, count in enumerate(row) for _ in range(count)]
    preds = [p for row in matrix for p, count in enumerate(row) for _ in range(count)]
    return wandb.plot.confusion_matrix(y_true=y_true, preds=preds, class_names=label_names, title=title)
