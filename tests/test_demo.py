"""The demo's functions without a browser: its results are the pipeline's (same options, same bytes as infer's
loader), PiSA-SR's lambdas reach a two-set checkpoint only, and a broken upload is answered with the loader's reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from osediff_lab.data.images import UnreadableImage, load_rgb
from osediff_lab.demo import describe_upload, infer_config, load_model, run_options, split_args, super_resolve
from osediff_lab.errors import ConfigError
from osediff_lab.pipeline import SRPipeline
from test_demo_browser import tiny_osediff_checkpoint, tiny_pisasr_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")
SMALL = ["pipeline.process_size=32", "pipeline.device=cpu"]
DEFAULTS = {"color_fix": "adain", "latent_tile": 96, "latent_overlap": 32, "vae_encoder_tile": 128,
            "vae_decoder_tile": 224, "lambda_pix": 1.0, "lambda_sem": 1.0}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {"osediff": tiny_osediff_checkpoint(root), "pisasr": tiny_pisasr_checkpoint(root)}


@pytest.fixture(scope="module")
def lq() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8))


def reference(ckpt, lq: Image.Image, **options) -> np.ndarray:
    """What the Python API (and so infer) gives for ``options``."""
    pipe = SRPipeline.from_checkpoint(ckpt, process_size=32, device="cpu", **options)
    return np.asarray(pipe.enhance_image(lq)[0])


def demo_sr(model, lq: Image.Image, **controls) -> np.ndarray:
    return np.asarray(super_resolve([model], lq, run_options(**(DEFAULTS | controls)), lambda f, d: None)[0].sr)


def test_split_args_keeps_the_demos_keys_and_passes_the_rest_to_infer():
    own, rest = split_args(["ckpt=a.safetensors", "ckpt_b=b.safetensors", "port=9000", "pipeline.color_fix=none"])
    assert own == {"ckpt_b": "b.safetensors", "port": "9000"}
    assert rest == ["ckpt=a.safetensors", "pipeline.color_fix=none"]
    with pytest.raises(ConfigError, match="ckpt=<file>"):
        infer_config([])


@pytest.mark.slow  # ~15 s: six tiny pipelines
def test_results_are_the_pipelines_and_lambdas_reach_two_set_checkpoints_only(ckpts, lq):
    osediff = load_model("A", ckpts["osediff"], infer_config([f"ckpt={ckpts['osediff']}", *SMALL]))
    pisasr = load_model("B", ckpts["pisasr"], infer_config([f"ckpt={ckpts['pisasr']}", *SMALL]))
    assert (osediff.two_sets, pisasr.two_sets) == (False, True)

    seen = []
    results = super_resolve([osediff, pisasr], lq, run_options(**DEFAULTS), lambda f, d: seen.append((f, d)))
    assert [r.sr.size for r in results] == [(40, 48)] * 2 and [r.before.size for r in results] == [(40, 48)] * 2
    assert [f for f, _ in seen] == [0.0, 0.5, 1.0] and "B (pisasr_lora.safetensors)" in seen[1][1]

    np.testing.assert_array_equal(demo_sr(osediff, lq, color_fix="none"), reference(ckpts["osediff"], lq, color_fix="none"))
    # a checkpoint with one LoRA set keeps (1, 1) whatever the sliders say
    np.testing.assert_array_equal(demo_sr(osediff, lq, lambda_sem=0.3), reference(ckpts["osediff"], lq))
    mixed = demo_sr(pisasr, lq, lambda_pix=0.8, lambda_sem=0.3)
    np.testing.assert_array_equal(mixed, reference(ckpts["pisasr"], lq, lambda_pix=0.8, lambda_sem=0.3))
    assert np.abs(mixed.astype(int) - demo_sr(pisasr, lq).astype(int)).max() > 0, "the lambdas had no effect"
    with pytest.raises(ConfigError, match="latent_tiling"):
        demo_sr(osediff, lq, latent_tile=32, latent_overlap=32)


def test_a_broken_upload_is_answered_with_the_loaders_reason(tmp_path, lq):
    good, broken = tmp_path / "good.png", tmp_path / "broken.png"
    lq.save(good)
    broken.write_bytes(good.read_bytes()[:60])
    with pytest.raises(UnreadableImage) as refused:
        load_rgb(broken)
    assert describe_upload(str(broken), 4) == f"**Cannot read broken.png**: {refused.value.reason}"
    assert describe_upload(str(good), 4) == "good.png: 10x12 px; SR x4: 40x48 px"
    assert torch.equal(torch.tensor(np.asarray(load_rgb(good))), torch.tensor(np.asarray(lq)))
