"""Prompt stage cost on CPU: DAPE tiny tagging throughput, and the prompt stage's share of a tiny training step."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
from common import compose_config, timings  # noqa: E402

from osediff_lab.data.datamodule import HQDataModule  # noqa: E402
from osediff_lab.prompts import build_prompt_provider  # noqa: E402
from osediff_lab.train import run  # noqa: E402

TRAIN = ["model=tiny", "data=demo", "logger=csv", "loss.lpips.pretrained=false", "loss.lpips.net=alex",
         "data.crop_size=64", "data.batch_size=4", "callbacks.samples.every_n_steps=0",
         "callbacks.checkpoint.every_n_train_steps=0", "trainer.enable_progress_bar=false"]


def tagging_throughput(batch: int = 8, size: int = 128, repeats: int = 10) -> None:
    cfg = compose_config([*TRAIN, "prompt=dape_tiny"])
    provider = build_prompt_provider(cfg.prompt)
    images = torch.rand(batch, 3, size, size)
    tags = provider.tags(images)
    times = timings(lambda: provider.tags(images), repeats)
    per_image = statistics.median(times) / batch
    mean_tags = sum(map(len, tags)) / batch
    print(f"DAPE tiny (random weights, {cfg.prompt.arch.num_tags} tags), CPU ({torch.get_num_threads()} threads), "
          f"{size}x{size}, batch {batch}")
    print(f"  {1 / per_image:.1f} images/s ({mean_tags * batch / (per_image * batch):.0f} tags/s at {mean_tags:.1f} tags/image); "
          f"median {statistics.median(times) * 1000:.1f} ms per batch")


def prompt_share(steps: int = 4) -> None:
    cfg = compose_config([*TRAIN, "prompt=dape_tiny", f"trainer.max_steps={steps}"], Path(tempfile.mkdtemp()))
    _, module, summary = run(cfg)
    step = summary["wall_time_s"] / steps
    dm = HQDataModule(cfg.data)
    dm.setup("fit")
    batch = module.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    stage = statistics.median(timings(lambda: module.batch_prompts(batch), 10))
    print(f"tiny training step with prompt=dape_tiny, 64x64, batch 4: {step:.3f} s/step over {steps} steps "
          "(incl. data + logging)")
    print(f"  prompt stage (batch_prompts) median {stage * 1000:.1f} ms = {100 * stage / step:.1f}% of a step")


if __name__ == "__main__":
    tagging_throughput()
    prompt_share()
