"""The evaluate command: NIQE equals pyiqa's with the shared parameter file, summary = mean of CSV rows,
unavailable metrics are reported (not numbers), size mismatches name the file, 16-bit inputs work."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from helpers import SHARED
from osediff_lab.errors import ConfigError
from osediff_lab.evaluate import evaluate
from osediff_lab.paths import CONF_DIR
from osediff_lab.weights import MANIFEST, expected_path

NIQE_MAT = SHARED / "weights" / "niqe_modelparameters.mat"


def eval_cfg(overrides: list[str]):
    """The evaluate config exactly as `python -m osediff_lab.evaluate <overrides>` composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="evaluate", overrides=["progress=false", *overrides])


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture
def niqe_cache(tmp_path):
    if not NIQE_MAT.is_file():
        pytest.skip(f"{NIQE_MAT} not found (../shared is absent in a fresh clone)")
    cache = tmp_path / "weights"
    dest = expected_path(MANIFEST["niqe"], cache)
    dest.parent.mkdir(parents=True)
    shutil.copy(NIQE_MAT, dest)
    return cache


@pytest.fixture
def sr_gt(realsr, tmp_path):
    """Two RealSR pairs: SR = LR bicubic-upsampled x4 (PNG), GT = a copy of the HR folder's files."""
    sr, gt = tmp_path / "sr", tmp_path / "gt"
    sr.mkdir()
    gt.mkdir()
    for lr in sorted((realsr / "LR").glob("*.png"))[:2]:
        im = Image.open(lr).convert("RGB")
        im.resize((im.width * 4, im.height * 4), Image.BICUBIC).save(sr / lr.name)
        shutil.copy(realsr / "HR" / lr.name, gt / lr.name)
    return sr, gt


def test_niqe_and_summary_through_the_command(sr_gt, niqe_cache, tmp_path):
    import pyiqa

    sr, gt = sr_gt
    out = tmp_path / "out"
    cfg = eval_cfg([f"sr_dir={sr}", f"gt_dir={gt}", f"out_dir={out}", f"paths.weights_dir={niqe_cache}", "metrics=[psnr,niqe,lpips]"])
    summary = evaluate(cfg)

    rows = read_csv(out / "per_image.csv")
    assert [r["name"] for r in rows] == sorted(p.stem for p in sr.iterdir())
    ref = pyiqa.create_metric("niqe", pretrained_model_path=str(NIQE_MAT), device="cpu")
    for r in rows:
        assert float(r["niqe"]) == pytest.approx(float(ref(r["sr"])), abs=1e-6)
    on_disk = json.loads((out / "summary.json").read_text())
    for m in ("psnr", "niqe"):
        mean = math.fsum(float(r[m]) for r in rows) / len(rows)
        assert on_disk["metrics"][m]["value"] == pytest.approx(mean, abs=1e-12)
        assert on_disk["metrics"][m]["n"] == len(rows)
    # LPIPS's AlexNet file is not in the cache: reported, not computed, not zero
    lp = on_disk["metrics"]["lpips"]
    assert lp["value"] is None and "alexnet-owt-7be5be79.pth" in lp["unavailable"]
    assert "python -m osediff_lab.weights fetch tv_alexnet" in lp["unavailable"]
    assert "lpips" not in rows[0] and on_disk["unavailable"] == ["lpips"]
    md = (out / "results.md").read_text()
    assert "| lpips | unavailable:" in md and "| niqe |" in md
    assert summary["count"] == 2


def test_size_mismatch_fails_the_pair_naming_the_files_unless_center_crop(tmp_path):
    import pyiqa

    rng = np.random.default_rng(0)
    sr, gt = tmp_path / "sr", tmp_path / "gt"
    sr.mkdir()
    gt.mkdir()
    big = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    Image.fromarray(big).save(gt / "a.png")
    Image.fromarray(big[4:36, 4:44]).save(sr / "a.png")
    base = [f"sr_dir={sr}", f"gt_dir={gt}", f"paths.weights_dir={tmp_path / 'w'}", "metrics=[psnr]"]
    failed = evaluate(eval_cfg([*base, f"out_dir={tmp_path / 'o1'}"]))["failed"]
    assert [f["name"] for f in failed] == ["a"]
    assert re.search(r"sr/a\.png \(40x32\).*gt/a\.png \(48x40\).*center_crop=true", failed[0]["reason"])

    summary = evaluate(eval_cfg([*base, f"out_dir={tmp_path / 'o2'}", "center_crop=true"]))
    assert summary["center_cropped"] == ["a"]
    assert "centre-cropped" in (tmp_path / "o2" / "results.md").read_text()
    # the centred 32x40 window of the 40x48 GT is exactly the SR: PSNR is pyiqa's "identical" value
    ref = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr", device="cpu")
    Image.fromarray(big[4:36, 4:44]).save(tmp_path / "same.png")
    assert summary["metrics"]["psnr"]["value"] == pytest.approx(float(ref(str(tmp_path / "same.png"), str(tmp_path / "same.png"))))


def test_unmatched_names_are_an_error_naming_every_unmatched_file_of_both_folders(tmp_path):
    sr, gt = tmp_path / "sr", tmp_path / "gt"
    (sr / "sub").mkdir(parents=True)
    gt.mkdir()
    sr_only = ["x0", "x1", "x2", "x3", "x4", "x5", "sub/x6"]  # more than a short report would name
    gt_only = ["y0", "y1"]
    for name in ["both", *sr_only]:
        Image.new("RGB", (8, 8)).save(sr / f"{name}.png")
    for name in ["both", *gt_only]:
        Image.new("RGB", (8, 8)).save(gt / f"{name}.png")
    base = [f"sr_dir={sr}", f"gt_dir={gt}", f"out_dir={tmp_path / 'o'}", "metrics=[psnr]"]
    with pytest.raises(ConfigError) as error:
        evaluate(eval_cfg(base))
    lines = str(error.value).splitlines()
    assert sorted(lines[1:-1]) == sorted([f"  {sr / n}.png has no GT in {gt}" for n in sr_only]
                                         + [f"  {gt / n}.png has no SR in {sr}" for n in gt_only])
    assert lines[-1] == "set allow_subset=true to score only the 1 GT image(s) that have an SR image"
    with pytest.raises(ConfigError) as error:  # GT without SR allowed: only the SR images without GT remain
        evaluate(eval_cfg([*base, "allow_subset=true"]))
    assert sorted(str(error.value).splitlines()[1:]) == sorted(f"  {sr / n}.png has no GT in {gt}" for n in sr_only)


def test_16bit_sr_keeps_precision(tmp_path):
    """A 16-bit SR holding an 8-bit image x 257 scores exactly like the 8-bit file; finer 16-bit detail counts."""
    import cv2

    rng = np.random.default_rng(1)
    gt8 = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    sr8 = np.clip(gt8.astype(int) + rng.integers(-6, 7, size=gt8.shape), 0, 255).astype(np.uint8)
    d8, d16, gt = tmp_path / "sr8", tmp_path / "sr16", tmp_path / "gt"
    for d in (d8, d16, gt):
        d.mkdir()
    Image.fromarray(gt8).save(gt / "a.png")
    Image.fromarray(sr8).save(d8 / "a.png")
    cv2.imwrite(str(d16 / "a.png"), (sr8.astype(np.uint16) * 257)[..., ::-1])
    common = [f"gt_dir={gt}", f"paths.weights_dir={tmp_path / 'w'}", "metrics=[psnr,ssim]"]
    s8 = evaluate(eval_cfg([*common, f"sr_dir={d8}", f"out_dir={tmp_path / 'o8'}"]))
    s16 = evaluate(eval_cfg([*common, f"sr_dir={d16}", f"out_dir={tmp_path / 'o16'}"]))
    for m in ("psnr", "ssim"):
        assert s16["metrics"][m]["value"] == pytest.approx(s8["metrics"][m]["value"], abs=1e-6)

    # half-step offsets only 16 bit can hold: 8-bit rounding would put them back on the GT exactly
    fine = np.minimum(gt8.astype(np.uint32) * 257 + 128, 65535).astype(np.uint16)
    cv2.imwrite(str(d16 / "a.png"), fine[..., ::-1])
    s_fine = evaluate(eval_cfg([*common, f"sr_dir={d16}", f"out_dir={tmp_path / 'of'}", "metrics=[psnr]"]))
    # the 1/512 offsets are kept (about 55 dB); rounded to 8 bit they would vanish (pyiqa's 80 dB ceiling)
    assert 45 < s_fine["metrics"]["psnr"]["value"] < 65
