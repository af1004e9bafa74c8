"""loop_state: the parent-death signal asked for exactly when a launcher started the process (`hardware`'s one
launcher test). Resume, stop signals and the non-finite guard run end to end in test_checkpointing.py."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from peft_agnews import loop_state


@pytest.mark.parametrize("launched", [False, True])
def test_the_parent_death_signal_is_asked_for_under_a_launcher_only(monkeypatch, launched):
    calls = []
    monkeypatch.setattr(loop_state, "under_launcher", lambda: launched)
    monkeypatch.setattr(loop_state.sys, "platform", "linux")
    monkeypatch.setattr(loop_state.ctypes, "CDLL", lambda *a, **k: SimpleNamespace(prctl=lambda *args: calls.append(args)))
    loop_state.stop_when_launcher_dies()
    assert calls == ([(loop_state.PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)] if launched else [])
