"""The HF Trainer's options under their Trainer names (docs/trainer-options.md): the optimizer, warmup steps, the
metric that picks the best adapter, the evaluation and checkpoint strategies, data loading workers, the Hub options
(revision, token, cache, split names), --log_level and progress bars. The reference recipe's results are pinned in
test_regression.py; here each option is checked for what it changes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from conftest import LABELS, accelerate_launch, tiny_train_args
from peft_agnews.config import RESUMABLE_OPTIONS, build_parser, mask_secret_arguments, parse_config
from peft_agnews.console import progress_bar
from peft_agnews.errors import UsageError
from peft_agnews.plan import check_fused_adamw, evaluates_at, make_optimizer, saves_at, warmup_steps
from peft_agnews.train import cli

NEW_OPTIONS = {  # option: a non-default value
    "optim": "adamw_torch_fused", "adam_beta1": 0.8, "adam_beta2": 0.99, "adam_epsilon": 1e-6, "warmup_steps": 5.0,
    "metric_for_best_model": "loss", "greater_is_better": False, "eval_strategy": "epoch", "save_strategy": "best",
    "dataloader_num_workers": 2, "dataloader_pin_memory": False, "log_level": "warning", "model_revision": "v1.0",
    "cache_dir": "/tmp/hf-cache", "train_split_name": "fit", "validation_split_name": "dev",
    "test_split_name": "final", "problem_type": "multi_label_classification", "multi_label_threshold": 0.4,
    "label_separator": "|", "token": "hf_not_a_real_token",
}
# Options that change the trained weights or which adapter is kept: recorded in checkpoints, fixed on resume.
MATH_OPTIONS = ("optim", "adam_beta1", "adam_beta2", "adam_epsilon", "warmup_steps", "metric_for_best_model",
                "greater_is_better", "model_revision", "problem_type", "multi_label_threshold", "label_separator")


def test_new_options_are_in_help_and_yaml_with_todays_defaults(tmp_path):
    help_text = build_parser().format_help()
    assert all(f"--{name}" in help_text for name in NEW_OPTIONS)
    defaults = parse_config([])
    assert {name: getattr(defaults, name) for name in NEW_OPTIONS} == {
        "optim": "adamw_torch", "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "warmup_steps": 0,
        "metric_for_best_model": "accuracy", "greater_is_better": True, "eval_strategy": "steps",
        "save_strategy": "steps", "dataloader_num_workers": 0, "dataloader_pin_memory": True, "log_level": "passive",
        "model_revision": "main", "cache_dir": None, "train_split_name": "train",
        "validation_split_name": "validation", "test_split_name": "test",
        "problem_type": "single_label_classification", "multi_label_threshold": 0.5, "label_separator": ",",
        "token": None,
    }
    path = tmp_path / "run.yaml"
    path.write_text("".join(f"{name}: {json.dumps(value)}\n" for name, value in NEW_OPTIONS.items()))
    from_yaml = parse_config(["--config", str(path)])
    assert {name: getattr(from_yaml, name) for name in NEW_OPTIONS} == NEW_OPTIONS


def test_math_options_are_recorded_for_resume_and_the_others_may_change():
    critical = parse_config([]).resume_critical()
    assert all(name in critical for name in MATH_OPTIONS)
    assert not set(MATH_OPTIONS) & set(RESUMABLE_OPTIONS)
    for name in ("dataloader_num_workers", "dataloader_pin_memory", "token", "cache_dir", "log_level",
                 "eval_strategy", "save_strategy", "train_split_name", "validation_split_name", "test_split_name"):
        assert name in RESUMABLE_OPTIONS and name not in critical


@pytest.mark.parametrize("given,greater,expected", [
    (None, None, ("accuracy", True)), ("eval_accuracy", None, ("accuracy", True)), ("loss", None, ("loss", False)),
    ("eval_loss", None, ("loss", False)), ("f1_macro", None, ("f1_macro", True)), ("loss", "true", ("loss", True)),
])
def test_metric_for_best_model_takes_the_trainers_names_and_default_direction(given, greater, expected):
    argv = (["--metric_for_best_model", given] if given else []) + (["--greater_is_better", greater] if greater else [])
    cfg = parse_config(argv)
    assert (cfg.metric_for_best_model, cfg.greater_is_better) == expected


@pytest.mark.parametrize("argv,message", [
    (["--metric_for_best_model", "bleu"], r"--metric_for_best_model 'bleu' is not a single-label validation metric"),
    (["--metric_for_best_model", "f1_micro"], "use one of accuracy, f1_macro, loss"),
    (["--adam_beta1", "1.0"], "--adam_beta1 and --adam_beta2 must be in"),
    (["--adam_epsilon=-1e-8"], "--adam_epsilon must be >= 0"),
    (["--warmup_steps", "2.5"], "--warmup_steps must be a whole number of steps, or a fraction"),
    (["--warmup_steps", "-1"], "--warmup_steps must be a whole number"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be >= 0"),
    (["--eval_strategy", "no", "--early_stopping_patience", "2"], "--early_stopping_patience needs evaluations"),
    (["--label_separator", " "], "--label_separator must be a visible character"),
])
def test_bad_trainer_option_values_are_refused(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_config(argv)


def test_the_token_is_masked_wherever_options_are_shown_or_saved():
    cfg = parse_config(["--token", "hf_secret_value"])
    assert cfg.token == "hf_secret_value"  # the loaders get it
    assert "hf_secret_value" not in repr(cfg) and cfg.to_dict()["token"] == "<TOKEN>"
    assert parse_config([]).to_dict()["token"] is None
    assert mask_secret_arguments(["train", "--token", "hf_a", "--token=hf_b", "--tokenizer_name", "t"]) == [
        "train", "--token", "<TOKEN>", "--token=<TOKEN>", "--tokenizer_name", "t"]


def test_warmup_steps_override_the_ratio_as_in_the_trainer():
    def steps(*argv: str) -> int:
        return warmup_steps(parse_config(list(argv)), total_steps=200)

    assert steps() == 20  # --warmup_ratio 0.1
    assert steps("--warmup_steps", "7") == 7
    assert steps("--warmup_steps", "0.25") == 50  # below 1: a fraction, as transformers 5 reads it
    assert steps("--warmup_steps", "0", "--warmup_ratio", "0.05") == 10


def test_evaluation_and_checkpoint_strategies():
    plan = SimpleNamespace(total_steps=30, steps_per_epoch=14)

    def when(rule, *argv: str, improved=lambda step: False) -> list[int]:
        cfg = parse_config(["--eval_steps", "10", "--save_steps", "12", *argv])
        return [s for s in range(1, 31) if (evaluates_at(cfg, plan, s) if rule == "eval" else saves_at(cfg, plan, s, improved(s)))]

    assert when("eval") == [10, 20, 30]  # every --eval_steps, and after the last step
    assert when("eval", "--eval_strategy", "epoch") == [14, 28, 30]
    assert when("eval", "--eval_strategy", "no") == [30]
    assert when("save") == [12, 24]
    assert when("save", "--save_steps", "0") == []
    assert when("save", "--save_strategy", "epoch") == [14, 28, 30]
    assert when("save", "--save_strategy", "no") == []
    assert when("save", "--save_strategy", "best", improved=lambda s: s in (10, 20)) == [10, 20]


def test_the_optimizer_takes_betas_epsilon_and_the_fused_kernel():
    param = torch.nn.Parameter(torch.ones(2))
    default = make_optimizer(parse_config([]), [{"params": [param]}], torch.device("cpu"))
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=1e-4)  # what the recipe always used
    assert default.defaults == reference.defaults
    tuned = make_optimizer(parse_config(["--optim", "adamw_torch_fused", "--adam_beta1", "0.8", "--adam_beta2", "0.99",
                                         "--adam_epsilon", "1e-6"]), [{"params": [param]}], torch.device("cpu"))
    assert (tuned.defaults["betas"], tuned.defaults["eps"], tuned.defaults["fused"]) == ((0.8, 0.99), 1e-6, True)
    with pytest.raises(UsageError, match="PyTorch has no fused AdamW for device meta.*use --optim adamw_torch"):
        check_fused_adamw(torch.device("meta"))


def test_split_names_choose_the_splits_of_a_dataset(tmp_path):
    from datasets import Dataset

    from peft_agnews.data import load_splits_and_validation_source

    sizes = {"fit": 40, "dev": 12, "final": 8}
    for name, rows in sizes.items():
        Dataset.from_dict({"text": [f"text {i}" for i in range(rows)], "label": [i % 4 for i in range(rows)]}).to_parquet(
            str(tmp_path / f"{name}.parquet"))
    (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n" + "".join(
        f"  - split: {name}\n    path: {name}.parquet\n" for name in sizes) + "---\n")
    names = ["--dataset_name", str(tmp_path), "--train_split_name", "fit"]
    splits, source = load_splits_and_validation_source(parse_config(
        [*names, "--validation_split_name", "dev", "--test_split_name", "final"]))
    assert {name: len(split) for name, split in splits.items()} == {"train": 40, "validation": 12, "test": 8}
    assert source == f"the `dev` split of `{tmp_path}`"
    # Default names that the dataset lacks: a held-out split of train and no test split, as before.
    splits, source = load_splits_and_validation_source(parse_config(names))
    assert set(splits) == {"train", "validation"} and source.startswith("a stratified 10% split")
    with pytest.raises(UsageError, match=r"has no 'valid' split \(it has \['fit', 'dev', 'final'\]\); check --validation_split_name"):
        load_splits_and_validation_source(parse_config([*names, "--validation_split_name", "valid"]))
    with pytest.raises(UsageError, match="has no 'train' split .*name the training split with --train_split_name"):
        load_splits_and_validation_source(parse_config(["--dataset_name", str(tmp_path)]))


def test_progress_bars_honour_tqdm_disable_and_show_on_the_main_process_only(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not progress_bar(True, total=3).disable and progress_bar(False, total=3).disable
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_bar(True, total=3).disable


def test_the_best_metric_is_compared_as_the_trainer_compares_and_old_checkpoints_resume():
    from peft_agnews.loop_state import TrainState

    state = TrainState()
    assert [state.record_evaluation(step, loss, 0.5, greater_is_better=False) for step, loss in
            ((1, 0.9), (2, 0.95), (3, 0.9), (4, 0.7))] == [True, False, False, True]  # strictly lower only
    assert (state.best_step, state.best_metric, state.evals_without_improvement) == (4, 0.7, 0)
    # A checkpoint written before --metric_for_best_model kept the best accuracy only: that was its metric.
    assert TrainState.restore({"best_step": 5, "best_accuracy": 0.75}, {}).best_metric == 0.75
    assert TrainState.restore({"best_step": 0}, {}).best_metric is None


# Training runs ---------------------------------------------------------------------------------------------------------
def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint_steps(out: Path) -> list[int]:
    folder = out / "checkpoints"
    return sorted(int(p.name.removeprefix("step_")) for p in folder.iterdir()) if folder.is_dir() else []


@pytest.mark.slow
def test_eval_loss_picks_the_lowest_validation_loss_everywhere(tiny_model_dir, synthetic_train_csv, tmp_path):
    out = tmp_path / "run"
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, eval_steps=2, max_train_steps=12,
                               learning_rate=3e-2, metric_for_best_model="eval_loss", save_strategy="best",
                               save_total_limit=0)) == 0
    evals = [(e["step"], e["eval/loss"], e["eval/accuracy"]) for e in events(out) if "eval/loss" in e]
    best_step, best_loss, accuracy_there = min(evals, key=lambda e: e[1])
    results = json.loads((out / "results.json").read_text())
    assert (results["best_step"], results["best_metric"], results["best_eval_loss"]) == (best_step, best_loss, best_loss)
    assert results["metric_for_best_model"] == "loss" and results["best_eval_accuracy"] == accuracy_there
    # The run must be one where the two metrics disagree, or this test could not tell them apart.
    assert best_step != max(evals, key=lambda e: e[2])[0], evals
    # save_strategy best: a checkpoint at every step that lowered the loss, and only there.
    improved, lowest = [], float("inf")
    for step, loss, _ in evals:
        if loss < lowest:
            improved.append(step)
            lowest = loss
    assert checkpoint_steps(out) == improved and len(improved) > 1
    assert json.loads((out / "eval_validation.json").read_text())["loss"] == pytest.approx(best_loss)
    assert "the adapter saved is the one with the lowest validation loss" in (out / "adapter" / "README.md").read_text()


@pytest.mark.slow
def test_epoch_strategies_evaluate_and_save_at_epoch_ends(tiny_model_dir, synthetic_train_csv, tmp_path):
    out = tmp_path / "run"  # 432 training rows, 16 x 2 per step: 14 steps per epoch
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, max_train_steps=30, eval_strategy="epoch",
                               save_strategy="epoch", save_total_limit=0)) == 0
    assert [e["step"] for e in events(out) if "eval/accuracy" in e] == [14, 28, 30]
    assert checkpoint_steps(out) == [14, 28, 30]


@pytest.mark.slow
def test_no_evaluation_warmup_steps_fused_adamw_cache_dir_and_revision(
    tiny_model_dir, synthetic_train_csv, tmp_path
):
    from peft_agnews.loading import ModelArgs, load_classifier

    out, cache = tmp_path / "run", tmp_path / "hf-cache"
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, eval_strategy="no", warmup_steps=4,
                               logging_steps=1, optim="adamw_torch_fused", adam_beta2=0.99, cache_dir=cache,
                               model_revision="v1.0")) == 0
    log = events(out)
    assert [e["step"] for e in log if "eval/accuracy" in e] == [12]
    assert json.loads((out / "results.json").read_text())["best_step"] == 12
    lrs = [e["train/lr"] for e in log if "train/lr" in e]  # peak 5e-3, 4 warmup steps, then linear decay to 0
    assert lrs[:4] == pytest.approx([5e-3 * k / 4 for k in (1, 2, 3, 4)]) and lrs[-1] == pytest.approx(0)
    assert all(torch.isfinite(torch.tensor(e["train/loss"])) for e in log if "train/loss" in e)
    assert any(cache.rglob("*.arrow"))  # --cache_dir: the datasets cache of the training file went there
    card = (out / "adapter" / "README.md").read_text()
    assert "linear schedule with 4 steps of warmup; AdamW betas (0.9, 0.99), fused kernel." in card
    # --model_revision: the adapter names the base's revision (AutoPeftModel loads it; a local folder has none).
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["revision"] == "v1.0"
    assert load_classifier(ModelArgs(adapter_dir=str(out / "adapter"))).label_names == LABELS


@pytest.mark.slow
def test_log_level_sets_what_a_run_prints_and_is_restored(tiny_model_dir, synthetic_train_csv, tmp_path, capsys,
                                                          monkeypatch):
    levels = []  # what transformers' verbosity is set to (its own handler writes to the stderr of its first use)
    set_verbosity = transformers.logging.set_verbosity
    monkeypatch.setattr(transformers.logging, "set_verbosity", lambda level: (levels.append(level), set_verbosity(level)))
    before = transformers.logging.get_verbosity()
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "quiet", max_train_steps=4,
                               eval_steps=2, log_level="warning")) == 0
    quiet = capsys.readouterr().out
    assert "plan:" not in quiet and "eval accuracy" not in quiet
    assert levels == [logging.WARNING, before] and logging.getLogger("peft_agnews").handlers == []
    levels.clear()
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "info", max_train_steps=4,
                               eval_steps=2, log_level="info")) == 0
    printed = capsys.readouterr().out
    assert "plan:" in printed and "step 2: eval accuracy" in printed and levels == [logging.INFO, before]
    assert transformers.logging.get_verbosity() == before
    # passive (the default): the package's messages as before, the libraries' levels untouched.
    levels.clear()
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "passive", max_train_steps=4,
                               eval_steps=2)) == 0
    assert "plan:" in capsys.readouterr().out and levels == [before]


@pytest.mark.slow
def test_resume_refuses_a_changed_optimizer_option(tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    out = tmp_path / "run"
    options = dict(max_train_steps=8, eval_steps=4, save_steps=4)
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, **options)) == 0
    (out / "results.json").unlink()
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, out, resume_from_checkpoint="latest",
                               adam_beta2=0.98, **options)) == 2
    assert "--adam_beta2 0.999 (now 0.98)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_launched_run_keeps_its_token_secret_and_honours_tqdm_disable(tiny_model_dir, synthetic_train_csv, tmp_path):
    secret = "hf_PEFTagnewsNotARealToken123"
    out = tmp_path / "run"
    args = tiny_train_args(tiny_model_dir, synthetic_train_csv, out, max_train_steps=4, eval_steps=2, save_steps=2,
                           report_to="offline", token=secret)
    proc = accelerate_launch("cpu.yaml", args, env={"TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "run_config.json").read_text())["token"] == "<TOKEN>"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)  # W&B's offline run log, with the command line in its metadata
    assert not [p for p in files if secret.encode() in p.read_bytes()]  # no file of the run holds the token
    assert secret not in proc.stdout + proc.stderr
    assert "train:" not in proc.stderr and "it/s" not in proc.stderr  # TQDM_DISABLE: no training bar
