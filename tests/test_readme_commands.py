"""Every command the README shows is either run here, as a user would type it (adapted only to be short and
to point at local stand-ins for the user's files), or listed with the reason it cannot run on a machine
without weights, GPU, cluster or network. A command added to the README fails the first test until it is
sorted into one of the two tables."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REALSR

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]  # the README and the reference pages it links

# Output no run may show: library noise a user cannot act on, epoch counters, crashes.
NOISE = ("gemm_4bit_forward", "publisher trust check", "💡 Tip", "module(s) in eval mode", "LeafSpec", "Epoch ", "Traceback",
         "lr-AdamW", "pre-optimization state", "Total FLOPs")

NOT_HERE = {
    "make test": "the test suite itself",
    "python benchmarks/memory_table.py --models sd3_shape flux_shape --size 1024":
        "benchmarks (numbers never live in tests): 32 predictions at SD3 and FLUX size, about an hour of CPU",
    "python -m osediff_lab.memory model=flux_shape data.crop_size=1024 data.batch_size=1 trainer.precision=bf16-mixed "
    "generator.frozen_dtype=fp8_e4m3 generator.gradient_checkpointing=true text_cache.enabled=true "
    "text_cache.keep_encoders=false": "a FLUX-size prediction takes minutes of CPU; tests/test_memory.py runs the CLI, "
    "tests/test_text_cache.py and tests/test_frozen_storage.py predict with these options on the tiny model",
    "torchrun --nproc_per_node=4 benchmarks/fsdp_check.py model=flux_shape data.crop_size=1024 trainer.precision=bf16-mixed "
    "generator.frozen_dtype=bf16 generator.gradient_checkpointing=true": "needs 4 GPUs; tests/test_fsdp.py runs the "
    "sharding on two CPU ranks over gloo",
    "python -m osediff_lab.demo ckpt=run_a/lora/osediff_lora.safetensors ckpt_b=run_b/lora/osediff_lora.safetensors":
        "serves the Gradio page until stopped; tests/test_demo_browser.py starts it and drives it in headless Chromium",
    "make test-fast": "the test suite's unit tests (tests marked slow left out)",
    "make bench": "benchmarks (timings never live in tests)",
    "make bench BENCH=train": "benchmarks (timings never live in tests)",
    "make lint": "ruff over the sources, run by the lead and CI",
    "make demo": "runs `python -m osediff_lab.train +experiment=demo resume=false`, run below",
    "make demo > log": "the demo with its output in a file: the run below is piped, not a terminal",
    "python -m osediff_lab.weights fetch sd21_base metrics lpips_vgg": "downloads: needs the network",
    "python -m osediff_lab.train +experiment=osediff_paper": "needs SD2.1-base weights (and 4 GPUs)",
    "python -m osediff_lab.train +experiment=osediff_release": "needs SD2.1-base weights and LSDIR",
    "python -m osediff_lab.train +experiment=osediff_paper generator.frozen_dtype=bf16 trainer.precision=bf16-mixed "
    "generator.gradient_checkpointing=true": "needs SD2.1-base weights",
    "python -m osediff_lab.train +experiment=ablate_vsd": "the paper's recipe on LSDIR: needs SD2.1-base and LSDIR",
    "python -m osediff_lab.train -m +experiment=ablate_rank trainer=slurm hydra/launcher=slurm_gpu "
    "hydra.launcher.account=myproj": "needs a Slurm cluster with GPUs and SD2.1-base",
    "python -m osediff_lab.train -m method.vsd_weight=0,1 trainer=ddp_cpu hydra/launcher=slurm_cpu": "needs the Slurm "
    "cluster that ../shared/tools/slurm/up.sh starts (tests/test_preemption.py and the Slurm tests use it)",
    "bash ../shared/tools/slurm/up.sh": "starts the shared Slurm test cluster (outside this repository)",
    "python -m osediff_lab.report --wandb-workspace ablate_rank --out experiments/rank/workspace.json": "reads the "
    "W&B runs of the ablate_rank sweep (SD2.1-base)",
    "python -m osediff_lab.weights fetch lpips_vgg": "downloads: needs the network",
    "python -m osediff_lab.infer input=img.png output=sr/ ckpt=osediff.pkl prompt=dape": "needs the official "
    "OSEDiff release file and the RAM/DAPE weights",
    "python -m osediff_lab.prompts.precompute data=lsdir prompt=llava": "needs LSDIR and the LLaVA-1.5 weights",
    "python benchmarks/bench_perf.py --model sd21_shape --size 128": "a benchmark (make bench runs it)",
    "python benchmarks/bench_memory.py": "a benchmark (make bench runs it)",
    "python benchmarks/bench_release.py --rows syncs": "a benchmark (make bench runs it; tests/test_precision.py "
    "holds the loop to no reads between log steps)",
    "python benchmarks/bench_degradation.py [--blur]": "a benchmark (make bench runs it; tests/test_degradation.py "
    "holds the batch to each sample alone and the strips to the plain convolution, bit for bit)",
    "python benchmarks/bench_backbones.py": "a benchmark (make bench runs it; its table is in docs/backbones.md)",
    "python -m osediff_lab.train +experiment=osediff_sd3": "needs SD3-medium weights and GPUs (tests/test_configs.py "
    "builds each backbone recipe on its tiny twin)",
    "python -m osediff_lab.weights fetch sdxl_base": "downloads: needs the network",
    "bash benchmarks/gpu_check.sh": "needs a CUDA GPU",
    "python -m osediff_lab.pretrain": "pretrains the nano base (a long CPU run; tests/test_pretrain.py runs it small)",
    "python -m osediff_lab.pretrain stage=vae": "a nano pretraining stage (tests/test_pretrain.py runs it small)",
    "python -m osediff_lab.pretrain stage=unet": "a nano pretraining stage (tests/test_pretrain.py runs it small)",
    "python -m osediff_lab.pretrain stage=samples": "a nano pretraining stage (tests/test_pretrain.py runs it small)",
    "python -m osediff_lab.pretrain stage=ship ship_dir=my_base/": "needs the pretraining stages' outputs",
    "python -m osediff_lab.pretrain stage=vae data=folder data.root=$HOME/photos out_dir=outputs/pretrain/mine":
        "needs a folder of your photographs",
    "python: class MyMethod(Method):": "a sketch of a method's shape (docs/extending.md); tests/test_plugin_points.py "
    "trains a complete one defined in the test file",
    "python -m osediff_lab.train +experiment=hypir_release data.root=<512-px patches>": "needs SD2.1-base, HYPIR's "
    "OpenCLIP ConvNeXt and a dataset (tests/test_gan.py checks its values and runs it on the tiny twin)",
    "python -m osediff_lab.train method=osediff_gan": "trains on SD2.1-size tiny defaults for long; tests/test_gan.py "
    "trains, resumes, exports and infers osediff_gan on model=tiny",
    "python -m osediff_lab.train method=hypir discriminator=convnext_tiny": "tests/test_gan.py trains, resumes, "
    "exports and infers hypir with the ConvNeXt twin on model=tiny",
    "python -m osediff_lab.weights fetch convnext_xxlarge_clip": "downloads: needs the network",
    "python -m osediff_lab.infer input=lq/ output=sr/ ckpt=<run>/lora/hypir_lora.safetensors": "needs a trained "
    "HYPIR run (tests/test_gan.py infers from one on model=tiny)",
    "python -m osediff_lab.train +experiment=pisasr_paper": "needs SD2.1-base, RAM weights and LSDIR "
    "(tests/test_pisasr_release.py builds it on the tiny model)",
    "python -m osediff_lab.train +experiment=pisasr_paper method=pisasr_semantic trainer.max_steps=8500 "
    "method.pixel_lora_from=<stage 1 run>/lora/osediff_lora.safetensors": "needs the paper recipe's stage 1 run",
    "python -m osediff_lab.train +experiment=pisasr_release": "needs SD2.1-base, RAM weights and LSDIR "
    "(tests/test_pisasr_release.py runs both stages on the tiny model)",
    "python -m osediff_lab.train +experiment=pisasr_release method=pisasr_semantic trainer.max_steps=12500 "
    "method.pixel_lora_from=<stage 1 run>/lora/osediff_lora.safetensors ckpt_path=<stage 1 run>/checkpoints/last.ckpt":
        "needs the release recipe's stage 1 run (tests/test_pisasr_release.py continues stage 1 through the loop)",
    "python -m osediff_lab.infer input=lq/ output=sr/ ckpt=pisa_sr.pkl pipeline.lambda_pix=1.0 pipeline.lambda_sem=0.5":
        "needs the authors' pisa_sr.pkl and SD2.1-base (tests/test_pisasr_release.py loads a release-format file)",
}

DEMO = "python -m osediff_lab.train +experiment=demo"
RUN = (
    "python -m osediff_lab.weights check",
    DEMO,
    "python -m osediff_lab.train model=tiny data=folder data.root=$HOME/photos data.crop_size=256 trainer=cpu method.lpips_weight=0",
    "python -m osediff_lab.train -m model=tiny method.lpips_weight=0 method.vsd_weight=0,1 hydra/launcher=local",
    "python -m osediff_lab.report multirun-dir/ --out experiments/rank/results.md --plot experiments/rank/tradeoff.png",
    "python -m osediff_lab.evaluate sr_dir=results/sr gt_dir=../shared/data/realsr/HR",
    "python -m osediff_lab.evaluate checkpoint=outputs/.../lora/osediff_lora.safetensors val=realsr",
    "python -m osediff_lab.infer input=lq_folder/ output=sr/ ckpt=outputs/.../lora/osediff_lora.safetensors",
    "python -m osediff_lab.export ckpt=outputs/.../checkpoints/last.ckpt out=my_lora.safetensors",
    "python: from osediff_lab.pipeline import SRPipeline",
    "python -m osediff_lab.profile model=sd21_shape --no-latency",
    "python -m osediff_lab.memory model=sd21_shape data.crop_size=512 data.batch_size=1 generator.gradient_checkpointing=true "
    "generator.frozen_dtype=bf16 trainer.precision=bf16-mixed",
    "python -m osediff_lab.data.preview degradation=realesrgan data=demo",
    "python -m osediff_lab.train method=pisasr_pixel",
    "python -m osediff_lab.train method=pisasr_semantic method.pixel_lora_from=outputs/.../lora/osediff_lora.safetensors",
    "python -m osediff_lab.infer input=lq_folder/ output=sr/ ckpt=outputs/.../lora/osediff_lora.safetensors pipeline.lambda_sem=0.5",
)
# docs/export.md: the formats of the demo's LoRA export, the diffusers folder's own script, the Hub offline
EXPORTS = (
    "python -m osediff_lab.export ckpt=outputs/.../lora/osediff_lora.safetensors format=diffusers out=sr_diffusers",
    "python sr_diffusers/infer.py sr_diffusers lq.png sr.png",
    "python -m osediff_lab.export ckpt=outputs/.../lora/osediff_lora.safetensors format=kohya out=sr_kohya",
    "python -m osediff_lab.export ckpt=outputs/.../lora/osediff_lora.safetensors out=sr_lora push_to_hub=me/osediff-x4",
)


def readme_commands() -> list[str]:
    """Shell lines of the bash blocks of the README and docs/ (continuations joined, comments cut), inline
    `python ...` and `make ...` spans, and each python block by its first line."""
    text = "\n".join(page.read_text() for page in DOCS)
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                found.append(re.sub(r"\s+", " ", line))
    found += re.findall(r"`((?:python|make|bash) [^`]+)`", text)
    found += ["python: " + block.splitlines()[0] for block in re.findall(r"```python\n(.*?)```", text, re.S)]
    return list(dict.fromkeys(found))


def python_block() -> str:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]


def test_every_readme_command_is_run_or_explained():
    commands, run = set(readme_commands()), set(RUN) | set(EXPORTS)
    assert commands - set(NOT_HERE) - run == set(), "README commands neither run by this test nor explained"
    assert run & set(NOT_HERE) == set()
    assert (set(NOT_HERE) | run) - commands == set(), "commands listed here that the README no longer shows"


class Shell:
    """Runs commands as a user would, from one scratch folder with its own HOME and output root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "HOME": str(root / "home"), "OSEDIFF_OUTPUT": str(root / "outputs"), "WANDB_MODE": "offline",
                    "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        (root / "home").mkdir(parents=True, exist_ok=True)

    def __call__(self, command: str, *extra: str, rc: int = 0, timeout: int = 900) -> str:
        words = [w.replace("$HOME", self.env["HOME"]) for w in command.split()]  # as the shell would
        argv = [sys.executable, *words[1:], *extra] if words[0] == "python" else [*words, *extra]
        proc = subprocess.run(argv, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        assert proc.returncode == rc, f"{command} exited {proc.returncode}:\n{out[-4000:]}"
        shown = [n for n in NOISE if n in out]
        assert not shown, f"{command} printed {shown}:\n{out[-4000:]}"
        return out


def quoted(path: Path) -> str:
    """A path as a Hydra value: run directories hold '=' and ','."""
    return f"'{path}'"


@pytest.fixture(scope="module")
def shell(tmp_path_factory) -> Shell:
    return Shell(tmp_path_factory.mktemp("readme"))


@pytest.fixture(scope="module")
def demo(shell) -> tuple[str, Path]:
    """The demo, two steps long (a checkpoint after each): its output and its run directory (LoRA, checkpoints)
    for later commands."""
    out = shell(DEMO, "trainer.max_steps=2", "resume=false", "callbacks.checkpoint.every_n_train_steps=1")
    (run,) = (shell.root / "outputs" / "demo" / "runs").iterdir()
    return out, run


@pytest.mark.slow
def test_weights_check(shell):
    out = shell("python -m osediff_lab.weights check", rc=1)  # nothing fetched on this machine
    assert "missing" in out and "sd21_unet" in out


@pytest.mark.slow
def test_demo(demo):
    out, run = demo
    assert "train: step 2/2 (100%)" in out and "osediff-lab: run finished" in out
    assert (run / "lora" / "osediff_lora.safetensors").is_file() and (run / "summary.json").is_file()
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_train_on_a_folder_of_photos(shell):
    import skimage

    photos = shell.root / "home" / "photos"
    photos.mkdir(parents=True)
    for name in ("astronaut.png", "coffee.png"):
        shutil.copy(Path(skimage.__file__).parent / "data" / name, photos / name)
    out = shell(RUN[2], "trainer.max_steps=1", "data.batch_size=1")
    assert "osediff-lab: run finished" in out


@pytest.mark.slow
def test_local_multirun_then_report(shell):
    out = shell(RUN[3], "trainer.max_steps=1")
    (sweep,) = (shell.root / "outputs" / "train" / "multiruns").iterdir()
    assert "method.vsd_weight=0 | finished" in out and "method.vsd_weight=1 | finished" in out  # the launcher's job table
    report = RUN[4].replace("multirun-dir/", f"{sweep}/")
    out = shell(report)
    assert "vsd_weight" in (shell.root / "experiments" / "rank" / "results.md").read_text()
    # the perception-distortion plot needs validation metrics (val=..., LPIPS weights): said, not silently skipped
    assert (shell.root / "experiments" / "rank" / "tradeoff.png").is_file() or "no plot: runs lack" in out


@pytest.mark.slow
def test_evaluate_an_sr_folder(shell, realsr):
    sr = shell.root / "results" / "sr"
    sr.mkdir(parents=True)
    for lr in sorted((REALSR / "LR").glob("*.png"))[:3]:
        im = Image.open(lr).convert("RGB")
        im.resize((im.width * 4, im.height * 4), Image.BICUBIC).save(sr / lr.name)
    out = shell(RUN[5], "allow_subset=true", "metrics=[psnr,ssim,niqe,lpips]")  # a quick look at 3 of the 100
    assert "97 GT image(s) have no SR image" in out and "| psnr |" in out and "lpips | unavailable" in out


@pytest.mark.slow
def test_evaluate_a_checkpoint(shell, demo, realsr):
    lora = demo[1] / "lora" / "osediff_lora.safetensors"
    out = shell(RUN[6].replace("outputs/.../lora/osediff_lora.safetensors", quoted(lora)), "val.limit=2", "metrics=[psnr,ssim]")
    assert "# Evaluation: 2 images" in out


@pytest.mark.slow
def test_infer_a_folder(shell, demo):
    lq = shell.root / "lq_folder"
    lq.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(lq / f"{i}.png")
    lora = demo[1] / "lora" / "osediff_lora.safetensors"
    out = shell(RUN[7].replace("outputs/.../lora/osediff_lora.safetensors", quoted(lora)), "pipeline.process_size=64")
    assert "2 of 2 images written" in out
    with Image.open(shell.root / "sr" / "0.png") as im:
        assert im.size == (96, 80)


@pytest.mark.slow
def test_export_then_the_python_api(shell, demo):
    last = demo[1] / "checkpoints" / "last.ckpt"
    shell(RUN[8].replace("outputs/.../checkpoints/last.ckpt", quoted(last)))
    assert (shell.root / "my_lora.safetensors").is_file()
    code = "from PIL import Image\npil_image = Image.new('RGB', (24, 20), (90, 120, 150))\n" + python_block()
    code += "assert sr_images[0].size == (96, 80), sr_images[0].size\n"
    shell("python -c", code)


@pytest.mark.slow
def test_profile_memory_and_preview(shell):
    assert "GMAC" in shell(RUN[10])
    assert "GiB" in shell(RUN[11])
    out = shell(RUN[12])
    assert ".png" in out and "SKIPPED" not in out


@pytest.mark.slow
def test_pisa_sr_two_stages_then_infer(shell):
    short = ("trainer.max_steps=2", "loss.lpips.pretrained=false", "loss.lpips.net=alex")  # no VGG weights here
    shell(RUN[13], *short)
    pixel = run_dir_with(shell, "method=pisasr_pixel")
    lora = pixel / "lora" / "osediff_lora.safetensors"
    shell(RUN[14].replace("outputs/.../lora/osediff_lora.safetensors", quoted(lora)), *short)
    semantic = run_dir_with(shell, "method=pisasr_semantic")
    lq = shell.root / "lq_folder"
    lq.mkdir(exist_ok=True)
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(lq / "p.png")
    out = shell(RUN[15].replace("outputs/.../lora/osediff_lora.safetensors", quoted(semantic / "lora" / "osediff_lora.safetensors")),
                "pipeline.process_size=64")
    assert "images written" in out and (shell.root / "sr" / "p.png").is_file()


def run_dir_with(shell: Shell, override: str) -> Path:
    """The one training run directory whose command had ``override`` (long names are shortened on disk)."""
    runs = [d for d in (shell.root / "outputs" / "train" / "runs").iterdir()
            if override in (d / ".hydra" / "overrides.yaml").read_text()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
def test_export_formats_the_scripts_output_and_the_hub_offline(shell, demo):
    """docs/export.md's commands on the demo's LoRA: the diffusers folder's infer.py gives the pipeline's image (to
    PNG rounding), kohya writes its files, push_to_hub offline writes the folder, says the upload and exits 3."""
    lora = demo[1] / "lora" / "osediff_lora.safetensors"
    small = "pipeline.process_size=64"  # the script's size rule comes from the export's pipeline options

    def export(command: str, *extra: str, rc: int = 0) -> str:
        return shell(command.replace("outputs/.../lora/osediff_lora.safetensors", quoted(lora)), *extra, rc=rc)

    assert "diffusers export sr_diffusers" in export(EXPORTS[0], small)
    lq = Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    lq.save(shell.root / "lq.png")
    # not through shell(): this machine's bitsandbytes logs its CPU-kernel lookup when diffusers loads (osediff_lab
    # quiets it, the standalone script cannot); a warning of the script's own lines would name infer.py
    script = subprocess.run([sys.executable, *EXPORTS[1].split()[1:]], cwd=shell.root, env=shell.env, capture_output=True,
                            text=True, timeout=600)
    assert script.returncode == 0 and "infer.py:" not in script.stderr and "osediff_lab" not in script.stderr, script.stderr
    from osediff_lab.pipeline import SRPipeline

    ours = np.asarray(SRPipeline.from_checkpoint(lora, options={"process_size": 64})([lq])[0], dtype=np.int16)
    with Image.open(shell.root / "sr.png") as im:
        theirs = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert theirs.shape == ours.shape == (80, 96, 3) and np.abs(theirs - ours).max() <= 1 and ours.std() > 3
    export(EXPORTS[2])
    assert {"unet_lora.safetensors", "README.md"} <= {p.name for p in (shell.root / "sr_kohya").iterdir()}
    out = export(EXPORTS[3], rc=3)
    assert "hf upload me/osediff-x4 sr_lora . --repo-type model" in out and (shell.root / "sr_lora" / "README.md").is_file()
