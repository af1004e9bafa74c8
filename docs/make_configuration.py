"""Write docs/configuration.md from `TrainConfig`: every training option, by `--help` section, with its values, its
default and its help text, so the page cannot drift from the code.

    python docs/make_configuration.py           # rewrite the page after changing an option in peft_agnews/config.py
    python docs/make_configuration.py --check   # exit 1 if the page is stale (tests/test_docs.py checks the same)
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "configuration.md"
sys.path.insert(0, str(REPO))  # this checkout's package, whatever is installed

from peft_agnews.config import SECTIONS, TrainConfig  # noqa: E402

INTRO = """# Configuration

<!-- Generated from peft_agnews/config.py by `python docs/make_configuration.py`: edit the options there. -->

Every training option, as a flag (`accelerate launch peft_agnews/train.py --learning_rate 3e-4`) or as a key of a
YAML file passed with `--config FILE` (`learning_rate: 3e-4`; flags given on the command line win over the file).
`peft-agnews train --help` lists the same options in the same sections. Booleans take a value (`--dry_run true`,
`--frozen_prefix false`); list options take several values or one comma-separated value. The defaults are the
reference recipe (`recipes/reference.yaml`). The inference commands' options: `peft-agnews <command> --help`.

A YAML value passes exactly the checks its flag does (type, choices, ranges: `classifier_head: pooler` or
`save_steps: 2.5` is an `error:` naming the file and key); a scalar for a list option is one item
(`wandb_tags: mytag`), and `null` is accepted only where unset is a value (`max_train_steps: null`). Values that
would give a wrong result are refused when the options are read: a negative `--max_grad_norm` (gradient ascent),
`--learning_rate <= 0`, `--lora_alpha <= 0`, a negative `--weight_decay`, NaN or infinity for any number.
`--output_dir` and `--model_name_or_path` may name environment variables (`outputs/sweep/$WANDB_RUN_ID`,
`$MINILM_DIR`); an unset one is an error.
`--dry_run true` builds data and model, prints the trainable parameter count and the plan (steps, effective
batch, processes, precision, threads), and writes nothing. The messages: [troubleshooting.md](troubleshooting.md).
"""


def _values(hint: typing.Any) -> str:
    """What the option accepts, in words."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return " / ".join(f"`{a}`" for a in args)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:  # X | None, Literal[...] | None
        return _values(args[0])
    if typing.get_origin(hint) is list:
        return f"list of {_values(args[0])}"
    return {bool: "`true` / `false`", int: "integer", float: "number", str: "text"}[hint]


def _default(value: typing.Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return " ".join(f"`{v}`" for v in value) if value else "none"
    return f"`{value}`"


def render() -> str:
    """The page, as it should read for the current TrainConfig."""
    hints = typing.get_type_hints(TrainConfig)
    fields = dataclasses.fields(TrainConfig)
    parts = [INTRO]
    for name, (title, about) in SECTIONS.items():
        parts.append(f"\n## {title[0].upper()}{title[1:]}\n\n{about}\n\n| option | values | default | what it does |\n"
                     "|---|---|---|---|\n")
        for f in fields:
            if f.metadata.get("group") != name:
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            help_text = f.metadata["help"].replace("|", "\\|")
            parts.append(f"| `--{f.name}` | {_values(hints[f.name])} | {_default(default)} | {help_text} |\n")
    return "".join(parts)


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        stale = not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != render()
        print(f"{PAGE} is {'stale: run python docs/make_configuration.py' if stale else 'up to date'}")
        return int(stale)
    PAGE.write_text(render(), encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
