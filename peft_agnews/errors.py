"""The exception type that the command line turns into a single clear line and a non-zero exit."""


class UsageError(Exception):
    """Bad input or configuration: the message says what is wrong and how to fix it."""


def describe_os_error(err: OSError) -> str:
    """A failed file operation (a full disk, a folder removed meanwhile) as `<reason>: <file>`."""
    return f"{err.strerror or err}: {err.filename}" if err.filename else str(err)
