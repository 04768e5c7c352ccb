"""The weights manifest, cache checks, the fetch path (file:// only) and the offline guard. No network."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import SHARED
from osediff_lab.errors import ConfigError
from osediff_lab.models.perceptual import BACKBONE_FILES
from osediff_lab.weights import MANIFEST, check_entry, expected_path, offline, resolve_names
from osediff_lab.weights.__main__ import main as weights_cli
from osediff_lab.weights.cache import NetworkBlockedError, format_problem
from osediff_lab.weights.fetch import fetch_entry
from osediff_lab.weights.manifest import WeightFile

NIQE_MAT = SHARED / "weights" / "niqe_modelparameters.mat"


def test_manifest_urls_are_the_libraries_own_defaults():
    """A fetched file must be exactly what pyiqa / torchvision / CLIP / timm would have downloaded."""
    import timm
    import torchvision.models as tvm
    from pyiqa.archs import clip_model, dists_arch, maniqa_arch, musiq_arch, niqe_arch
    from pyiqa.archs.inception import FID_WEIGHTS_URL

    assert MANIFEST["dists"].url == dists_arch.default_model_urls["url"]
    assert MANIFEST["niqe"].url == niqe_arch.default_model_urls["niqe"]
    assert MANIFEST["musiq_koniq"].url == musiq_arch.default_model_urls["koniq10k"]
    assert MANIFEST["maniqa_pipal"].url == maniqa_arch.default_model_urls["pipal"]
    assert MANIFEST["fid_inception"].url == FID_WEIGHTS_URL
    assert MANIFEST["clip_rn50"].url == clip_model._MODELS["RN50"]
    assert MANIFEST["clip_rn50"].sha256 == clip_model._MODELS["RN50"].split("/")[-2]
    assert MANIFEST["tv_vgg16"].url == tvm.VGG16_Weights.IMAGENET1K_V1.url
    assert MANIFEST["tv_alexnet"].url == tvm.AlexNet_Weights.IMAGENET1K_V1.url
    assert MANIFEST["vit_b8_maniqa"].hf_repo == timm.models.get_pretrained_cfg("vit_base_patch8_224").hf_hub_id
    # models/perceptual.py looks for the same torchvision file names under <weights>/torch_hub/checkpoints
    for net, file in BACKBONE_FILES.items():
        assert any(e.path.endswith(f"checkpoints/{file}") for e in MANIFEST.values()), net


def test_bundled_lpips_linear_layers_are_present(tmp_path):
    for name in ("lpips_linear_alex", "lpips_linear_vgg", "lpips_linear_squeeze"):
        status = check_entry(MANIFEST[name], tmp_path)
        assert status.state == "present", status


def test_groups_expand_and_unknown_names_fail():
    assert {e.name for e in resolve_names(["lpips_vgg"])} == {"tv_vgg16", "lpips_linear_vgg"}
    assert "niqe" in {e.name for e in resolve_names(["metrics"])}
    assert len(resolve_names(None)) == len(MANIFEST)
    with pytest.raises(ConfigError, match="nope"):
        resolve_names(["nope"])


def test_check_cli_reports_missing_then_present(tmp_path, capsys, monkeypatch):
    if not NIQE_MAT.is_file():
        pytest.skip(f"{NIQE_MAT} not found (../shared is absent in a fresh clone)")
    monkeypatch.setenv("OSEDIFF_WEIGHTS_SHARED", "")  # the cache alone
    assert weights_cli(["--weights-dir", str(tmp_path), "check", "niqe", "fid"]) == 1
    out = capsys.readouterr().out
    assert "missing" in out and "niqe" in out and "present" not in out
    dest = expected_path(MANIFEST["niqe"], tmp_path)
    dest.parent.mkdir(parents=True)
    shutil.copy(NIQE_MAT, dest)
    assert weights_cli(["--weights-dir", str(tmp_path), "check", "niqe"]) == 0
    assert "present" in capsys.readouterr().out


def test_corrupt_files_are_detected(tmp_path):
    # truncated PyTorch zip checkpoint
    good = tmp_path / "good.pth"
    torch.save({"w": torch.arange(1000.0)}, good)
    assert format_problem(good) is None
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:200])
    assert "truncated" in format_problem(cut)
    # safetensors whose data is shorter than its header promises
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    st = tmp_path / "x.safetensors"
    st.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    assert "expects" in format_problem(st)
    # a torchvision file whose sha256 does not start with the prefix in its name
    entry = MANIFEST["tv_alexnet"]
    dest = expected_path(entry, tmp_path)
    dest.parent.mkdir(parents=True)
    shutil.copy(good, dest)
    status = check_entry(entry, tmp_path)
    assert status.state == "corrupt" and "sha256" in status.detail
    assert check_entry(entry, tmp_path, verify_hash=False).state == "present"


def test_fetch_from_file_url_verifies_and_installs(tmp_path):
    src = tmp_path / "src" / "blob.pth"
    src.parent.mkdir()
    torch.save({"a": torch.ones(3)}, src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    entry = WeightFile("blob", "test file", "x/blob.pth", src.as_uri(), sha256=digest)
    assert "fetched" in fetch_entry(entry, cache)
    assert (cache / "x" / "blob.pth").read_bytes() == src.read_bytes()
    assert "already present" in fetch_entry(entry, cache)

    bad = WeightFile("bad", "wrong digest", "y/blob.pth", src.as_uri(), sha256="0" * 64)
    with pytest.raises(OSError, match="does not match"):
        fetch_entry(bad, cache)
    assert not (cache / "y").exists() or not any((cache / "y").iterdir())  # nothing half-written left behind


def test_gated_releases_get_the_token_and_a_401_names_the_licence_and_the_fix(tmp_path, monkeypatch):
    import urllib.error

    from osediff_lab.weights.fetch import hub_request

    monkeypatch.setenv("HF_TOKEN", "hf_abc")
    assert hub_request("https://huggingface.co/stabilityai/sd-turbo/resolve/main/x").get_header("Authorization") == "Bearer hf_abc"
    assert hub_request("https://download.pytorch.org/models/x.pth").get_header("Authorization") is None  # never elsewhere
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert hub_request("https://huggingface.co/x").get_header("Authorization") is None

    def gated(url: str, dest: Path) -> None:
        raise urllib.error.HTTPError(url, 401, "Unauthorized", {}, None)

    entry = MANIFEST["sd3_transformer"]
    with pytest.raises(OSError, match=r"401 .*gated \(Stability AI Community License.*set HF_TOKEN"):
        fetch_entry(entry, tmp_path, download=gated)
    assert not any(tmp_path.rglob("*.part"))


def test_fetch_cli_uses_the_downloader(tmp_path, monkeypatch):
    if not NIQE_MAT.is_file():
        pytest.skip(f"{NIQE_MAT} not found (../shared is absent in a fresh clone)")
    monkeypatch.setenv("OSEDIFF_WEIGHTS_SHARED", "")  # the cache alone
    seen = []

    def fake_network(url: str, dest: Path) -> None:
        seen.append(url)
        shutil.copy(NIQE_MAT, dest)

    monkeypatch.setattr("osediff_lab.weights.fetch.download_url", fake_network)
    assert weights_cli(["--weights-dir", str(tmp_path), "fetch", "niqe"]) == 0
    assert seen == [MANIFEST["niqe"].url]
    assert check_entry(MANIFEST["niqe"], tmp_path).state == "present"


def test_offline_points_libraries_at_cache_and_blocks_network(tmp_path):
    import pyiqa.utils.download_util as pyiqa_download

    before = torch.hub.get_dir()
    with offline(tmp_path):
        assert torch.hub.get_dir() == str(tmp_path / "torch_hub")
        assert str(tmp_path / "torch_hub" / "pyiqa") == pyiqa_download.DEFAULT_CACHE_DIR
        with pytest.raises(NetworkBlockedError):
            socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET address: never routed
    assert torch.hub.get_dir() == before


def test_zip_check_accepts_real_zip(tmp_path):
    z = tmp_path / "m.pt"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("a", "b")
    assert format_problem(z) is None


def test_configs_name_the_manifest_paths(tmp_path):
    """One path per file: what `weights check` and `fetch` use is what the prompt configs read."""
    from helpers import compose_config

    for prompt, key, entry in (("dape", "ram_path", "ram_swin_large"), ("dape", "dape_path", "dape"), ("llava", "model_dir", "llava15_7b")):
        cfg = compose_config([f"prompt={prompt}", f"paths.weights_dir={tmp_path}"])
        assert Path(cfg.prompt[key]) == expected_path(MANIFEST[entry], tmp_path), (prompt, key)


def test_llava_snapshot_directory_is_found_where_the_config_points(tmp_path):
    snap = expected_path(MANIFEST["llava15_7b"], tmp_path)
    assert check_entry(MANIFEST["llava15_7b"], tmp_path).state == "missing"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model-00001-of-00001.safetensors").write_bytes(b"")
    status = check_entry(MANIFEST["llava15_7b"], tmp_path)
    assert status.state == "present" and status.path == snap


def test_a_shared_copy_is_found_and_used_only_where_its_path_is_handed_over(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from osediff_lab.metrics import availability, metric_defs

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "niqe_modelparameters.mat").write_bytes(b"MATLAB 5.0 MAT-file")
    (shared / "MANIQA_PIPAL-ae6d356b.pth").write_bytes(b"\x80 pickle")
    monkeypatch.setenv("OSEDIFF_WEIGHTS_SHARED", str(shared))
    cache = tmp_path / "cache"
    status = check_entry(MANIFEST["niqe"], cache)
    assert status.state == "present" and status.path == shared / "niqe_modelparameters.mat"
    defs = metric_defs(OmegaConf.load(Path(__file__).parents[1] / "conf" / "metric_defs" / "paper.yaml"), ["niqe", "maniqa"])
    ok, missing = availability(defs, cache)
    assert [d.name for d in ok] == ["niqe"]  # its path is handed to pyiqa (model_file)
    (maniqa,) = missing  # pyiqa finds MANIQA's file in the cache by itself: the shared copy cannot be used
    assert any(p.state == "outside the cache" and "copy it there" in p.detail for p in maniqa.problems)


def test_the_shared_niqe_file_is_picked_up_by_default(tmp_path, monkeypatch):
    if not NIQE_MAT.is_file():
        pytest.skip(f"{NIQE_MAT} not found (../shared is absent in a fresh clone)")
    monkeypatch.delenv("OSEDIFF_WEIGHTS_SHARED", raising=False)
    status = check_entry(MANIFEST["niqe"], tmp_path)
    assert status.state == "present" and status.path.resolve() == NIQE_MAT.resolve()
