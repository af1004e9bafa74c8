"""A disk cache of the frozen prefix's output (--cache_frozen_prefix): per training example, at its real length.

One memory-mapped file holds every example's hidden states back to back (offsets from the tokenized lengths,
so its size is known before training), and a second one byte per example saying whether it is filled. Every
process on the machine maps the same files: each example is computed once, by whichever process meets it first
(in the first epoch each process fills the rows of its own batches), and any process reads any example later.
A key (prefix weights, model config, tokens, max length, depth, dtype) is stored next to them: a cache whose key
differs is rebuilt, never reused; one whose key matches (a resumed run) is reused as far as it is filled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from itertools import accumulate
from pathlib import Path

import torch
from accelerate import Accelerator

from peft_agnews.errors import UsageError
from peft_agnews.artifacts import write_json

CACHE_DIR = "prefix_cache"
# The batch key carrying each training row's index (the cache's address); stripped before the model sees it.
ROWS_KEY = "prefix_rows"
DATA_FILE = "hidden_states.bin"
FILLED_FILE = "filled.bin"
KEY_FILE = "key.json"


def cache_bytes(lengths: list[int], hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes of the cache: every example's real length x hidden size x the dtype's size."""
    return sum(lengths) * hidden_size * dtype.itemsize


def weights_digest(modules: list[torch.nn.Module]) -> str:
    """sha256 over the parameters and buffers of `modules` (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            digest.update(f"{index}.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def tokens_digest(input_ids: list[list[int]]) -> str:
    """sha256 over the token ids of every row, in order (covers the tokenizer and --max_length)."""
    digest = hashlib.sha256()
    for ids in input_ids:
        digest.update(torch.tensor(ids, dtype=torch.int64).numpy())
        digest.update(b"|")
    return digest.hexdigest()


class PrefixCache:
    """Hidden states of the frozen prefix, one row of the training split at a time, shared through the files."""

    def __init__(self, folder: Path, lengths: list[int], hidden_size: int, dtype: torch.dtype) -> None:
        self.lengths = list(lengths)
        self.offsets = [0, *accumulate(self.lengths)]
        self.dtype = dtype
        tokens = self.offsets[-1]
        self.states = torch.from_file(
            str(folder / DATA_FILE), shared=True, size=tokens * hidden_size, dtype=dtype
        ).view(tokens, hidden_size)
        self.filled = torch.from_file(str(folder / FILLED_FILE), shared=True, size=len(self.lengths), dtype=torch.uint8)

    @classmethod
    def open(
        cls, folder: Path, key: dict, lengths: list[int], hidden_size: int, dtype: torch.dtype,
        accelerator: Accelerator, max_gb: float,
    ) -> PrefixCache:
        """Reuse the cache in `folder` if its key equals `key`, else (main process) create it empty; all wait.

        Every process of the run must see the same files: one machine (`speed.check_prerequisites`)."""
        size = cache_bytes(lengths, hidden_size, dtype)
        if size > max_gb * 1e9:
            raise UsageError(
                f"the frozen-prefix cache would take {size / 1e9:.2f} GB, over --frozen_prefix_cache_max_gb "
                f"{max_gb:g}; raise the limit, lower --max_length, or drop --cache_frozen_prefix"
            )
        if accelerator.is_main_process:
            accelerator.print(_prepare(folder, key, len(lengths), size))
        accelerator.wait_for_everyone()
        return cls(folder, lengths, hidden_size, dtype)

    def read(self, rows: torch.Tensor, seq_len: int) -> torch.Tensor | None:
        """The batch's prefix output, right-padded with zeros to `seq_len`; None unless every row is filled."""
        rows = rows.cpu()
        if not bool(self.filled[rows].all()):
            return None
        out = torch.zeros(len(rows), seq_len, self.states.shape[1], dtype=self.dtype)
        for i, row in enumerate(rows.tolist()):
            out[i, : self.lengths[row]] = self.states[self.offsets[row] : self.offsets[row + 1]]
        return out

    def write(self, rows: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Store the rows not yet filled; returns the batch as stored (rounded to the cache dtype)."""
        stored = hidden_states.detach().to(self.dtype)
        on_cpu = stored.cpu()
        for i, row in enumerate(rows.cpu().tolist()):
            if not self.filled[row]:
                self.states[self.offsets[row] : self.offsets[row + 1]] = on_cpu[i, : self.lengths[row]]
                self.filled[row] = 1  # after the values: a reader never sees a flag before its row
        return stored.to(hidden_states.dtype)

    def filled_count(self) -> int:
        return int(self.filled.sum())


def _prepare(folder: Path, key: dict, rows: int, size: int) -> str:
    """Keep a cache with the same key, else replace it by empty files; returns what was done, for the log."""
    key_file = folder / KEY_FILE
    old = json.loads(key_file.read_text()) if key_file.is_file() else None
    if old == key and (folder / DATA_FILE).is_file() and (folder / DATA_FILE).stat().st_size == size:
        filled = int(torch.from_file(str(folder / FILLED_FILE), shared=False, size=rows, dtype=torch.uint8).sum())
        return f"frozen-prefix cache: reusing {folder} ({filled:,} of {rows:,} examples filled, {size / 1e9:.2f} GB)"
    changed = sorted(k for k in key if old is not None and old.get(k) != key[k])
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, length in ((DATA_FILE, size), (FILLED_FILE, rows)):
        with open(folder / name, "wb") as handle:
            handle.truncate(length)  # sparse: disk fills as examples are written
    write_json(key_file, key)  # last: a key marks a complete set of files
    reason = f" (key changed: {', '.join(changed)})" if changed else ""
    return f"frozen-prefix cache: new at {folder}, {size / 1e9:.2f} GB for {rows:,} examples{reason}"
