"""Start-up costs, tiny preset on CPU, one thread: `infer` on one image as a whole process, and `train`
from process start to its first step, phase by phase.

`python benchmarks/bench_startup.py [--repeats N] [--size PX]`; prints numbers, asserts nothing.
Whole-process figures are wall seconds and CPU seconds (user + system, as `time` reports them) of the
child process, medians of ``--repeats`` runs. The train phases are timed inside one child process by
wrapping the project's own build steps (imports, config, data, model, trainer set-up, first step).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
       "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "tests")])}
# The tiny training run every start-up and step measurement uses (bench_release's rows too).
TRAIN = ["model=tiny", "data=demo", "logger=csv", "val=none", "degradation=realesrgan", "data.crop_size=256",
         "data.batch_size=2", "method.lpips_weight=0"]
HEAVY = ("pytorch_lightning", "lightning", "wandb", "lpips", "pyiqa", "timm", "torchmetrics")


def run_child(args: list[str]) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds, peak RSS (MiB) and stdout of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, after.ru_maxrss / 1024, proc.stdout


def tiny_checkpoint(out: Path) -> Path:
    """A tiny generator exported in the project's format (trained-looking LoRA weights)."""
    import torch
    from common import compose_config

    from helpers import TINY
    from osediff_lab.models.components import build_components
    from osediff_lab.models.lora_files import export_lora
    from osediff_lab.models.osediff import build_generator

    cfg = compose_config(TINY)
    torch.manual_seed(cfg.seed)
    generator, targets = build_generator(build_components(cfg.model), cfg.generator)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(generator.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    state = {n: p for n, p in generator.named_parameters() if p.requires_grad}
    return export_lora(state, cfg, targets, out / "lora.safetensors")[0]


def infer_args(image: Path, ckpt: Path, out: Path) -> list[str]:
    return ["-m", "osediff_lab.infer", f"input={image}", f"output={out}", f"ckpt={ckpt}", "prompt=fixed",
            "pipeline.color_fix=none", f"hydra.run.dir={out / 'hydra'}"]


def bench_infer(tmp: Path, repeats: int, size: int) -> dict[str, float]:
    """`infer` on one ``size`` px image (x4), whole process; and the process that only imports the CLI."""
    import numpy as np
    from PIL import Image

    ckpt = tiny_checkpoint(tmp)
    image = tmp / "one.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(image)
    probe = f"import sys, osediff_lab.infer; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    runs, imports = [], []
    for i in range(repeats):  # alternating, so both see the same load
        runs.append(run_child(infer_args(image, ckpt, tmp / f"out{i}")))
        imports.append(run_child(["-c", probe]))
    loaded = imports[-1][3].split()
    result = {
        "infer_wall_s": statistics.median(r[0] for r in runs),
        "infer_cpu_s": statistics.median(r[1] for r in runs),
        "import_wall_s": statistics.median(r[0] for r in imports),
        "import_cpu_s": statistics.median(r[1] for r in imports),
    }
    print(f"infer, one {size}x{size} image -> {4 * size}x{4 * size}, tiny preset, whole process, median of {repeats}:")
    print(f"  wall {result['infer_wall_s']:.2f} s, CPU {result['infer_cpu_s']:.2f} s "
          f"(importing the CLI alone: wall {result['import_wall_s']:.2f} s, CPU {result['import_cpu_s']:.2f} s)")
    print(f"  training-side libraries the CLI imports: {', '.join(loaded) or 'none'}")
    return result


TRAIN_CHILD = r"""
import json, sys, time
start = float(sys.argv[1])
marks = {"python start": time.time() - start}
t = time.perf_counter()
import osediff_lab.train as train
from osediff_lab.data.datamodule import HQDataModule
from osediff_lab.lit.module import SRModule
marks["imports"] = time.perf_counter() - t
from common import compose_config
t = time.perf_counter()
cfg = compose_config(json.loads(sys.argv[2]), sys.argv[3])
marks["config"] = time.perf_counter() - t

def timed(name, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        marks.setdefault(name, time.perf_counter() - t0)
        return out
    return wrapper

clock = {}
setup, build, resume, step = HQDataModule.setup, train.build_module, train.resume_checkpoint, SRModule.training_step
HQDataModule.setup = timed("data set-up", setup)
train.build_module = timed("model build", build)
def resume_probe(*args, **kwargs):
    clock["trainer ready"] = time.perf_counter()
    return resume(*args, **kwargs)
train.resume_checkpoint = resume_probe
steps = []
def step_probe(self, *args, **kwargs):
    t0 = time.perf_counter()
    clock.setdefault("first step start", t0)
    out = step(self, *args, **kwargs)
    steps.append(time.perf_counter() - t0)
    return out
SRModule.training_step = step_probe
t = time.perf_counter()
train.run(cfg)
end = time.perf_counter()
marks["callbacks, logger, trainer"] = clock["trainer ready"] - t - marks["data set-up"] - marks["model build"]
marks["fit set-up to first step"] = clock["first step start"] - clock["trainer ready"]
marks["first step"] = steps[0]
marks["later steps (median)"] = sorted(steps[1:])[len(steps[1:]) // 2] if len(steps) > 1 else 0.0
marks["after the last step (export, summary)"] = end - clock["first step start"] - sum(steps)
print("PHASES " + json.dumps(marks))
"""


def bench_train(tmp: Path, repeats: int, steps: int) -> dict[str, float]:
    """Start-up phases of `train` (tiny preset, 256 px, batch 2, Real-ESRGAN, L2 + VSD + regularizer)."""
    overrides = [*TRAIN, "trainer=cpu", f"trainer.max_steps={steps}", "callbacks.checkpoint.every_n_train_steps=0",
                 "callbacks.samples.every_n_steps=0", "resume=false"]
    runs = []
    for i in range(repeats):
        script = tmp / "train_child.py"
        script.write_text(TRAIN_CHILD)
        wall, cpu, rss, out = run_child([str(script), repr(time.time()), json.dumps(overrides), str(tmp / f"run{i}")])
        phases = json.loads(next(line for line in out.splitlines() if line.startswith("PHASES "))[7:])
        runs.append(phases | {"whole process wall": wall, "whole process CPU": cpu, "peak RSS MiB": rss})
    keys = list(runs[0])
    median = {k: statistics.median(r[k] for r in runs) for k in keys}
    print(f"\ntrain start-up, tiny preset, 256 px, batch 2, {steps} steps, one thread, median of {repeats} (seconds):")
    for k in keys:
        print(f"  {k:40s} {median[k]:8.2f}")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=128, help="input side of the infer image (output is 4x)")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_infer(Path(tmp), args.repeats, args.size) | bench_train(Path(tmp), args.repeats, args.train_steps)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
