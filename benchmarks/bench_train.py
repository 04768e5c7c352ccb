"""Seconds per training step (generator + regularizer) and per generator forward, tiny preset, CPU, 128x128 batch 4."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from common import compose_config, timings  # noqa: E402

from osediff_lab.data.datamodule import HQDataModule  # noqa: E402
from osediff_lab.train import run  # noqa: E402

OVERRIDES = ["model=tiny", "data=demo", "logger=csv", "loss.lpips.pretrained=false", "loss.lpips.net=vgg",
             "data.crop_size=128", "data.batch_size=4", "callbacks.samples.every_n_steps=0",
             "callbacks.checkpoint.every_n_train_steps=0", "trainer.enable_progress_bar=false"]


def main(steps: int = 20) -> None:
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    cfg = compose_config([*OVERRIDES, f"trainer.max_steps={steps}"], tmp)
    trainer, module, summary = run(cfg)
    optimize_batch = summary["wall_time_s"] / steps

    dm = HQDataModule(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    batch = module.on_after_batch_transfer(batch, 0)
    embeds = module.encode_text([""] * 4)
    module.eval()
    with torch.no_grad():
        module.generator(batch["lq_up"], embeds)
        fwd = timings(lambda: module.generator(batch["lq_up"], embeds), 10)
    print(f"tiny preset, CPU ({torch.get_num_threads()} threads), 128x128, batch 4, LPIPS vgg (random weights)")
    print(f"  training step (generator + regularizer, incl. data + logging): {optimize_batch:.3f} s/step over {steps} steps")
    print(f"  generator forward alone: median {statistics.median(fwd):.4f} s (min {min(fwd):.4f}, max {max(fwd):.4f})")


if __name__ == "__main__":
    main()
