"""How the commands write files: atomically, never through a link planted by someone else, one run per folder.

- `atomic_write(path)`: the content goes to a temporary file created exclusively next to `path` (`O_EXCL |
  O_NOFOLLOW`: never an existing file or symlink) and is renamed over `path` when complete. A rename replaces
  `path` itself, so a symlink planted at `path` is replaced, not written through.
- `fresh_dir(parent, name)`: a new, empty temporary folder (`mkdir` never reuses an existing entry).
- `check_writable(folder)`: fail before the work, not after it, when the output cannot be written.
- `OutputLock`: one run per `--output_dir` at a time (`fcntl.flock`, released by the kernel when the holder dies).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from peft_agnews.errors import UsageError

LOCK_FILE = ".peft-agnews.lock"
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


@contextmanager
def atomic_write(path: Path, mode: str = "w") -> Iterator[IO]:
    """Yield a handle on a new temporary file beside `path`; rename it over `path` when the block completes,
    delete it when the block fails. `mode`: "w" (text, UTF-8) or "wb"."""
    tmp = _temp_name(path)
    handle = os.fdopen(os.open(tmp, _NEW_FILE, 0o666), mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    try:
        with handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_line(path: Path, line: str) -> None:
    """Append one line to `path` (created if absent), refusing to follow a symlink there."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def fresh_dir(parent: Path, name: str) -> Path:
    """A new empty folder `.<name>.<random>.tmp` in `parent` (to fill, then rename into place)."""
    path = _temp_name(parent / name)
    path.mkdir()
    return path


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a new empty folder beside `path` to fill; swap it in for `path` (replacing whatever is there) when the
    block completes, delete it when the block fails."""
    tmp = fresh_dir(path.parent, path.name)
    try:
        yield tmp
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(folder: Path, option: str) -> None:
    """Create `folder` if needed and prove a file can be created in it; else a UsageError naming `option`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = _temp_name(folder / "write-probe")
        os.close(os.open(probe, _NEW_FILE, 0o600))
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write to {folder} ({err.strerror}); choose another {option}") from None


class OutputLock:
    """An exclusive lock on `<folder>/.peft-agnews.lock`, held for a whole run by one process (the main one).

    The kernel drops a `flock` when its holder dies, however it dies, so a killed run never leaves the folder
    stuck. The file names the holder (PID, host, start time) for the refusal message. `release` deletes it, and
    removes the folder again if `acquire` created it and nothing else was written there.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_FILE
        self._fd: int | None = None
        self._created_folder = False

    def acquire(self, wait_seconds: float = 0.0, say: Callable[[str], None] = print) -> None:
        """Take the lock, waiting up to `wait_seconds` for another holder to finish; else a UsageError."""
        self._created_folder = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create --output_dir {self.folder} ({err.strerror}); choose another path") from None
        deadline = time.monotonic() + wait_seconds
        waiting_said = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise UsageError(
                        f"--output_dir {self.folder} is in use by another run ({holder}); wait for it to finish "
                        "or choose another --output_dir"
                    ) from None
                if not waiting_said:
                    say(f"--output_dir {self.folder} is in use ({holder}); waiting up to {wait_seconds:.0f} s")
                    waiting_said = True
                time.sleep(0.5)
                continue
            if self._same_file(fd):
                break
            os.close(fd)  # a finishing holder deleted the file we locked: lock the one now at the path
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self._fd = fd

    def _same_file(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it: a waiter re-checks the path after locking
        os.close(self._fd)
        self._fd = None
        if self._created_folder:
            try:
                self.folder.rmdir()  # only if empty: a run that failed before writing anything leaves nothing
            except OSError:
                pass
