"""Run tracking: every logged event goes to `<output_dir>/metrics.jsonl` and, when enabled, to W&B via Accelerate."""

from __future__ import annotations

import json
import netrc
import os
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from peft_agnews.config import TrainConfig

WANDB_HOST = "api.wandb.ai"


def wandb_key_configured() -> bool:
    """True when W&B has credentials (env or ~/.netrc). Only presence is checked; the key is never read out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> str:
    """WANDB_MODE when set; else online with a key, offline without (an unauthenticated online run hangs ~100 s)."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_key_configured() else "offline")


def tracker_name(cfg: TrainConfig) -> str | None:
    """The Accelerate `log_with` value for this config."""
    return "wandb" if cfg.report_to == "wandb" else None


class RunLogger:
    """Writes events to metrics.jsonl (main process only) and forwards them to the Accelerate trackers."""

    def __init__(self, accelerator: Accelerator, output_dir: Path) -> None:
        self.accelerator = accelerator
        self.path = output_dir / "metrics.jsonl"

    def start(self, cfg: TrainConfig, extra_config: dict[str, Any]) -> None:
        """Open the tracker run (if any) with the full resolved config, and start a fresh metrics file."""
        if self.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        if cfg.report_to == "wandb":
            init = {"mode": wandb_mode(), "dir": str(Path(cfg.output_dir).resolve())}
            if cfg.run_name:
                init["name"] = cfg.run_name
            self.accelerator.init_trackers(
                cfg.wandb_project, config={**cfg.to_dict(), **extra_config}, init_kwargs={"wandb": init}
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.accelerator.log(metrics, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def finish(self) -> None:
        self.accelerator.end_training()
