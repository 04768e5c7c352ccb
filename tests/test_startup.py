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


@pytest.mark.slow
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


def test_the_packaged_conf_comes_before_the_checkout(tmp_path: Path, monkeypatch):
    """A non-editable install carries conf/ inside the package (osediff_lab/conf); only without it (editable
    installs, the checkout) is the checkout's conf/ used. A stand-in package shows the order."""
    package = tmp_path / "stand_in_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(paths.CONF_ENV, raising=False)
    monkeypatch.setattr(paths, "PACKAGE", "stand_in_pkg")
    assert paths.conf_candidates() == [package / "conf", paths.REPO_ROOT / "conf"]
    assert paths.find_conf_dir() == paths.REPO_ROOT / "conf"
    (package / "conf").mkdir()
    (package / "conf" / "train.yaml").write_text("seed: 0\n")
    assert paths.find_conf_dir() == package / "conf"


def build_wheel(tmp_path: Path, python: str = sys.executable) -> Path:
    """`pip wheel` of a copy of the checkout (the build writes build/ and egg-info next to the sources)."""
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "multirun", "*.egg-info",
                                                                "build", "__pycache__", ".pytest_cache", ".ruff_cache"))
    proc = subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path / "dist"), str(source)], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("osediff_lab-*.whl")
    return wheel


# Run from an installed copy: where the package and conf/ are, every YAML file shipped, the train config composed.
COMPOSE = (
    "import json, sys\n"
    "from pathlib import Path\n"
    "import osediff_lab.paths as p\n"
    "from hydra import compose, initialize_config_dir\n"
    "from omegaconf import OmegaConf\n"
    "from osediff_lab import resolvers\n"
    "with initialize_config_dir(config_dir=str(p.CONF_DIR), version_base='1.3'):\n"
    "    cfg = compose(config_name='train', overrides=['+experiment=demo'])\n"
    "files = sorted(f.relative_to(p.CONF_DIR).as_posix() for f in p.CONF_DIR.rglob('*.yaml'))\n"
    "print(json.dumps({'module': p.__file__, 'conf': str(p.CONF_DIR), 'files': files, 'config': OmegaConf.to_yaml(cfg)}))\n"
)


@pytest.mark.slow
def test_target_and_prefix_installs_carry_conf_and_compose_the_train_config(tmp_path: Path):
    """`pip install --target` and `--prefix` of the wheel (no deps, no build isolation): each copy finds its own
    conf/ (package data, every YAML file of the checkout's conf/) and composes the train config from another folder."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1]
    wheel = build_wheel(tmp_path)
    expected = sorted(f.relative_to(root / "conf").as_posix() for f in (root / "conf").rglob("*.yaml"))
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        checkout_config = OmegaConf.to_yaml(compose(config_name="train", overrides=["+experiment=demo"]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in ENV.items() if k not in ("PYTHONPATH", paths.CONF_ENV)}
    for option in ("--target", "--prefix"):
        dest = tmp_path / option.strip("-")
        # --ignore-installed: without it `--prefix` first uninstalls this environment's (editable) osediff_lab
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--ignore-installed", "--no-warn-script-location", option, str(dest), str(wheel)],
                             env=env, capture_output=True, text=True, timeout=600)
        assert pip.returncode == 0, pip.stderr[-3000:]
        site_dir = dest if option == "--target" else next((dest / "lib").glob("python3*/site-packages"))
        run = subprocess.run([sys.executable, "-c", COMPOSE], cwd=elsewhere, env=env | {"PYTHONPATH": str(site_dir)},
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        found = json.loads(run.stdout.strip().splitlines()[-1])
        assert found["module"] == str(site_dir / "osediff_lab" / "paths.py"), found["module"]
        assert found["conf"] == str(site_dir / "osediff_lab" / "conf")
        assert found["files"] == expected
        assert found["config"] == checkout_config  # the same train config as the checkout's
    ours = subprocess.run([sys.executable, "-c", "import osediff_lab.paths as p; print(p.__file__)"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=120)
    assert ours.stdout.strip() == str(root / "src" / "osediff_lab" / "paths.py"), "this environment's install was touched"


@pytest.mark.slow
def test_a_non_editable_install_trains_the_demo_from_another_directory(tmp_path: Path):
    """`pip install .` (a wheel: package, assets, conf/ as package data) into a fresh venv, then the demo from a
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
    assert module_file.startswith(str(venv)) and conf_dir == str(Path(module_file).parent / "conf"), where.stdout + where.stderr
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
