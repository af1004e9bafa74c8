"""The exception type that the command line turns into a single clear line and a non-zero exit."""


class UsageError(Exception):
    """Bad input or configuration: the message says what is wrong and how to fix it."""


def describe_os_error(err: OSError) -> str:
    """A failed file operation (a full disk, a folder removed meanwhile) as `<reason>: <file>`."""
    return f"{err.strerror or err}: {err.filename}" if err.filename else str(err)


class NonFiniteError(RuntimeError):
    """The loss or the gradient became NaN/inf (outside fp16's skipped grad-scaler steps)."""


class TrainingInterrupted(Exception):
    """A stop signal was honoured after writing a checkpoint; the CLI exits with EXIT_INTERRUPTED."""


# sysexits.h EX_TEMPFAIL, "temporary failure, the user is invited to retry": a stop signal was honoured, a
# checkpoint was written, and `--resume_from_checkpoint latest` continues the run.
EXIT_INTERRUPTED = 75
