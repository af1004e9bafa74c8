"""PNG figures of a run, no tracker needed: loss and accuracy curves from metrics.jsonl, and confusion matrices.

Training calls `write_run_plots` at the end; the `plot` command (plot.py) redraws them for any past run.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot state, no display needed

from peft_agnews.errors import UsageError
from peft_agnews.files import atomic_write

CURVES_FILE = "training_curves.png"
DPI = 100
CURVES_SIZE = (12, 4.5)  # inches: 1200 x 450 px
CONFUSION_SIZE = (6, 5.5)  # inches: 600 x 550 px


def read_metrics(path: Path) -> list[dict]:
    """The events of a metrics.jsonl file (one JSON object per line, each with a `step`)."""
    if not path.is_file():
        raise UsageError(f"{path} not found; --run_dir must be a training output_dir")
    try:
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: line {err.lineno} is not JSON; the file is damaged") from None
    if not events:
        raise UsageError(f"{path} has no events; the run logged nothing to plot")
    return events


def _series(events: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(e["step"], e[key]) for e in events if key in e]
    return [s for s, _ in points], [v for _, v in points]


def plot_training_curves(events: list[dict], out: Path) -> Path:
    """Two panels over optimizer steps: train and validation loss; validation accuracy and macro-F1."""
    fig = Figure(figsize=CURVES_SIZE, dpi=DPI, layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for key, label, style in (("train/loss", "train", "-"), ("eval/loss", "validation", "o-")):
        steps, values = _series(events, key)
        if steps:
            loss_ax.plot(steps, values, style, label=label)
    loss_ax.set(title="Loss", xlabel="optimizer step", ylabel="cross-entropy")
    for key, label in (("eval/accuracy", "accuracy"), ("eval/f1_macro", "macro-F1")):
        steps, values = _series(events, key)
        if steps:
            acc_ax.plot(steps, values, "o-", label=label)
    acc_ax.set(title="Validation accuracy and macro-F1", xlabel="optimizer step", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no events logged", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, out)


def plot_confusion_matrix(report: dict, out: Path, title: str = "", exclusive: bool = False) -> Path:
    """Counts with rows = true class and columns = predicted class; colour by row share (recall)."""
    counts = report["confusion_matrix"]
    names = report["label_names"]
    fig = Figure(figsize=CONFUSION_SIZE, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    shares = [[c / max(sum(row), 1) for c in row] for row in counts]
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if shares[i][j] > 0.5 else "black")
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=30, ha="right")
    ax.set_yticks(ticks, names)
    accuracy = f"accuracy {report['accuracy']:.4f}" if "accuracy" in report else ""
    ax.set(xlabel="predicted class", ylabel="true class", title=f"Confusion matrix {title}\n{accuracy}".strip())
    fig.colorbar(image, ax=ax, label="share of the true class")
    return _save(fig, out, exclusive)


def _save(fig: Figure, out: Path, exclusive: bool = False) -> Path:
    """Write via a temporary file and a rename: a PNG appears complete or not at all (`exclusive`: see
    `files.atomic_write`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb", exclusive=exclusive) as handle:
        fig.savefig(handle, format="png")
    return out


def write_run_plots(run_dir: Path, reports: list[str] | None = None) -> list[Path]:
    """training_curves.png from metrics.jsonl, and eval_<split>.png for every eval_<split>.json in `run_dir` (or
    for the `reports` named: training draws only its own)."""
    written = [plot_training_curves(read_metrics(run_dir / "metrics.jsonl"), run_dir / CURVES_FILE)]
    files = sorted(run_dir.glob("eval_*.json")) if reports is None else [run_dir / name for name in reports]
    for report_file in files:
        report = json.loads(report_file.read_text())
        if "confusion_matrix" in report:
            split = report_file.stem.removeprefix("eval_")
            written.append(plot_confusion_matrix(report, report_file.with_suffix(".png"), title=f"({split})"))
    return written
