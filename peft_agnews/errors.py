"""The exceptions a command turns into one clear line and an exit status, and the one place that does it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class UsageError(Exception):
    """Bad input or configuration: the message says what is wrong and how to fix it."""


class GradientFlowError(RuntimeError):
    """A trainable parameter gets no usable gradient (a wiring problem, caught at the first optimizer step)."""


class NonFiniteError(RuntimeError):
    """The loss or the gradient became NaN/inf (outside fp16's skipped grad-scaler steps)."""


class TrainingInterrupted(Exception):
    """A stop signal was honoured after writing a checkpoint; the CLI exits with EXIT_INTERRUPTED."""


# sysexits.h EX_TEMPFAIL, "temporary failure, the user is invited to retry": a stop signal was honoured, a
# checkpoint was written, and `--resume_from_checkpoint latest` continues the run.
EXIT_INTERRUPTED = 75
# Exit status per exception (subclasses included, e.g. checkpointing.CheckpointError is a UsageError);
# a failed file operation (OSError) is also 2.
EXIT_STATUS: dict[type[BaseException], int] = {
    UsageError: 2,
    GradientFlowError: 2,
    NonFiniteError: 3,
    TrainingInterrupted: EXIT_INTERRUPTED,
}


def describe_os_error(err: OSError) -> str:
    """A failed file operation (a full disk, a folder removed meanwhile) as `<reason>: <file>`."""
    return f"{err.strerror or err}: {err.filename}" if err.filename else str(err)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (a library's long error as one clause), else its type name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_command(
    main: Callable[[Sequence[str] | None], object],
    argv: Sequence[str] | None = None,
    os_error_hint: str = "fix that and run the command again",
) -> int:
    """Run a command's `main`; an exception of EXIT_STATUS or a failed file operation becomes one line on stderr
    (`error: ...`, except the note of an honoured stop signal) and its exit status. 0 when `main` returns."""
    try:
        main(argv)
    except tuple(EXIT_STATUS) as err:
        status = next(code for kind, code in EXIT_STATUS.items() if isinstance(err, kind))
        print(err if isinstance(err, TrainingInterrupted) else f"error: {err}", file=sys.stderr)
        return status
    except OSError as err:  # checked outputs can still fail to be written: a full disk, a folder removed meanwhile
        print(f"error: {describe_os_error(err)}; {os_error_hint}", file=sys.stderr)
        return 2
    return 0
