"""Validation during training on the tiny preset: a 4-image RealSR subset, means checked against pyiqa."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from helpers import TINY, compose_config
from osediff_lab.data.datamodule import HQDataModule, paired_dataset
from osediff_lab.data.resize import upsample_to
from osediff_lab.errors import ConfigError
from osediff_lab.evaluate import evaluate
from osediff_lab.lit.validation import Validator, table_rows, to_unit, trainer_kwargs
from osediff_lab.pipeline.colorfix import adain_color_fix
from osediff_lab.train import build_module, run
from test_evaluate import eval_cfg


def data_names(cfg) -> list[str]:
    return [lr.stem for lr, _ in paired_dataset(cfg.val, cfg.scale).pairs]


def val_config(realsr, tmp_path, extra: list[str]):
    return compose_config([*TINY, "val=realsr", f"val.root={realsr}", f"paths.weights_dir={tmp_path / 'w'}", *extra], tmp_path)


class KeepOutputs(pl.Callback):
    """Collects what validation_step scored (SR in [0, 1]) and the batch it came from."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, dict]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen.append((outputs.cpu(), {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}))


@pytest.mark.slow
def test_validate_on_4_realsr_pairs_matches_pyiqa(realsr, tmp_path):
    import pyiqa

    cfg = val_config(realsr, tmp_path, ["val.limit=4", "val.metrics=[psnr,ssim]"])
    module = build_module(cfg)
    dm = HQDataModule(cfg.data, val=cfg.val, scale=cfg.scale)
    keep = KeepOutputs()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[keep])
    logged = trainer.validate(module, datamodule=dm)[0]
    assert set(logged) == {"val/psnr", "val/ssim", "val_info/num_images"} and logged["val_info/num_images"] == 4
    assert [b["name"][0] for _, b in keep.seen] == data_names(cfg)
    assert len(keep.seen) == 4

    # independent scoring of what was validated: pyiqa directly on each SR (8-bit rounded) vs its HQ
    ref = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr", device="cpu")
    scores = [float(ref(sr, to_unit(batch["hq"]))) for sr, batch in keep.seen]
    assert logged["val/psnr"] == pytest.approx(sum(scores) / len(scores), abs=1e-4)
    assert 0 < logged["val/ssim"] < 1
    # and the validated SR is what inference gives: the deterministic generator output of the
    # bicubic-upsampled LQ with the default AdaIN colour fix towards that upsampled LQ
    sr0, batch0 = keep.seen[0]
    lq_up = upsample_to(batch0["lq"], batch0["hq"].shape[-2:])
    module.generator.latent = "mode"  # deterministic, as inference
    with torch.no_grad():
        x_h = module.generator(lq_up, module.encode_text([""]))[0]
    expected = adain_color_fix(to_unit(x_h), to_unit(lq_up)).clamp(0, 1)
    assert torch.allclose(expected, sr0, atol=1 / 255 + 1e-4)
    assert torch.equal(sr0, (sr0 * 255).round() / 255)  # scored at 8 bit, like saved PNGs


@pytest.mark.slow
def test_fit_validates_every_n_steps_and_keeps_best_checkpoint(realsr, tmp_path):
    cfg = val_config(
        realsr, tmp_path,
        ["val.limit=1", "val.metrics=[psnr]", "val.every_n_steps=1", "trainer.max_steps=1", "trainer.enable_progress_bar=false",
         "callbacks.checkpoint.monitor=val/psnr", "callbacks.checkpoint.mode=max"],
    )
    trainer, _, summary = run(cfg)
    assert "val/psnr" in summary["last_metrics"]
    best = [c for c in trainer.callbacks if isinstance(c, pl.callbacks.ModelCheckpoint) and c.monitor == "val/psnr"]
    assert len(best) == 1 and best[0].best_model_path.endswith(".ckpt")
    assert float(best[0].best_model_score) == pytest.approx(summary["last_metrics"]["val/psnr"])
    from safetensors.torch import load_file

    exported = load_file(summary["lora_best"])  # the monitored best, exported beside the last step's lora/
    state = torch.load(best[0].best_model_path, map_location="cpu", weights_only=False)["state_dict"]
    assert exported and all(torch.equal(v, state["method.generator." + k].float()) for k, v in exported.items())

    # the evaluate command's checkpoint path: super-resolve val's LR with the exported LoRA, then score
    out = tmp_path / "eval"
    ev = evaluate(eval_cfg([f"checkpoint={summary['lora']}", "val=realsr", f"val.root={realsr}", "val.limit=1",
                            "metrics=[psnr]", f"out_dir={out}", f"paths.weights_dir={tmp_path / 'w'}"]))
    name = data_names(cfg)[0]
    assert ev["count"] == 1 and sorted(p.name for p in (out / "sr").iterdir()) == [f"{name}.png", f"{name}.txt"]  # + its prompt
    assert 5 < ev["metrics"]["psnr"]["value"] < 60


def test_trainer_kwargs_follow_the_val_group(tiny_cfg, realsr, tmp_path):
    assert trainer_kwargs(tiny_cfg) == {"limit_val_batches": 0}  # val=none is the train default
    cfg = val_config(realsr, tmp_path, ["val.every_n_steps=7"])
    assert trainer_kwargs(cfg) == {"val_check_interval": 7, "check_val_every_n_epoch": None}
    with pytest.raises(ConfigError, match="every_n_steps"):
        trainer_kwargs(val_config(realsr, tmp_path, ["val.every_n_steps=0"]))


def test_folder_metrics_are_refused_during_training(realsr, tmp_path):
    with pytest.raises(ConfigError, match="fid"):
        Validator(val_config(realsr, tmp_path, ["val.metrics=[psnr,fid]"]))


def test_table_rows_hold_uint8_images_and_scores():
    ex = {"name": "a", "lq": torch.rand(3, 4, 4), "sr": torch.ones(3, 16, 16), "hq": torch.zeros(3, 16, 16), "psnr": 12.5}
    columns, rows = table_rows([ex], ["psnr"], step=3)
    assert columns == ["step", "name", "LQ", "SR", "HQ", "psnr"]
    assert rows[0][0] == 3 and rows[0][-1] == 12.5
    assert rows[0][3].dtype.name == "uint8" and rows[0][3].shape == (16, 16, 3) and rows[0][3].max() == 255
