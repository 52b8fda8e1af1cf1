"""Packaging: `pip install .` gives a working `grassmann-lora` command without
a top-level package named `core`; the metadata the registry reads is complete
and true (license file, icon, ComfyUI floor, nothing of tests/bench shipped)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")   # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_core_package_is_installed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {"grassmann_lora." + str(p.parent.relative_to(ROOT)).replace(os.sep, ".")
             for p in (ROOT / "core").rglob("__init__.py")}
    assert found == listed
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"grassmann_lora.core": "core"}


def test_license_file_matches_the_metadata():
    assert PYPROJECT["project"]["license"] == {"file": "LICENSE"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "License :: OSI Approved :: Apache Software License" in PYPROJECT["project"]["classifiers"]


def test_registry_fields():
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["Icon"].startswith("https://") and (ROOT / "assets" / "icon.svg").is_file()
    assert comfy["Icon"].endswith("/assets/icon.svg")
    floor = re.fullmatch(r">=(\d+)\.(\d+)\.(\d+)", comfy["requires-comfyui"])
    assert floor
    version_file = Path(os.environ.get("COMFYUI_PATH", Path.home() / "ComfyUI")) / "comfyui_version.py"
    if version_file.is_file():   # the integration tests' ComfyUI meets the floor
        have = re.search(r'__version__\s*=\s*"(\d+)\.(\d+)\.(\d+)', version_file.read_text())
        assert tuple(map(int, have.groups())) >= tuple(map(int, floor.groups()))
    ignored = (ROOT / ".comfyignore").read_text().split()
    assert {"tests/", "bench/", ".ci/"} <= set(ignored)


def test_pip_install_gives_a_working_command_without_a_top_level_core(tmp_path):
    pytest.importorskip("setuptools")
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode:
        pytest.skip("pip is not available in this environment")
    src = tmp_path / "src"                 # build from a copy: the checkout stays clean
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "core", src / "core", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    # offline and fast: no index, no build isolation, dependencies already here
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                          "--no-build-isolation", "--target", str(target), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (target / "grassmann_lora" / "core" / "cli.py").is_file()
    assert not (target / "core").exists()
    script = target / "bin" / "grassmann-lora"
    assert script.is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 0 and "usage: grassmann-lora" in out.stdout
    # a real command, run away from the checkout
    sys.path.insert(0, str(ROOT))
    from core.save import save_kohya
    from core.synthetic import random_lora
    sys.path.pop(0)
    lora = save_kohya(random_lora("sd1", rank=2, seed=0, limit=3), str(tmp_path / "a.safetensors"))
    out = subprocess.run([sys.executable, str(script), "inspect", "--summary", lora], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 0 and "SD1" in out.stdout, out.stderr


def test_python_m_core_still_works_in_the_checkout():
    out = subprocess.run([sys.executable, "-m", "core", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "usage: python -m core" in out.stdout
