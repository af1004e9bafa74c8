"""files: atomic writes that never follow a planted link, the writability probe, and the output-folder lock."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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


# --- the one rule: owned outputs, never an input, exclusive creation, atomic swap --------------------------------

def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(tmp_path):
    from peft_agnews.files import check_not_an_input

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    data = tmp_path / "in.csv"
    data.write_text("text\nx\n")
    (tmp_path / "hardlink.csv").hardlink_to(data)
    inputs = [("--adapter_dir", run / "adapter"), ("--input_file", data), ("--model_name_or_path", "roberta-base")]
    for output, relation in ((data, "is"), (tmp_path / "hardlink.csv", "is"), (run / "adapter", "is"),
                             (run, "contains"), (run / "adapter" / "x.csv", "lies inside")):
        with pytest.raises(UsageError, match=rf"--out {output} {relation} the input "):
            check_not_an_input(output, "--out", inputs)
    check_not_an_input(run / "predictions.csv", "--out", inputs)  # beside the adapter: fine (a Hub id is skipped)


def test_a_folder_output_is_replaced_only_if_this_command_marked_it(tmp_path, monkeypatch):
    from peft_agnews.files import check_output_folder, mark_folder

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own files")
    for overwrite in (False, True):
        with pytest.raises(UsageError, match=r"is not empty \(notes.txt\) and was not written by peft-agnews export"):
            check_output_folder(mine, "--output_dir", "export", overwrite)
    mark_folder(mine, "train")  # another command's folder is not export's either
    with pytest.raises(UsageError, match="was not written by peft-agnews export"):
        check_output_folder(mine, "--output_dir", "export", True)
    mark_folder(mine, "export")
    with pytest.raises(UsageError, match="already exists; choose another path or pass --overwrite"):
        check_output_folder(mine, "--output_dir", "export", False)
    check_output_folder(mine, "--output_dir", "export", True)
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", "--output_dir", "export", False)  # nothing to lose
    monkeypatch.chdir(mine)
    for here in (".", str(tmp_path)):
        with pytest.raises(UsageError, match="is the current folder or one above it"):
            check_output_folder(Path(here), "--output_dir", "export", True)


def test_exclusive_creation_never_replaces_what_appeared_meanwhile(tmp_path):
    from peft_agnews.files import atomic_dir

    out = tmp_path / "pred.csv"
    with pytest.raises(UsageError, match="was created by another command while this one ran"):
        with atomic_write(out, exclusive=True) as handle:
            handle.write("mine")
            out.write_text("theirs")  # the other command finished first
    assert out.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["pred.csv"]
    folder = tmp_path / "export"
    with pytest.raises(UsageError, match="was created by another command"):
        with atomic_dir(folder, exclusive=True, owner="export") as tmp:
            (tmp / "model.safetensors").write_text("mine")
            folder.mkdir()
            (folder / "theirs").write_text("theirs")
    assert sorted(p.name for p in folder.iterdir()) == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "pred.csv"], "no temporary folder left"


def test_replacing_a_folder_is_a_swap_a_reader_never_sees_it_half_or_missing(tmp_path, monkeypatch):
    """The old folder used to be deleted first and the new one renamed in after: in between, no folder."""
    from peft_agnews import files

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_model.safetensors").write_text("old")
    seen_when_removing = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        seen_when_removing.append((out / "adapter_model.safetensors").read_text() if out.is_dir() else None)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(files.shutil, "rmtree", rmtree)
    with files.atomic_dir(out) as tmp:
        (tmp / "adapter_model.safetensors").write_text("new")
    assert seen_when_removing == ["new"], "the new folder was in place before the old one was removed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_stale_temporary_files_of_our_naming_are_swept_and_nothing_else(tmp_path):
    from peft_agnews.files import sweep_stale_temps

    stale = [".training_curves.png.0123456789ab.tmp", ".adapter.a1b2c3d4e5f6.tmp"]
    kept = [".training_curves.png.tmp", "notes.tmp", ".other.png.0123456789ab.tmp", "training_curves.png"]
    for name in stale[:1] + kept:
        (tmp_path / name).write_text("")
    (tmp_path / stale[1]).mkdir()
    assert sorted(sweep_stale_temps(tmp_path, ["training_curves.png", "adapter"])) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


@pytest.mark.parametrize("writer", ["safetensors", "tokenizers", "torch.save"])
def test_a_failed_write_inside_a_library_becomes_an_oserror(writer, tmp_path):
    """A full disk reached safetensors' SafetensorError, tokenizers' bare Exception and torch.save's RuntimeError,
    which the commands did not report as one line. Writes past RLIMIT_FSIZE fail for real (EFBIG, as ENOSPC would;
    Python ignores SIGXFSZ), through each library's own error path."""
    import resource

    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    from peft_agnews.files import library_writes

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(400)} | {"<unk>": 400}, unk_token="<unk>"))
    write = {"safetensors": lambda: save_file({"w": torch.zeros(1000, 100)}, str(tmp_path / "w.safetensors")),
             "tokenizers": lambda: tokenizer.save(str(tmp_path / "tokenizer.json")),
             "torch.save": lambda: torch.save({"w": torch.zeros(1000, 100)}, tmp_path / "w.bin")}[writer]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))
    try:
        with pytest.raises(OSError) as caught, library_writes(tmp_path):
            write()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert caught.value.filename == str(tmp_path) and caught.value.strerror
    with pytest.raises(KeyError), library_writes(tmp_path):  # anything else passes unchanged
        raise KeyError("a bug")
