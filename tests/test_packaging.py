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
    # The tracker, the guards and the logger sinks serve both adapters. (transformers is not checked: torchmetrics
    # itself imports it, for BERTScore, whenever it is installed.)
    code = (
        "import sys, reprmetrics, reprmetrics.functional, reprmetrics.monitor, reprmetrics.stopping, reprmetrics.sinks;"
        " assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


@pytest.mark.slow  # an editable install into a fresh virtual environment
def test_editable_install_maps_callbacks():
    out = subprocess.run(
        [sys.executable, "-c", "import reprmetrics.callbacks as c; print(c.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd="/",
    ).stdout.strip()
    assert Path(out).resolve() == (ROOT / "callbacks" / "__init__.py").resolve()


@pytest.mark.slow
def test_wheel_contains_and_imports_callbacks(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("reprmetrics-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "reprmetrics/callbacks/__init__.py" in names
    # The version comes from reprmetrics.__version__; the Apache-2.0 text ships in the metadata.
    import reprmetrics

    assert wheel.name.startswith(f"reprmetrics-{reprmetrics.__version__}-")
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert f"Version: {reprmetrics.__version__}\n" in zipfile.ZipFile(wheel).read(metadata).decode()
    license_files = [n for n in names if ".dist-info/" in n and n.rsplit("/", 1)[-1] == "LICENSE"]
    assert license_files and b"Apache License" in zipfile.ZipFile(wheel).read(license_files[0])
    assert not any(n.startswith("callbacks/") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import reprmetrics, reprmetrics.callbacks as c; print(reprmetrics.__file__); print(c.__file__)",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd="/",
        env=env,
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


def test_lazy_names_match_the_type_checking_imports():
    """`reprmetrics.__getattr__` loads names from `_LAZY`; type checkers, IDEs and the API reference read
    the `if TYPE_CHECKING:` imports. Both must list the same names from the same modules."""
    import ast

    import reprmetrics

    tree = ast.parse((ROOT / "reprmetrics" / "__init__.py").read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING")
    imported = {
        alias.name: node.module for node in guarded.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    assert imported == reprmetrics._LAZY
    assert set(reprmetrics._LAZY) == set(reprmetrics.__all__) - {"__version__"}
