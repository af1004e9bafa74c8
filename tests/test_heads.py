"""The head registry (`heads.HEADS`): the one list of `--classifier_head` choices that the config, the parser, model
building, head.json and the model card read."""

from __future__ import annotations

import typing

import pytest

from peft_agnews.config import TrainConfig, build_parser
from peft_agnews.errors import UsageError
from peft_agnews.heads import HEADS, OWN_HEAD, first_token_problem, ours, research_head_warning
from peft_agnews.model import read_head_choice, save_head_choice


def test_the_registry_is_the_one_list_of_heads():
    assert typing.get_args(typing.get_type_hints(TrainConfig)["classifier_head"]) == tuple(HEADS)
    action = next(a for a in build_parser()._actions if a.dest == "classifier_head")
    assert tuple(action.choices) == tuple(HEADS)
    assert all(f"'{name}'" in action.help for name in HEADS)
    assert OWN_HEAD in HEADS and not ours(OWN_HEAD) and TrainConfig().classifier_head == OWN_HEAD


def test_our_heads_and_only_they_are_recorded_in_head_json(tmp_path):
    for name in HEADS:
        folder = tmp_path / name
        folder.mkdir()
        save_head_choice(folder, name)
        assert (folder / "head.json").is_file() == ours(name)
        assert read_head_choice(folder) == (name if ours(name) else OWN_HEAD)
    (tmp_path / "model" / "head.json").write_text('{"classifier_head": "model"}')  # never written: damaged
    with pytest.raises(UsageError, match="head.json is damaged"):
        read_head_choice(tmp_path / "model")


def test_first_token_heads_and_the_research_warning_follow_the_registry():
    for name, head in HEADS.items():
        assert (first_token_problem(name) is None) == head.first_token_only
    assert "--classifier_head model / model_output / first_token" in first_token_problem("mean")
    assert HEADS["model_output"].plain_peft_loads  # the standard head the warning recommends
    assert "Use --classifier_head model_output" in research_head_warning("mean")
