"""files: atomic writes that never follow a planted link, the writability probe, and the output-folder lock."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from peft_agnews.errors import UsageError
from peft_agnews.files import LOCK_FILE, OutputLock, append_line, atomic_write, check_writable


def test_atomic_write_replaces_a_planted_symlink_and_leaves_nothing_on_failure(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "out.json"
    target.symlink_to(victim)
    with atomic_write(target) as handle:
        handle.write("new")
    assert not target.is_symlink() and target.read_text() == "new" and victim.read_text() == "precious"
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "victim"], "no temp file left"


def test_append_refuses_a_symlink(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        append_line(tmp_path / "metrics.jsonl", "{}")
    assert not (tmp_path / "elsewhere").exists()


def test_check_writable_names_the_folder(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match=r"cannot write to .*file/sub .*choose another --output_file"):
        check_writable(tmp_path / "file" / "sub", "--output_file")


def test_lock_is_exclusive_released_by_a_dead_holder_and_cleans_up(tmp_path):
    folder = tmp_path / "run"
    code = f"""
import sys
from peft_agnews.files import OutputLock
from pathlib import Path
OutputLock(Path({str(folder)!r})).acquire()
print("held", flush=True)
sys.stdin.read()
"""
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=rf"in use by another run \(PID {holder.pid} on host "):
            OutputLock(folder).acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock file stays behind
        holder.wait()
    assert (folder / LOCK_FILE).exists()
    lock = OutputLock(folder)
    lock.acquire()  # the kernel dropped the dead holder's lock
    lock.release()
    assert list(folder.iterdir()) == []
    fresh = OutputLock(tmp_path / "new")
    fresh.acquire()
    fresh.release()
    assert not (tmp_path / "new").exists(), "a folder the lock created and nothing else used is removed again"


def test_atomic_dir_swaps_a_complete_folder_in_or_leaves_the_old_one(tmp_path):
    from peft_agnews.files import atomic_dir

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"] and (out / "old.txt").read_text() == "old"
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"] and sorted(p.name for p in out.iterdir()) == ["new.txt"]
