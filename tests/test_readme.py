"""README.md: short, its quick start what CI runs, its links live, and every Python block runs as printed."""

import importlib.metadata
import re
from pathlib import Path

import pytest
from markdown_blocks import blocks, run_page

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
QUICK_START = [
    "python3 -m venv .venv && . .venv/bin/activate"
    ' && pip install -q -c constraints.txt -e ".[examples]" && python examples/ssl_digits.py',
    "python3 -m venv .venv && . .venv/bin/activate"
    ' && pip install -q -c constraints.txt -e ".[test]" && python -m pytest -q',
]


def quick_start_commands(path: Path) -> list[str]:
    section = path.read_text(encoding="utf-8").split("## Quick start", 1)[1]
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", section, flags=re.S)[0]
    return [line for line in commands.strip().splitlines() if line and not line.startswith("#")]


def test_readme_is_short_and_names_the_version():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert f"Version {importlib.metadata.version('reprmetrics')} " in text


def test_quick_start_commands_are_unchanged_and_the_docs_show_the_same():
    assert quick_start_commands(README) == QUICK_START
    assert quick_start_commands(ROOT / "docs" / "getting-started.md") == QUICK_START


def test_quick_start_times_are_filled_in():
    for path in (README, ROOT / "docs" / "getting-started.md"):
        assert not re.search(r"\bQS_[A-Z_]+|\bTEST_(INSTALL|SUITE)\b", path.read_text(encoding="utf-8")), path


def test_relative_links_point_at_files():
    text = README.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in t]
    assert len(targets) >= 15
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, missing


def test_lid_is_flagged_as_a_geometric_mean_where_the_metrics_are_listed():
    for path in (README, ROOT / "docs" / "metrics" / "index.md"):
        text = path.read_text(encoding="utf-8")
        assert "geometric mean" in text and ".mean()" in text and "6.179" in text and "5.767" in text, path


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write lightning_logs/ and hf_out/
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_every_python_block_runs(in_tmp, capsys):
    runnable = [b for b in blocks(README) if b.runs]
    assert len(runnable) == 3  # Lightning, Hugging Face, plain loop: none is skipped
    namespace = run_page(README)
    lines = capsys.readouterr().out.strip().splitlines()
    # Lightning: the guard stops the collapsing model well before max_epochs and says why.
    lightning_stop = namespace["stop"]
    assert (
        lightning_stop.stopping_reason_message is not None and "tap projector" in lightning_stop.stopping_reason_message
    )
    (epochs,) = [int(m[1]) for m in map(re.compile(r"^(\d+) .*Signaling Trainer to stop").match, lines) if m]
    assert epochs < 15
    # Hugging Face: the same guard through the Trainer.
    assert namespace["guard"].stopping_reason is not None and "tap projector" in namespace["guard"].stopping_reason
    assert namespace["trainer"].state.epoch < 15
    # The plain loop: one line per epoch, drift included, on 4 × 128 samples.
    assert [line.split()[0] for line in lines[-2:]] == ["0", "1"]
    assert "'encoder/cka_to_reference'" in lines[-1] and "'encoder/num_samples': 512.0" in lines[-1]
