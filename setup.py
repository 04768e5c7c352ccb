"""The one build step pyproject.toml cannot state: ship conf/ inside the package as ``osediff_lab/conf``.

The top-level conf/ stays the only source; every wheel (so ``pip install .``, ``--target`` and ``--prefix``)
carries a copy that ``osediff_lab.paths`` finds through ``importlib.resources``. Editable installs read conf/
in place, so they get no copy."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"


class BuildPyWithConf(build_py):
    """build_py that also copies conf/ (its YAML files, folders kept) to ``<build_lib>/osediff_lab/conf``."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "osediff_lab" / "conf"
        shutil.rmtree(target, ignore_errors=True)
        for source in sorted(CONF.rglob("*.yaml")):
            dest = target / source.relative_to(CONF)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)


setup(cmdclass={"build_py": BuildPyWithConf})
