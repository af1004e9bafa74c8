"""The Hugging Face Hub: what a model card may name (a base model's Hub id and license) and uploading a folder.

No token is handled here: huggingface_hub resolves it (HF_TOKEN, else the one `hf auth login` saved) and never
prints it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import HfApi, ModelCard

# A Hub repository id: `name` or `owner/name` (letters, digits, `-`, `_`, `.`).
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hub_id(name_or_path: str) -> str | None:
    """The Hub id of a base model, or None: `name_or_path` when it is not a local folder; for a local folder, the
    `_name_or_path` its config.json records when that is a Hub id. A local path is never returned (a card must not
    record one as `base_model`)."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return name_or_path if REPO_ID.fullmatch(name_or_path) else None
    try:
        named = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(named, str) and REPO_ID.fullmatch(named) and not Path(named).expanduser().exists():
        return named
    return None


def base_license(name_or_path: str) -> str | None:
    """The license a base model's card names: its folder's README.md, else its Hub card (from the cache when
    offline); None when neither can be read."""
    card = Path(name_or_path).expanduser() / "README.md"
    repo = hub_id(name_or_path)
    try:
        if card.is_file():
            return ModelCard.load(card).data.license
        return ModelCard.load(repo).data.license if repo else None
    except Exception:  # no network, no cache entry, no card, a card without metadata: the license is unknown
        return None


def push(folder: Path, repo_id: str, private: bool | None = None, commit_message: str = "Upload from peft-agnews") -> str:
    """Create (or reuse) the Hub repository `repo_id` and upload `folder` as one commit; returns its URL."""
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    url = f"https://huggingface.co/{repo_id}"
    print(f"pushed {folder} to {url}")
    return url
