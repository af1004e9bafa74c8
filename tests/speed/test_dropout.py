"""`--dropout_generator pcg64`: the masks keep torch's dropout math (rate, scaling, gradient, seeding) and reach
every dropout of the recipe (base, head, LoRA, attention probabilities) while SDPA keeps its fused path at 0."""

from __future__ import annotations

import math

import pytest
import torch

from peft_agnews import speed
from peft_agnews.speed import dropout
from peft_agnews.config import TrainConfig, parse_config
from peft_agnews.speed.dropout import PCG64Dropout, keep_mask, pcg64_dropout
from peft_agnews.errors import UsageError
from peft_agnews.model import apply_lora, load_base_model

BATCH = {
    "input_ids": torch.tensor([[0, 5, 9, 12, 2], [0, 7, 30, 2, 1], [0, 11, 2, 1, 1]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
}


def quantised_drop_rate(p: float) -> float:
    return 1 - round((1 - p) * 2**16) / 2**16


@pytest.mark.parametrize("p", [0.05, 0.1, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_rate_is_p_within_binomial_tolerance_and_kept_values_are_scaled_by_1_over_keep(p, dtype):
    torch.manual_seed(1)
    x = torch.rand(1001, 999).add_(0.5).to(dtype)  # no zeros of its own; an odd size leaves a partial 64-bit draw
    y = pcg64_dropout(x, p)
    dropped = y == 0
    n, rate = x.numel(), quantised_drop_rate(p)
    sigma = math.sqrt(rate * (1 - rate) / n)
    assert abs(dropped.float().mean().item() - rate) < 5 * sigma
    # every one of the four 16-bit lanes of a 64-bit draw is used, each at the same rate
    lanes = dropped.flatten()[: n - n % 4].view(-1, 4).float().mean(0)
    assert (lanes - rate).abs().max().item() < 5 * sigma * 2
    assert y.dtype == dtype
    torch.testing.assert_close(y[~dropped], x[~dropped] * (1 / (1 - p)), rtol=0, atol=0)


def test_the_gradient_goes_through_the_same_mask_scaled():
    torch.manual_seed(2)
    x = torch.randn(64, 96, requires_grad=True)
    y = pcg64_dropout(x, 0.3)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    kept = y.detach() != 0
    torch.testing.assert_close(x.grad, upstream * kept / 0.7, rtol=1e-6, atol=0)
    assert 0 < kept.float().mean().item() < 1


def test_masks_follow_torchs_seed_and_eval_or_zero_rate_pass_through():
    torch.manual_seed(7)
    a = keep_mask((32, 200), 0.2)
    b = keep_mask((32, 200), 0.2)
    torch.manual_seed(7)
    assert torch.equal(keep_mask((32, 200), 0.2), a) and torch.equal(keep_mask((32, 200), 0.2), b)
    assert not torch.equal(a, b)  # the next mask in the same run is another one
    torch.manual_seed(8)
    assert not torch.equal(keep_mask((32, 200), 0.2), a)
    x = torch.randn(8, 8)
    assert pcg64_dropout(x, 0.5, training=False) is x and pcg64_dropout(x, 0.0) is x


def tiny(model_dir, **overrides):
    """The tiny model with LoRA and the speed options (`speed.apply`), as training builds it."""
    cfg = TrainConfig(model_name_or_path=str(model_dir), gradient_checkpointing=False, **overrides)
    torch.manual_seed(0)
    model = apply_lora(load_base_model(cfg), cfg)
    speed.apply(model, cfg)
    return model


class Calls:
    """Counts calls of a function it wraps; `refuse_dropout` fails any SDPA call that would draw torch's masks."""

    def __init__(self, fn, refuse_dropout: bool = False):
        self.fn, self.refuse_dropout, self.dropout_p = fn, refuse_dropout, []

    def __call__(self, *args, **kwargs):
        self.dropout_p.append(kwargs.get("dropout_p", 0.0))
        assert not (self.refuse_dropout and self.dropout_p[-1] > 0), "SDPA drew torch's dropout masks"
        return self.fn(*args, **kwargs)


def test_pcg64_reaches_every_dropout_and_attention_and_sdpa_stays_fused_without_dropout(tiny_model_dir, monkeypatch):
    model = tiny(tiny_model_dir, dropout_generator="pcg64", lora_dropout=0.2).train()
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert layers and all(type(m) is PCG64Dropout for m in layers)
    lora = [name for name, m in model.named_modules() if type(m) is PCG64Dropout and "lora_dropout" in name]
    assert lora and {m.p for m in layers} >= {0.1, 0.2}
    assert model.base_model.model.config._attn_implementation == dropout.ATTENTION
    masks = Calls(keep_mask)
    sdpa = Calls(torch.nn.functional.scaled_dot_product_attention, refuse_dropout=True)
    monkeypatch.setattr(dropout, "keep_mask", masks)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda *a, **k: pytest.fail("torch's dropout was called"))
    config = model.base_model.model.config
    model(**BATCH)
    # embeddings 1; per layer: attention probabilities, attention output, FFN output, LoRA on query and on value;
    # the head's dropout twice (roberta's classification head)
    assert len(masks.dropout_p) == 1 + config.num_hidden_layers * 5 + 2
    assert sdpa.dropout_p == []  # attention with dropout took the math path with our mask
    model.eval()
    model(**BATCH)
    assert sdpa.dropout_p == [0.0] * config.num_hidden_layers  # eval: SDPA's own kernels
    off = tiny(tiny_model_dir, dropout_generator="pcg64", model_dropout=0.0, lora_dropout=0.0).train()
    off(**BATCH)
    assert sdpa.dropout_p == [0.0] * config.num_hidden_layers * 2 and len(masks.dropout_p) == 1 + config.num_hidden_layers * 5 + 2


def test_training_forwards_repeat_under_the_same_seed_and_match_torch_without_dropout(tiny_model_dir):
    model = tiny(tiny_model_dir, dropout_generator="pcg64", lora_dropout=0.2).train()
    torch.manual_seed(3)
    first = model(**BATCH).logits
    second = model(**BATCH).logits
    torch.manual_seed(3)
    torch.testing.assert_close(model(**BATCH).logits, first, rtol=0, atol=0)
    assert not torch.equal(first, second)
    # with dropout 0 both generators compute the same model
    ours = tiny(tiny_model_dir, dropout_generator="pcg64", model_dropout=0.0).train()(**BATCH).logits
    theirs = tiny(tiny_model_dir, model_dropout=0.0).train()(**BATCH).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_the_option_is_parsed_and_unknown_generators_are_refused():
    assert parse_config(["--dropout_generator", "pcg64"]).dropout_generator == "pcg64"
    assert TrainConfig().dropout_generator == "pcg64"
    with pytest.raises((UsageError, SystemExit)):
        parse_config(["--dropout_generator", "philox"])


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_the_same_masks(tiny_model_dir):
    """Checkpointing re-runs each layer's forward in backward; torch restores its generator state for that, so the
    recomputed masks (seeded from it) match and the gradients equal those of a run without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        cfg = TrainConfig(model_name_or_path=str(tiny_model_dir), dropout_generator="pcg64", lora_dropout=0.2,
                          gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        model = apply_lora(load_base_model(cfg), cfg).train()
        speed.apply(model, cfg)
        torch.manual_seed(5)
        model(**BATCH, labels=torch.tensor([0, 3, 1])).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
