"""Training sources, robust image loading with real files written here, paired benchmarks and val configs."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from helpers import REALSR, compose_config
from osediff_lab.checks import config_problems
from osediff_lab.data.datamodule import HQDataModule, paired_dataset, resolve_dir, source_files
from osediff_lab.data.datasets import HQCropDataset
from osediff_lab.data.images import UnreadableImage, load_rgb
from osediff_lab.data.paired import match_pairs
from osediff_lab.errors import ConfigError
from osediff_lab.paths import CONF_DIR


def write_png16_rgb(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write this mode)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def rgb_array(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- loading edge cases --------------------------------------------------------------------------
def test_grayscale_rgba_palette_and_la_become_rgb(tmp_path):
    rgb = rgb_array()
    gray = rgb[..., 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "pal.png")
    Image.fromarray(np.dstack([gray, gray])).save(tmp_path / "la.png")

    out = np.asarray(load_rgb(tmp_path / "gray.png"))
    assert out.shape == (40, 48, 3) and all((out[..., c] == gray).all() for c in range(3))
    assert (np.asarray(load_rgb(tmp_path / "rgba.png")) == rgb).all()  # alpha dropped, colours kept
    expected_pal = np.asarray(pal.convert("RGB"))
    assert (np.asarray(load_rgb(tmp_path / "pal.png")) == expected_pal).all()
    assert (np.asarray(load_rgb(tmp_path / "la.png"))[..., 1] == gray).all()


def test_16bit_grayscale_png_scales_full_range_to_8bit(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 257 * k maps exactly to k
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(load_rgb(tmp_path / "g16.png"))[..., 0]
    assert out.tolist() == [[0, 1, 128, 255]]
    dark = np.array([[0, 100, 200, 250]], dtype=np.uint16)  # a dark 16-bit image stays dark (no 8-bit guess)
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert np.asarray(load_rgb(tmp_path / "dark16.png")).max() <= 1


def test_16bit_rgb_png_keeps_the_high_byte(tmp_path):
    rgb8 = rgb_array(8, 8)
    write_png16_rgb(tmp_path / "rgb16.png", rgb8.astype(np.uint16) * 257)
    out = np.asarray(load_rgb(tmp_path / "rgb16.png")).astype(int)
    assert out.shape == (8, 8, 3)
    assert np.abs(out - rgb8).max() <= 1


def test_cmyk_jpeg_decodes_to_rgb(tmp_path):
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # pure red ink
    out = np.asarray(load_rgb(tmp_path / "cmyk.jpg")).astype(int)
    assert np.abs(out - np.array([255, 0, 0])).max() <= 8


def test_truncated_and_garbage_files_raise_with_the_path(tmp_path):
    Image.fromarray(rgb_array(64, 64)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(rgb_array(64, 64)).save(tmp_path / "full.png")
    png = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    for name in ("cut.jpg", "cut.png", "junk.png", "gone.png"):
        with pytest.raises(UnreadableImage, match=name):
            load_rgb(tmp_path / name)


def make_folder(root: Path, n: int = 3, size: int = 40) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        p = root / f"{i:05d}.png"
        Image.fromarray(rgb_array(size, size + 8, seed=i)).save(p)
        files.append(p)
    return files


def test_dataset_skips_and_counts_bad_files_and_logs_them(tmp_path, caplog):
    good = make_folder(tmp_path, 2)
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 garbage")
    files = [*good, tmp_path / "junk.jpg", tmp_path / "missing.png"]
    caplog.set_level(logging.INFO, logger="osediff_lab.data.datasets")
    ds = HQCropDataset(files, 32, small_image_policy="error")
    assert len(ds) == 2 and len(ds.skipped) == 2
    assert "2 of 4 file(s) unreadable" in caplog.text and "junk.jpg" in caplog.text
    item = ds[0]
    assert item["hq"].shape == (3, 32, 32) and item["hq"].min() >= -1 and item["hq"].max() <= 1


def test_file_that_disappears_mid_epoch_is_skipped_and_counted(tmp_path, caplog):
    files = make_folder(tmp_path, 3)
    ds = HQCropDataset(files, 32)
    files[1].unlink()
    caplog.set_level(logging.WARNING, logger="osediff_lab.data.datasets")
    item = ds[1]
    assert item["path"] == str(files[2])
    assert ds.skipped == [str(files[1])] and "00001.png" in caplog.text
    assert ds[1]["path"] == str(files[2]) and len(ds.skipped) == 1  # remembered, not retried


def test_small_image_policies_are_counted(tmp_path, caplog):
    files = make_folder(tmp_path / "big", 2, 40) + make_folder(tmp_path / "small", 1, 16)
    caplog.set_level(logging.INFO, logger="osediff_lab.data.datasets")
    skip = HQCropDataset(files, 32, small_image_policy="skip")
    assert len(skip) == 2 and len(skip.small) == 1
    assert "1 image(s) smaller than the crop: policy 'skip'" in caplog.text
    up = HQCropDataset(files, 32, small_image_policy="upscale")
    assert len(up) == 3 and up[2]["hq"].shape == (3, 32, 32)
    with pytest.raises(ConfigError, match="small_image_policy"):
        HQCropDataset(files, 32, small_image_policy="error")


def test_repeated_listing_reads_each_header_once_and_keeps_every_entry(tmp_path, monkeypatch):
    import osediff_lab.data.datasets as datasets

    files = make_folder(tmp_path / "big", 2, 40) + make_folder(tmp_path / "small", 1, 16)
    listed = [files[0], files[2], files[0], files[1], files[0], files[2]]
    reads: list[Path] = []
    real = datasets.image_size
    monkeypatch.setattr(datasets, "image_size", lambda f: reads.append(Path(f)) or real(f))
    ds = HQCropDataset(listed, 32, small_image_policy="skip")
    assert sorted(reads) == sorted(files)  # three distinct files, three header reads
    assert ds.files == [files[0], files[0], files[1], files[0]]  # listing order and repeats kept
    assert ds.small == [str(files[2])]


# ---- sources -------------------------------------------------------------------------------------
def data_cfg(**kw):
    return OmegaConf.create(kw)


def test_ffhq_takes_the_first_n_by_name(tmp_path):
    files = make_folder(tmp_path / "ffhq", 5)
    cfg = data_cfg(name="ffhq", _target_="osediff_lab.data.sources.FFHQImages", root=str(tmp_path / "ffhq"), root_env="OSEDIFF_FFHQ", first_n=3)
    assert source_files(cfg) == files[:3]


def test_mix_repeats_each_source(tmp_path):
    a, b = make_folder(tmp_path / "a", 2), make_folder(tmp_path / "b", 3)
    cfg = data_cfg(
        name="mix",
        _target_="osediff_lab.data.sources.MixedSources",
        sources={
            "lsdir": {"_target_": "osediff_lab.data.sources.FolderImages", "root": str(tmp_path / "a"), "repeat": 3},
            "ffhq": {"_target_": "osediff_lab.data.sources.FFHQImages", "root": str(tmp_path / "b"), "first_n": 2, "repeat": 1},
        },
    )
    files = source_files(cfg)
    assert sorted(files) == sorted(a * 3 + b[:2])


def test_txt_list_paths_and_repeats(tmp_path):
    files = make_folder(tmp_path / "imgs", 3)
    (tmp_path / "one.txt").write_text(f"# comment\nimgs/00000.png\n\n{files[1]}\n")
    (tmp_path / "two.txt").write_text("imgs/00002.png\n")
    cfg = data_cfg(_target_="osediff_lab.data.sources.TxtListImages", lists=[{"path": str(tmp_path / "one.txt"), "repeat": 1}, {"path": str(tmp_path / "two.txt"), "repeat": 2}])
    assert source_files(cfg) == [files[0], files[1], files[2], files[2]]
    bad = data_cfg(_target_="osediff_lab.data.sources.TxtListImages", lists=[{"path": str(tmp_path / "nope.txt")}])
    with pytest.raises(ConfigError, match=r"data.lists\[0\].path=.*nope.txt"):
        source_files(bad)


def test_missing_roots_are_named_by_key(tmp_path, monkeypatch):
    for env in ("OSEDIFF_LSDIR", "OSEDIFF_FFHQ", "OSEDIFF_DIV2K"):
        monkeypatch.delenv(env, raising=False)
    mix = " ".join(config_problems(compose_config(["data=lsdir_ffhq", "loss.lpips.pretrained=false"], tmp_path)))
    assert "data.sources.lsdir.root" in mix and "OSEDIFF_LSDIR" in mix
    assert "data.sources.ffhq.root" in mix and "OSEDIFF_FFHQ" in mix
    for name, env in (("div2k", "OSEDIFF_DIV2K"), ("ffhq", "OSEDIFF_FFHQ")):
        text = " ".join(config_problems(compose_config([f"data={name}", "loss.lpips.pretrained=false"], tmp_path)))
        assert "data.root" in text and env in text
    text = " ".join(config_problems(compose_config(["data=txt_list", "loss.lpips.pretrained=false"], tmp_path)))
    assert "data.lists" in text
    make_folder(tmp_path / "ff", 2)
    monkeypatch.setenv("OSEDIFF_FFHQ", str(tmp_path / "ff"))
    ok = compose_config(["data=ffhq", "loss.lpips.pretrained=false"], tmp_path)
    assert not [p for p in config_problems(ok) if "data" in p]


def folder_cfg(root: Path, **kw):
    base = dict(name="folder", _target_="osediff_lab.data.sources.FolderImages", root=str(root), crop_size=32, flip=True, small_image_policy="error",
                batch_size=2, num_workers=0, pin_memory=True, prefetch_factor=2)
    return data_cfg(**(base | kw))


def test_datamodule_seeded_order_and_crops_ignore_the_global_rng(tmp_path):
    make_folder(tmp_path / "imgs", 6)
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # only the datamodule's seed may matter
        dm = HQDataModule(folder_cfg(tmp_path / "imgs"), seed=11)
        dm.setup("fit")
        runs.append([(p, hq) for batch in dm.train_dataloader() for p, hq in zip(batch["path"], batch["hq"], strict=True)])
    assert [p for p, _ in runs[0]] == [p for p, _ in runs[1]] and len(runs[0]) == 6
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(runs[0], runs[1], strict=True))
    ds = dm.train_set
    n = len(ds)
    assert ds[3]["path"] == ds[3 + n]["path"]  # a global sample id of the next epoch: same file ...
    assert not torch.equal(ds[3]["hq"], ds[3 + n]["hq"])  # ... its own crop


def test_resumed_sampler_continues_the_epoch(tmp_path):
    make_folder(tmp_path / "imgs", 6)
    full = HQDataModule(folder_cfg(tmp_path / "imgs"), seed=3)
    full.setup()
    order = [p for batch in full.train_dataloader() for p in batch["path"]]
    resumed = HQDataModule(folder_cfg(tmp_path / "imgs"), seed=3)
    resumed.setup()
    loader = resumed.train_dataloader()
    resumed.sampler.skip_next(2)
    assert [p for batch in loader for p in batch["path"]] == order[2:]


def test_datamodule_loader_settings(tmp_path):
    make_folder(tmp_path / "imgs", 4)
    dm = HQDataModule(folder_cfg(tmp_path / "imgs", num_workers=2))
    dm.setup()
    dl = dm.train_dataloader()
    assert dl.persistent_workers and dl.num_workers == 2 and dl.prefetch_factor == 2 and dl.drop_last
    assert dl.pin_memory == torch.cuda.is_available()


# ---- paired benchmarks ---------------------------------------------------------------------------
def test_val_configs_compose_with_the_keys_consumers_need():
    for path in sorted((CONF_DIR / "val").glob("*.yaml")):
        cfg = compose_config([f"val={path.stem}"])
        for key in ("name", "lr_dir", "hr_dir", "limit", "every_n_steps", "metrics"):
            assert key in cfg.val, (path.stem, key)
    assert list(compose_config(["val=realsr"]).val.metrics) == ["psnr", "ssim"]


def test_realsr_layout_from_the_default_config(realsr):
    cfg = compose_config(["val=realsr", "val.limit=3"])
    assert resolve_dir(cfg.val.lr_dir).resolve() == (REALSR / "LR").resolve()
    ds = paired_dataset(cfg.val, cfg.scale)
    assert len(ds) == 3
    item = ds[0]
    assert item["lq"].shape[-2:] == (128, 128) and item["hq"].shape[-2:] == (512, 512)
    assert len(match_pairs(realsr / "LR", realsr / "HR", 4)) == 100


def test_missing_partner_and_wrong_size_name_the_file(tmp_path, realsr):
    lr, hr = tmp_path / "LR", tmp_path / "HR"
    lr.mkdir()
    hr.mkdir()
    names = sorted(p.name for p in (realsr / "LR").iterdir())[:2]
    for n in names:
        Image.open(realsr / "LR" / n).save(lr / n)
        Image.open(realsr / "HR" / n).save(hr / n)
    assert len(match_pairs(lr, hr, 4)) == 2
    (hr / names[1]).unlink()
    with pytest.raises(ConfigError, match=f"{names[1]} has no HR partner"):
        match_pairs(lr, hr, 4)
    Image.open(realsr / "HR" / names[1]).resize((500, 512)).save(hr / names[1])
    with pytest.raises(ConfigError, match=f"{names[1]}.*500x512"):
        match_pairs(lr, hr, 4)


def test_paired_errors_on_tmp_dirs(tmp_path):
    lr, hr = tmp_path / "LR", tmp_path / "HR"
    lr.mkdir()
    hr.mkdir()
    Image.fromarray(rgb_array(8, 8)).save(lr / "a.png")
    Image.fromarray(rgb_array(32, 32)).save(hr / "a.png")
    Image.fromarray(rgb_array(32, 32)).save(hr / "b.png")
    with pytest.raises(ConfigError, match="b.png has no LR partner"):
        match_pairs(lr, hr, 4)
    cfg = compose_config(["val=realsr", f"val.lr_dir={tmp_path / 'nope'}"])
    assert any("val.lr_dir" in p and "nope" in p for p in config_problems(cfg))
