"""One error-to-exit mapping for every command (`errors.run_command`)."""

from __future__ import annotations

import errno

import pytest

from peft_agnews.errors import (
    EXIT_INTERRUPTED, GradientFlowError, NonFiniteError, TrainingInterrupted, UsageError, run_command,
)
from peft_agnews.checkpointing import CorruptCheckpointError


def raising(err: BaseException):
    def main(argv):
        raise err
    return main


@pytest.mark.parametrize("err, status", [
    (UsageError("bad --x; pass --y"), 2),
    (CorruptCheckpointError("checkpoint damaged"), 2),
    (GradientFlowError("no gradient"), 2),
    (NonFiniteError("non-finite loss"), 3),
])
def test_errors_become_one_line_and_their_exit_status(err, status, capsys):
    assert run_command(raising(err)) == status
    assert capsys.readouterr().err == f"error: {err}\n"


def test_an_honoured_stop_signal_is_a_note_not_an_error(capsys):
    assert run_command(raising(TrainingInterrupted("stopped by SIGTERM at step 4"))) == EXIT_INTERRUPTED == 75
    assert capsys.readouterr().err == "stopped by SIGTERM at step 4\n"


def test_a_failed_file_operation_names_the_file_and_the_fix(capsys):
    err = OSError(errno.ENOSPC, "No space left on device", "out/adapter")
    assert run_command(raising(err), os_error_hint="fix that, then resume") == 2
    assert capsys.readouterr().err == "error: No space left on device: out/adapter; fix that, then resume\n"


def test_success_and_other_exceptions():
    seen = []
    assert run_command(seen.append, ["--a"]) == 0 and seen == [["--a"]]
    with pytest.raises(KeyError):  # a bug, not bad input: the traceback stays
        run_command(raising(KeyError("x")))
