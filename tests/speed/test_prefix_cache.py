"""The frozen prefix's activation cache (`--cache_frozen_prefix`): its files, reuse and size limit, and (fp32,
dropout off) the same adapter as without it, at 1 and 2 processes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import accelerate_launch, assert_same_adapter, four_layer_model, prefix_args, tiny_train_args, toy_batch
from peft_agnews.config import parse_config
from peft_agnews.errors import UsageError
from peft_agnews.speed.frozen_prefix import enable_frozen_prefix
from peft_agnews.speed.prefix_cache import KEY_FILE, ROWS_KEY, PrefixCache
from peft_agnews.train import cli

BATCH = toy_batch()


def one_process(printed: list[str]) -> SimpleNamespace:
    return SimpleNamespace(num_processes=1, is_main_process=True, print=printed.append, wait_for_everyone=lambda: None)


def test_cache_stores_rows_at_their_real_length_and_reads_them_back_padded(tmp_path):
    printed = []
    cache = PrefixCache.open(tmp_path / "c", {"k": 1}, [3, 5, 2], 4, torch.float32, one_process(printed), 1.0)
    assert printed == [f"frozen-prefix cache: new at {tmp_path / 'c'}, 0.00 GB for 3 examples"]
    rows = torch.tensor([2, 0])
    assert cache.read(rows, 8) is None
    states = torch.randn(2, 8, 4)
    assert torch.equal(cache.write(rows, states), states)
    assert cache.filled_count() == 2 and cache.read(torch.tensor([0, 1]), 8) is None
    back = cache.read(torch.tensor([0, 2]), 6)
    assert torch.equal(back[0, :3], states[1, :3]) and torch.equal(back[1, :2], states[0, :2])
    assert not back[0, 3:].any() and not back[1, 2:].any()


def test_cache_with_the_same_key_is_reused_and_with_another_key_rebuilt(tmp_path):
    printed = []
    key = {"depth": 1, "max_length": 128, "tokens": "abc"}
    cache = PrefixCache.open(tmp_path, key, [3, 5], 4, torch.bfloat16, one_process(printed), 1.0)
    stored = cache.write(torch.tensor([1]), torch.randn(1, 5, 4))
    assert stored.dtype == torch.float32 and torch.equal(stored, stored.bfloat16().float())
    del cache
    again = PrefixCache.open(tmp_path, key, [3, 5], 4, torch.bfloat16, one_process(printed), 1.0)
    assert "reusing" in printed[-1] and "1 of 2 examples filled" in printed[-1]
    assert torch.equal(again.read(torch.tensor([1]), 5), stored.bfloat16())
    other = PrefixCache.open(tmp_path, {**key, "max_length": 64}, [3, 5], 4, torch.bfloat16, one_process(printed), 1.0)
    assert "new at" in printed[-1] and "key changed: max_length" in printed[-1]
    assert other.filled_count() == 0
    assert json.loads((tmp_path / KEY_FILE).read_text())["max_length"] == 64


def test_cache_over_the_size_limit_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(UsageError, match=r"would take 0\.00 GB, over --frozen_prefix_cache_max_gb 1e-09"):
        PrefixCache.open(tmp_path / "c", {}, [100], 32, torch.float32, one_process([]), 1e-9)
    assert not (tmp_path / "c").exists()


def test_a_cached_batch_skips_the_embeddings_and_the_prefix_and_gives_the_same_logits(tmp_path):
    model = four_layer_model(lora_layers="top1", gradient_checkpointing=False).eval()
    prefix = enable_frozen_prefix(model)
    prefix.cache = PrefixCache.open(tmp_path, {}, [5, 4, 3, 5], 32, torch.float32, one_process([]), 1.0)
    roberta = model.get_base_model().roberta
    calls = {"embeddings": 0, "prefix": 0}
    roberta.embeddings.word_embeddings.register_forward_pre_hook(
        lambda *_: calls.__setitem__("embeddings", calls["embeddings"] + 1))
    roberta.encoder.layer[0].register_forward_pre_hook(lambda *_: calls.__setitem__("prefix", calls["prefix"] + 1))
    rows = {ROWS_KEY: torch.tensor([0, 1, 2])}
    with torch.no_grad():
        filling = model(**BATCH, **rows).logits
        assert calls == {"embeddings": 1, "prefix": 1}
        cached = model(**BATCH, **rows).logits  # every row filled: neither the embeddings nor the prefix run
        assert calls == {"embeddings": 1, "prefix": 1}
        plain = model(**BATCH).logits  # no rows (evaluation): computed
        assert calls == {"embeddings": 2, "prefix": 2}
        model(**BATCH, **{ROWS_KEY: torch.tensor([0, 1, 3])})  # row 3 not filled: computed, then stored
        assert calls == {"embeddings": 3, "prefix": 3} and prefix.cache.filled_count() == 4
    assert torch.equal(cached, filling) and torch.equal(plain, filling)


@pytest.mark.slow
def test_cache_trains_the_same_adapter_and_is_reused_by_the_next_run(prefix_runs, no_dropout_model_dir,
                                                                     synthetic_train_csv, capsys):
    cached = prefix_runs("cache")
    assert_same_adapter(cached, prefix_runs("prefix"))
    filled = (cached / "prefix_cache" / "filled.bin").read_bytes()
    assert len(filled) == 432 and set(filled) == {1}
    # A second run in the same folder (as a resumed run does) reads every epoch from the stored cache.
    capsys.readouterr()
    assert cli(prefix_args(no_dropout_model_dir, synthetic_train_csv, cached, cache_frozen_prefix="true")) == 0
    out = capsys.readouterr().out
    assert "frozen prefix: embeddings + layers 0-0 of 2 run without autograd; cache 0.00 GB (" in out
    assert "reusing" in out and "432 of 432 examples filled" in out
    assert_same_adapter(cached, prefix_runs("prefix"))


@pytest.mark.slow
def test_cache_at_two_processes_trains_the_same_adapter(no_dropout_model_dir, synthetic_train_csv, tmp_path):
    runs = {}
    for name, options in (("no-cache", {}), ("cache", {"cache_frozen_prefix": "true"})):
        runs[name] = tmp_path / name
        proc = accelerate_launch("cpu_ddp.yaml", prefix_args(no_dropout_model_dir, synthetic_train_csv, runs[name],
                                                             **options))
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout + proc.stderr
    assert set((runs["cache"] / "prefix_cache" / "filled.bin").read_bytes()) == {1}
    assert_same_adapter(runs["cache"], runs["no-cache"])


def test_cache_needs_dropout_off_and_a_frozen_prefix(tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    base = dict(max_train_steps=1, cache_frozen_prefix="true")
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "a", lora_layers="top1",
                               model_dropout=0.1, **base)) == 2
    assert "error: --cache_frozen_prefix needs dropout off in the frozen layers" in capsys.readouterr().err
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "b", **base)) == 2
    assert "error: --cache_frozen_prefix needs frozen bottom layers" in capsys.readouterr().err
    assert not (tmp_path / "a" / "results.json").exists()


def test_cache_limit_and_layers_reach_the_command_line(tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    args = tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "r", lora_layers="top1", model_dropout=0.0,
                           cache_frozen_prefix="true", frozen_prefix_cache_max_gb=1e-6,
                           lora_target_modules="query,value", lora_exclude_modules="layer.1.attention.self.value")
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "over --frozen_prefix_cache_max_gb 1e-06" in err
    # The one layer with LoRA (top1 of 2) has its value excluded: the target placed nowhere is named.
    assert "warning: --lora_target_modules ['value'] got no LoRA: outside --lora_layers top1" in err
    assert parse_config(["--lora_layers", "top3"]).lora_layers == "top3"
