"""--lora_layers, the frozen prefix (no autograd below the trained layers) and its opt-in activation cache.

Exactness (fp32, dropout off): the prefix mode trains the same adapter as the plain model with the same LoRA
layers, and the cache the same adapter as no cache, at 1 and 2 processes.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, RobertaConfig, RobertaForSequenceClassification

from conftest import REPO, accelerate_launch, tiny_train_args
from peft_agnews.config import TrainConfig, parse_config
from peft_agnews.errors import UsageError
from peft_agnews.frozen_prefix import FrozenPrefixLayers, enable_frozen_prefix, first_token_last_layer, frozen_depth
from peft_agnews.model import ALL_LINEAR_TARGETS, apply_lora, count_parameters, lora_layer_indices, targets_without_lora
from peft_agnews.objectives import classification_loss
from peft_agnews.prefix_cache import KEY_FILE, ROWS_KEY, PrefixCache
from peft_agnews.train import cli

BATCH = {
    "input_ids": torch.tensor([[0, 5, 9, 12, 2], [0, 7, 30, 2, 1], [0, 11, 2, 1, 1]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
    "labels": torch.tensor([0, 3, 1]),
}


def four_layer_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                           intermediate_size=64, num_labels=4, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    return apply_lora(RobertaForSequenceClassification(config), TrainConfig(lora_dropout=0.0, **options))


# --- --lora_layers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [("all", None), ("top2", [4, 5]), ("top6", None), ("4, 1", [1, 4]),
                                            ("0,1,2,3,4,5", None)])
def test_lora_layers_resolve_to_layer_indices(spec, expected):
    assert lora_layer_indices(TrainConfig(lora_layers=spec).lora_layers, 6) == expected


@pytest.mark.parametrize("spec", ["top0", "bottom2", "1-3", ""])
def test_malformed_lora_layers_are_refused(spec):
    with pytest.raises(UsageError, match="--lora_layers .* is not 'all', 'topK'"):
        TrainConfig(lora_layers=spec)


@pytest.mark.parametrize("spec", ["top7", "6"])
def test_lora_layers_beyond_the_model_name_its_layer_count(spec):
    with pytest.raises(UsageError, match="asks for layers the model lacks: it has 6"):
        lora_layer_indices(spec, 6)


def test_lora_goes_only_on_the_chosen_layers_and_the_rest_is_a_frozen_prefix():
    model = four_layer_model(lora_layers="top1", gradient_checkpointing=False)
    lora_layers = {int(n.split("layer.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}
    assert lora_layers == {3}
    assert model.peft_config["default"].layers_to_transform == [3]
    assert frozen_depth(model) == 3
    assert frozen_depth(four_layer_model(gradient_checkpointing=False)) == 0


def test_excluded_modules_get_no_lora_so_backward_stops_inside_the_lowest_trained_layer():
    model = four_layer_model(lora_layers="top2", lora_target_modules=["query", "value", "intermediate.dense"],
                             lora_exclude_modules=["layer.2.attention.self.query,layer.2.attention.self.value"],
                             gradient_checkpointing=False)
    lora = {n.split("layer.")[1].split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert lora == {"2.intermediate.dense", "3.attention.self.query", "3.attention.self.value", "3.intermediate.dense"}
    assert model.peft_config["default"].exclude_modules == {"layer.2.attention.self.query",
                                                            "layer.2.attention.self.value"}
    assert frozen_depth(model) == 2
    enable_frozen_prefix(model)
    layer = model.get_base_model().roberta.encoder.layer[2]
    needs_grad = {}
    for part in ("attention", "intermediate"):
        getattr(layer, part).register_forward_hook(
            lambda _, __, out, part=part: needs_grad.__setitem__(part, out[0].requires_grad if part == "attention"
                                                                 else out.requires_grad))
    classification_loss(model.train(), BATCH).backward()
    # Layer 2's attention holds no LoRA: it runs outside autograd like the prefix, and backward ends in its FFN.
    assert needs_grad == {"attention": False, "intermediate": True}


def test_targets_that_got_no_lora_are_found():
    model = four_layer_model(lora_layers="top1", lora_target_modules=["query", "value", "intermediate.dense"],
                             lora_exclude_modules=["layer.3.attention.self.value"])
    assert targets_without_lora(model, ["query", "value", "intermediate.dense"]) == ["value"]
    assert targets_without_lora(four_layer_model(lora_layers="top1"), ["query", "value"]) == []


def test_unknown_excluded_modules_are_refused():
    with pytest.raises(UsageError, match=r"--lora_exclude_modules \['layer.9.attention.self.query'\] not found"):
        four_layer_model(lora_exclude_modules=["layer.9.attention.self.query"])


# --- the prefix mode -----------------------------------------------------------------------------------------

def layer_calls_and_grads(frozen_prefix: bool) -> tuple[list[int], dict[str, torch.Tensor], torch.Tensor]:
    """Forward + backward of one batch with gradient checkpointing on: forward calls per layer, LoRA grads, loss."""
    model = four_layer_model(lora_layers="top2", gradient_checkpointing=True)
    if frozen_prefix:
        assert isinstance(enable_frozen_prefix(model), FrozenPrefixLayers)
    calls = [0] * 4
    layers = model.get_base_model().roberta.encoder.layer
    for i, layer in enumerate(layers._modules.values()):  # a sub-module: checkpointing recomputes `forward`
        layer.attention.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model.train()
    loss = classification_loss(model, BATCH)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return calls, grads, loss.detach()


def test_prefix_runs_once_without_autograd_and_gives_the_plain_models_gradients():
    plain_calls, plain_grads, plain_loss = layer_calls_and_grads(frozen_prefix=False)
    calls, grads, loss = layer_calls_and_grads(frozen_prefix=True)
    # Gradient checkpointing makes the embeddings' output require grad, so the plain model recomputes (and
    # backpropagates through) every layer; the prefix runs once and backward stops at the first LoRA layer.
    assert plain_calls == [2, 2, 2, 2]
    assert calls == [1, 1, 2, 2]
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and any("lora_B" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_prefix_mode_keeps_the_plain_models_state_dict_names():
    model = four_layer_model(lora_layers="top2", gradient_checkpointing=False)
    names = list(model.state_dict())
    enable_frozen_prefix(model)
    assert list(model.state_dict()) == names


def test_nothing_is_frozen_when_every_layer_has_lora():
    assert enable_frozen_prefix(four_layer_model(gradient_checkpointing=False)) is None


# --- the last layer for the first token only ------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("lora_layers", ["top2", "all"])
def test_last_layer_for_the_first_token_only_gives_the_same_logits_and_gradients(kernel, lora_layers):
    """The model head reads only the first token's final state: the last layer computed for that token alone
    (keys and values still from every token, padding masked) is the same function of the trained weights."""
    results = []
    for first_token in (False, True):
        model = four_layer_model(lora_layers=lora_layers, gradient_checkpointing=False, attn_implementation=kernel)
        model.get_base_model().config._attn_implementation = kernel  # built in code, not loaded
        enable_frozen_prefix(model)
        if first_token:
            first_token_last_layer(model, "model")
        widths = []  # tokens reaching the last layer's feed-forward
        model.get_base_model().roberta.encoder.layer[3].intermediate.register_forward_pre_hook(
            lambda _, args: widths.append(args[0].shape[1]))
        model.train()
        out = model(**BATCH)
        assert widths == [1 if first_token else BATCH["input_ids"].shape[1]]
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain_logits, plain_grads), (logits, grads) = results
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and any("layer.3" in n and "lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_last_layer_for_the_first_token_only_needs_a_head_that_reads_only_the_first_token():
    model = four_layer_model(lora_layers="top1", gradient_checkpointing=False, classifier_head="mean")
    with pytest.raises(UsageError, match="--first_token_last_layer needs a head that reads only the first token"):
        first_token_last_layer(model, "mean")
    # Refused when the options are read, before any data or model is loaded.
    with pytest.raises(UsageError, match="needs a head that reads only the first token .*, not 'mean'"):
        parse_config(["--first_token_last_layer", "true", "--classifier_head", "mean"])


# --- the cache -----------------------------------------------------------------------------------------------

def one_process(printed: list[str]) -> SimpleNamespace:
    return SimpleNamespace(num_processes=1, is_main_process=True, print=printed.append, wait_for_everyone=lambda: None)


def test_cache_stores_rows_at_their_real_length_and_reads_them_back_padded(tmp_path):
    printed = []
    cache = PrefixCache.open(tmp_path / "c", {"k": 1}, [3, 5, 2], 4, torch.float32, one_process(printed), 1.0)
    assert printed == [f"frozen-prefix cache: new at {tmp_path / 'c'}, 0.00 GB for 3 examples"]
    rows = torch.tensor([2, 0])
    assert cache.read(rows, 8) is None
    states = torch.randn(2, 8, 4)
    assert torch.equal(cache.write(rows, states), states)
    assert cache.filled_count() == 2 and cache.read(torch.tensor([0, 1]), 8) is None
    back = cache.read(torch.tensor([0, 2]), 6)
    assert torch.equal(back[0, :3], states[1, :3]) and torch.equal(back[1, :2], states[0, :2])
    assert not back[0, 3:].any() and not back[1, 2:].any()


def test_cache_with_the_same_key_is_reused_and_with_another_key_rebuilt(tmp_path):
    printed = []
    key = {"depth": 1, "max_length": 128, "tokens": "abc"}
    cache = PrefixCache.open(tmp_path, key, [3, 5], 4, torch.bfloat16, one_process(printed), 1.0)
    stored = cache.write(torch.tensor([1]), torch.randn(1, 5, 4))
    assert stored.dtype == torch.float32 and torch.equal(stored, stored.bfloat16().float())
    del cache
    again = PrefixCache.open(tmp_path, key, [3, 5], 4, torch.bfloat16, one_process(printed), 1.0)
    assert "reusing" in printed[-1] and "1 of 2 examples filled" in printed[-1]
    assert torch.equal(again.read(torch.tensor([1]), 5), stored.bfloat16())
    other = PrefixCache.open(tmp_path, {**key, "max_length": 64}, [3, 5], 4, torch.bfloat16, one_process(printed), 1.0)
    assert "new at" in printed[-1] and "key changed: max_length" in printed[-1]
    assert other.filled_count() == 0
    assert json.loads((tmp_path / KEY_FILE).read_text())["max_length"] == 64


@pytest.mark.parametrize("damage", ["zeroed", "bit flip", "index truncated", "key truncated", "checksums missing"])
def test_a_damaged_cache_is_rebuilt_never_reused(damage, tmp_path):
    """A cache file zeroed or bit-flipped at the same size was reused ("reusing ... filled") and trained on; a
    truncated index (filled.bin, key.json) was a traceback."""
    from peft_agnews.prefix_cache import CHECKSUM_FILE, DATA_FILE, FILLED_FILE

    printed = []
    key = {"depth": 1, "tokens": "abc"}
    cache = PrefixCache.open(tmp_path, key, [3, 5, 2], 4, torch.float32, one_process(printed), 1.0)
    cache.write(torch.tensor([0, 1, 2]), torch.randn(3, 5, 4) + 2)  # no zero in the stored values
    del cache
    data = bytearray((tmp_path / DATA_FILE).read_bytes())
    if damage == "zeroed":
        data[12 * 4: 20 * 4] = bytes(32)  # row 1's first two positions
    elif damage == "bit flip":
        data[-1] ^= 0x01  # in row 2
    (tmp_path / DATA_FILE).write_bytes(bytes(data))
    if damage == "index truncated":
        (tmp_path / FILLED_FILE).write_bytes(b"\x01")
    elif damage == "key truncated":
        (tmp_path / KEY_FILE).write_text((tmp_path / KEY_FILE).read_text()[:5])
    elif damage == "checksums missing":  # a cache written before checksums were recorded
        (tmp_path / CHECKSUM_FILE).unlink()
    again = PrefixCache.open(tmp_path, key, [3, 5, 2], 4, torch.float32, one_process(printed), 1.0)
    assert "new at" in printed[-1] and "rebuilt: " in printed[-1], printed[-1]
    reason = {"zeroed": "1 stored examples fail their checksum", "bit flip": "1 stored examples fail their checksum",
              "index truncated": "filled.bin of the wrong size", "key truncated": "key.json is damaged",
              "checksums missing": "checksums.bin of the wrong size or missing"}[damage]
    assert reason in printed[-1], printed[-1]
    assert again.filled_count() == 0


def test_an_intact_cache_passes_its_checksums_and_is_reused(tmp_path):
    printed = []
    cache = PrefixCache.open(tmp_path, {"k": 1}, [3, 5], 4, torch.bfloat16, one_process(printed), 1.0)
    cache.write(torch.tensor([0, 1]), torch.randn(2, 5, 4))
    del cache
    PrefixCache.open(tmp_path, {"k": 1}, [3, 5], 4, torch.bfloat16, one_process(printed), 1.0)
    assert "reusing" in printed[-1] and "2 of 2 examples filled" in printed[-1]


def test_cache_over_the_size_limit_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(UsageError, match=r"would take 0\.00 GB, over --frozen_prefix_cache_max_gb 1e-09"):
        PrefixCache.open(tmp_path / "c", {}, [100], 32, torch.float32, one_process([]), 1e-9)
    assert not (tmp_path / "c").exists()


def test_a_cached_batch_skips_the_embeddings_and_the_prefix_and_gives_the_same_logits(tmp_path):
    model = four_layer_model(lora_layers="top1", gradient_checkpointing=False).eval()
    prefix = enable_frozen_prefix(model)
    prefix.cache = PrefixCache.open(tmp_path, {}, [5, 4, 3, 5], 32, torch.float32, one_process([]), 1.0)
    roberta = model.get_base_model().roberta
    calls = {"embeddings": 0, "prefix": 0}
    roberta.embeddings.word_embeddings.register_forward_pre_hook(
        lambda *_: calls.__setitem__("embeddings", calls["embeddings"] + 1))
    roberta.encoder.layer[0].register_forward_pre_hook(lambda *_: calls.__setitem__("prefix", calls["prefix"] + 1))
    rows = {ROWS_KEY: torch.tensor([0, 1, 2])}
    with torch.no_grad():
        filling = model(**BATCH, **rows).logits
        assert calls == {"embeddings": 1, "prefix": 1}
        cached = model(**BATCH, **rows).logits  # every row filled: neither the embeddings nor the prefix run
        assert calls == {"embeddings": 1, "prefix": 1}
        plain = model(**BATCH).logits  # no rows (evaluation): computed
        assert calls == {"embeddings": 2, "prefix": 2}
        model(**BATCH, **{ROWS_KEY: torch.tensor([0, 1, 3])})  # row 3 not filled: computed, then stored
        assert calls == {"embeddings": 3, "prefix": 3} and prefix.cache.filled_count() == 4
    assert torch.equal(cached, filling) and torch.equal(plain, filling)


# --- end to end (fp32, dropout off): the same adapter with and without prefix mode and cache -------------------

def prefix_args(model_dir, train_csv, out, **overrides) -> list[str]:
    """2 epochs (the cache is filled in the first and read in the second), LoRA on the top layer of 2."""
    return tiny_train_args(model_dir, train_csv, out, max_train_steps=None, num_train_epochs=2, eval_steps=100,
                           per_device_train_batch_size=16, gradient_accumulation_steps=1, mixed_precision="no",
                           lora_layers="top1", model_dropout=0.0, overwrite_output_dir="true", **overrides)


def adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(run, reference):
    a, b = adapter(run), adapter(reference)
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert all(b[k].abs().max() > 1e-3 for k in b if "lora_B" in k), "LoRA B must have moved from zero"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def one_process_runs(no_dropout_model_dir, synthetic_train_csv, tmp_path_factory):
    runs = {}
    for name, options in (("plain", {"frozen_prefix": "false"}), ("prefix", {}),
                          ("cache", {"cache_frozen_prefix": "true"})):
        runs[name] = tmp_path_factory.mktemp(name)
        assert cli(prefix_args(no_dropout_model_dir, synthetic_train_csv, runs[name], **options)) == 0
    return runs


@pytest.mark.slow
def test_prefix_mode_trains_the_plain_models_adapter(one_process_runs):
    config = json.loads((one_process_runs["prefix"] / "adapter" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]
    assert_same_adapter(one_process_runs["prefix"], one_process_runs["plain"])


@pytest.mark.slow
def test_cache_trains_the_same_adapter_and_is_reused_by_the_next_run(one_process_runs, no_dropout_model_dir,
                                                                     synthetic_train_csv, capsys):
    cached = one_process_runs["cache"]
    assert_same_adapter(cached, one_process_runs["prefix"])
    filled = (cached / "prefix_cache" / "filled.bin").read_bytes()
    assert len(filled) == 432 and set(filled) == {1}
    # A second run in the same folder (as a resumed run does) reads every epoch from the stored cache.
    capsys.readouterr()
    assert cli(prefix_args(no_dropout_model_dir, synthetic_train_csv, cached, cache_frozen_prefix="true")) == 0
    out = capsys.readouterr().out
    assert "frozen prefix: embeddings + layers 0-0 of 2 run without autograd; cache 0.00 GB (" in out
    assert "reusing" in out and "432 of 432 examples filled" in out
    assert_same_adapter(cached, one_process_runs["prefix"])


@pytest.mark.slow
def test_a_cache_damaged_on_disk_is_rebuilt_by_the_next_run(one_process_runs, no_dropout_model_dir,
                                                             synthetic_train_csv, tmp_path, capsys):
    """Zeroed bytes in the middle of the cache, at the same size, were reused and trained on (exit 0)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(one_process_runs["cache"], run)
    data = run / "prefix_cache" / "hidden_states.bin"
    size = data.stat().st_size
    with data.open("r+b") as handle:
        handle.seek(size // 2)
        handle.write(bytes(4096))
    assert data.stat().st_size == size
    capsys.readouterr()
    assert cli(prefix_args(no_dropout_model_dir, synthetic_train_csv, run, cache_frozen_prefix="true")) == 0
    out = capsys.readouterr().out
    assert "reusing" not in out and "stored examples fail their checksum (damaged on disk)" in out, out
    assert_same_adapter(run, one_process_runs["prefix"])


@pytest.mark.slow
def test_cache_at_two_processes_trains_the_same_adapter(no_dropout_model_dir, synthetic_train_csv, tmp_path):
    runs = {}
    for name, options in (("no-cache", {}), ("cache", {"cache_frozen_prefix": "true"})):
        runs[name] = tmp_path / name
        proc = accelerate_launch("cpu_ddp.yaml", prefix_args(no_dropout_model_dir, synthetic_train_csv, runs[name],
                                                             **options))
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout + proc.stderr
    assert set((runs["cache"] / "prefix_cache" / "filled.bin").read_bytes()) == {1}
    assert_same_adapter(runs["cache"], runs["no-cache"])


def test_cache_needs_dropout_off_and_a_frozen_prefix(tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    base = dict(max_train_steps=1, cache_frozen_prefix="true")
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "a", lora_layers="top1",
                               model_dropout=0.1, **base)) == 2
    assert "error: --cache_frozen_prefix needs dropout off in the frozen layers" in capsys.readouterr().err
    assert cli(tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "b", **base)) == 2
    assert "error: --cache_frozen_prefix needs frozen bottom layers" in capsys.readouterr().err
    assert not (tmp_path / "a" / "results.json").exists()


def test_cache_limit_and_layers_reach_the_command_line(tiny_model_dir, synthetic_train_csv, tmp_path, capsys):
    args = tiny_train_args(tiny_model_dir, synthetic_train_csv, tmp_path / "r", lora_layers="top1", model_dropout=0.0,
                           cache_frozen_prefix="true", frozen_prefix_cache_max_gb=1e-6,
                           lora_target_modules="query,value", lora_exclude_modules="layer.1.attention.self.value")
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "over --frozen_prefix_cache_max_gb 1e-06" in err
    # The one layer with LoRA (top1 of 2) has its value excluded: the target placed nowhere is named.
    assert "warning: --lora_target_modules ['value'] got no LoRA: outside --lora_layers top1" in err
    assert parse_config(["--lora_layers", "top3"]).lora_layers == "top3"


def test_fast_recipe_fits_the_budget_on_roberta_base_with_a_cached_bottom_half(shared_data):
    cfg = parse_config(["--config", str(REPO / "recipes" / "fast.yaml")])
    config = AutoConfig.from_pretrained(shared_data / "roberta-base-tokenizer")
    config.num_labels, config.vocab_size = 4, 1000
    model = apply_lora(RobertaForSequenceClassification(config), cfg)
    assert count_parameters(model)[0] == 939_268 < 1_000_000
    assert model.peft_config["default"].r == 4 and frozen_depth(model) == 6
    lora_in_layer_6 = {n.split("layer.6.")[1].split(".lora_A")[0] for n, _ in model.named_parameters()
                       if "layer.6." in n and "lora_A" in n}
    assert lora_in_layer_6 == {"intermediate.dense", "output.dense"}  # backward ends in its feed-forward
    assert cfg.cache_frozen_prefix and cfg.model_dropout == 0 and cfg.classifier_head == "model"


def test_proxy_fast_recipe_is_the_proxy_recipe_with_the_measured_levers(monkeypatch):
    """EXPERIMENTS.md measured proxy-minilm.yaml + these overrides (benchmarks/time_to_accuracy.py)."""
    monkeypatch.setenv("MINILM_DIR", "/models/minilm")
    fast = parse_config(["--config", str(REPO / "recipes" / "proxy-fast.yaml")])
    # Measured before the proxy recipe moved to the `model_output` head (LoRA on pooler.dense too): the model's
    # own head, fully trained, and LoRA on the six encoder Linear kinds.
    overrides = ["--classifier_head", "model", "--lora_layers", "top3", "--cache_frozen_prefix", "true",
                 "--lora_target_modules", *ALL_LINEAR_TARGETS,
                 "--first_token_last_layer", "true", "--attn_implementation", "eager",
                 "--lora_exclude_modules", *[f"layer.3.attention.{name}" for name in
                                             ("self.query", "self.key", "self.value", "output.dense")]]
    assert fast == parse_config(["--config", str(REPO / "recipes" / "proxy-minilm.yaml"), *overrides])
