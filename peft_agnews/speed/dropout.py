"""Dropout with masks drawn by a vectorised generator (`--dropout_generator pcg64`): the same math, faster on CPU.

torch's CPU dropout draws every mask element from its Mersenne Twister one number at a time on one core
(~4.5 ns each); a roberta-base step draws ~158M of them, 36% of a bf16 step on a 2-core AMX machine
(BENCHMARKS.md). Here each mask takes ONE 62-bit seed from torch's generator (so the run seed decides every mask
and a checkpoint's saved generator state resumes them exactly) and fills its bits with numpy's PCG64, four 16-bit
lanes per 64-bit draw. An element is kept when its lane is below round(keep * 2^16): Bernoulli with the keep
probability quantised to 2^-16 (0.9 -> 0.899994), kept values scaled by 1/keep as in `torch.nn.Dropout`, and
backward multiplies by the same saved bool mask.

`use_pcg64_dropout(model)` puts this into every `nn.Dropout` of the model (the base's, the head's, PEFT's
`lora_dropout`) and into the attention-probability dropout by registering (on first use, `register_attention`) an
SDPA variant with transformers' `AttentionInterface`: while dropout is 0 (eval, `--model_dropout 0`) it is plain SDPA
with its fused kernels; with dropout it runs SDPA's math path (matmul, softmax, dropout, matmul), the path torch's
CPU SDPA takes for dropout anyway. On non-CPU tensors everything stays torch's own (GPU generators are parallel already).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "sdpa_pcg64_dropout"
LANE = 2**16  # the keep probability's resolution: one uint16 lane per element


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool mask, True with probability round((1 - p) * 2^16) / 2^16, seeded by one draw of torch's generator.

    The bits come from an opaque custom op (`peft_agnews::pcg64_keep_mask`): eager calls it directly, and under
    torch.compile it stays one node of the graph (no graph break at numpy); the seed draw before it is an
    ordinary random op, so the run's generator state decides every mask either way."""
    if not torch.compiler.is_compiling():  # a compiled graph finds the op defined by its eager caller
        define_mask_op()
    seed = torch.randint(2**62, (), dtype=torch.int64)
    return torch.ops.peft_agnews.pcg64_keep_mask(seed, list(shape), round((1 - p) * LANE)).to(device)


@functools.cache
def define_mask_op() -> None:
    """Define `torch.ops.peft_agnews.pcg64_keep_mask(seed, shape, threshold)` (once, on first use): the mask of
    `threshold / 2^16` keep probability drawn from PCG64 seeded by `seed`, a CPU int64 scalar tensor."""

    @torch.library.custom_op("peft_agnews::pcg64_keep_mask", mutates_args=(), device_types="cpu")
    def pcg64_keep_mask(seed: torch.Tensor, shape: list[int], threshold: int) -> torch.Tensor:
        n = math.prod(shape)
        with torch.profiler.record_function("dropout mask (pcg64)"):  # numpy's time is otherwise no operator's
            lanes = np.random.PCG64(int(seed)).random_raw((n + 3) // 4).view(np.uint16)[:n]
            return torch.from_numpy(lanes < threshold).view(shape)

    @pcg64_keep_mask.register_fake
    def _(seed: torch.Tensor, shape: list[int], threshold: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.bool)


class _ScaleByMask(torch.autograd.Function):
    """x * mask * scale; saves the bool mask (1 byte an element, as torch's dropout does) for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x.mul(mask).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return grad.mul(mask).mul_(ctx.scale), None, None


def pcg64_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`torch.nn.functional.dropout(x, p, training)` with the mask from `keep_mask` (CPU tensors only)."""
    if not training or p == 0 or x.numel() == 0:
        return x
    if x.device.type != "cpu" or p == 1:
        return torch.nn.functional.dropout(x, p, training)
    return _ScaleByMask.apply(x, keep_mask(x.shape, p, x.device), 1 / (1 - p))


class PCG64Dropout(torch.nn.Dropout):
    """`nn.Dropout` (same `p`, so transformers' attention still reads its rate) drawing masks with `keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pcg64_dropout(x, self.p, self.training)


def sdpa_pcg64_dropout_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; with dropout on CPU, SDPA's math path with the probabilities' mask drawn here."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = (dropout == 0 or query.device.type != "cpu" or key.shape[1] != query.shape[1]
             or (causal and attention_mask is None and query.shape[2] > 1) or kwargs.get("position_bias") is not None)
    if plain:  # no dropout, or a case (GQA, implicit causal mask, position bias) left to transformers' own code
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if attention_mask is not None:
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    probs = pcg64_dropout(torch.softmax(scores, dim=-1), dropout)
    out = torch.matmul(probs.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make `sdpa_pcg64_dropout` an attention implementation transformers knows (done on first use, not at import;
    registering again changes nothing)."""
    AttentionInterface.register(ATTENTION, sdpa_pcg64_dropout_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the same masks SDPA gets


def use_pcg64_dropout(model: torch.nn.Module) -> int:
    """Swap every `nn.Dropout` in `model` for a `PCG64Dropout` of the same rate, and move SDPA attention to
    `sdpa_pcg64_dropout`; returns how many dropout layers were swapped. Models on eager attention keep torch's
    masks for the attention probabilities (their dropout layers are still swapped)."""
    define_mask_op()  # before any compiled graph meets it
    swapped = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is torch.nn.Dropout:
                fast = PCG64Dropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped += 1
    register_attention()
    for sub in model.modules():
        if isinstance(sub, PreTrainedModel) and sub.config._attn_implementation == "sdpa":
            sub.set_attn_implementation(ATTENTION)
    return swapped
