"""Ship a trained adapter: merged into its base as a standalone Transformers model, or as a clean adapter copy.

    peft-agnews export --adapter_dir outputs/agnews-lora/adapter --merge --output_dir outputs/merged
    python -m peft_agnews.export ...

A merged folder holds safetensors weights, the tokenizer, a config whose id2label names the classes, and a model
card: `AutoModelForSequenceClassification.from_pretrained(folder)` and `pipeline("text-classification", folder)`
work without PEFT. `--push_to_hub` uploads the written folder (needs network and a Hub token).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peft_agnews.cli import parse_args
from peft_agnews.errors import UsageError, run_command
from peft_agnews.artifacts import save_adapter
from peft_agnews.config import option
from peft_agnews.console import log_level
from peft_agnews.hub import push
from peft_agnews.loading import ModelArgs, check_output_path, load_classifier
from peft_agnews.heads import ours
from peft_agnews.model import read_head_choice
from peft_agnews.model_card import CARD_FILE, merged_card, write_card


@dataclass
class ExportArgs:
    output_dir: str | None = option(None, "Folder to write (refused if it exists, unless --overwrite).")
    merge: bool = option(False, "Merge LoRA into the base weights (merge_and_unload): a standalone model.")
    overwrite: bool = option(False, "Replace an existing --output_dir.")
    push_to_hub: bool = option(False, "Upload the written folder to the Hub (needs network and a token).")
    hub_model_id: str | None = option(None, "Hub repository for --push_to_hub, e.g. user/agnews-roberta-lora.")

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise UsageError("give the folder to write with --output_dir")
        if self.push_to_hub and not self.hub_model_id:
            raise UsageError("--push_to_hub needs --hub_model_id (the Hub repository to create or update)")


def main(argv: Sequence[str] | None = None) -> Path:
    model_args, args = parse_args((ModelArgs, ExportArgs), argv, description=__doc__.splitlines()[0])
    with log_level(model_args.log_level):
        return export(model_args, args)


def export(model_args: ModelArgs, args: ExportArgs) -> Path:
    """Write the merged model or the adapter copy to --output_dir (and push it when asked)."""
    if not model_args.adapter_dir:
        raise UsageError("export needs --adapter_dir (the adapter to merge or copy)")
    if args.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise UsageError("--push_to_hub needs the network, but HF_HUB_OFFLINE is set; unset it or drop --push_to_hub")
    head = read_head_choice(Path(model_args.adapter_dir))
    if args.merge and ours(head):
        raise UsageError(
            f"--merge needs the base class's own head, but this adapter was trained with --classifier_head {head} "
            "(a plain Transformers model cannot hold it); export without --merge and load it with peft-agnews"
        )
    out = Path(args.output_dir)
    check_output_path(out, args.overwrite, folder=True)
    classifier = load_classifier(model_args)
    adapter_dir = Path(model_args.adapter_dir)
    threshold = classifier.multi_label_threshold  # multi-label: labels.json keeps it (and the merged config, problem_type)
    if args.merge:
        model = classifier.model.merge_and_unload()
        # save_adapter writes any PreTrainedModel's weights + tokenizer + labels.json into a fresh folder.
        save_adapter(model, classifier.tokenizer, classifier.label_names, out, multi_label_threshold=threshold)
        write_card(out, merged_card(classifier.base_model, adapter_dir, classifier.label_names, model_args.max_length,
                                    threshold))
    else:
        save_adapter(classifier.model, classifier.tokenizer, classifier.label_names, out, classifier_head=head,
                     multi_label_threshold=threshold)
        if (adapter_dir / CARD_FILE).is_file():
            shutil.copyfile(adapter_dir / CARD_FILE, out / CARD_FILE)
    print(f"wrote {'merged model' if args.merge else 'adapter'} to {out}")
    if args.push_to_hub:
        push(out, args.hub_model_id, commit_message="Upload from peft-agnews export")
    return out


def cli(argv: Sequence[str] | None = None) -> int:
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
