"""The one exception type that the command line turns into a single clear line and a non-zero exit."""


class UsageError(Exception):
    """Bad input or configuration: the message says what is wrong and how to fix it."""
