"""The model: a sequence-classification base + PEFT LoRA, its parameter budget, and the gradient-flow preflight."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from peft_agnews.config import TrainConfig
from peft_agnews.errors import UsageError


def load_tokenizer(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    name = cfg.tokenizer_name or cfg.model_name_or_path
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise UsageError(f"could not load tokenizer '{name}' ({_first_line(err)}); check --tokenizer_name") from None


def load_base_model(cfg: TrainConfig) -> PreTrainedModel:
    """The pretrained encoder with a fresh classification head sized and named for `cfg.label_names`."""
    labels = cfg.label_names
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            cfg.model_name_or_path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
    except (OSError, ValueError) as err:
        raise UsageError(
            f"could not load model '{cfg.model_name_or_path}' ({_first_line(err)}); check --model_name_or_path"
        ) from None


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct last-name components of the Linear layers: the names LoRA can target."""
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)})


def apply_lora(base: PreTrainedModel, cfg: TrainConfig) -> PeftModel:
    """Wrap `base` with LoRA on `cfg.lora_target_modules`; the classifier head is trained and saved with it."""
    available = linear_module_names(base)
    unknown = [m for m in cfg.lora_target_modules if m not in available]
    if unknown:
        raise UsageError(
            f"--lora_target_modules {unknown} not found in {type(base).__name__}; its Linear modules are {available}"
        )
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # marks the classifier head as trainable (modules_to_save) and saves it
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias=cfg.lora_bias,
        target_modules=list(cfg.lora_target_modules),
    )
    model = get_peft_model(base, lora)
    trainable, _ = count_parameters(model)
    if trainable > cfg.max_trainable_params:
        raise UsageError(
            f"{trainable:,} trainable parameters exceed --max_trainable_params {cfg.max_trainable_params:,}; "
            "lower --lora_r or target fewer modules"
        )
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


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


def cast_frozen_linear_weights(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights and biases of Linear layers in `dtype`; returns how many tensors were cast.

    Under autocast every Linear casts its fp32 weight to the half dtype on each call (autocast caches only
    leaves that require grad), so frozen weights were re-cast every forward and every backward. Casting them
    once gives the matmuls the very same half-precision values: results are unchanged. Trainable tensors
    (LoRA, the head, LoRA-side biases), embeddings and LayerNorms stay fp32.
    """
    cast = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear:
            continue
        for param in (module.weight, module.bias):
            if param is not None and not param.requires_grad and param.dtype != dtype:
                param.data = param.data.to(dtype)
                cast += 1
    return cast


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, with biases and LayerNorm weights exempt from weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class GradientFlowError(RuntimeError):
    """Some trainable parameters received no usable gradient: training them would silently do nothing."""


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


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

