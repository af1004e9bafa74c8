"""Plots: valid PNGs of the expected size, with both curve panels and the confusion matrix actually drawn."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from peft_agnews.cli import main as peft_agnews
from peft_agnews.figures import CONFUSION_SIZE, CURVES_SIZE, DPI, plot_confusion_matrix, plot_training_curves


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        image.verify()  # a complete, well-formed PNG
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).astype(int)


def coloured(rgb: np.ndarray) -> np.ndarray:
    """Mask of saturated pixels: plotted lines and filled cells, not the black/grey/white of axes and text."""
    return (rgb.max(-1) - rgb.min(-1)) > 60


def test_training_curves_have_both_panels_drawn(trained_adapter_run, tmp_path):
    events = [json.loads(line) for line in (trained_adapter_run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in e for e in events) and any("eval/accuracy" in e for e in events)
    rgb = pixels(plot_training_curves(events, tmp_path / "curves.png"))
    assert rgb.shape == (CURVES_SIZE[1] * DPI, CURVES_SIZE[0] * DPI, 3)
    assert rgb.std() > 20, "blank image"
    half = rgb.shape[1] // 2
    loss_panel, accuracy_panel = coloured(rgb[:, :half]), coloured(rgb[:, half:])
    # Each panel shows its lines: loss (train + validation), accuracy (+ macro-F1).
    assert loss_panel.sum() > 500 and accuracy_panel.sum() > 500, (loss_panel.sum(), accuracy_panel.sum())


def test_an_empty_panel_says_so_instead_of_drawing_nothing(tmp_path):
    rgb = pixels(plot_training_curves([{"step": 1, "train/loss": 1.3}, {"step": 2, "train/loss": 1.1}], tmp_path / "c.png"))
    assert coloured(rgb[:, : rgb.shape[1] // 2]).sum() > 100
    assert coloured(rgb[:, rgb.shape[1] // 2 :]).sum() == 0  # no eval events: text only, no coloured line


def test_confusion_matrix_png_shades_the_cells(tmp_path):
    report = {"label_names": ["World", "Sports", "Business", "Sci/Tech"], "accuracy": 0.8,
              "confusion_matrix": [[9, 1, 0, 0], [0, 10, 0, 0], [2, 0, 6, 2], [0, 0, 3, 7]]}
    rgb = pixels(plot_confusion_matrix(report, tmp_path / "cm.png", title="(test)"))
    assert rgb.shape == (CONFUSION_SIZE[1] * DPI, CONFUSION_SIZE[0] * DPI, 3)
    assert coloured(rgb).sum() > 20_000  # the dark diagonal cells and the colour bar
    empty = {**report, "confusion_matrix": [[0] * 4 for _ in range(4)]}
    assert coloured(pixels(plot_confusion_matrix(empty, tmp_path / "empty.png"))).sum() < coloured(rgb).sum() / 2


def test_training_wrote_plots_and_the_command_redraws_them(trained_adapter_run, tmp_path):
    for name in ("training_curves.png", "eval_validation.png", "eval_validation.json"):
        assert (trained_adapter_run / name).is_file(), name
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_adapter_run / "metrics.jsonl", run)
    shutil.copy(trained_adapter_run / "eval_validation.json", run)
    assert peft_agnews(["plot", "--run_dir", str(run)]) == 0
    for name in ("training_curves.png", "eval_validation.png"):
        assert pixels(run / name).std() > 20
    assert not list(run.glob("*.tmp"))


@pytest.mark.parametrize(("content", "message"), [(None, "not found"), ("", "has no events"), ("{oops\n", "not JSON")])
def test_plot_command_errors(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert peft_agnews(["plot", "--run_dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "training_curves.png").exists()
