"""A disk cache of the frozen prefix's output (--cache_frozen_prefix): per training example, at its real length.

One memory-mapped file holds every example's hidden states back to back (offsets from the tokenized lengths,
so its size is known before training), and a second one byte per example saying whether it is filled. Every
process on the machine maps the same files: each example is computed once, by whichever process meets it first
(in the first epoch each process fills the rows of its own batches), and any process reads any example later.
A key (prefix weights, model config, tokens, max length, depth, dtype) is stored next to them: a cache whose key
differs is rebuilt, never reused; one whose key matches (a resumed run) is reused as far as it is filled.
A third file holds a CRC-32 of each example's stored bytes, written with them: before a cache is reused every
filled example is checked against it, and a cache with a damaged example (zeroed, bit-flipped) or a damaged index
(key.json, filled.bin or the checksums of the wrong size or unreadable) is rebuilt, never trained on.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import shutil
import zlib
from itertools import accumulate
from pathlib import Path

import numpy as np

import torch
from accelerate import Accelerator

from peft_agnews.errors import UsageError
from peft_agnews.artifacts import write_json

CACHE_DIR = "prefix_cache"
# The batch key carrying each training row's index (the cache's address); stripped before the model sees it.
ROWS_KEY = "prefix_rows"
DATA_FILE = "hidden_states.bin"
FILLED_FILE = "filled.bin"
CHECKSUM_FILE = "checksums.bin"  # one int64 per example: the CRC-32 of its stored bytes
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
        self.checksums = torch.from_file(str(folder / CHECKSUM_FILE), shared=True, size=len(self.lengths),
                                         dtype=torch.int64)

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
            row_bytes = [length * hidden_size * dtype.itemsize for length in lengths]
            accelerator.print(_prepare(folder, key, row_bytes))
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
                stored_row = self.states[self.offsets[row] : self.offsets[row + 1]]
                stored_row.copy_(on_cpu[i, : self.lengths[row]])
                self.checksums[row] = zlib.crc32(stored_row.view(torch.uint8).numpy())
                self.filled[row] = 1  # after the values and their checksum: a reader never sees a flag first
        return stored.to(hidden_states.dtype)

    def filled_count(self) -> int:
        return int(self.filled.sum())


def _sizes(rows: int, size: int) -> dict[str, int]:
    return {DATA_FILE: size, FILLED_FILE: rows, CHECKSUM_FILE: rows * 8}


def _read_key(key_file: Path) -> tuple[dict | None, str]:
    """The stored key, or None and why it cannot be used (absent, or damaged: not a JSON object)."""
    if not key_file.is_file():
        return None, ""
    try:
        old = json.loads(key_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, f"{KEY_FILE} is damaged ({type(err).__name__})"
    return (old, "") if isinstance(old, dict) else (None, f"{KEY_FILE} is damaged (not an object)")


def damaged_rows(folder: Path, row_bytes: list[int]) -> int:
    """How many filled examples no longer match the CRC-32 recorded when they were written."""
    filled = np.fromfile(folder / FILLED_FILE, dtype=np.uint8)
    expected = np.fromfile(folder / CHECKSUM_FILE, dtype=np.int64)
    if not filled.any():
        return 0
    bad, offset = 0, 0
    with open(folder / DATA_FILE, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for row, length in enumerate(row_bytes):
            if filled[row] and zlib.crc32(data[offset : offset + length]) != expected[row]:
                bad += 1
            offset += length
    return bad


def _prepare(folder: Path, key: dict, row_bytes: list[int]) -> str:
    """Keep a cache with the same key whose files are whole and whose filled examples match their checksums, else
    replace it by empty files; returns what was done, for the log."""
    rows, size = len(row_bytes), sum(row_bytes)
    old, problem = _read_key(folder / KEY_FILE)
    if old == key:
        wrong = [name for name, length in _sizes(rows, size).items()
                 if not (folder / name).is_file() or (folder / name).stat().st_size != length]
        bad = 0 if wrong else damaged_rows(folder, row_bytes)
        if not wrong and not bad:
            filled = int(np.fromfile(folder / FILLED_FILE, dtype=np.uint8).sum())
            return f"frozen-prefix cache: reusing {folder} ({filled:,} of {rows:,} examples filled, {size / 1e9:.2f} GB)"
        problem = (f"{', '.join(wrong)} of the wrong size or missing" if wrong else
                   f"{bad:,} stored examples fail their checksum (damaged on disk)")
    changed = sorted(k for k in key if old is not None and old.get(k) != key[k])
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, length in _sizes(rows, size).items():
        with open(folder / name, "wb") as handle:
            handle.truncate(length)  # sparse: disk fills as examples are written
    write_json(folder / KEY_FILE, key)  # last: a key marks a complete set of files
    reason = f" (key changed: {', '.join(changed)})" if changed else (f" (rebuilt: {problem})" if problem else "")
    return f"frozen-prefix cache: new at {folder}, {size / 1e9:.2f} GB for {rows:,} examples{reason}"
