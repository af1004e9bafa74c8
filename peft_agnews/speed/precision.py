"""The dtype the frozen base is held in: under fp16/bf16 autocast its Linear weights cast once
(`--cast_frozen_weights`, `cast_frozen_linear_weights`), or the whole base in bf16 without autocast
(`--half_precision_base`, `hold_base_in_half`). The trained weights stay fp32 either way.

Under autocast every Linear casts its input to bf16 and LayerNorm runs in fp32, so each LayerNorm output is cast
again for every Linear that reads it, and the residual stream stays fp32. Holding the frozen base itself in bf16
(as torchtune trains LoRA) removes those casts: weights, LayerNorms and activations are bf16 end to end. What is
trained stays fp32, so small updates are not rounded away: PEFT's LoRA layers cast their input to the adapter's
dtype and the result back; the classifier head (PEFT's `modules_to_save`) gets its input cast to fp32; a trained
bias of a frozen bf16 Linear or LayerNorm (`--lora_bias lora_only|all`) stays an fp32 parameter and is cast into
the layer's computation. The adapter saved is fp32, as under autocast.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from peft.utils import ModulesToSaveWrapper

from peft_agnews.errors import UsageError


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


def hold_base_in_half(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Cast every frozen floating-point parameter and buffer of `model` outside the head to `dtype` (in place) and
    wire the trained fp32 pieces in; returns how many tensors were cast."""
    heads = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    in_head = {id(t) for head in heads for t in (*head.parameters(), *head.buffers())}
    cast = 0
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(tensor) in in_head or not tensor.is_floating_point() or tensor.dtype == dtype:
                continue
            if isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad:
                continue
            tensor.data = tensor.data.to(dtype)
            cast += 1
        _compute_trained_bias_in(module, dtype)
    for head in heads:
        head.register_forward_pre_hook(_inputs_to_fp32, with_kwargs=True)
    return cast


def _compute_trained_bias_in(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """A frozen half-precision Linear or LayerNorm whose bias is trained (fp32) computes with that bias cast in."""
    bias = getattr(module, "bias", None)
    weight = getattr(module, "weight", None)
    if not isinstance(bias, torch.nn.Parameter) or not bias.requires_grad or weight is None or weight.dtype != dtype:
        return
    if type(module) is torch.nn.Linear:
        module.forward = partial(_linear_with_cast_bias, module)
    elif type(module) is torch.nn.LayerNorm:
        module.forward = partial(_layer_norm_with_cast_bias, module)
    else:
        raise UsageError(f"--half_precision_base cannot hold a frozen {type(module).__name__} with a trained bias in "
                         "half precision; use --lora_bias none or lora_only, or drop --half_precision_base")


def _linear_with_cast_bias(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias.to(x.dtype))


def _layer_norm_with_cast_bias(module: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias.to(x.dtype), module.eps)


def _inputs_to_fp32(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def up(value: object) -> object:
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}
