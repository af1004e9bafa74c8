"""Redraw the PNG figures of a training run (loss/accuracy curves, confusion matrices) from its output folder.

    peft-agnews plot --run_dir outputs/agnews-lora        python -m peft_agnews.plot --run_dir ...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peft_agnews.cli import parse_args
from peft_agnews.config import option
from peft_agnews.errors import UsageError, run_command
from peft_agnews.figures import CURVES_FILE, read_metrics, write_run_plots
from peft_agnews.files import check_output_file


@dataclass
class PlotArgs:
    run_dir: str | None = option(None, "A training output_dir (holds metrics.jsonl).")

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise UsageError("give the training output folder with --run_dir")


def main(argv: Sequence[str] | None = None) -> list[Path]:
    (args,) = parse_args((PlotArgs,), argv, description=__doc__.splitlines()[0])
    run_dir = Path(args.run_dir)
    read_metrics(run_dir / "metrics.jsonl")  # a folder that is no run is refused before anything else
    # Redrawing is this command's job, so its figures are replaced; each is checked before any drawing.
    reports = sorted(run_dir.glob("eval_*.json"))
    inputs = [("--run_dir", run_dir / "metrics.jsonl"), *(("--run_dir", report) for report in reports)]
    for figure in (run_dir / CURVES_FILE, *(report.with_suffix(".png") for report in reports)):
        check_output_file(figure, "--run_dir", overwrite=True, inputs=inputs)
    written = write_run_plots(run_dir)
    print("\n".join(f"wrote {path}" for path in written))
    return written


def cli(argv: Sequence[str] | None = None) -> int:
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
