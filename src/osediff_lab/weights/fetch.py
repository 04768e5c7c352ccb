"""Downloading manifest entries into the cache: the ONLY code path in the project that reaches the network."""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from osediff_lab.weights.cache import check_entry, expected_path, sha256_of
from osediff_lab.weights.manifest import HF_HUB, WeightFile

Downloader = Callable[[str, Path], None]


TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # what huggingface_hub reads, in its order


def hub_request(url: str) -> urllib.request.Request:
    """A request for ``url``, carrying the Hugging Face token (``HF_TOKEN``) to huggingface.co only: gated
    releases (SD-Turbo, SD3) answer 401 without the token of an account that accepted their licence."""
    token = next((os.environ[v] for v in TOKEN_VARIABLES if os.environ.get(v)), None)
    if token and urllib.parse.urlparse(url).hostname == "huggingface.co":
        return urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    return urllib.request.Request(url)


def download_url(url: str, dest: Path, chunk: int = 1 << 20) -> None:
    """Stream ``url`` (http(s) or file://) to ``dest`` with a progress bar."""
    with urllib.request.urlopen(hub_request(url)) as src, open(dest, "wb") as out:
        total = int(src.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name) as bar:
            while block := src.read(chunk):
                out.write(block)
                bar.update(len(block))


def fetch_entry(entry: WeightFile, cache: str | Path, download: Downloader | None = None) -> str:
    """Put one entry into the cache (skipping a good copy); returns what happened. Verifies known digests.

    ``download(url, dest)`` defaults to ``download_url`` (looked up at call time, so tests can replace it).
    """
    cache = Path(cache).expanduser()
    status = check_entry(entry, cache)
    if status.state == "present":
        return f"{entry.name}: already present ({status.path})"
    if entry.package:
        return f"{entry.name}: ships inside the pip package '{entry.package}'; reinstall it (pip install --force-reinstall {entry.package})"
    if entry.hf_repo:
        from huggingface_hub import hf_hub_download, snapshot_download

        if entry.path:  # its own directory of the cache, the path the configs name
            path = snapshot_download(entry.hf_repo, local_dir=str(expected_path(entry, cache)))
        elif entry.hf_file:
            path = hf_hub_download(entry.hf_repo, entry.hf_file, cache_dir=str(cache / HF_HUB))
        else:
            path = snapshot_download(entry.hf_repo, cache_dir=str(cache / HF_HUB))
        return f"{entry.name}: fetched into {path}"
    if not entry.url:
        return f"{entry.name}: no direct download; {entry.manual}"
    dest = expected_path(entry, cache)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        try:
            (download or download_url)(entry.url, part)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403) and entry.licence:
                raise OSError(f"{entry.name}: {exc.code} from {entry.url}: the release is gated ({entry.licence}). "
                              "Accept the licence with your Hugging Face account, then set HF_TOKEN to a token of "
                              "that account and fetch again") from exc
            raise
        want = entry.sha256 or entry.sha256_prefix
        if want:
            digest = sha256_of(part)
            if not digest.startswith(want):
                raise OSError(f"{entry.name}: downloaded file's sha256 {digest} does not match {want}; not installed")
        os.replace(part, dest)
    finally:
        if part.exists():
            part.unlink()
    after = check_entry(entry, cache)
    if after.state != "present":
        raise OSError(f"{entry.name}: downloaded to {dest} but it is {after.state}: {after.detail}")
    return f"{entry.name}: fetched {dest}" + (f" (licence: {entry.licence})" if entry.licence else "")
