"""The Hugging Face Hub for adapters: ``LoRA2Model.push_to_hub`` uploads what ``save_pretrained`` writes (the
adapter alone, never the base model), and ``from_pretrained`` accepts a Hub repo id where a directory is missing.
Offline (``HF_HUB_OFFLINE``) or unreachable, both fail with a message that names the way out.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import CONFIG_NAME
from .persistence import WEIGHTS_NAME

if TYPE_CHECKING:
    from .model import LoRA2Model

# what huggingface_hub accepts as a repo id: a name or namespace/name of letters, digits, '-', '_', '.'
REPO_ID = re.compile(r"^(?!\.)[\w.-]{1,96}(/(?!\.)[\w.-]{1,96})?$")


def hub_offline(*also: str) -> bool:
    """Whether HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE (or one of ``also``, e.g. HF_DATASETS_OFFLINE) is set."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *also)
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in names)


def looks_like_repo_id(name: str) -> bool:
    return bool(REPO_ID.match(name)) and not name.startswith(("~", "/"))


def resolve_adapter_directory(name_or_path: str | Path, revision: str | None = None, token: str | bool | None = None,
                              ) -> Path:
    """A local directory as given; a name that is not one but reads as a Hub repo id: the adapter's two files
    downloaded (or found in the local cache when offline)."""
    path = Path(name_or_path)
    if path.exists() or not looks_like_repo_id(str(name_or_path)):
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, token=token,
                                      allow_patterns=[CONFIG_NAME, WEIGHTS_NAME], local_files_only=hub_offline()))
    except Exception as err:  # offline and not cached, no such repo, no access, no network
        why = ("the Hub is off (HF_HUB_OFFLINE is set) and it is not in the local cache" if hub_offline()
               else f"downloading it from the Hugging Face Hub failed ({type(err).__name__}: {err})")
        raise FileNotFoundError(
            f"No adapter directory {str(name_or_path)!r} here, and as a Hub repo id {why}. Pass the directory "
            "LoRA2Model.save_pretrained wrote, or a repo id you can read (log in with `hf auth login`, or pass "
            "token=...)."
        ) from err


def push_adapter(model: LoRA2Model, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                 commit_message: str | None = None, revision: str | None = None, create_pr: bool = False) -> Any:
    """Save the adapter into a temporary directory and upload that directory to ``repo_id`` (created if missing).
    Returns huggingface_hub's commit info."""
    if not isinstance(repo_id, str) or not looks_like_repo_id(repo_id):
        raise ValueError(f"push_to_hub needs a Hub repo id such as 'user/my-lora2-adapter', got {repo_id!r}.")
    if hub_offline():
        raise RuntimeError(f"push_to_hub({repo_id!r}): the Hub is off (HF_HUB_OFFLINE is set). Save the adapter with "
                           "save_pretrained(directory) and upload that directory when online (`hf upload`).")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="lora2-push-") as tmp:
        model.save_pretrained(tmp)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or "Upload LoRA² adapter")
