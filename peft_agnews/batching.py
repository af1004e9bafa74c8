"""Tokenize once (cached by `datasets`), then batch rows of similar length with per-batch dynamic padding.

On AG News the mean length is ~56 tokens; padding every row to 128 would waste more than half the compute.
"""

from __future__ import annotations

import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from peft_agnews.config import TrainConfig
from peft_agnews.labels import class_names, is_multi_label, multi_hot
from peft_agnews.speed.prefix_cache import ROWS_KEY

# Padding to a multiple of 8 keeps tensor-core shapes on GPU and bounds the number of distinct shapes.
PAD_TO_MULTIPLE_OF = 8
# Rows are sorted by length inside shuffled windows of this many global batches (the HF Trainer's factor).
MEGABATCH_FACTOR = 50


def tokenize_splits(splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> DatasetDict:
    """Add `input_ids`/`attention_mask`/`length`, rename `label` to `labels`, drop the raw text. Multi-label
    `labels` become multi-hot float rows (the binary cross-entropy's targets)."""
    feature = next(iter(splits.values())).features["label"]
    num_classes = len(class_names(feature)) if is_multi_label(feature) else 0

    def encode(batch: dict) -> dict:
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        if num_classes:
            enc["labels"] = multi_hot(batch["label"], num_classes)
        return enc

    if num_classes:
        return splits.map(encode, batched=True, remove_columns=["text", "label"], desc="tokenize")
    tokenized = splits.map(encode, batched=True, remove_columns=["text"], desc="tokenize")
    return tokenized.rename_column("label", "labels")


class LengthGroupedSampler(Sampler[int]):
    """Shuffled indices where each window of `global_batch * MEGABATCH_FACTOR` rows is sorted by length.

    The order is a pure function of (seed, epoch, global_batch), never of the micro-batch size or the process
    count. Accelerate's `BatchSamplerShard` hands rank r the micro-batches r, r+P, r+2P, ... of this order, so
    optimizer step k consumes rows [k*G, (k+1)*G) whatever the split of G into processes x accumulation x
    micro-batch: 1 process x 4 x 8 trains on exactly the rows of 2 processes x 1 x 16. Every process and every
    resumed run sees the same order; Accelerate's prepared dataloader calls `set_epoch` on this sampler.
    """

    def __init__(self, lengths: list[int], global_batch: int, seed: int, group_by_length: bool = True) -> None:
        self.lengths = list(lengths)  # a plain list: one lookup of a `datasets` column costs a table query
        self.window = global_batch * MEGABATCH_FACTOR
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if self.group_by_length:
            windows = [order[i : i + self.window] for i in range(0, len(order), self.window)]
            order = [i for w in windows for i in sorted(w, key=lambda j: -self.lengths[j])]
        return iter(order)


def eval_order(split: Dataset) -> list[int]:
    """Row indices in evaluation-loader order, which is also the order of the gathered predictions.

    Longest first: an out-of-memory error shows at once, and similar lengths share a batch. Stable for ties."""
    lengths = torch.tensor(list(split["length"]))
    return torch.sort(lengths, descending=True, stable=True).indices.tolist()


def make_dataloaders(
    tokenized: DatasetDict, tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig, num_processes: int = 1
) -> dict[str, DataLoader]:
    """Training loader (length-grouped, seeded) and evaluation loaders (sorted by length, no shuffle).

    The loaders are built for one process; `accelerator.prepare` shards them over `num_processes`.
    """
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=PAD_TO_MULTIPLE_OF, return_tensors="pt")
    model_columns = ["input_ids", "attention_mask", "labels"]
    train: Dataset = tokenized["train"]
    if cfg.cache_frozen_prefix:  # the cache is addressed by training row
        train = train.add_column(ROWS_KEY, list(range(len(train))))
        model_columns = [*model_columns, ROWS_KEY]
    global_batch = cfg.effective_batch(num_processes)
    sampler = LengthGroupedSampler(train["length"], global_batch, cfg.seed, cfg.group_by_length)
    # Workers only collate (the order comes from the sampler, dropout from the training process): same batches.
    workers = {"num_workers": cfg.dataloader_num_workers,
               "pin_memory": cfg.dataloader_pin_memory and torch.accelerator.is_available()}
    loaders = {
        "train": DataLoader(
            train.select_columns(model_columns),
            batch_size=cfg.per_device_train_batch_size,
            sampler=sampler,
            collate_fn=collator,
            **workers,
        )
    }
    for split in tokenized:
        if split == "train":
            continue
        loaders[split] = length_sorted_dataloader(tokenized[split], tokenizer, cfg.per_device_eval_batch_size, **workers)
    return loaders


def length_sorted_dataloader(split: Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int,
                             num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """An evaluation loader over a tokenized split, longest rows first, no shuffle.

    Rows come in `eval_order` (longest first). The `labels` column comes out in loader order, so callers that
    need the input order can carry row indices there.
    """
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=PAD_TO_MULTIPLE_OF, return_tensors="pt")
    ordered = split.select(eval_order(split)).select_columns(["input_ids", "attention_mask", "labels"])
    return DataLoader(ordered, batch_size=batch_size, collate_fn=collator, num_workers=num_workers,
                      pin_memory=pin_memory)
