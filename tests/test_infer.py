"""The inference CLI: folders of mixed formats, outputs and prompts, corrupt inputs, EXIF orientation, empty
folders, reproducibility."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from helpers import TINY, compose_config
from osediff_lab.errors import ConfigError
from osediff_lab.infer import collect_inputs, run_inference
from osediff_lab.models.components import build_components
from osediff_lab.models.lora_files import export_lora
from osediff_lab.models.osediff import build_generator
from osediff_lab.paths import CONF_DIR
from test_bad_input import ENV, noise, with_orientation
from test_pipeline import perturb_trained

pytestmark = pytest.mark.usefixtures("single_thread")
FIXED = "a high quality photograph, sharp, detailed"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny model exported in our format (its random base is rebuilt from the sidecar's seed)."""
    cfg = compose_config(TINY)
    torch.manual_seed(cfg.seed)
    generator, targets = build_generator(build_components(cfg.model), cfg.generator)
    perturb_trained(generator)
    state = {n: p for n, p in generator.named_parameters() if p.requires_grad}
    return export_lora(state, cfg, targets, tmp_path_factory.mktemp("ckpt") / "lora.safetensors")[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Images in several formats and modes, one corrupt PNG, one non-image file."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8))
    rgb.save(root / "a.png")
    (root / "sub").mkdir()
    rgb.convert("L").save(root / "sub" / "b.jpg", quality=90)
    rgb.convert("P").save(root / "c.bmp")
    rgb.convert("RGBA").save(root / "d.v2.tif")
    (root / "broken.png").write_bytes((root / "a.png").read_bytes()[:60])
    (root / "notes.txt").write_text("not an image")
    return root


def infer_config(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="infer", overrides=overrides)


def run(inputs, ckpt, out, extra=()):
    cfg = infer_config([f"input={inputs}", f"output={out}", f"ckpt={ckpt}", "pipeline.process_size=32", "prompt=fixed", *extra])
    return run_inference(cfg)


def test_collect_inputs_takes_every_pillow_format_and_keeps_names(inputs):
    found = {str(rel): src.suffix for src, rel in collect_inputs(inputs)}
    assert found == {"a": ".png", "sub/b": ".jpg", "c": ".bmp", "d.v2": ".tif", "broken": ".png"}


def test_folder_run_writes_pngs_and_prompts_and_reports_the_corrupt_file(inputs, ckpt, tmp_path):
    summary = run(inputs, ckpt, tmp_path / "out")
    out = tmp_path / "out"
    for name in ("a", "sub/b", "c", "d.v2"):
        with Image.open(out / f"{name}.png") as im:
            assert im.size == (44, 36) and im.mode == "RGB"
        assert (out / f"{name}.txt").read_text().strip() == FIXED
    assert summary["succeeded"] == 4
    (failure,) = summary["failed"]
    assert failure["input"].endswith("broken.png") and failure["reason"].startswith(("OSError", "SyntaxError"))
    assert json.loads((out / "summary.json").read_text()) == summary
    assert not (out / "broken.png").exists() and not (out / "notes.png").exists()

    again = run(inputs, ckpt, tmp_path / "again")
    assert again["succeeded"] == 4
    for name in ("a", "sub/b", "c", "d.v2"):
        assert (out / f"{name}.png").read_bytes() == (tmp_path / "again" / f"{name}.png").read_bytes()


@pytest.mark.slow
def test_cli_single_file(inputs, ckpt, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    args = [f"input={inputs / 'a.png'}", f"output={tmp_path / 'out'}", f"ckpt={ckpt}", "pipeline.process_size=32",
            "pipeline.color_fix=wavelet", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run([sys.executable, "-m", "osediff_lab.infer", *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 of 1 images" in proc.stdout
    with Image.open(tmp_path / "out" / "a.png") as im:
        assert im.size == (44, 36)
    assert (tmp_path / "out" / "a.txt").read_text() == "\n"  # the checkpoint's prompt mode: null


def test_infer_exif_rotated_jpeg_gives_an_upright_output(tmp_path, ckpt):
    d = tmp_path / "in"
    d.mkdir()
    with_orientation(noise(16, 24), d / "turned.jpg", 6, quality=95)  # stored 24 wide x 16 high, shown 16 x 24
    summary = run(d, ckpt, tmp_path / "out")
    assert summary["failed"] == []
    with Image.open(tmp_path / "out" / "turned.png") as im:
        assert im.size == (64, 96)


@pytest.mark.slow
def test_infer_on_a_folder_without_images_names_it_and_the_suffixes(tmp_path, ckpt):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    with pytest.raises(ConfigError, match=rf"input={empty}: no image files.*\.jpg.*\.png"):
        collect_inputs(empty)
    proc = subprocess.run([sys.executable, "-m", "osediff_lab.infer", f"input={empty}", f"output={tmp_path / 'out'}", f"ckpt={ckpt}",
                           f"hydra.run.dir={tmp_path / 'hydra'}"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no image files" in proc.stderr + proc.stdout
