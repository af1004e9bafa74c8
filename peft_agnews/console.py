"""What a command shows while it runs: its log messages (`--log_level`, through Python logging) and progress bars
(main process only, `TQDM_DISABLE` honoured).

Levels follow transformers' TrainingArguments: the main process logs at `--log_level` (the package's logger
`peft_agnews`, and transformers' and datasets' verbosity); the other processes log warnings and worse. `passive`
leaves transformers and datasets as they are and shows this package's progress messages (info), as before.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import datasets
import transformers
from tqdm.auto import tqdm

logger = logging.getLogger("peft_agnews")

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL, "passive": None}
REPLICA_LEVEL = logging.WARNING  # TrainingArguments' log_level_replica default


def is_main_process() -> bool:
    """Rank 0 of a launched job (torchrun and `accelerate launch` set RANK), or a process launched alone: known
    before any Accelerator exists, so model loading already logs at the right level."""
    return int(os.environ.get("RANK", "0")) == 0


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time of the message (progress messages went to stdout before
    they went through logging, and a redirected or captured stdout keeps receiving them)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler assigns it; the current sys.stdout is always used
        pass


class _Formatter(logging.Formatter):
    """Info as the bare message (the command's progress narrative); other levels prefixed, e.g. `warning: ...`."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}"


@contextmanager
def log_level(name: str, main_process: bool | None = None) -> Iterator[None]:
    """Log at `name` (one of LEVELS) while the block runs, then restore every level it changed and remove its
    handler: the package's logger writes to stdout; transformers and datasets get the same level unless `passive`."""
    main = is_main_process() if main_process is None else main_process
    level = LEVELS[name] if main else REPLICA_LEVEL
    previous = (logger.level, logger.propagate, transformers.logging.get_verbosity(), datasets.logging.get_verbosity())
    handler = _StdoutHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False  # one line per message, whatever the root logger's handlers
    logger.setLevel(logging.INFO if level is None else level)
    if level is not None:
        transformers.logging.set_verbosity(level)
        datasets.logging.set_verbosity(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous[0])
        logger.propagate = previous[1]
        transformers.logging.set_verbosity(previous[2])
        datasets.logging.set_verbosity(previous[3])


def progress_disabled_by_env() -> bool:
    """TQDM_DISABLE as tqdm reads it: any non-empty value turns bars off."""
    return bool(os.environ.get("TQDM_DISABLE"))


def progress_bar(main_process: bool, **kwargs: Any) -> tqdm:
    """A tqdm bar shown by the main process only, and by no process when TQDM_DISABLE is set (tqdm reads it only
    as a default, which an explicit `disable` overrides: the training bar used to ignore it)."""
    return tqdm(disable=not main_process or progress_disabled_by_env(), **kwargs)
