"""Start-up: the inference and evaluation CLIs import nothing of training, heavy libraries load when a run
needs them, and conf/ is found without importing training (osediff_lab.paths)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from osediff_lab import paths

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
TRAINING = ("pytorch_lightning", "lightning", "osediff_lab.train", "osediff_lab.lit", "wandb", "lpips", "pyiqa")
# Printed at exit: which of these the process had imported, whatever path the run took.
PROBE = (
    "import atexit, json, runpy, sys\n"
    "names = json.loads(sys.argv[1])\n"
    "atexit.register(lambda: print('LOADED ' + json.dumps([n for n in names if n in sys.modules])))\n"
    "sys.argv = ['osediff_lab.infer', *sys.argv[2:]]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def loaded_after(code: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` are in sys.modules after ``code`` runs in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([n for n in {list(names)!r} if n in sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_cli_modules_loads_no_training_and_no_model_libraries():
    heavy = (*TRAINING, "diffusers", "transformers", "peft", "torchmetrics", "timm")
    assert loaded_after("import osediff_lab.infer, osediff_lab.evaluate, osediff_lab.data.paired", heavy) == []
    assert "pytorch_lightning" in loaded_after("import osediff_lab.train", ("pytorch_lightning",))  # the probe sees imports


@pytest.mark.slow
def test_an_infer_run_never_imports_training(tmp_path: Path):
    """The real CLI on one image with a tiny checkpoint; the probe lists training modules loaded at exit."""
    from helpers import TINY, compose_config
    from osediff_lab.models.components import build_components
    from osediff_lab.models.lora_files import export_lora
    from osediff_lab.models.osediff import build_generator

    cfg = compose_config(TINY)
    generator, targets = build_generator(build_components(cfg.model), cfg.generator)
    state = {n: p for n, p in generator.named_parameters() if p.requires_grad}
    lora = export_lora(state, cfg, targets, tmp_path / "lora.safetensors")[0]
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    args = [f"input={tmp_path / 'a.png'}", f"output={tmp_path / 'out'}", f"ckpt={lora}", "pipeline.process_size=32",
            "prompt=fixed", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps([*TRAINING, "diffusers"]), *args], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "a.png").is_file()
    loaded = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("LOADED "))[7:])
    assert loaded == ["diffusers"]  # the model libraries load for the run itself, nothing of training


def test_conf_dir_is_the_checkout_and_follows_the_environment_variable(tmp_path: Path, monkeypatch):
    assert Path(__file__).resolve().parents[1] / "conf" == paths.CONF_DIR
    assert "osediff_lab.train" not in loaded_after("import osediff_lab.paths", ("osediff_lab.train",))
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "train.yaml").write_text("seed: 0\n")
    monkeypatch.setenv(paths.CONF_ENV, str(tmp_path / "conf"))
    assert paths.find_conf_dir() == tmp_path / "conf"
    monkeypatch.setenv(paths.CONF_ENV, str(tmp_path))  # set but wrong: an error naming it, no silent fallback
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        paths.find_conf_dir()


def test_conf_dir_falls_back_to_the_installed_copy(tmp_path: Path, monkeypatch):
    """Without the checkout's conf/ (a non-editable install), the copy under <prefix>/share/osediff_lab/conf."""
    share = tmp_path / paths.SHARE
    share.mkdir(parents=True)
    (share / "train.yaml").write_text("seed: 0\n")
    monkeypatch.delenv(paths.CONF_ENV, raising=False)
    monkeypatch.setattr(paths.sys, "prefix", str(tmp_path))
    checkout, *installed = paths.conf_candidates()
    assert share in installed
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "site-packages")  # where an installed package sits: no conf/
    assert paths.find_conf_dir() == share


def test_every_conf_folder_ships_with_the_package():
    """pyproject's data-files list every folder of conf/ holding YAML (a wheel installs them under share/)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    data_files = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    folders = {p.parent.relative_to(root).as_posix() for p in (root / "conf").rglob("*.yaml")}
    assert {f"share/osediff_lab/{f}": [f"{f}/*.yaml"] for f in sorted(folders)} == data_files


@pytest.mark.slow
def test_a_non_editable_install_trains_the_demo_from_another_directory(tmp_path: Path):
    """`pip install .` (a wheel: package, assets, conf/ as data files) into a fresh venv, then the demo from a
    folder that is not the checkout. The venv reaches this environment's libraries through a path file, but
    not its editable osediff_lab (path files inside that folder are not read)."""
    root = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site_dir = next((venv / "lib").glob("python3*/site-packages"))
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
    (site_dir / "deps.pth").write_text(deps + "\n")
    python = venv / "bin" / "python"
    env = {k: v for k, v in ENV.items() if k not in ("PYTHONPATH", paths.CONF_ENV)}
    build = tmp_path / "build"  # a copy: the wheel build writes build/ and egg-info next to the sources
    shutil.copytree(root, build, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "multirun", "*.egg-info", "build"))
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(build)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import osediff_lab.paths as p; print(p.__file__); print(p.CONF_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    module_file, conf_dir = where.stdout.split()
    assert module_file.startswith(str(venv)) and conf_dir == str(venv / paths.SHARE), where.stdout + where.stderr
    demo = subprocess.run([str(python), "-m", "osediff_lab.train", "+experiment=demo", "trainer.max_steps=1", "resume=false",
                           f"paths.output_root={elsewhere / 'outputs'}"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, (demo.stdout + demo.stderr)[-3000:]
    assert "osediff-lab: run finished" in demo.stdout


def test_the_gpu_check_ends_within_eight_minutes_even_if_every_section_hangs():
    """Issue 19: a session with a GPU runs benchmarks/gpu_check.sh in under 8 minutes; each section's
    timeout bounds it, so their sum must stay below 480 s (every command in it must carry one)."""
    script = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh").read_text()
    commands = [line for line in script.splitlines() if "$PY " in line and not line.lstrip().startswith(("#", "if "))]
    assert commands and all(line.lstrip().startswith("timeout ") for line in commands), commands
    assert sum(int(line.split()[1]) for line in commands) < 480
