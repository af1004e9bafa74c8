"""How the commands write files: the one rule for every output, atomic writes that never go through a link
planted by someone else, and one run per folder.

The rule (every command that writes follows it, through the functions below):
- A command writes only paths it owns: its output file, or a folder it created and marked with OUTPUT_MARKER
  (naming the command). `--overwrite` replaces only such an output of the same command, never a folder of
  someone else's files.
- An output never is, contains or lies inside one of the command's inputs (`check_not_an_input`).
- Every path a command will write (side files such as evaluate's PNG included) is checked before any work
  (`check_output_file`, `check_output_folder`).
- Creating an output is exclusive: two commands writing the same new path cannot both succeed
  (`atomic_write(..., exclusive=True)`, `atomic_dir(..., exclusive=True)`: renamed into place only if nothing is
  there). Replacing a folder is an atomic swap: the new folder is complete before it is exchanged with the old
  one, which is removed after, so a reader sees the old folder or the new one, never half of one or none.

- `atomic_write(path)`: the content goes to a temporary file created exclusively next to `path` (`O_EXCL |
  O_NOFOLLOW`: never an existing file or symlink) and is renamed over `path` when complete. A rename replaces
  `path` itself, so a symlink planted at `path` is replaced, not written through.
- `fresh_dir(parent, name)`: a new, empty temporary folder (`mkdir` never reuses an existing entry).
- `check_writable(folder)`: fail before the work, not after it, when the output cannot be written.
- `OutputLock`: one run per `--output_dir` at a time (`fcntl.flock`, released by the kernel when the holder dies).
- `library_writes`: a failed write inside safetensors, tokenizers or torch.save (a full disk) as the OSError every
  command reports in one line.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from peft_agnews.errors import UsageError

LOCK_FILE = ".peft-agnews.lock"
# In a folder a command created (export's output, training's output_dir): which command owns it.
OUTPUT_MARKER = ".peft-agnews-output"
# remove_entries' trash folder: `.peft-agnews-trash.<random>.tmp` (sweep_stale_temps removes a killed one's).
TRASH_NAME = "peft-agnews-trash"
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# renameat2(2) flags (linux/fs.h).
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
# A kernel or filesystem without renameat2 answers with one of these; the fallbacks below are then used.
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    rename = getattr(libc, "renameat2", None)
    if rename is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), str(dst))
    if rename(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(dst))


def _rename_new(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` only if nothing is at `dst` (FileExistsError otherwise): no check-then-rename race."""
    try:
        _renameat2(src, dst, _RENAME_NOREPLACE)
        return
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        if err.errno not in _UNSUPPORTED:
            raise
    if src.is_dir() and not src.is_symlink():  # no exclusive rename for folders here: check, then rename
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
        return
    os.link(src, dst, follow_symlinks=False)  # a hard link fails if `dst` exists
    src.unlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _swap_dir(new: Path, path: Path) -> None:
    """Put the complete folder `new` at `path` and remove what was there. Linux exchanges the two in one
    rename (a reader sees the old folder or the new one); elsewhere the old one is renamed aside first."""
    try:
        _renameat2(new, path, _RENAME_EXCHANGE)
        old = new  # the exchange left the old folder at the new one's temporary name
    except OSError as err:
        if err.errno not in _UNSUPPORTED:
            raise
        old = _temp_name(path)
        os.rename(path, old)
        os.rename(new, path)
    _remove(old)


def _already_there(path: Path) -> UsageError:
    return UsageError(f"{path} was created by another command while this one ran; nothing was replaced: "
                      "choose another path, or pass --overwrite to replace it")


@contextmanager
def atomic_write(path: Path, mode: str = "w", exclusive: bool = False) -> Iterator[IO]:
    """Yield a handle on a new temporary file beside `path`; rename it over `path` when the block completes,
    delete it when the block fails. `mode`: "w" (text, UTF-8) or "wb". `exclusive`: fail (a UsageError) instead
    of replacing a `path` that appeared meanwhile (the output of a command run without --overwrite)."""
    tmp = _temp_name(path)
    handle = os.fdopen(os.open(tmp, _NEW_FILE, 0o666), mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    try:
        with handle:
            yield handle
        if not exclusive:
            os.replace(tmp, path)
            return
        try:
            _rename_new(tmp, path)
        except FileExistsError:
            raise _already_there(path) from None
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
def atomic_dir(path: Path, exclusive: bool = False, owner: str | None = None) -> Iterator[Path]:
    """Yield a new empty folder beside `path` to fill; when the block completes, put it at `path`: swapped with
    the folder there (removed after), or, with `exclusive` or nothing there, renamed into place only if nothing
    appeared meanwhile (else a UsageError). `owner`: the command whose OUTPUT_MARKER the folder gets. The
    temporary folder is deleted when the block fails."""
    tmp = fresh_dir(path.parent, path.name)
    try:
        yield tmp
        if owner:
            mark_folder(tmp, owner)
        if exclusive or not os.path.lexists(path):
            if path.is_dir() and not path.is_symlink():
                try:
                    path.rmdir()  # an empty folder holds nothing to lose; one that is not empty stays and refuses
                except OSError:
                    pass
            try:
                _rename_new(tmp, path)
            except FileExistsError:
                raise _already_there(path) from None
        else:
            _swap_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def mark_folder(folder: Path, command: str) -> None:
    """Record in `folder` that `command` created it and may replace it (with --overwrite)."""
    with atomic_write(folder / OUTPUT_MARKER) as handle:
        handle.write(json.dumps({"written_by": f"peft-agnews {command}", "command": command}) + "\n")


def folder_owner(folder: Path) -> str | None:
    """The command whose OUTPUT_MARKER `folder` holds, else None (no marker, or not one of ours)."""
    marker = folder / OUTPUT_MARKER
    try:
        if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > 4096:
            return None
        command = json.loads(marker.read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None
    return command if isinstance(command, str) else None


def _relation(output: Path, source: Path) -> str | None:
    """How `output` overlaps the existing input `source`: "is", "contains", "lies inside", or None."""
    out, src = output.resolve(), source.resolve()
    if out == src or (output.exists() and os.path.samefile(output, source)):
        return "is"
    if out in src.parents:
        return "contains"
    if src in out.parents:
        return "lies inside"
    return None


def check_not_an_input(output: Path, option: str, inputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """A UsageError when `output` is, contains or lies inside one of `inputs` ((option, path) pairs; values that
    name no existing path, such as a Hub model id, are skipped): a command never writes over what it reads."""
    for flag, value in inputs:
        if not value or not os.path.lexists(value):
            continue
        relation = _relation(Path(output), Path(value))
        if relation:
            raise UsageError(f"{option} {output} {relation} the input {flag} {value}; a command never writes over "
                             f"what it reads: choose another {option}")


def check_output_file(path: Path, option: str, overwrite: bool,
                      inputs: Iterable[tuple[str, str | Path | None]] = ()) -> None:
    """Before any work: `path` is not an input, not a folder, absent (or --overwrite), and its folder writable."""
    check_not_an_input(path, option, inputs)
    if path.is_dir():
        raise UsageError(f"{option} {path} exists and is a folder; choose another path")
    if os.path.lexists(path) and not overwrite:
        raise UsageError(f"{option} {path} already exists; choose another path or pass --overwrite")
    check_writable(path.parent, option)


def check_output_folder(path: Path, option: str, command: str, overwrite: bool,
                        inputs: Iterable[tuple[str, str | Path | None]] = ()) -> None:
    """Before any work: `path` is not an input, not the current folder or one above it, and absent or empty, or
    (with --overwrite) a folder `command` created and marked; and its parent folder is writable."""
    check_not_an_input(path, option, inputs)
    here, out = Path.cwd().resolve(), path.resolve()
    if out == here or out in here.parents:
        raise UsageError(f"{option} {path} is the current folder or one above it, which this command would "
                         f"replace as a whole; choose a new folder for {option}")
    if os.path.lexists(path) and not path.is_dir():
        raise UsageError(f"{option} {path} exists and is not a folder; choose another path")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if entries and folder_owner(path) != command:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise UsageError(f"{option} {path} is not empty ({shown}) and was not written by peft-agnews {command}; "
                         f"--overwrite replaces only a folder {command} created: choose a new or empty folder")
    if entries and not overwrite:
        raise UsageError(f"{option} {path} already exists; choose another path or pass --overwrite")
    check_writable(path.parent, option)


def sweep_stale_temps(folder: Path, names: Sequence[str]) -> list[str]:
    """Remove the temporary files and folders that a killed write of one of `names` left in `folder` (only our
    own pattern `.<name>.<12 hex>.tmp`); returns what was removed. Call it holding the folder's OutputLock."""
    pattern = re.compile(r"\.(" + "|".join(re.escape(n) for n in names) + r")\.[0-9a-f]{12}\.tmp")
    removed = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        if pattern.fullmatch(entry.name):
            _remove(entry)
            removed.append(entry.name)
    return removed


def remove_entries(folder: Path, names: Sequence[str]) -> list[str]:
    """Remove the entries of `folder` named in `names`, in that order, each by one rename into a trash folder
    (so a kill leaves each either in place or gone, never half deleted); returns the names removed."""
    present = [name for name in names if os.path.lexists(folder / name)]
    if not present:
        return []
    trash = fresh_dir(folder, TRASH_NAME)
    for name in present:
        os.rename(folder / name, trash / name)
    shutil.rmtree(trash)
    return present


@contextmanager
def library_writes(where: Path) -> Iterator[None]:
    """Turn a failed write (a full disk) inside a library that does not raise OSError into one naming `where`:
    safetensors (SafetensorError "... (os error 28)"), tokenizers (a bare Exception "... (os error 28)"),
    torch.save (RuntimeError "... unexpected pos ..." / "file write failed" / "iostream error"). Commands report an
    OSError as one `error:` line with exit 2; any other error passes unchanged."""
    try:
        yield
    except OSError:
        raise
    except Exception as err:
        text = str(err)
        found = re.search(r"os error (\d+)|Os \{ code: (\d+)", text)
        if found:
            code = int(found.group(1) or found.group(2))
            raise OSError(code, os.strerror(code), str(where)) from err
        if any(sign in text for sign in ("file write failed", "unexpected pos", "iostream error")):
            raise OSError(errno.EIO, "write failed (a full disk or an I/O error)", str(where)) from err
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
    stuck. The file names the holder (PID, host, start time) for the refusal message. `release` deletes it (and an
    OUTPUT_MARKER left alone in the folder), and removes the folder again if `acquire` created it and nothing else
    was written there.
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
        if [p.name for p in self.folder.iterdir()] == [OUTPUT_MARKER]:
            (self.folder / OUTPUT_MARKER).unlink()  # marked, then nothing written: a failed start leaves nothing
        if self._created_folder:
            try:
                self.folder.rmdir()  # only if empty: a run that failed before writing anything leaves nothing
            except OSError:
                pass
