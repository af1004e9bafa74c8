"""Fault tolerance: small atomic checkpoints and exact resume.

A checkpoint `<output_dir>/checkpoints/step_N/` is the adapter at step N, loadable as any PEFT adapter
(`PeftModel.from_pretrained(base, step_N)`, `peft-agnews evaluate --adapter_dir step_N`), plus what a resume needs;
never the frozen base:

    adapter_config.json, adapter_model.safetensors, README.md
                               PEFT's `save_pretrained` (LoRA, trained biases, classifier head at step N): also the
                               weights a resume restores (PEFT's `set_peft_model_state_dict`), written once
    tokenizer files, labels.json, head.json (custom heads only)
                               as in the run's adapter/ folder; files identical to the previous checkpoint's are
                               hard links to them (one copy on disk), where the filesystem allows
    best.safetensors           the best weights so far (PEFT's names), when they are not this step's: trainer_state.json
                               says which file holds them (`best_weights`: adapter_model.safetensors, this, or null
                               before the first evaluation)
    optimizer.bin, scheduler.bin, scaler.pt, random_states_<rank>.pkl
                               Accelerate's `save_state` (model weights removed by our hooks); tensors and numbers
                               only, read back with `weights_only=True`
    trainer_state.json         step, epoch, position in the epoch, best metric, early-stopping count, tracker run id,
                               and the run's shape (processes, batches, accumulation, seed) a resume must match
    COMPLETE                   written last

Each checkpoint is written into `.tmp-step_N/`, synced, marked COMPLETE and then renamed, so a folder named
`step_N` is complete; a process killed mid-write leaves only a `.tmp-*` folder that `latest` skips.
They hold `loop_state.TrainState`: its counters in trainer_state.json, its best weights in the file `best_weights` names.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import load as torch_load_safely
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS
from safetensors.torch import load_file, save_file

from peft_agnews.errors import UsageError, first_line
from peft_agnews.loop_state import BEST_FILE, TrainState

PREFIX = "step_"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
# Which file of the checkpoint holds TrainState.best_weights (trainer_state.json key; see the module docstring).
BEST_KEY = "best_weights"
LEGACY_WEIGHTS_FILE = "trainable.safetensors"  # checkpoints of versions before they were adapters
# Keys of the run shape: the options that must match on resume, and the per-split fingerprints of the data rows.
OPTIONS_KEY = "options"
FINGERPRINT_SUFFIX = "_rows_sha256"


class CheckpointError(UsageError):
    """A checkpoint that cannot be resumed from: missing, incomplete, corrupt, or from a differently shaped run."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read back (truncated, damaged, wrong types)."""


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the adapter's weights as PEFT saves them (`get_peft_model_state_dict` of the unwrapped
    PeftModel: LoRA, trained biases, classifier head; a few MB), so they can be written as an adapter file."""
    return {n: t.detach().to("cpu", copy=True).contiguous() for n, t in get_peft_model_state_dict(model).items()}


def load_adapter_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put `adapter_weights` output back into the unwrapped PeftModel (PEFT's own inverse); {} changes nothing."""
    if weights:
        set_peft_model_state_dict(model, weights)


def step_of(folder: Path) -> int:
    return int(folder.name.split("_")[-1])


def list_checkpoints(folder: Path) -> tuple[list[Path], list[Path]]:
    """(complete checkpoints oldest first, incomplete leftovers) under `folder`."""
    complete, incomplete = [], []
    if not folder.is_dir():
        return complete, incomplete
    for path in folder.iterdir():
        if path.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            incomplete.append(path)
        elif path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit():
            (complete if (path / MARKER).is_file() else incomplete).append(path)
    return sorted(complete, key=step_of), sorted(incomplete)


def resolve_checkpoint(spec: str | None, folder: Path, overwrite: bool = False,
                       say: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from: None (start fresh), `latest`, or an explicit folder (which must be complete).

    `latest` with no complete checkpoint starts fresh, so a requeued job can always pass it. Starting fresh over an
    earlier run's checkpoints needs `overwrite`: otherwise `latest` could later pick one of the old run's.
    """
    if not spec:
        if list_checkpoints(folder)[0] and not overwrite:
            raise UsageError(
                f"{folder} holds checkpoints of an earlier run; continue it with --resume_from_checkpoint latest "
                "or start over with --overwrite_output_dir true (deletes them)"
            )
        return None
    if spec == "latest":
        complete, incomplete = list_checkpoints(folder)
        if incomplete:
            say(f"skipping incomplete checkpoint(s) (interrupted writes): {', '.join(p.name for p in incomplete)}")
        if not complete:
            say(f"no complete checkpoint in {folder}: starting from scratch")
            return None
        say(f"resuming from {complete[-1]}")
        return complete[-1]
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {spec}: no such folder; pass a checkpoint folder or 'latest'")
    if not (path / MARKER).is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {MARKER} marker: its write was interrupted); "
            "pass another checkpoint or 'latest'"
        )
    return path


def read_state(path: Path) -> dict[str, Any]:
    """The JSON part of a checkpoint (plain data: no unpickling), every counter checked for its type."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("counters"), dict):
            raise ValueError("not a checkpoint state object")
        if not isinstance(state.get("run_shape"), dict) or not isinstance(state["run_shape"].get(OPTIONS_KEY, {}), dict):
            raise ValueError("run_shape is not an object of shape values and options")
        kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str | None": (str, type(None)),
                 "float | None": (int, float, type(None))}
        for f in fields(TrainState):
            value = state["counters"].get(f.name)
            if f.type in kinds and f.name in state["counters"] and (
                not isinstance(value, kinds[f.type]) or (f.type != "bool" and isinstance(value, bool))
            ):
                raise ValueError(f"counter {f.name} is {value!r}, not {f.type}")
        if state.get(BEST_KEY) not in (ADAPTER_WEIGHTS, BEST_FILE, None):
            raise ValueError(f"{BEST_KEY} is {state.get(BEST_KEY)!r}, not {ADAPTER_WEIGHTS}, {BEST_FILE} or null")
    except (OSError, ValueError) as err:
        raise CorruptCheckpointError(
            f"checkpoint file {file} is unreadable or corrupt ({err}); pass another checkpoint"
        ) from None
    if BEST_KEY not in state and (path / LEGACY_WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"checkpoint {path} was written by an earlier version of peft-agnews ({LEGACY_WEIGHTS_FILE}, not an "
            "adapter) and cannot be resumed by this one; finish that run with the version that wrote it, or start "
            "over with --overwrite_output_dir true"
        )
    return state


def with_older_hint(err: CheckpointError, path: Path) -> CheckpointError:
    """`err` about the checkpoint `latest` picked, extended with the older complete checkpoint to pass instead.

    `latest` does not fall back by itself: a silent fallback would repeat steps without anyone noticing why."""
    older = [p for p in list_checkpoints(path.parent)[0] if step_of(p) < step_of(path)]
    hint = (f"; --resume_from_checkpoint latest picked the newest checkpoint: pass the older {older[-1]} "
            f"instead, or delete {path.name}") if older else "; it is the only complete checkpoint"
    return type(err)(f"{err}{hint}")


def _link_if_same(previous: Path, file: Path) -> None:
    """Replace `file` by a hard link to `previous` when both hold the same bytes (one copy on disk; each checkpoint
    still a complete folder). Where hard links are not possible the copy stays."""
    if not previous.is_file() or not filecmp.cmp(previous, file, shallow=False):
        return
    link = file.with_name(f".{file.name}.link")
    try:
        os.link(previous, link)
    except OSError:
        return
    os.replace(link, file)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Writes and reads checkpoints for one prepared model/optimizer/scheduler through Accelerate's save/load_state.

    Hooks replace Accelerate's full-model weights file with the adapter (PEFT's `save_pretrained`); everything
    Accelerate saves besides (optimizer, scheduler, grad scaler, every process's RNG states) is kept as it writes it.
    """

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, folder: Path, keep: int,
                 run_shape: dict[str, Any], fresh: bool,
                 companions: Callable[[Path], None] | None = None) -> None:
        """`fresh`: a run that does not resume; checkpoints of an earlier run in `folder` are deleted.
        `companions(folder)` writes the adapter's other files (tokenizer, labels.json, head.json: see
        `artifacts.write_adapter_companions`) into each checkpoint."""
        self.accelerator = accelerator
        self.model = model
        self.folder = folder
        self.keep = keep
        self.run_shape = run_shape
        self.companions = companions
        self.last_saved: Path | None = None
        self._incoming: dict[str, torch.Tensor] | None = None
        accelerator.register_save_state_pre_hook(self._save_weights_hook)
        accelerator.register_load_state_pre_hook(self._load_weights_hook)
        if accelerator.is_main_process:
            complete, incomplete = list_checkpoints(folder)
            for path in incomplete + (complete if fresh else []):
                shutil.rmtree(path, ignore_errors=True)

    # Accelerate hooks ------------------------------------------------------------------------------------------
    def _save_weights_hook(self, models: list, weights: list, output_dir: str) -> None:
        if self.accelerator.is_main_process:
            self._write_adapter(Path(output_dir))
        weights.clear()  # Accelerate would otherwise write the whole model, frozen base included

    def _load_weights_hook(self, models: list, input_dir: str) -> None:
        load_adapter_weights(self.accelerator.unwrap_model(self.model), self._incoming)
        models.clear()

    # The adapter -------------------------------------------------------------------------------------------------
    def _write_adapter(self, folder: Path) -> None:
        """The adapter as PEFT writes it, then its companions; those unchanged since the previous checkpoint become
        hard links to its files (the tokenizer alone is ~3.5 MB for roberta-base)."""
        self.accelerator.unwrap_model(self.model).save_pretrained(folder, safe_serialization=True)
        if self.companions is None:
            return
        before = set(os.listdir(folder))
        self.companions(folder)
        if self.last_saved is not None:
            for name in sorted(set(os.listdir(folder)) - before):
                _link_if_same(self.last_saved / name, folder / name)

    @staticmethod
    def _write_best(folder: Path, step: int, counters: dict[str, Any], best_weights: dict[str, torch.Tensor]) -> str | None:
        """Where this checkpoint keeps the best weights (the value of BEST_KEY): nowhere before the first
        evaluation; the adapter just written when this step is the best one; else best.safetensors."""
        if not best_weights:
            return None
        if counters.get("best_step") == step:  # evaluated at this step, model unchanged since
            return ADAPTER_WEIGHTS
        save_file(best_weights, str(folder / BEST_FILE))
        return BEST_FILE

    # Saving ------------------------------------------------------------------------------------------------------
    def save(self, step: int, counters: dict[str, Any], best_weights: dict[str, torch.Tensor]) -> Path:
        """Write checkpoint `step_<step>` atomically (all processes call this), then drop old ones."""
        acc = self.accelerator
        final, tmp = self.folder / f"{PREFIX}{step}", self.folder / f"{TMP_PREFIX}{PREFIX}{step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # every process writes its own RNG file; the main process the rest
        if acc.is_main_process:
            best_file = self._write_best(tmp, step, counters, best_weights)
            state = {"step": step, "counters": counters, "run_shape": self.run_shape, BEST_KEY: best_file}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        acc.wait_for_everyone()
        if acc.is_main_process:
            for file in tmp.iterdir():
                _fsync(file)
            (tmp / MARKER).write_text("")
            _fsync(tmp / MARKER)
            if final.exists():  # an older run reached this step before: replace it
                self._discard(final)
            tmp.rename(final)
            _fsync(self.folder)
            self._rotate(int(counters.get("best_step", 0)))
        acc.wait_for_everyone()
        self.last_saved = final
        return final

    def _discard(self, path: Path) -> None:
        # Rename first: a kill during rmtree leaves a `.trash-*` folder that is never mistaken for a checkpoint.
        trash = path.with_name(TRASH_PREFIX + path.name)
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _rotate(self, best_step: int) -> None:
        if not self.keep:
            return
        complete, _ = list_checkpoints(self.folder)
        keep = set(complete[-self.keep:]) | {p for p in complete if step_of(p) == best_step}
        for path in complete:
            if path not in keep:
                self._discard(path)

    # Loading ----------------------------------------------------------------------------------------------------
    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Restore weights, optimizer, scheduler, scaler and RNG states from `path`; return (counters, best weights).

        Every file is read and checked before anything is restored, on every process, so a bad checkpoint fails
        the same way everywhere and names the file.
        """
        state = read_state(path)
        self._check_shape(path, state["run_shape"])
        expected = {n: tuple(t.shape) for n, t in get_peft_model_state_dict(self.accelerator.unwrap_model(self.model)).items()}
        self._incoming = self._read_weights(path / ADAPTER_WEIGHTS, expected)
        if state.get(BEST_KEY) == BEST_FILE:
            best = self._read_weights(path / BEST_FILE, expected)
        else:  # this step's adapter, or none before the first evaluation
            best = self._incoming if state.get(BEST_KEY) == ADAPTER_WEIGHTS else {}
        files = ["optimizer.bin", "scheduler.bin"] + [f"random_states_{i}.pkl" for i in range(self.run_shape["num_processes"])]
        if self.accelerator.scaler is not None:
            files.append("scaler.pt")
        loaded = {name: self._read_torch(path / name) for name in files}
        self.accelerator.load_state(str(path))
        self._incoming = None
        # Accelerate swallows any error while restoring RNG states ("Could not load random states"); an exact
        # resume needs them, so check that the CPU generator really holds the saved state.
        rng = loaded[f"random_states_{self.accelerator.process_index}.pkl"]
        if not torch.equal(torch.get_rng_state(), rng["torch_manual_seed"]):
            raise CheckpointError(f"could not restore the RNG states in {path}; pass another checkpoint")
        self.last_saved = path
        return state["counters"], best

    def _check_shape(self, path: Path, saved: dict[str, Any]) -> None:
        """Name every difference between this run and the checkpoint's: shape, data rows, options. Keys a
        checkpoint of an older version did not record are not compared."""
        now = json.loads(json.dumps(self.run_shape))  # compare as the checkpoint stored it (tuples as lists)
        diffs = []
        for key, value in now.items():
            if key not in saved or saved[key] == value:
                continue
            if key == OPTIONS_KEY:
                diffs += [f"--{name} {saved[key][name]!r} (now {value[name]!r})" for name in value
                          if name in saved[key] and saved[key][name] != value[name]]
            elif key.endswith(FINGERPRINT_SUFFIX):
                split = key.removesuffix(FINGERPRINT_SUFFIX)
                diffs.append(f"other {split} rows (sha256 {str(saved[key])[:12]}... now {value[:12]}...)")
            else:
                diffs.append(f"{key}={saved[key]} (now {value})")
        if diffs:
            raise CheckpointError(
                f"checkpoint {path} comes from a differently shaped run: {', '.join(diffs)}; resume with the "
                "checkpoint's data and options (its trainer_state.json lists them) or start a new run in another "
                "--output_dir"
            )

    @staticmethod
    def _read_weights(file: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """An adapter weights file, checked to hold exactly this model's adapter tensors (`expected`: PEFT's
        names and shapes)."""
        try:
            weights = load_file(str(file))
        except Exception as err:  # safetensors raises several types for missing/truncated files
            raise CorruptCheckpointError(f"checkpoint file {file} is missing or corrupt ({err}); pass another checkpoint") from None
        reshaped = sorted(n for n in set(weights) & set(expected) if tuple(weights[n].shape) != expected[n])
        if set(weights) != set(expected) or reshaped:
            missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
            raise CheckpointError(
                f"checkpoint file {file} does not match this model's adapter weights "
                f"(missing {missing[:3]}, unexpected {extra[:3]}, other shapes {reshaped[:3]}); "
                "resume with the same model and LoRA options"
            )
        return weights

    @staticmethod
    def _read_torch(file: Path) -> Any:
        try:
            return torch_load_safely(str(file), map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load raises many types (EOFError, UnpicklingError, RuntimeError, ...)
            raise CorruptCheckpointError(
                f"checkpoint file {file} is missing or corrupt ({first_line(err)}); pass another checkpoint"
            ) from None
