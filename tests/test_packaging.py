"""Install layout: `callbacks/` installs as `reprmetrics.callbacks`, from an editable install and a wheel."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_core_never_imports_lightning():
    code = "import sys, reprmetrics, reprmetrics.functional; assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_editable_install_maps_callbacks():
    out = subprocess.run(
        [sys.executable, "-c", "import reprmetrics.callbacks as c; print(c.__file__)"],
        check=True, capture_output=True, text=True, cwd="/",
    ).stdout.strip()
    assert Path(out).resolve() == (ROOT / "callbacks" / "__init__.py").resolve()


@pytest.mark.slow
def test_wheel_contains_and_imports_callbacks(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("reprmetrics-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "reprmetrics/callbacks/__init__.py" in names
    assert not any(n.startswith("callbacks/") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run(
        [sys.executable, "-c", "import reprmetrics, reprmetrics.callbacks as c; print(reprmetrics.__file__); print(c.__file__)"],
        check=True, capture_output=True, text=True, cwd="/", env=env,
    ).stdout.split()
    assert all(Path(p).resolve().is_relative_to(site.resolve()) for p in out)


def test_ci_runs_the_readme_quick_start_test_command():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1]
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", quick_start, flags=re.S)
    commands = [line for block in commands for line in block.strip().splitlines() if line and not line.startswith("#")]
    assert len(commands) >= 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
