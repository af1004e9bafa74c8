"""The `peft-agnews` command: one entry point with a subcommand per job.

    peft-agnews train|evaluate|predict|export|plot|ensemble [--option value ...]

Each subcommand is also a module runnable on its own (`python -m peft_agnews.<module>`, `accelerate launch
peft_agnews/<module>.py`); this file only dispatches (each command's `cli` turns errors into exit statuses via
`errors.run_command`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from peft_agnews.config import OptionParser

COMMANDS = {
    "train": ("peft_agnews.train", "fine-tune with LoRA (see `peft-agnews train --help`)"),
    "evaluate": ("peft_agnews.evaluate", "score a trained classifier on a labelled file"),
    "predict": ("peft_agnews.predict", "classify an unlabelled file into an ID,Label CSV"),
    "export": ("peft_agnews.export", "write a merged standalone model (or a copy of the adapter)"),
    "plot": ("peft_agnews.plot", "draw loss/accuracy curves and confusion matrices of a run"),
    "ensemble": ("peft_agnews.ensemble", "accuracy of several adapters' averaged probabilities on a labelled file"),
}


def parse_args(dataclass_types: tuple, argv: Sequence[str] | None, description: str) -> tuple:
    """Parse argv into the given option dataclasses (each option declared once, in its dataclass)."""
    parser = OptionParser(dataclass_types, description=description)
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "usage: peft-agnews {" + ",".join(COMMANDS) + "} [options]\n" + "\n".join(
            f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()
        )
        known = not argv or argv[0] in ("-h", "--help")
        print(usage if known else f"error: unknown command '{argv[0]}'\n{usage}", file=sys.stdout if known else sys.stderr)
        return 0 if known else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.cli(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
