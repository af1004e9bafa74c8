"""Tokenization, the seeded length-grouped order, dynamic padding."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from peft_agnews.batching import PAD_TO_MULTIPLE_OF, LengthGroupedSampler, make_dataloaders, tokenize_splits
from peft_agnews.config import TrainConfig
from peft_agnews.data import load_splits


@pytest.fixture(scope="module")
def tokenized(tiny_model_dir, synthetic_train_csv, synthetic_test_csv):
    cfg = TrainConfig(train_file=str(synthetic_train_csv), test_file=str(synthetic_test_csv), max_length=24)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return cfg, tokenizer, tokenize_splits(load_splits(cfg), tokenizer, cfg.max_length)


def test_tokenize_truncates_and_records_lengths(tokenized):
    _, _, data = tokenized
    train = data["train"]
    assert set(train.column_names) == {"input_ids", "attention_mask", "labels", "length"}
    assert max(train["length"]) == 24  # some synthetic rows are longer than 24 tokens
    assert all(n == len(ids) for n, ids in zip(train["length"], train["input_ids"]))


def test_sampler_is_a_seeded_permutation_that_changes_each_epoch():
    lengths = [(i * 37) % 101 for i in range(1000)]
    sampler = LengthGroupedSampler(lengths, global_batch=8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(1000))
    assert list(LengthGroupedSampler(lengths, global_batch=8, seed=3)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(1000))
    assert list(LengthGroupedSampler(lengths, global_batch=8, seed=4)) != first


def test_sampler_reads_a_datasets_column_once(monkeypatch):
    from datasets import Dataset
    from datasets.arrow_dataset import Column

    lengths = [(i * 37) % 101 for i in range(1000)]
    column = Dataset.from_dict({"length": lengths})["length"]
    expected = list(LengthGroupedSampler(lengths, global_batch=8, seed=3))
    sampler = LengthGroupedSampler(column, global_batch=8, seed=3)
    # One lookup in a `datasets` column is a table query: the epoch's ordering must not make one per row.
    monkeypatch.setattr(Column, "__getitem__", lambda *_: pytest.fail("a per-row lookup in a datasets column"))
    assert list(sampler) == expected


def test_grouping_by_length_cuts_padding():
    lengths = [(i * 7919) % 120 + 8 for i in range(4000)]

    def padded_tokens(order, batch_size=32):
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        return sum(max(lengths[j] for j in b) * len(b) for b in batches)

    grouped = padded_tokens(list(LengthGroupedSampler(lengths, 32, seed=0)))
    shuffled = padded_tokens(list(LengthGroupedSampler(lengths, 32, seed=0, group_by_length=False)))
    real = sum(lengths)
    assert real / grouped > 0.95 and real / shuffled < 0.65


def test_batches_are_padded_per_batch_to_a_multiple_of_8(tokenized):
    cfg, tokenizer, data = tokenized
    loaders = make_dataloaders(data, tokenizer, cfg)
    widths = set()
    for batch in loaders["train"]:
        width = batch["input_ids"].shape[1]
        assert width % PAD_TO_MULTIPLE_OF == 0
        assert width - batch["attention_mask"].sum(1).max() < PAD_TO_MULTIPLE_OF
        widths.add(width)
    assert len(widths) > 1  # dynamic, not a fixed max_length


def test_eval_loaders_cover_each_example_once_longest_first(tokenized):
    cfg, tokenizer, data = tokenized
    loaders = make_dataloaders(data, tokenizer, cfg)
    assert set(loaders) == {"train", "validation", "test"}
    sizes = [b["attention_mask"].sum(1) for b in loaders["test"]]
    assert sum(len(s) for s in sizes) == len(data["test"])
    flat = [int(x) for s in sizes for x in s]
    assert flat == sorted(flat, reverse=True)
