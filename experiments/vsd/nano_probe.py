"""Held-out L2 before and after a short OSEDiff run on the nano base (the learning test's measurement).

    python experiments/vsd/nano_probe.py intact 40 /tmp/probe method.vsd_weight=0.1 method.optim.generator.lr=1e-3
    python experiments/vsd/nano_probe.py detached 40 /tmp/probe_det     # generator output detached on purpose

Prints one JSON line: start and end L2 (RGB, [0, 1]) on the val=demo crops, the relative drop, wall and CPU
seconds. ``detached`` cuts the gradient path from the losses on x_H to the generator (the negative control
of tests/test_learns.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

import test_learns as tl  # noqa: E402
from helpers import compose_config  # noqa: E402
from osediff_lab.models.generator import OneStepGenerator  # noqa: E402
from osediff_lab.train import build_module, run  # noqa: E402


def detach_generator_output() -> None:
    """Break the gradient path on purpose: x_H leaves the generator detached (z_H keeps its graph)."""
    forward = OneStepGenerator.forward

    def detached(self, x_l, prompt_embeds, generator=None):
        x_h, z_h = forward(self, x_l, prompt_embeds, generator)
        return x_h.detach(), z_h

    OneStepGenerator.forward = detached


def main(mode: str, steps: int, out: str, extra: list[str]) -> dict:
    torch.set_num_threads(1)
    if mode == "detached":
        detach_generator_output()
    overrides = [o for o in tl.LEARN if not o.startswith("trainer.max_steps")] + [f"trainer.max_steps={steps}", *extra]
    cfg = compose_config(overrides, Path(out))
    pl.seed_everything(cfg.seed, workers=True)
    t, c = time.time(), time.process_time()
    start = tl.heldout_l2(build_module(cfg), cfg)
    _, module, _ = run(cfg)
    end = tl.heldout_l2(module, cfg)
    return {"mode": mode, "steps": steps, "overrides": extra, "start": start, "end": end, "drop": 1 - end / start,
            "wall_s": round(time.time() - t, 1), "cpu_s": round(time.process_time() - c, 1)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:])))
