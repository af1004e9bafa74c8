"""The model: a sequence-classification base + PEFT LoRA, its parameter budget, and the gradient-flow preflight."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from peft_agnews.config import TrainConfig, rank_pattern_dict
from peft_agnews.errors import GradientFlowError, UsageError, first_line
from peft_agnews.heads import HEADS, OWN_HEAD, ours

# Every Linear kind of a BERT/RoBERTa encoder layer: `--lora_target_modules` for LoRA on all of them.
ALL_LINEAR_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def load_tokenizer(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    """The tokenizer, checked to cover the model's vocabulary.

    A model folder without tokenizer files still "loads": transformers builds a tokenizer of the special tokens
    alone, every text becomes `<s></s>`, and the run trains on nothing; that is refused here.
    """
    vocab_size = load_model_config(cfg.model_name_or_path, "--model_name_or_path", cfg.trust_remote_code,
                                   **hub_options(cfg)).vocab_size
    name = cfg.tokenizer_name or cfg.model_name_or_path
    flag = "--tokenizer_name" if cfg.tokenizer_name else "--model_name_or_path (or pass --tokenizer_name)"
    tokenizer = load_pretrained_tokenizer(name, flag, cfg.trust_remote_code, **hub_options(cfg))
    # Vocabularies padded to a multiple of 8/64 are a little larger than their tokenizers, never twice as large.
    if vocab_size and len(tokenizer) * 2 < vocab_size:
        raise UsageError(
            f"the tokenizer loaded from '{name}' has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{vocab_size}: the folder lacks its tokenizer files (tokenizer.json, vocab.json, ...); "
            f"copy them in or check {flag}"
        )
    return tokenizer


def hub_options(cfg: TrainConfig) -> dict:
    """`from_pretrained` keyword arguments for a model or tokenizer on the Hub: --model_revision, --token and
    --cache_dir, as run_classification.py passes them (a local folder ignores them)."""
    return {"revision": cfg.model_revision, "token": cfg.token, "cache_dir": cfg.cache_dir}


def load_error(what: str, name: str | Path, err: Exception, flag: str) -> UsageError:
    """A failed transformers load as one line: a model that needs its own code names --trust_remote_code."""
    if "trust_remote_code" in str(err):
        return UsageError(
            f"{what} '{name}' needs its own Python code to load (an auto_map naming .py files in its folder or "
            "repository); peft-agnews runs no code from a model unless you pass --trust_remote_code true, which "
            "runs that code: pass it only for a source you trust"
        )
    return UsageError(f"could not load {what} '{name}' ({first_line(err)}); check {flag}")


def load_model_config(name: str, flag: str, trust_remote_code: bool = False, **kwargs) -> PretrainedConfig:
    """`AutoConfig.from_pretrained(name, **kwargs)`, running no code of the model's own unless `trust_remote_code`;
    a load failure is a UsageError naming `flag`."""
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        raise load_error("model", name, err, flag) from None


def load_pretrained_tokenizer(name: str | Path, flag: str, trust_remote_code: bool = False,
                              **kwargs) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(name, **kwargs)` (no code of the model's own unless `trust_remote_code`), a
    load failure a UsageError naming `flag` (what named the folder)."""
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        raise load_error("tokenizer", name, err, flag) from None


def load_classification_model(name: str, flag: str, trust_remote_code: bool = False, **kwargs) -> PreTrainedModel:
    """`AutoModelForSequenceClassification.from_pretrained(name, **kwargs)` (no code of the model's own unless
    `trust_remote_code`), every load failure a UsageError naming `flag` (the option or file that named the model)."""
    try:
        return AutoModelForSequenceClassification.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        raise load_error("model", name, err, flag) from None
    except RuntimeError as err:
        if "mismatch" not in str(err):
            raise
        # The base already has a classification head, sized for another number of classes.
        raise UsageError(
            f"model '{name}' has a saved classification head for another number of classes than the "
            f"{kwargs.get('num_labels')} label names given; pass one --label_names entry per class of that head, "
            f"or a base model without a head"
        ) from None


def load_base_model(cfg: TrainConfig) -> PreTrainedModel:
    """The pretrained encoder with a fresh classification head sized and named for `cfg.label_names`, and
    transformers' problem_type for multi-label runs (its loss is then the binary cross-entropy)."""
    labels = cfg.resolved_label_names()
    kernel = {} if cfg.attn_implementation == "auto" else {"attn_implementation": cfg.attn_implementation}
    problem = {"problem_type": cfg.problem_type} if cfg.multi_label else {}
    return load_classification_model(
        cfg.model_name_or_path,
        "--model_name_or_path",
        trust_remote_code=cfg.trust_remote_code,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        **kernel,
        **problem,
        **hub_options(cfg),
    )


# Models whose position ids start after the padding id (RoBERTa's scheme): pad_token_id + 1 positions are unusable.
PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                            "data2vec-text", "longformer", "ibert", "mpnet")


def position_limit(config: PretrainedConfig) -> int | None:
    """The most tokens the model's absolute position embeddings can index (None: no such table, e.g. relative
    positions only); a longer input fails inside the embeddings with an index error."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0 or getattr(config, "position_biased_input", True) is False:
        return None
    if getattr(config, "model_type", None) in PADDING_OFFSET_POSITIONS:
        positions -= (getattr(config, "pad_token_id", None) or 0) + 1
    return positions


def check_max_length(config: PretrainedConfig, max_length: int, name: str) -> None:
    """A UsageError when --max_length is above what the model can read (see `position_limit`)."""
    limit = position_limit(config)
    if limit is not None and max_length > limit:
        raise UsageError(f"--max_length {max_length} is more than model '{name}' can read ({limit} token positions); "
                         f"pass --max_length {limit} or less")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct last-name components of the Linear layers: the names LoRA can target."""
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)})


def apply_lora(base: PreTrainedModel, cfg: TrainConfig) -> PeftModel:
    """Wrap `base` with LoRA on `cfg.lora_target_modules`; the classifier head is trained and saved with it."""
    check_target_modules(base, cfg.lora_target_modules + list(rank_pattern_dict(cfg.lora_rank_pattern)))
    check_target_modules(base, cfg.lora_exclude_modules, flag="--lora_exclude_modules")
    replace_head(base, cfg.classifier_head)
    if cfg.model_dropout is not None:
        set_dropout(base, cfg.model_dropout)
    rank = pick_lora_rank(base, cfg) if cfg.lora_r == "auto" else cfg.lora_r
    model = wrap_with_lora(base, cfg, rank)
    trainable, _ = count_parameters(model)
    if trainable > cfg.max_trainable_params:
        raise UsageError(
            f"{trainable:,} trainable parameters exceed --max_trainable_params {cfg.max_trainable_params:,}; "
            "lower --lora_r (or pass --lora_r auto) or target fewer modules"
        )
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def check_target_modules(base: torch.nn.Module, targets: list[str], flag: str = "--lora_target_modules") -> None:
    """Every target must name Linear layers by their last name(s), as PEFT matches them (`query`, `output.dense`)."""
    linear = [name for name, mod in base.named_modules() if isinstance(mod, torch.nn.Linear)]
    unknown = unmatched(targets, linear)
    if unknown:
        raise UsageError(
            f"{flag} {unknown} not found in {type(base).__name__}; its Linear modules are "
            f"{linear_module_names(base)} (a dotted suffix such as 'attention.output.dense' also works)"
        )


def targets_without_lora(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """The targets that got no LoRA module: e.g. `pooler.dense` under --lora_layers topK (PEFT's
    layers_to_transform keeps LoRA inside the layer stack), or targets whose every match is excluded."""
    return unmatched(targets, [name for name, module in model.named_modules() if isinstance(module, LoraLayer)])


def unmatched(targets: list[str], module_names: list[str]) -> list[str]:
    """The targets that name none of `module_names`, matched as PEFT matches a list: the whole name or a dotted
    suffix (`query`, `output.dense`, `layer.3.attention.self.query`)."""
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)]


def wrap_with_lora(base: PreTrainedModel, cfg: TrainConfig, rank: int) -> PeftModel:
    """get_peft_model, then (for --classifier_head model_output) only the head's output Linear left trainable."""
    model = get_peft_model(base, lora_config(cfg, rank, base.config.num_hidden_layers))
    if cfg.classifier_head == "model_output":
        train_only_head_output(model)
    return model


def train_only_head_output(model: PeftModel) -> None:
    """Freeze the head's inner layers (roberta's `classifier.dense`), keep its last Linear trainable.

    PEFT's SEQ_CLS task always puts `classifier`/`score` in modules_to_save (a trained copy of the whole head)
    and excludes everything inside it from LoRA targets, so LoRA on `classifier.dense` is not possible. The
    frozen layers still live in that copy, so they are saved with the adapter and plain
    `PeftModel.from_pretrained` restores the very weights trained with (roberta-base's checkpoint has no
    `classifier.dense`: a fresh base draws it anew).
    """
    for wrapper in model.modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        for head in wrapper.modules_to_save.values():
            linears = [mod for mod in head.modules() if isinstance(mod, torch.nn.Linear)]
            head.requires_grad_(False)
            if linears:
                linears[-1].requires_grad_(True)


def lora_config(cfg: TrainConfig, rank: int, num_layers: int) -> LoraConfig:
    layers = lora_layer_indices(cfg.lora_layers, num_layers)
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,  # marks the classifier head as trainable (modules_to_save) and saves it
        r=rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias=cfg.lora_bias,
        target_modules=list(cfg.lora_target_modules),
        exclude_modules=list(cfg.lora_exclude_modules) or None,  # matched by dotted suffix, like the targets
        layers_to_transform=layers,  # PEFT finds the layer index after `layer.`/`layers.` in module names
        rank_pattern=rank_pattern_dict(cfg.lora_rank_pattern),
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        # The base's Hub revision, which AutoPeftModel (and peft-agnews) load the adapter on; the default stays unset.
        revision=None if cfg.model_revision == "main" else cfg.model_revision,
    )


def lora_layer_indices(spec: str, num_layers: int) -> list[int] | None:
    """--lora_layers ('all', 'topK' or 'i,j') as PEFT's `layers_to_transform`; None means every layer."""
    if spec == "all":
        return None
    wanted = list(range(num_layers - int(spec[3:]), num_layers)) if spec.startswith("top") else sorted(
        {int(i) for i in spec.split(",")})
    if wanted[0] < 0 or wanted[-1] >= num_layers:
        raise UsageError(f"--lora_layers {spec} asks for layers the model lacks: it has {num_layers} "
                         f"(0-{num_layers - 1}; top1-top{num_layers})")
    return None if wanted == list(range(num_layers)) else wanted


def pick_lora_rank(base: PreTrainedModel, cfg: TrainConfig) -> int:
    """The largest rank whose exact trainable count (LoRA + head + biases) fits --max_trainable_params.

    Each candidate is counted on a weightless copy of the architecture (meta device), so the search is cheap
    even for large bases; the count is monotonic in the rank, hence a bisection.
    """
    def fits(rank: int) -> bool:
        return lora_trainable_count(base.config, type(base), cfg, rank) <= cfg.max_trainable_params

    if not fits(1):
        raise UsageError(
            f"even --lora_r 1 exceeds --max_trainable_params {cfg.max_trainable_params:,} with targets "
            f"{cfg.lora_target_modules}; target fewer modules or choose a smaller --classifier_head"
        )
    low, high = 1, base.config.hidden_size  # fits(low) holds; a rank above the width makes no sense
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def lora_trainable_count(model_config, model_class: type, cfg: TrainConfig, rank: int) -> int:
    with torch.device("meta"):
        skeleton = model_class(model_config)
    replace_head(skeleton, cfg.classifier_head)
    return count_parameters(wrap_with_lora(skeleton, cfg, rank))[0]


def trainable_breakdown(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters by kind: LoRA (and DoRA magnitudes) per target name, the head, biases."""
    counts: Counter[str] = Counter()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.split(".")
        if "modules_to_save" in parts:
            counts["classifier head"] += param.numel()
        elif any(p.startswith(("lora_", "lora_magnitude")) for p in parts):
            owner = parts[: next(i for i, p in enumerate(parts) if p.startswith("lora_"))]
            target = ".".join(p for p in owner[-3:] if not p.isdigit()).split("layer.")[-1]
            kind = "DoRA magnitude" if any("magnitude" in p for p in parts) else "LoRA A+B"
            counts[f"{kind} on {target}"] += param.numel()
        else:
            counts["biases" if parts[-1] == "bias" else "other"] += param.numel()
    return dict(counts)


HEAD_FILE = "head.json"


class _MaskSlot:
    """Where the current batch's attention mask waits for the head. PEFT deep-copies the head into
    `modules_to_save`; sharing (not copying) the slot keeps both copies reading the mask of the same forward."""

    mask: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> _MaskSlot:
        return self


class PooledLinearHead(torch.nn.Module):
    """dropout + one Linear over the first token ('first_token') or the masked token mean ('mean')."""

    def __init__(self, hidden_size: int, num_labels: int, pooling: str, dropout: float, slot: _MaskSlot):
        super().__init__()
        self.pooling, self.slot = pooling, slot
        self.dropout = torch.nn.Dropout(dropout)
        self.out = torch.nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.pooling == "first_token":
            pooled = hidden_states[:, 0]
        else:
            mask = self.slot.mask
            mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device) if mask is None else mask
            mask = mask.to(hidden_states.dtype).unsqueeze(-1)
            pooled = (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.out(self.dropout(pooled))


def set_dropout(model: torch.nn.Module, rate: float) -> int:
    """Set every nn.Dropout in `model` to `rate` (attention dropout included: transformers' attention
    functions read the rate from their nn.Dropout); returns how many were set."""
    layers = [mod for mod in model.modules() if isinstance(mod, torch.nn.Dropout)]
    for layer in layers:
        layer.p = rate
    return len(layers)


def replace_head(base: PreTrainedModel, head: str) -> None:
    """Swap the base class's head for a PooledLinearHead (in place); 'model' and 'model_output' keep it.

    The head always receives the last hidden states: a BERT-style pooler (dense + tanh over the first token)
    becomes a pass-through, and the base's own dropout before the head is kept, so the head adds none there.
    """
    if not ours(head):
        return
    if not isinstance(getattr(base, "classifier", None), torch.nn.Module):
        raise UsageError(
            f"--classifier_head {head} needs a model whose head is named 'classifier'; "
            f"{type(base).__name__} has none, use --classifier_head model"
        )
    encoder = getattr(base, base.base_model_prefix)
    has_pooler = getattr(encoder, "pooler", None) is not None
    if has_pooler:
        encoder.pooler = torch.nn.Identity()
    dropout = 0.0 if has_pooler else (getattr(base.config, "classifier_dropout", None) or base.config.hidden_dropout_prob)
    slot = _MaskSlot()
    base.classifier = PooledLinearHead(base.config.hidden_size, base.config.num_labels, head, dropout, slot)

    def remember_mask(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        slot.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    base.register_forward_pre_hook(remember_mask, with_kwargs=True)


def save_head_choice(adapter_dir: Path, head: str) -> None:
    """Record one of our own heads next to the adapter: loading it needs the same head built first."""
    if ours(head):
        (Path(adapter_dir) / HEAD_FILE).write_text(json.dumps({"classifier_head": head}) + "\n")


def read_head_choice(adapter_dir: Path) -> str:
    """The head of our own an adapter was trained with (`heads.OWN_HEAD` when no head.json: the base class's own
    head, which plain PEFT rebuilds); a damaged head.json is a UsageError."""
    file = Path(adapter_dir) / HEAD_FILE
    if not file.is_file():
        return OWN_HEAD
    try:
        head = json.loads(file.read_text())["classifier_head"]
    except (ValueError, KeyError, TypeError):
        head = None
    recorded = [name for name in HEADS if ours(name)]
    if head not in recorded:
        raise UsageError(f"{file} is damaged (expected {{\"classifier_head\": one of {', '.join(recorded)}}}); "
                         "restore it from the training run's adapter folder")
    return head


def enable_gradient_checkpointing(model: PeftModel) -> None:
    """Checkpoint activations without starving LoRA of gradients.

    With reentrant checkpointing and a frozen embedding, a checkpointed block's inputs do not require grad, so
    autograd never reaches the LoRA weights inside it and only the head learns. Non-reentrant checkpointing
    plus inputs that require grad keeps every adapter in the graph; the preflight verifies it at step one.
    """
    base = model.get_base_model()
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def optimizer_param_groups(
    model: torch.nn.Module, weight_decay: float, head_learning_rate: float | None = None
) -> list[dict]:
    """Trainable parameters, with biases and LayerNorm weights exempt from weight decay.

    With `head_learning_rate`, the classifier head (PEFT's `modules_to_save`) gets its own groups at that
    learning rate; the adapters keep the optimizer's default.
    """
    groups: dict[tuple[bool, bool], list] = {(h, e): [] for h in (False, True) for e in (False, True)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name
        head = head_learning_rate is not None and "modules_to_save" in name
        groups[head, exempt].append(param)
    result = [{"params": groups[False, False], "weight_decay": weight_decay},
              {"params": groups[False, True], "weight_decay": 0.0}]
    if head_learning_rate is not None:
        result += [{"params": groups[True, False], "weight_decay": weight_decay, "lr": head_learning_rate},
                   {"params": groups[True, True], "weight_decay": 0.0, "lr": head_learning_rate}]
    return result


def check_gradient_flow(model: torch.nn.Module) -> None:
    """Raise GradientFlowError unless every trainable parameter got a finite, non-zero gradient.

    One exception is structural: with LoRA's standard init B = 0, so the gradient of A is exactly zero until B
    has moved; an A whose B is all zero may show a zero gradient (B's own gradient must then be non-zero).
    """
    params = dict(model.named_parameters())
    problems = []
    for name, param in params.items():
        if not param.requires_grad:
            continue
        if param.grad is None:
            problems.append(f"{name} (no gradient)")
            continue
        grad = param.grad.detach()
        if not torch.isfinite(grad).all():
            problems.append(f"{name} (non-finite gradient)")
        elif not grad.any():
            partner = params.get(name.replace("lora_A", "lora_B")) if "lora_A" in name else None
            if partner is None or partner.detach().any():
                problems.append(f"{name} (all-zero gradient)")
    if problems:
        shown = ", ".join(problems[:8]) + (f", and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise GradientFlowError(
            f"gradient preflight failed: {len(problems)} trainable parameters would not learn: {shown}. "
            "With gradient checkpointing, use non-reentrant checkpointing or inputs that require grad."
        )

