"""Which trackers a run reports to, and each one's settings, from `--report_to`, `--wandb_mode` and the trackers'
own environment variables (read as W&B, TensorBoard, MLflow and the HF Trainer document them).

`--report_to` takes the Trainer's values: `wandb`, `tensorboard`, `mlflow`, `all` (those installed) or `none`.
Accelerate runs them (`Accelerator(log_with=...)`); `tracking.RunLogger` logs to them.

- W&B: mode from `--wandb_mode`, else `WANDB_MODE`, else online with an API key and offline without; off with
  `WANDB_DISABLED=true` or mode `disabled`. Files under `WANDB_DIR` when set, else `<output_dir>/wandb`.
  `WANDB_LOG_MODEL`: `false` (default), `end` (the adapter at the end), `checkpoint` (each checkpoint, and the end).
- TensorBoard: event files under `$TENSORBOARD_LOGGING_DIR` when set, else `<output_dir>/runs`, in a folder named
  after the project.
- MLflow: the store `MLFLOW_TRACKING_URI` names, else `sqlite:///<output_dir>/mlflow.db` with artifacts in
  `<output_dir>/mlartifacts` (MLflow 3 refuses its old file store); experiment `MLFLOW_EXPERIMENT_NAME`, else the
  project.
"""

from __future__ import annotations

import configparser
import json
import netrc
import os
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from peft_agnews.config import TrainConfig
from peft_agnews.errors import UsageError

DEFAULT_PROJECT = "peft-agnews"
CLOUD_URL = "https://api.wandb.ai"
# wandb itself still accepts these legacy WANDB_MODE spellings.
MODE_ALIASES = {"dryrun": "offline", "run": "online"}
TRACKERS = ("wandb", "tensorboard", "mlflow")
# The import each tracker needs, and the install that brings it.
TRACKER_MODULES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow"}
# --report_to values of earlier versions (W&B modes): what replaces each.
LEGACY_REPORT_TO = {
    "online": "--report_to wandb --wandb_mode online",
    "offline": "--report_to wandb --wandb_mode offline",
    "disabled": "--report_to none",
}
LOG_MODEL_VALUES = ("false", "end", "checkpoint")
TRUE_VALUES = {"1", "true", "yes", "on", "y", "t"}


def wandb_base_url() -> str:
    """The W&B server: $WANDB_BASE_URL, else the host `wandb login --host` saved in W&B's settings file, else the
    cloud. Read the way wandb reads it, so a self-hosted server's login is found where wandb will look."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    settings = Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser() / "settings"
    parser = configparser.ConfigParser()
    try:
        parser.read(settings)
    except (OSError, configparser.Error):
        return CLOUD_URL
    return parser.get("default", "base_url", fallback=CLOUD_URL)


def wandb_key_configured() -> bool:
    """True when W&B has credentials for its server: WANDB_API_KEY, or a netrc entry ($NETRC, else ~/.netrc) for
    that server's host, as `wandb login [--host]` writes. Only presence is checked; the key is never read out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(wandb_base_url()).netloc
    try:
        return bool(host) and netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(cfg: TrainConfig | None = None) -> str:
    """--wandb_mode (or a legacy `--report_to online|offline`), else WANDB_MODE, else online with a key, offline
    without (an unauthenticated online run hangs ~100 s)."""
    legacy = [v for v in (cfg.report_to if cfg else []) if v in ("online", "offline")]
    chosen = legacy[-1] if legacy else (cfg.wandb_mode if cfg else None)
    return chosen or os.environ.get("WANDB_MODE") or ("online" if wandb_key_configured() else "offline")


def requested_trackers(cfg: TrainConfig) -> list[str]:
    """The trackers `--report_to` names, `all` expanded to those installed and legacy W&B modes read as wandb."""
    names: list[str] = []
    for value in cfg.report_to:
        if value == "all":
            names += [t for t in TRACKERS if find_spec(TRACKER_MODULES[t]) is not None]
        elif value in ("online", "offline"):
            names.append("wandb")
        elif value in TRACKERS:
            names.append(value)
    return list(dict.fromkeys(names))


def resolve_wandb_mode(cfg: TrainConfig) -> str | None:
    """The W&B mode this run uses ('online' or 'offline'), or None when W&B is not reported to or is off
    (`--wandb_mode disabled`, WANDB_MODE=disabled, WANDB_DISABLED=true, legacy `--report_to disabled`)."""
    if "wandb" not in requested_trackers(cfg):
        return None
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in TRUE_VALUES:
        return None
    mode = wandb_mode(cfg)
    mode = MODE_ALIASES.get(mode, mode)
    if mode == "disabled":
        return None
    if mode not in ("online", "offline"):
        raise UsageError(f"WANDB_MODE={mode} is not a W&B mode; use online, offline or disabled")
    if mode == "online" and not wandb_key_configured():
        raise UsageError(
            "W&B online mode needs an API key: set WANDB_API_KEY or run `wandb login`, "
            "or use --wandb_mode offline (and `wandb sync` later)"
        )
    return mode


def resolve_trackers(cfg: TrainConfig) -> list[str]:
    """The Accelerate `log_with` list for this run (W&B left out when its mode is off). A tracker named explicitly
    whose package is missing is an error naming the install."""
    names = [t for t in requested_trackers(cfg) if t != "wandb" or resolve_wandb_mode(cfg)]
    for name in names:
        if find_spec(TRACKER_MODULES[name]) is None:
            raise UsageError(f"--report_to {name} needs the {name} package: pip install 'peft-agnews[trackers]'")
    if "wandb" in names:
        wandb_log_model()  # a bad WANDB_LOG_MODEL fails now, not at the end of training
    return names


def report_to_notes(cfg: TrainConfig) -> list[str]:
    """One line for each legacy `--report_to` value used, saying what replaces it (it keeps working)."""
    return [f"note: --report_to {v} is now written {LEGACY_REPORT_TO[v]} (the old form still works)"
            for v in dict.fromkeys(cfg.report_to) if v in LEGACY_REPORT_TO]


def wandb_log_model() -> str:
    """WANDB_LOG_MODEL as the Trainer reads it: false (default), end, or checkpoint."""
    value = os.environ.get("WANDB_LOG_MODEL", "false").strip().lower() or "false"
    if value not in LOG_MODEL_VALUES:
        raise UsageError(f"WANDB_LOG_MODEL={value} is not one of {', '.join(LOG_MODEL_VALUES)}; unset it or pick one")
    return value


def tensorboard_dir(output_dir: Path) -> Path:
    """Accelerate's logging_dir: $TENSORBOARD_LOGGING_DIR (the Trainer's variable), else <output_dir>/runs."""
    env = os.environ.get("TENSORBOARD_LOGGING_DIR")
    return Path(env).expanduser() if env else output_dir / "runs"


def mlflow_store(output_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment): MLFLOW_TRACKING_URI with MLflow's own choice of
    artifact store, else a SQLite store and an artifact folder inside the run folder."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], None
    folder = output_dir.resolve()
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "mlartifacts").as_uri()


def tracker_init_kwargs(cfg: TrainConfig, output_dir: Path, run_ids: dict[str, str], resume_step: int | None) -> dict:
    """Accelerate's `init_kwargs` for each tracker: the W&B run (or the one `run_ids` resumes), TensorBoard's purge
    of events logged after the checkpoint, the MLflow run."""
    wandb: dict[str, Any] = {"mode": resolve_wandb_mode(cfg)}
    # WANDB_DIR when set, else the run folder. Passed as `dir=` either way: W&B reads WANDB_DIR only when its
    # process-wide settings are first made, so a later run in the same process (a notebook) would miss a change.
    wandb["dir"] = str(Path(os.environ.get("WANDB_DIR") or output_dir).resolve())
    # The flags win; unset, W&B's own environment variables apply (Accelerate always passes a project).
    optional = {"entity": cfg.wandb_entity or os.environ.get("WANDB_ENTITY"), "group": cfg.wandb_group,
                "name": cfg.run_name, "id": run_ids.get("wandb")}
    wandb.update({k: v for k, v in optional.items() if v})
    if cfg.wandb_tags:
        wandb["tags"] = list(cfg.wandb_tags)
    if run_ids.get("wandb"):
        wandb["resume"] = "allow"
    tensorboard = {} if resume_step is None else {"purge_step": resume_step + 1}
    mlflow = {"run_name": cfg.run_name, "run_id": run_ids.get("mlflow"), "logging_dir": mlflow_store(output_dir)[1]}
    return {"wandb": wandb, "tensorboard": tensorboard, "mlflow": {k: v for k, v in mlflow.items() if v}}


def project_name(cfg: TrainConfig) -> str:
    """--wandb_project, else $WANDB_PROJECT, else peft-agnews: W&B's project, TensorBoard's folder, MLflow's
    default experiment."""
    return cfg.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested run config as the flat scalar parameters TensorBoard's hparams and MLflow's params hold:
    `{"plan": {"total_steps": 12}}` -> `{"plan.total_steps": 12}`; lists and null as JSON text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat
