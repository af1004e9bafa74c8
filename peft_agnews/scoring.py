"""Scoring: a model's logits over a split or a list of texts, computed on any number of processes, each example
counted exactly once (`gather_for_metrics`) and returned in input order. Training's evaluations and the evaluate,
predict and ensemble commands all score here; metrics.py turns the logits into numbers."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader

from peft_agnews.batching import length_sorted_dataloader, tokenize_splits
from peft_agnews.console import progress_bar
from peft_agnews.loading import Classifier, ModelArgs
from peft_agnews.metrics import classification_metrics


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, dataloader: DataLoader, accelerator: Accelerator,
                   progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) for every example of `dataloader`, gathered from all processes, in loader order.
    `progress`: show a progress bar of the batches with this title (main process only)."""
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    batches = dataloader if progress is None else progress_bar(
        accelerator.is_main_process, iterable=dataloader, desc=progress, unit="batch")
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        # gather_for_metrics drops the samples duplicated to even out the last batch across processes.
        logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    model.train(was_training)
    return torch.cat(all_logits), torch.cat(all_labels)


def score_split(model: torch.nn.Module, dataloader: DataLoader, accelerator: Accelerator, num_labels: int,
                threshold: float = 0.5) -> dict[str, Any]:
    """Metrics of `model` on the whole split behind `dataloader` (`threshold`: multi-label only)."""
    logits, labels = predict_logits(model, dataloader, accelerator)
    return classification_metrics(logits, labels, num_labels, threshold)


def score_texts(
    classifier: Classifier, texts: list[str], labels: list | None, accelerator: Accelerator, args: ModelArgs,
    progress: str = "score",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) for `texts` in input order, computed on all processes in length-sorted batches, with a
    progress bar titled `progress` on the main process. `labels`: class ids, or multi-hot rows (multi-label).

    Without labels, the row index is carried in the label slot; either way the rows are put back in input order.
    """
    rows = list(range(len(texts)))
    data = Dataset.from_dict({"text": texts, "label": rows})
    tokenized = tokenize_splits(DatasetDict({"data": data}), classifier.tokenizer, args.max_length)["data"]
    loader = length_sorted_dataloader(tokenized, classifier.tokenizer, args.per_device_eval_batch_size)
    # Only the loader is prepared (sharded across processes): a frozen model needs no DDP wrapper, just a device.
    logits, row_ids = predict_logits(classifier.model.to(accelerator.device), accelerator.prepare(loader), accelerator,
                                     progress)
    order = torch.argsort(row_ids)
    if not torch.equal(row_ids[order], torch.arange(len(texts))):
        raise RuntimeError(f"gathered {len(row_ids)} rows for {len(texts)} inputs: each row must come back once")
    restored = torch.tensor(labels) if labels is not None else torch.tensor(rows)
    return logits[order], restored
