"""The metric protocol against pyiqa itself and hand-computed values; image reading at 8 and 16 bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from osediff_lab.errors import ConfigError
from osediff_lab.metrics import MetricSuite, center_crop, load_image01, metric_defs
from osediff_lab.paths import CONF_DIR

DEFS = OmegaConf.load(CONF_DIR / "metric_defs" / "paper.yaml")


@pytest.fixture
def bicubic_pairs(realsr, tmp_path):
    """Two real RealSR pairs: the LR bicubic-upsampled x4 (saved as PNG) and its HR."""
    out = tmp_path / "sr"
    out.mkdir()
    pairs = []
    for lr in sorted((realsr / "LR").glob("*.png"))[:2]:
        im = Image.open(lr).convert("RGB")
        sr = out / lr.name
        im.resize((im.width * 4, im.height * 4), Image.BICUBIC).save(sr)
        pairs.append((sr, realsr / "HR" / lr.name))
    return pairs


def psnr_y_by_hand(sr: np.ndarray, gt: np.ndarray) -> float:
    """PSNR on the ITU-R BT.601 luma (the 'ycbcr' Y of MATLAB's rgb2ycbcr) of uint8 RGB images, in float64."""
    weights = np.array([65.481, 128.553, 24.966]) / 255.0

    def y(img):
        return 16.0 / 255.0 + (img.astype(np.float64) / 255.0) @ weights

    mse = np.mean((y(sr) - y(gt)) ** 2)
    return float(10 * np.log10(1.0 / mse))


@pytest.mark.slow
def test_psnr_ssim_equal_pyiqa_on_realsr(bicubic_pairs, tmp_path):
    import pyiqa

    suite = MetricSuite(metric_defs(DEFS, ["psnr", "ssim"]), tmp_path / "empty_cache")
    assert not suite.unavailable  # PSNR/SSIM need no weight files
    ref_psnr = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr", device="cpu")
    ref_ssim = pyiqa.create_metric("ssim", test_y_channel=True, color_space="ycbcr", device="cpu")
    for sr_path, gt_path in bicubic_pairs:
        ours = suite.score(load_image01(sr_path)[None], load_image01(gt_path)[None])
        assert ours["psnr"][0] == pytest.approx(float(ref_psnr(str(sr_path), str(gt_path))), abs=1e-6)
        assert ours["ssim"][0] == pytest.approx(float(ref_ssim(str(sr_path), str(gt_path))), abs=1e-6)
        by_hand = psnr_y_by_hand(np.asarray(Image.open(sr_path).convert("RGB")), np.asarray(Image.open(gt_path).convert("RGB")))
        assert ours["psnr"][0] == pytest.approx(by_hand, abs=2e-3)  # pyiqa works in float32
        assert 15 < ours["psnr"][0] < 40 and 0.3 < ours["ssim"][0] < 1


def test_missing_weights_make_metrics_unavailable_not_numbers(tmp_path):
    suite = MetricSuite(metric_defs(DEFS, ["psnr", "lpips", "dists", "musiq", "maniqa", "clipiqa", "fid"]), tmp_path)
    names = {u.name for u in suite.unavailable}
    assert names == {"lpips", "dists", "musiq", "maniqa", "clipiqa", "fid"}
    assert set(suite.models) == {"psnr"}
    maniqa = next(u for u in suite.unavailable if u.name == "maniqa")
    assert "MANIQA_PIPAL-ae6d356b.pth" in maniqa.message
    assert "python -m osediff_lab.weights fetch maniqa_pipal vit_b8_maniqa" in maniqa.message
    scores = suite.score(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    assert set(scores) == {"psnr"}


def test_unknown_metric_is_a_config_error():
    with pytest.raises(ConfigError, match="psnrr"):
        metric_defs(DEFS, ["psnrr"])


def test_lpips_linear_layers_from_the_lpips_package_load_into_pyiqa(monkeypatch):
    """pyiqa loads pretrained_model_path with strict=False: prove every tensor of the file lands somewhere.

    pyiqa's AlexNet always asks torchvision for ImageNet weights; the backbone is irrelevant here, so it is
    built randomly for this test (no file, no network).
    """
    from pathlib import Path

    import lpips
    import torchvision
    from pyiqa.archs.arch_util import load_pretrained_network
    from pyiqa.archs.lpips_arch import LPIPS

    random_alexnet = torchvision.models.alexnet
    monkeypatch.setattr(torchvision.models, "alexnet", lambda weights=None, **kw: random_alexnet(weights=None))

    file = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    state = torch.load(file, map_location="cpu")
    net = LPIPS(net="alex", pretrained=False, pnet_rand=True)
    ours = net.state_dict()
    assert set(state) <= set(ours) and all(ours[k].shape == v.shape for k, v in state.items())
    load_pretrained_network(net, str(file), False)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_8bit_reading_matches_pyiqa_reader(realsr):
    from pyiqa.utils.img_util import imread2tensor

    path = sorted((realsr / "LR").glob("*.png"))[0]
    assert torch.equal(load_image01(path), imread2tensor(str(path), rgb=True))


def test_16bit_png_keeps_precision(tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, size=(9, 7, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "a.png"), rgb16[..., ::-1])
    got = load_image01(tmp_path / "a.png")
    assert got.shape == (3, 9, 7)
    assert np.abs(got.permute(1, 2, 0).double().numpy() - rgb16 / 65535.0).max() < 1e-7
    grey16 = rng.integers(0, 65536, size=(5, 6), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g.png")
    got = load_image01(tmp_path / "g.png")
    assert np.abs(got[1].double().numpy() - grey16 / 65535.0).max() < 1e-7


def test_center_crop_takes_the_middle():
    x = torch.arange(36.0).reshape(1, 6, 6)
    assert torch.equal(center_crop(x, 2, 4), x[:, 2:4, 1:5])
