"""The typed config: defaults are the reference recipe, YAML + flag overrides, booleans with values, bad options,
the accuracy options (off by default, checked)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from conftest import RECIPES, REPO
from peft_agnews.config import AG_NEWS_LABELS, SECTIONS, TrainConfig, build_parser, parse_config
from peft_agnews.errors import UsageError

REFERENCE_RECIPE = {
    "model_name_or_path": "roberta-base",
    "dataset_name": "ag_news",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.2,
    "lora_bias": "lora_only",
    "lora_target_modules": ["query", "value"],
    "max_trainable_params": 1_000_000,
    "learning_rate": 1e-4,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "per_device_train_batch_size": 32,
    "gradient_accumulation_steps": 4,
    "num_train_epochs": 6,
    "lr_scheduler_type": "linear",
    "warmup_ratio": 0.1,
    "eval_steps": 200,
    "save_steps": 200,
    "logging_steps": 50,
    "seed": 37,
    "max_length": 128,
    "gradient_checkpointing": True,
    "validation_split": 0.1,
    "group_by_length": True,
    "report_to": ["wandb"],
}


def test_defaults_are_the_reference_recipe():
    cfg = parse_config([])
    assert {k: getattr(cfg, k) for k in REFERENCE_RECIPE} == REFERENCE_RECIPE
    assert AG_NEWS_LABELS == ["World", "Sports", "Business", "Sci/Tech"]
    # Class names left to the data (the Hub ag_news's ClassLabel names are these four); AG News's without a dataset.
    assert cfg.label_names is None and cfg.resolved_label_names() == AG_NEWS_LABELS
    assert cfg.resolved_label_names(["neg", "pos"]) == ["neg", "pos"]
    assert parse_config(["--label_names", "a", "b"]).resolved_label_names(["neg", "pos"]) == ["a", "b"]


def test_yaml_file_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora_r: 4\nlearning_rate: 0.001\nlora_target_modules: [query, key, value]\ngradient_checkpointing: false\n")
    cfg = parse_config(["--config", str(path), "--lora_r", "16"])
    assert cfg.lora_r == 16  # the flag wins
    assert cfg.learning_rate == 1e-3 and cfg.lora_target_modules == ["query", "key", "value"]
    assert cfg.gradient_checkpointing is False


@pytest.mark.parametrize("text,expected", [("false", False), ("False", False), ("0", False), ("true", True), ("yes", True)])
def test_booleans_take_a_value(text, expected):
    assert parse_config(["--gradient_checkpointing", text]).gradient_checkpointing is expected
    assert parse_config(["--group_by_length", text]).group_by_length is expected


def test_conventional_hf_flag_names_are_all_accepted():
    flags = (
        "model_name_or_path tokenizer_name dataset_name train_file validation_file test_file output_dir "
        "num_train_epochs max_train_steps per_device_train_batch_size per_device_eval_batch_size "
        "gradient_accumulation_steps learning_rate weight_decay warmup_ratio lr_scheduler_type max_grad_norm "
        "max_length lora_r lora_alpha lora_dropout lora_bias lora_target_modules eval_steps save_steps "
        "logging_steps seed gradient_checkpointing max_train_samples max_eval_samples report_to "
        "max_trainable_params mixed_precision dry_run group_by_length dataset_config_name text_column_names "
        "label_column_name"
    ).split()
    help_text = build_parser().format_help()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for flag in flags:
        assert flag in fields and f"--{flag}" in help_text, flag


def test_every_option_has_help_text():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"{f.name} has no help"


def test_unknown_yaml_key_is_refused_with_its_name(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("lora_rank: 8\n")
    with pytest.raises(UsageError, match=r"unknown options \['lora_rank'\]"):
        parse_config(["--config", str(path)])


def test_missing_or_malformed_yaml_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        parse_config(["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_r: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        parse_config(["--config", str(bad)])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
        (["--warmup_ratio", "1.5"], "warmup_ratio"),
        (["--lora_r", "0"], "lora_r"),
        (["--label_names", "A", "A"], "distinct"),
        (["--validation_split", "0"], "validation_split"),
    ],
)
def test_invalid_values_are_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_config(argv)


def test_invalid_choice_exits_with_argparse_error():
    with pytest.raises(SystemExit):
        parse_config(["--lora_bias", "some"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--max_grad_norm", "-1"], r"--max_grad_norm must be >= 0"),  # was gradient ascent, exit 0
        (["--learning_rate", "-0.1"], r"--learning_rate must be > 0"),
        (["--learning_rate", "nan"], r"--learning_rate must be a finite number"),
        (["--weight_decay", "-0.5"], r"--weight_decay must be >= 0"),
        (["--lora_alpha", "0"], r"--lora_alpha must be > 0"),
        (["--label_smoothing", "inf"], r"--label_smoothing must be a finite number"),
    ],
)
def test_wrong_result_values_are_refused_at_parse_time(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_config(argv)


@pytest.mark.parametrize(
    "text,message",
    [
        ("classifier_head: pooler\n", r"classifier_head: 'pooler': invalid choice"),
        ("lora_bias: sometimes\n", r"lora_bias: 'sometimes': invalid choice"),
        ("lr_scheduler_type: wiggly\n", r"lr_scheduler_type: 'wiggly': invalid choice"),
        ("mixed_precision: fp8\n", r"mixed_precision: 'fp8': invalid choice"),
        ("save_steps: 2.5\n", r"save_steps: 2.5: invalid int value"),
        ("lora_bias: null\n", r"lora_bias is null"),
        ("learning_rate: {a: 1}\n", r"learning_rate must be a value"),
        ("max_grad_norm: -1\n", r"--max_grad_norm must be >= 0"),
    ],
)
def test_yaml_values_pass_the_same_checks_as_flags(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        parse_config(["--config", str(path)])


def test_yaml_scalar_for_a_list_option_is_one_item_and_null_keeps_none(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("wandb_tags: mytag\nlora_target_modules: query\nmax_train_steps: null\nlearning_rate: 2e-4\n")
    cfg = parse_config(["--config", str(path)])
    assert cfg.wandb_tags == ["mytag"] and cfg.lora_target_modules == ["query"]
    assert cfg.max_train_steps is None and cfg.learning_rate == 2e-4


@pytest.mark.parametrize("spec", ["top0", "bottom2", "1-3", ""])
def test_malformed_lora_layers_are_refused(spec):
    with pytest.raises(UsageError, match="--lora_layers .* is not 'all', 'topK'"):
        TrainConfig(lora_layers=spec)


# --- the accuracy options ---------------------------------------------------------------------------------------

OPTIONS_OFF = {
    "lora_rank_pattern": [], "use_rslora": False, "use_dora": False, "classifier_head": "model",
    "head_learning_rate": None, "label_smoothing": 0.0, "rdrop_alpha": 0.0, "lr_scheduler_type": "linear",
    "model_dropout": None,
}


def test_every_new_option_is_off_by_default_and_reference_yaml_is_the_defaults():
    defaults = parse_config([])
    assert {k: getattr(defaults, k) for k in OPTIONS_OFF} == OPTIONS_OFF
    assert defaults.lora_r == 8 and isinstance(defaults.lora_r, int)
    assert parse_config(["--config", str(RECIPES / "reference.yaml")]) == defaults


@pytest.mark.parametrize("text,expected", [("auto", "auto"), ("AUTO", "auto"), ("16", 16)])
def test_lora_r_takes_an_integer_or_auto(text, expected):
    assert parse_config(["--lora_r", text]).lora_r == expected


@pytest.mark.parametrize("argv,message", [
    (["--lora_r", "big"], "neither an integer nor 'auto'"),
    (["--lora_r", "0"], "--lora_r must be >= 1"),
    (["--lora_rank_pattern", "output.dense:4"], "not MODULE=RANK"),
    (["--label_smoothing", "1.0"], "--label_smoothing"),
    (["--rdrop_alpha", "-1"], "--rdrop_alpha"),
])
def test_bad_new_options_are_refused_with_the_fix(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_config(argv)


@pytest.mark.parametrize("argv", [["--model_dropout", "1"], ["--model_dropout", "-0.1"], ["--lora_dropout", "1.5"]])
def test_dropout_rates_outside_0_1_are_refused(argv):
    with pytest.raises(UsageError, match="must be in \\[0, 1\\)"):
        parse_config(argv)


# --- --help in sections --------------------------------------------------------------------------------------

def test_every_option_names_its_help_section():
    """A new option must say where `--help` (and docs/configuration.md) lists it: option(..., group=...)."""
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("group") not in SECTIONS]
    assert missing == [], f"give these options a group= (one of {list(SECTIONS)}): {missing}"


def test_help_lists_each_option_under_its_section_in_order():
    help_text = build_parser().format_help()
    titles = [f"\n{title}:\n  {about.split()[0]}" for title, about in SECTIONS.values()]
    starts = [help_text.index(title) for title in titles]
    assert starts == sorted(starts)  # the sections in SECTIONS' order
    ends = [*starts[1:], len(help_text)]
    for f in dataclasses.fields(TrainConfig):
        section = list(SECTIONS).index(f.metadata["group"])
        at = help_text.index(f"\n  --{f.name} ")
        assert starts[section] < at < ends[section], f"--{f.name} is not under {SECTIONS[f.metadata['group']][0]}"


def test_the_section_comments_in_train_config_match_their_options():
    """`# Title` comments in TrainConfig's body head the options of the section of that title, and only those."""
    source = (REPO / "peft_agnews" / "config.py").read_text()
    body = source[source.index("class TrainConfig:"):source.index("    def __post_init__")]
    titles = {title.lower(): name for name, (title, _) in SECTIONS.items()}
    comment, seen = None, {}
    for line in body.splitlines():
        if line.startswith("    # "):
            comment = line.strip("# ").lower()
            assert comment in titles, f"section comment '{line.strip()}' is no section title {list(titles)}"
        elif (m := re.match(r"    (\w+): .*= option\(", line)):
            seen[m.group(1)] = comment
    groups = {f.name: SECTIONS[f.metadata["group"]][0].lower() for f in dataclasses.fields(TrainConfig)}
    assert seen == groups


def test_help_strings_say_what_an_option_does_not_what_it_measured():
    measured = re.compile(r"\d(\.\d+)?x\b|\d\s?%|\bfaster\b|\bslower\b|BENCHMARKS|EXPERIMENTS")
    for f in dataclasses.fields(TrainConfig):
        assert not measured.search(f.metadata["help"]), f"--{f.name}: {f.metadata['help']}"
