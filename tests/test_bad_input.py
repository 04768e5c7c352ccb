"""Broken and unusual inputs against the one loader, evaluate, infer and the config checks: a bad file is
reported with its name and reason, everything else is processed, and the exit status says so."""

from __future__ import annotations

import csv
import errno
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from helpers import TINY, compose_config
from osediff_lab.checks import validate_config
from osediff_lab.data.images import (
    MAX_PIXELS,
    UnreadableImage,
    image_size,
    list_images,
    load_image01,
    load_rgb,
)
from osediff_lab.errors import ConfigError
from osediff_lab.evaluate import evaluate
from test_evaluate import eval_cfg

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_header_only(path: Path, width: int, height: int) -> None:
    """A valid PNG header that claims ``width`` x ``height`` pixels but holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def with_orientation(arr: np.ndarray, path: Path, value: int, **save) -> None:
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = value
    im.save(path, exif=exif, **save)


@pytest.fixture
def bad_files(tmp_path) -> dict[str, Path]:
    """One file per broken kind, each named after it."""
    d = tmp_path / "bad"
    d.mkdir()
    (d / "zero.png").write_bytes(b"")
    Image.fromarray(noise(32, 32)).save(d / "full.png")
    data = (d / "full.png").read_bytes()
    (d / "truncated_png.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(noise(32, 32)).save(d / "full.jpg", quality=90)
    jpg = (d / "full.jpg").read_bytes()
    (d / "truncated_jpg.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "text.png").write_text("this is a text file named .png")
    png_header_only(d / "bomb.png", 20000, 20000)
    return {p.stem: p for p in d.iterdir() if not p.stem.startswith("full")}


# --- the loader -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("zero", "empty file"),
        ("truncated_png", "truncated"),
        ("truncated_jpg", "truncated"),
        ("text", "not an image"),
        ("bomb", f"more than {MAX_PIXELS:,} pixels"),
    ],
)
def test_loader_refuses_broken_files_with_path_and_reason(bad_files, kind, reason):
    for path in (p for p in bad_files.values() if p.stem == kind):
        for read in (load_rgb, load_image01):
            with pytest.raises(UnreadableImage, match=reason) as info:
                read(path)
            assert info.value.path == str(path) and str(info.value).startswith(str(path))


def test_bomb_is_refused_from_the_header_and_a_vanished_file_is_named(bad_files, tmp_path):
    with pytest.raises(UnreadableImage, match="decompression-bomb guard"):
        image_size(bad_files["bomb"])
    png_header_only(tmp_path / "big.png", 12500, 12500)  # over our limit, under Pillow's own
    with pytest.raises(UnreadableImage, match=f"12500x12500 is more than {MAX_PIXELS:,} pixels"):
        load_rgb(tmp_path / "big.png")
    with pytest.raises(UnreadableImage, match="file not found"):
        load_rgb(tmp_path / "gone.png")


@pytest.mark.parametrize("value", range(1, 9))
def test_every_exif_orientation_is_applied_like_pillow(tmp_path, value):
    arr = noise(5, 7, seed=value)
    with_orientation(arr, tmp_path / "o.png", value)
    want = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")).convert("RGB"))
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "o.png")), want)
    assert image_size(tmp_path / "o.png") == (want.shape[1], want.shape[0])
    assert torch.equal(load_image01(tmp_path / "o.png"), torch.from_numpy(want.copy()).permute(2, 0, 1).float() / 255)


def test_16bit_png_with_orientation_keeps_precision_and_turns(tmp_path):
    import cv2

    arr = np.random.default_rng(3).integers(0, 65536, (6, 10, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "plain.png"), arr[..., ::-1])
    im = Image.open(tmp_path / "plain.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    # Pillow cannot write 16-bit RGB; add the orientation as an eXIf chunk before IEND
    raw = (tmp_path / "plain.png").read_bytes()
    body = exif.tobytes()
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body) & 0xFFFFFFFF)
    (tmp_path / "turned.png").write_bytes(raw[:-12] + chunk + raw[-12:])
    im.close()
    got = load_image01(tmp_path / "turned.png")
    want = np.rot90(arr.astype(np.float64) / 65535, -1)  # orientation 6: rotate 90 degrees clockwise
    assert got.shape == (3, 10, 6)
    assert np.allclose(got.permute(1, 2, 0).numpy(), want, atol=1e-7)


def test_unusual_but_valid_images_load(tmp_path):
    """Cases that pass today and must keep passing: 1x1, grey, palette, RGBA, LA, CMYK, 16-bit grey."""
    rgb = Image.fromarray(noise(9, 11))
    rgb.save(tmp_path / "rgb.png")
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "one.png")
    rgb.convert("L").save(tmp_path / "grey.png")
    rgb.convert("P").save(tmp_path / "palette.png")
    rgb.convert("RGBA").save(tmp_path / "rgba.png")
    rgb.convert("LA").save(tmp_path / "la.png")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    for path in list_images(tmp_path):
        im = load_rgb(path)
        assert im.mode == "RGB" and im.size == ((1, 1) if path.stem == "one" else (11, 9)), path
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "rgba.png")), np.asarray(rgb))
    assert load_rgb(tmp_path / "one.png").getpixel((0, 0)) == (10, 20, 30)


# --- evaluate ---------------------------------------------------------------------------------------------


def good_pairs(root: Path, names: list[str], size: int = 24) -> tuple[Path, Path]:
    sr, gt = root / "sr", root / "gt"
    sr.mkdir(exist_ok=True)
    gt.mkdir(exist_ok=True)
    for i, n in enumerate(names):
        g = noise(size, size, seed=i)
        Image.fromarray(g).save(gt / f"{n}.png")
        Image.fromarray(np.clip(g.astype(int) + 5, 0, 255).astype(np.uint8)).save(sr / f"{n}.png")
    return sr, gt


def rows(out: Path) -> list[dict]:
    with open(out / "per_image.csv") as f:
        return list(csv.DictReader(f))


def test_evaluate_reports_bad_files_and_scores_every_other_pair(tmp_path, bad_files):
    sr, gt = good_pairs(tmp_path, ["a", "b"])
    for kind, path in bad_files.items():  # a broken SR beside a good GT
        (sr / path.name).write_bytes(path.read_bytes())
        Image.fromarray(noise(24, 24)).save(gt / f"{kind}.png")
    out = tmp_path / "out"
    summary = evaluate(eval_cfg([f"sr_dir={sr}", f"gt_dir={gt}", f"out_dir={out}", f"paths.weights_dir={tmp_path / 'w'}",
                                 "metrics=[psnr,ssim]"]))
    assert [r["name"] for r in rows(out)] == ["a", "b"] and summary["count"] == 2
    failed = {f["name"]: f["reason"] for f in summary["failed"]}
    assert set(failed) == set(bad_files)
    assert "empty file" in failed["zero"] and "truncated" in failed["truncated_png"] and "truncated" in failed["truncated_jpg"]
    assert "not an image" in failed["text"] and "decompression-bomb" in failed["bomb"]
    assert all(str(sr / bad_files[k].name) in failed[k] for k in failed)  # the file is named
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["failed"] == summary["failed"] and on_disk["metrics"]["psnr"]["n"] == 2
    md = (out / "results.md").read_text()
    assert "FAILED: 5 pair(s)" in md and "`bomb`" in md


def test_evaluate_pair_too_small_for_ssim_is_reported_the_others_scored(tmp_path):
    sr, gt = good_pairs(tmp_path, ["a", "b"])
    good_pairs(tmp_path, ["tiny"], size=1)
    good_pairs(tmp_path, ["small"], size=8)
    summary = evaluate(eval_cfg([f"sr_dir={sr}", f"gt_dir={gt}", f"out_dir={tmp_path / 'o'}", f"paths.weights_dir={tmp_path / 'w'}",
                                 "metrics=[psnr,ssim]"]))
    assert summary["count"] == 2
    failed = {f["name"]: f["reason"] for f in summary["failed"]}
    assert failed == {"small": "8x8 is smaller than ssim's minimum side of 11 px", "tiny": "1x1 is smaller than ssim's minimum side of 11 px"}


class RaisesOn(torch.nn.Module):
    """A metric that fails on one image (recognised by its mean), like pyiqa's SSIM on a tiny input."""

    def __init__(self, inner: torch.nn.Module, mean: float) -> None:
        super().__init__()
        self.inner, self.mean = inner, mean

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if abs(float(x.mean()) - self.mean) < 1e-6:
            raise RuntimeError("kernel too big")
        return self.inner(x, y)


def test_evaluate_metric_failing_on_one_image_is_reported(tmp_path, monkeypatch):
    from osediff_lab.metrics import MetricSuite

    sr, gt = good_pairs(tmp_path, ["a", "b", "c"])
    real_init = MetricSuite.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.models["ssim"] = RaisesOn(self.models["ssim"], float(load_image01(sr / "b.png").mean()))

    monkeypatch.setattr(MetricSuite, "__init__", init)
    summary = evaluate(eval_cfg([f"sr_dir={sr}", f"gt_dir={gt}", f"out_dir={tmp_path / 'o'}", f"paths.weights_dir={tmp_path / 'w'}",
                                 "metrics=[psnr,ssim]"]))
    (f,) = summary["failed"]
    assert f["name"] == "b" and f["reason"] == "ssim failed on a 24x24 image: RuntimeError: kernel too big"
    assert summary["count"] == 2


def test_evaluate_exif_rotated_jpeg_against_upright_gt(tmp_path):
    sr, gt = tmp_path / "sr", tmp_path / "gt"
    sr.mkdir()
    gt.mkdir()
    upright = noise(24, 16)  # 16 wide, 24 high
    Image.fromarray(upright).save(gt / "a.png")
    stored = np.rot90(upright, 1)  # what a camera stores for orientation 6 (viewer turns it clockwise)
    with_orientation(np.ascontiguousarray(stored), sr / "a.jpg", 6, quality=100)
    summary = evaluate(eval_cfg([f"sr_dir={sr}", f"gt_dir={gt}", f"out_dir={tmp_path / 'o'}", f"paths.weights_dir={tmp_path / 'w'}",
                                 "metrics=[psnr]"]))
    assert summary["failed"] == [] and summary["count"] == 1
    assert summary["metrics"]["psnr"]["value"] > 30  # the same picture, only JPEG noise


def test_evaluate_file_deleted_after_listing_is_reported(tmp_path, monkeypatch):
    import osediff_lab.evaluate as ev

    sr, gt = good_pairs(tmp_path, ["a", "b", "c"])
    real = ev.match_by_name

    def match_then_delete(*args, **kwargs):
        found = real(*args, **kwargs)
        (sr / "b.png").unlink()
        return found

    monkeypatch.setattr(ev, "match_by_name", match_then_delete)
    summary = evaluate(eval_cfg([f"sr_dir={sr}", f"gt_dir={gt}", f"out_dir={tmp_path / 'o'}", f"paths.weights_dir={tmp_path / 'w'}",
                                 "metrics=[psnr]"]))
    (f,) = summary["failed"]
    assert f["name"] == "b" and "file not found" in f["reason"] and summary["count"] == 2


def test_evaluate_subset_needs_the_switch_and_says_how_many_were_left_out(tmp_path):
    sr, gt = good_pairs(tmp_path, ["a", "b", "c", "d"])
    for n in ("c", "d"):
        (sr / f"{n}.png").unlink()
    base = [f"sr_dir={sr}", f"gt_dir={gt}", f"paths.weights_dir={tmp_path / 'w'}", "metrics=[psnr]"]
    with pytest.raises(ConfigError, match=r"(?s)c\.png has no SR.*d\.png has no SR.*allow_subset=true"):
        evaluate(eval_cfg([*base, f"out_dir={tmp_path / 'o1'}"]))
    summary = evaluate(eval_cfg([*base, f"out_dir={tmp_path / 'o2'}", "allow_subset=true"]))
    assert summary["count"] == 2 and summary["left_out"] == ["c", "d"] and summary["failed"] == []
    assert "2 GT image(s) have no SR image and were left out" in (tmp_path / "o2" / "results.md").read_text()


@pytest.mark.slow
def test_evaluate_cli_exit_status_says_whether_a_pair_failed(tmp_path, bad_files):
    sr, gt = good_pairs(tmp_path, ["a"])
    common = [f"gt_dir={gt}", f"paths.weights_dir={tmp_path / 'w'}", "metrics=[psnr]", "progress=false",
              f"hydra.run.dir={tmp_path / 'hydra'}"]
    ok = subprocess.run([sys.executable, "-m", "osediff_lab.evaluate", f"sr_dir={sr}", f"out_dir={tmp_path / 'o1'}", *common],
                        env=ENV, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    (sr / "zero.png").write_bytes(b"")
    Image.fromarray(noise(24, 24)).save(gt / "zero.png")
    bad = subprocess.run([sys.executable, "-m", "osediff_lab.evaluate", f"sr_dir={sr}", f"out_dir={tmp_path / 'o2'}", *common],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "zero.png: empty file" in bad.stdout and "| psnr |" in bad.stdout


# --- configs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [("method.optim.generator.lr=-1e-3", "method.optim.generator.lr"), ("method.optim.regularizer.lr=0", "method.optim.regularizer.lr"),
     ("optim.lr=1e-4", "method.optim.generator.lr"), ("loss.vsd_weight=0.5", "method.vsd_weight"),
     ("loss.reg_steps_per_gen_step=2", "method.optim.regularizer.updates"), ("loss=no_vsd", "method=osediff_no_vsd"), ("optim.reg_lr=1e-4", "method.optim.regularizer.lr"),
     ("method.optim.regularizer.betas=[0.9,1.0]", "method.optim.regularizer.betas"),
     ("optim.accumulate_grad_batches=0", "optim.accumulate_grad_batches"),
     ("+method.optim.generator.updates=2", "method.optim.generator.updates"), ("trainer.max_steps=0", "trainer.max_steps"),
     ("trainer.max_steps=-1", "trainer.max_steps"), ("trainer.precision=8-mixed", "trainer.precision"),
     ("trainer.precision=bf16-true", "trainer.precision")],
)
def test_bad_optimiser_and_step_settings_are_rejected_before_building(override, key, tmp_path, monkeypatch):
    import osediff_lab.train as train

    cfg = compose_config([*TINY, override], tmp_path)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)
    monkeypatch.setattr(train, "build_module", lambda cfg: pytest.fail("a model was built"))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train.run(cfg)



# --- train ------------------------------------------------------------------------------------------------

TRAIN = [*TINY, "trainer.max_steps=4", "trainer.log_every_n_steps=2", "callbacks.samples.every_n_steps=0",
         "callbacks.checkpoint.every_n_train_steps=1", "data=folder", "data.crop_size=32"]


@pytest.fixture
def photo_folder(tmp_path, bad_files) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(3):
        Image.fromarray(noise(40, 48, seed=i)).save(d / f"good{i}.png")
    for kind in ("zero", "truncated_png"):
        (d / bad_files[kind].name).write_bytes(bad_files[kind].read_bytes())
    return d


@pytest.mark.slow
def test_training_skips_bad_images_reports_them_prints_progress_lines_and_leaves_a_finished_run_alone(
    tmp_path, photo_folder, capsys
):
    from osediff_lab.train import run

    cfg = compose_config([*TRAIN, f"data.root={photo_folder}"], tmp_path / "run")
    trainer, _, summary = run(cfg)
    out = capsys.readouterr().out
    assert trainer.global_step == 4
    # bad inputs: named with the reason, in the summary file and the printout
    skipped = {Path(s["path"]).name: s["reason"] for s in summary["skipped_images"]}
    assert skipped == {"zero.png": "empty file (0 bytes)", "truncated_png.png": skipped["truncated_png.png"]}
    assert "truncated" in skipped["truncated_png.png"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["skipped_images"] == summary["skipped_images"] and "SKIPPED image" in out
    # progress without a terminal: lines in steps of max_steps, never "Epoch 0/-2"
    assert "train: step 2/4 (50%)" in out and "train: step 4/4 (100%)" in out and "Epoch" not in out
    # learning rates logged once (the module's train/lr_*), not again by LearningRateMonitor
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "lr-AdamW" not in header

    before = (tmp_path / "run" / "summary.json").read_bytes()
    trainer2, module2, again = run(compose_config([*TRAIN, f"data.root={photo_folder}", "trainer.max_steps=2"], tmp_path / "run"))
    assert trainer2 is None and module2 is None and again == on_disk
    assert (tmp_path / "run" / "summary.json").read_bytes() == before
    assert "at step 4, not below trainer.max_steps=2: nothing to train" in capsys.readouterr().out


@pytest.mark.slow
def test_images_found_unreadable_in_a_data_worker_reach_the_summary(tmp_path, monkeypatch):
    """A file that passes the scan and then fails to load in a worker process (here: made to fail there):
    the worker's finding travels with the batch to the trainer, so summary.json still names it."""
    import osediff_lab.data.datasets as datasets
    from osediff_lab.train import run

    d = tmp_path / "photos"
    d.mkdir()
    for i in range(3):
        Image.fromarray(noise(40, 48, seed=i)).save(d / f"good{i}.png")
    Image.fromarray(noise(40, 48, seed=9)).save(d / "late.png")
    real_load = datasets.load_rgb

    def fails_in_the_worker(path):
        if Path(path).name == "late.png" and torch.utils.data.get_worker_info() is not None:
            raise UnreadableImage(path, "went bad after the scan")
        return real_load(path)

    monkeypatch.setattr(datasets, "load_rgb", fails_in_the_worker)  # inherited by the forked worker
    cfg = compose_config([*TRAIN, f"data.root={d}", "trainer.max_steps=2", "data.num_workers=1",
                          "data.batch_size=4", "trainer.enable_progress_bar=false"], tmp_path / "run")
    _, _, summary = run(cfg)
    assert [(Path(s["path"]).name, s["reason"]) for s in summary["skipped_images"]] == [("late.png", "went bad after the scan")]


@pytest.mark.slow
def test_full_disk_while_checkpointing_says_so_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from osediff_lab.lit.callbacks import DiskFullError
    from osediff_lab.train import run

    real = Path.write_bytes
    written = []

    def fills_up(self: Path, data) -> int:
        if ".ckpt." in self.name:  # the temporary file of a checkpoint
            if len(written) >= 2:
                real(self, bytes(data)[:100])
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(self.name)
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", fills_up)
    cfg = compose_config([*TRAIN, "data=demo", "data.crop_size=64"], tmp_path / "run")
    with pytest.raises(DiskFullError, match=rf"No space left on {tmp_path / 'run' / 'checkpoints'}: .*the last good checkpoint is kept: "):
        run(cfg)
    monkeypatch.undo()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert not [n for n in ckpts if n.endswith(".tmp")], "temporary file left behind"
    kept = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert kept["global_step"] >= 1


# --- prompts precompute and the degradation preview -------------------------------------------------------


def test_precompute_lists_unreadable_files_and_fills_the_cache_for_the_others(tmp_path, photo_folder):
    from osediff_lab.data.datamodule import source_files
    from osediff_lab.prompts import build_prompt_provider
    from osediff_lab.prompts.precompute import precompute

    (photo_folder / "gone.png").write_bytes((photo_folder / "good0.png").read_bytes())
    cfg = compose_config([*TINY, "prompt=llava_tiny", f"prompt.cache.path={tmp_path / 'cache.sqlite'}", "data=folder",
                          f"data.root={photo_folder}"], tmp_path / "run")
    listed = source_files(cfg.data)
    (photo_folder / "gone.png").unlink()  # vanishes between listing and reading
    stats = build_prompt_provider(cfg.prompt).fill_files(listed, device="cpu", progress=False)
    failed = {Path(p).name: r for p, r in stats["failed"].items()}
    assert set(failed) == {"zero.png", "truncated_png.png", "gone.png"} and stats["computed"] == 3
    assert "empty file" in failed["zero.png"] and "truncated" in failed["truncated_png.png"]
    again = precompute(cfg, device="cpu", progress=False)  # the CLI's path: the two broken files again
    assert again["computed"] == 0 and again["cached_before"] == 3 and len(again["failed"]) == 2


def test_preview_skips_unreadable_images_and_lists_them(tmp_path, photo_folder):
    from osediff_lab.data.preview import run_preview

    cfg = compose_config(["data=folder", f"data.root={photo_folder}", "data.crop_size=32", "data.batch_size=2"], tmp_path)
    grid = run_preview(cfg)
    report = json.loads(grid.with_suffix(".json").read_text())
    assert report["grid"] == str(grid)
    assert sorted(Path(s["path"]).name for s in report["skipped_images"]) == ["truncated_png.png", "zero.png"]


@pytest.mark.slow
def test_a_config_error_is_one_message_without_traceback_and_exit_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "osediff_lab.evaluate", f"sr_dir={tmp_path / 'nope'}", f"gt_dir={tmp_path}",
                           f"hydra.run.dir={tmp_path / 'hydra'}"], env=ENV, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out
    assert out.count(f"sr_dir={tmp_path / 'nope'} is not a directory") == 1


@pytest.mark.slow
def test_train_cli_exits_0_listing_skipped_images_and_1_with_strict_images(tmp_path, photo_folder):
    """A run that finished without some unreadable images is a complete model (`sbatch --dependency=afterok`
    chains go on): exit 0, the files in the log and summary.json; strict_images=true makes it exit 1."""
    args = [*TRAIN, f"data.root={photo_folder}", "trainer.max_steps=1", "callbacks.checkpoint.every_n_train_steps=0"]
    for strict, status in ((False, 0), (True, 1)):
        out_root = tmp_path / f"strict_{strict}"
        proc = subprocess.run([sys.executable, "-m", "osediff_lab.train", *args, f"strict_images={str(strict).lower()}",
                               f"paths.output_root={out_root}"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                              timeout=900)
        out = proc.stdout + proc.stderr
        assert proc.returncode == status, out[-3000:]
        assert "2 training image(s) were unreadable and skipped, listed in summary.json" in out
        assert ("exit status 1 (strict_images=true)" in out) == strict
        (run,) = (out_root / "train" / "runs").iterdir()
        logged = (run / "train.log").read_text()  # the job's log file holds every skipped file with its reason
        assert f"  {photo_folder / 'zero.png'}: empty file (0 bytes)" in logged and "truncated_png.png" in logged
        skipped = json.loads((run / "summary.json").read_text())["skipped_images"]
        assert sorted(Path(s["path"]).name for s in skipped) == ["truncated_png.png", "zero.png"]
        assert (run / "lora" / "osediff_lora.safetensors").is_file()  # the run itself finished and was exported
