"""Training's `--output_dir`: what a run owns there, when a run may start, continue or replace one, and the lock.

The rule of files.py applied to training. A run writes only the entries of RUN_FILES (plus the KEPT prefix_cache/,
W&B's wandb/ and the MLflow store) into a folder that is new, empty, or a training run's own (marked with
files.OUTPUT_MARKER naming `train`; a folder of an older version is recognised by its run files). A folder holding
anything else is never written into, whatever the flags.

- A fresh run (no flags) needs a new or empty folder.
- `--resume_from_checkpoint latest|PATH` continues the run in its own folder; `latest` with no complete
  checkpoint starts that run over (its leftovers removed first), so a requeued job can always pass it.
- `--overwrite_output_dir true` replaces a run's own folder: when the new run starts writing, the old run's
  checkpoints go first, then results.json (so the folder never looks finished or resumable with the old run's
  state), then its other files; files other commands put there (evaluate's eval_<name>.json) are kept.
- A folder without results.json holds an unfinished run (stopped, failed, killed, or an interrupted
  replacement): a run without flags is refused with the two commands that continue or replace it.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from peft_agnews.config import TrainConfig
from peft_agnews.errors import UsageError
from peft_agnews.files import (
    LOCK_FILE, OUTPUT_MARKER, TRASH_NAME, OutputLock, check_not_an_input, folder_owner, mark_folder, remove_entries,
    sweep_stale_temps,
)

COMMAND = "train"
RESULTS_FILE = "results.json"  # written last: its presence marks a finished run
CHECKPOINTS = "checkpoints"
# Everything a run writes, in the order a replaced run's files are removed (checkpoints and results.json first).
# `runs`: TensorBoard's event files (trackers.tensorboard_dir), which would show a replaced run's curves mixed with
# the new run's.
RUN_FILES = (
    CHECKPOINTS, RESULTS_FILE, "adapter", "eval_validation.json", "eval_validation.png", "training_curves.png",
    "metrics.jsonl", "confusion_matrices.jsonl", "misclassified.jsonl", "runs", "run_config.json",
)
# Also written by a run, and kept when it is replaced: a cache verified on reuse, W&B's run files (offline runs
# may not be synced yet) and the MLflow store (trackers.mlflow_store), which keep each run apart.
KEPT = ("prefix_cache", "wandb", "mlflow.db", "mlartifacts")
# Reports other commands write into a run folder by default (evaluate's eval_<test file>.json and .png).
REPORT_PATTERNS = ("eval_*.json", "eval_*.png")
# How long a resuming run waits for the output folder's previous holder to exit (a requeued SLURM job can start
# while the preempted one is still writing its stop checkpoint); a fresh run is refused at once.
RESUME_LOCK_WAIT_SECONDS = 180


def training_inputs(cfg: TrainConfig) -> list[tuple[str, str | None]]:
    """What training reads from disk, as (option, path): the output folder must not be, hold or lie in one."""
    inputs = [("--train_file", cfg.train_file), ("--validation_file", cfg.validation_file),
              ("--test_file", cfg.test_file), ("--model_name_or_path", cfg.model_name_or_path),
              ("--tokenizer_name", cfg.tokenizer_name)]
    return inputs + ([("--dataset_name", cfg.dataset_name)] if not cfg.train_file else [])


def folder_entries(out: Path) -> list[str]:
    """The entries of `out` that count as content (not the lock, the marker, or our own temporary files)."""
    if not out.is_dir():
        return []
    ours = (LOCK_FILE, OUTPUT_MARKER)
    return sorted(p.name for p in out.iterdir() if p.name not in ours and not _our_temp(p.name))


def _our_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp") and (
        name.startswith(f".{TRASH_NAME}.") or any(name.startswith(f".{n}.") for n in RUN_FILES))


def is_run_folder(out: Path, entries: list[str]) -> bool:
    """A folder a training run created: marked so, or (written before the marker existed) holding a run's
    run_config.json or checkpoints and nothing but what runs and their evaluations write."""
    if folder_owner(out) == COMMAND:
        return True
    known = set(RUN_FILES) | set(KEPT)
    legacy = {"run_config.json", CHECKPOINTS} & set(entries)
    return bool(legacy) and all(e in known or any(fnmatch.fnmatch(e, p) for p in REPORT_PATTERNS) for e in entries)


def _shown(entries: list[str]) -> str:
    return ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")


def check_output_dir(cfg: TrainConfig) -> Path:
    """The output folder, checked (every process, before any work): not one of the inputs; new or empty, or a
    run's own folder that the flags allow to continue or replace (see the module docstring)."""
    out = Path(cfg.output_dir)
    check_not_an_input(out, "--output_dir", training_inputs(cfg))
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} exists and is not a folder; choose another path")
    entries = folder_entries(out)
    if not entries:
        return out
    if not is_run_folder(out, entries):
        raise UsageError(
            f"--output_dir {out} is not empty ({_shown(entries)}) and holds no peft-agnews training run; choose a "
            "new or empty folder (--overwrite_output_dir and --resume_from_checkpoint act only on a run's own folder)"
        )
    if (out / RESULTS_FILE).exists():
        if not cfg.overwrite_output_dir:
            raise UsageError(
                f"{out} already holds a finished run ({RESULTS_FILE}); choose another --output_dir "
                "or pass --overwrite_output_dir true"
            )
    elif not cfg.resume_from_checkpoint and not cfg.overwrite_output_dir:
        raise UsageError(
            f"--output_dir {out} holds an unfinished run ({_shown(entries)}): one that stopped, failed or was killed "
            "(a replacement by --overwrite_output_dir included); continue it with --resume_from_checkpoint latest, "
            "or start over with --overwrite_output_dir true (replaces that run's files)"
        )
    return out


def lock_output_dir(cfg: TrainConfig, accelerator: Accelerator) -> OutputLock:
    """One run per output folder: the main process takes the lock (waiting a while when resuming) and removes
    the temporary files a killed run left; every process learns whether it got the lock."""
    lock = OutputLock(Path(cfg.output_dir))
    error = None
    if accelerator.is_main_process:
        try:
            wait = RESUME_LOCK_WAIT_SECONDS if cfg.resume_from_checkpoint else 0
            lock.acquire(wait_seconds=wait, say=accelerator.print)
            sweep_stale_temps(lock.folder, (*RUN_FILES, OUTPUT_MARKER, TRASH_NAME))
        except UsageError as err:
            error = str(err)
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error:
        raise UsageError(error)
    return lock


def start_writing(out: Path, fresh: bool, accelerator: Accelerator) -> None:
    """Called once the data and model are built, before the run writes anything: mark the folder as a training
    run's and as unfinished (no results.json). A `fresh` run (not resuming) first removes what an earlier run
    left there, checkpoints first (see the module docstring)."""
    if accelerator.is_main_process:
        if folder_owner(out) != COMMAND:
            mark_folder(out, COMMAND)
        removed = remove_entries(out, RUN_FILES if fresh else (RESULTS_FILE,))
        if fresh and removed:
            accelerator.print(f"--output_dir {out}: removed the earlier run's {', '.join(removed)}")
    accelerator.wait_for_everyone()
