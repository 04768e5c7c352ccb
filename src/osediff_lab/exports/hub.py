"""``push_to_hub=<repo>``: upload an export folder (files, card, images) with huggingface_hub when a token and the
network are there; otherwise say exactly which command uploads it later."""

from __future__ import annotations

import shlex
from pathlib import Path

from huggingface_hub import HfApi, get_token, is_offline_mode


class HubUnavailable(RuntimeError):
    """The Hub cannot be reached from here (offline mode or no token); the message holds the command to run later."""


def upload_commands(repo: str, folder: Path, private: bool) -> str:
    """The shell command and the Python call that upload ``folder`` to the model repo ``repo``."""
    flag = " --private" if private else ""
    return (f"  hf upload {shlex.quote(repo)} {shlex.quote(str(folder))} . --repo-type model{flag}\n"
            f"or, in Python:\n"
            f"  from huggingface_hub import HfApi\n"
            f"  api = HfApi()\n"
            f"  api.create_repo({repo!r}, repo_type='model', private={private}, exist_ok=True)\n"
            f"  api.upload_folder(repo_id={repo!r}, folder_path={str(folder)!r}, repo_type='model')")


def hub_blocker() -> str | None:
    """Why the Hub cannot be used from here (None when it can): offline mode, or no token."""
    if is_offline_mode():
        return "the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE is set)"
    if get_token() is None:
        return "no Hugging Face token (set HF_TOKEN or run `hf auth login`)"
    return None


def push_folder(folder: Path, repo: str, private: bool = False) -> str:
    """Create the model repo ``repo`` if needed and upload ``folder`` in one commit; returns the commit's URL.
    Raises HubUnavailable, naming the command to run later, when the Hub cannot be used from here."""
    blocker = hub_blocker()
    if blocker is not None:
        raise HubUnavailable(f"push_to_hub={repo}: not uploaded, {blocker}. The export is complete at {folder}; "
                             f"upload it later with\n{upload_commands(repo, folder, private)}")
    api = HfApi()
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                               commit_message="osediff-lab export")
    return str(commit.commit_url)
