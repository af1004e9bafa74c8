"""The suite's deprecation rule (pyproject.toml's filterwarnings + conftest.py): a deprecated call made by our code
fails the test that makes it, even when the library warns without a stacklevel; the same call made by a library
only warns."""

from __future__ import annotations

import warnings

import pytest

from conftest import REPO


def probe(source: str, filename: str, module: str) -> dict:
    """`source` compiled as if it were the file `filename` of module `module` (where a warning is attributed)."""
    namespace = {"__name__": module, "warnings": warnings}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 (test code)
    return namespace


CALLS_DEPRECATED_API = "def enable(model):\n    model.gradient_checkpointing_enable()\n"


@pytest.fixture
def tiny_model():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, num_labels=4)
    return RobertaForSequenceClassification(config)


def test_a_deprecated_call_from_the_package_fails_even_when_the_library_gives_no_stacklevel(tiny_model):
    """transformers' `gradient_checkpointing_enable` warns with no stacklevel (attributed to transformers itself)."""
    ours = probe(CALLS_DEPRECATED_API, str(REPO / "peft_agnews" / "probe.py"), "peft_agnews.probe")
    with pytest.raises(FutureWarning, match="`gradient_checkpointing_enable` is deprecated"):
        ours["enable"](tiny_model)


def test_the_same_call_from_a_library_only_warns(tiny_model):
    library = probe(CALLS_DEPRECATED_API, "/site-packages/somelib/models.py", "somelib.models")
    with pytest.warns(FutureWarning, match="`gradient_checkpointing_enable` is deprecated"):
        library["enable"](tiny_model)


@pytest.mark.parametrize("category", [DeprecationWarning, PendingDeprecationWarning, FutureWarning])
def test_deprecations_attributed_to_our_modules_are_errors(category):
    """pyproject.toml's filters: a warning attributed to a peft_agnews module (here by its __name__ alone, from a
    file outside the repo) is raised; other warnings stay warnings."""
    ours = probe("def old():\n    warnings.warn('old', CATEGORY)\n".replace("CATEGORY", category.__name__),
                 "/elsewhere/probe.py", "peft_agnews.probe")
    with pytest.raises(category, match="old"):
        ours["old"]()
    with pytest.warns(UserWarning):
        probe("warnings.warn('just a warning')\n", "/elsewhere/probe.py", "peft_agnews.probe")


def test_peft_s_own_deprecated_call_is_quiet_but_ours_would_fail(tiny_model):
    """pyproject.toml ignores `is_gradient_checkpointing`'s warning, which PEFT triggers once per model it wraps;
    the same property read by our code still fails."""
    from peft import LoraConfig, TaskType, get_peft_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(tiny_model, LoraConfig(task_type=TaskType.SEQ_CLS, target_modules=["query"]))
    assert any("is_gradient_checkpointing" in str(w.message) for w in caught)  # PEFT still makes the call
    ours = probe("def read(model):\n    return model.is_gradient_checkpointing\n",
                 str(REPO / "peft_agnews" / "probe.py"), "peft_agnews.probe")
    with pytest.raises(FutureWarning, match="`is_gradient_checkpointing` is deprecated"):
        ours["read"](tiny_model)
