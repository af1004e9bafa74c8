"""The classifier heads `--classifier_head` offers: one registry that the config, model building, loading, the model
card and the speed code read.

`model` and `model_output` are the base class's own head (BERT's pooler + Linear, roberta's dense + out_proj): PEFT
saves it with the adapter, so plain `PeftModel.from_pretrained` rebuilds it and `export --merge` can fold it in.
`first_token` and `mean` are ours (`model.PooledLinearHead`): only peft-agnews builds them, so training records the
choice in the adapter's head.json and loading builds the head before PEFT loads the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Head:
    """One `--classifier_head` choice."""

    name: str
    help: str  # what `--help` says it is
    card: str  # how the model card names it
    first_token_only: bool  # reads only the first token's final hidden state (--first_token_last_layer may skip the rest)
    plain_peft_loads: bool  # plain PEFT loads its adapter (and export --merge merges it); False: ours, in head.json


HEADS: dict[str, Head] = {head.name: head for head in (
    Head("model", "the base class's own head, trained in full (roberta: dense + out_proj)",
         "the model's own classifier head", first_token_only=True, plain_peft_loads=True),
    Head("model_output", "the base class's own head with only its output Linear trained (the inner layers stay as "
         "initialised and are saved with the adapter)",
         "the output Linear of the model's own classifier head", first_token_only=True,
         plain_peft_loads=True),
    Head("first_token", "one Linear over the first token's last hidden state (research: only peft-agnews loads it)",
         "a `first_token` pooling head (one Linear)", first_token_only=True, plain_peft_loads=False),
    Head("mean", "one Linear over the masked mean of the last hidden states (research: only peft-agnews loads it)",
         "a `mean` pooling head (one Linear)", first_token_only=False, plain_peft_loads=False),
)}
# The `--classifier_head` choices, as the type the command-line parser reads its choices from.
HeadName = Literal[tuple(HEADS)]  # type: ignore[valid-type]
# What an adapter without head.json was trained with: the base class's own head (plain PEFT rebuilds it).
OWN_HEAD = "model"


def ours(head: str) -> bool:
    """True for a head only peft-agnews builds (recorded in head.json; plain PEFT cannot load its adapter)."""
    return not HEADS[head].plain_peft_loads


def first_token_problem(head: str) -> str | None:
    """Why --first_token_last_layer cannot go with `head` (one that reads more than the first token); None if it can."""
    if HEADS[head].first_token_only:
        return None
    fitting = " / ".join(name for name, h in HEADS.items() if h.first_token_only)
    return (f"--first_token_last_layer needs a head that reads only the first token (--classifier_head {fitting}), "
            f"not {head!r}")


def research_head_warning(head: str) -> str:
    """What a run with one of our own heads says at its start."""
    return (
        f"warning: --classifier_head {head} is a research head: plain PEFT cannot load the adapter this run writes "
        "(PeftModel.from_pretrained fails, export --merge refuses it); only peft-agnews evaluate/predict/export read "
        "it. Use --classifier_head model_output for a standard, equally cheap head."
    )


def classifier_head_help() -> str:
    """`--classifier_head`'s help: every head and what it is."""
    return "The classifier head: " + "; ".join(f"'{name}': {head.help}" for name, head in HEADS.items()) + "."
