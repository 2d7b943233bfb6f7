"""Start-up of the ``reprmetrics`` command line, next to a bare interpreter and a bare ``import torch``.

    python -m benchmarks.bench_cli_startup               # every command, 7 rounds, a Markdown table
    python -m benchmarks.bench_cli_startup --repeats 15

Each command runs as a fresh process (what a user's shell does), in rounds: every round runs each
command once, in a rotated order, so the noise of a shared machine falls on all of them alike; the
table gives the median and the fastest run. ``--help``, ``--version`` and argument errors import
neither torch nor numpy (``tests/test_cli.py`` checks the imports; this file measures the time), so
they should sit near ``python -c pass`` and far below ``python -c "import torch"``.

``python -m benchmarks.run --only startup`` runs the ``--help`` vs ``import torch`` pair through the
shared harness; its peak-memory columns are the harness's own process, not the child's: ignore them.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import Case

_SCRIPT = shutil.which("reprmetrics") or str(Path(sys.executable).with_name("reprmetrics"))

COMMANDS: dict[str, list[str]] = {
    "python -c pass": [sys.executable, "-c", "pass"],
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    'python -c "import reprmetrics"': [sys.executable, "-c", "import reprmetrics"],
    "reprmetrics --help": [_SCRIPT, "--help"],
    "reprmetrics --version": [_SCRIPT, "--version"],
    "reprmetrics report --help": [_SCRIPT, "report", "--help"],
    "reprmetrics report (argument error)": [_SCRIPT, "report"],
    'python -c "from reprmetrics import evaluate"': [sys.executable, "-c", "from reprmetrics import evaluate"],
}


def run_once(command: list[str]) -> float:
    """Wall seconds of one run of ``command`` as a fresh process (output discarded)."""
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def measure(commands: dict[str, list[str]], repeats: int) -> dict[str, list[float]]:
    for command in commands.values():  # warm the page cache: the first run of anything reads the disk
        run_once(command)
    times: dict[str, list[float]] = {name: [] for name in commands}
    names = list(commands)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(run_once(commands[name]))
    return times


def table(times: dict[str, list[float]]) -> str:
    torch_median = statistics.median(times['python -c "import torch"'])
    lines = ["| command | median (s) | fastest (s) | × `import torch` (median) |", "|---|---:|---:|---:|"]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| `{name}` | {median:.3f} | {min(values):.3f} | {median / torch_median:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="rounds (each runs every command once; default 7)")
    args = parser.parse_args(argv)
    times = measure(COMMANDS, args.repeats)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"Python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs,"
        f" load average {load:.1f} at the end; {args.repeats} rounds\n"
    )
    print(table(times))
    return 0


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cpu":
        return []
    help_command, torch_command = COMMANDS["reprmetrics --help"], COMMANDS['python -c "import torch"']
    bare = {}

    def make_input() -> None:
        bare["s"] = statistics.median(run_once(COMMANDS["python -c pass"]) for _ in range(5))

    return [
        Case(
            name="cli startup: reprmetrics --help",
            ours=lambda _: run_once(help_command),
            baseline=lambda _: run_once(torch_command),
            baseline_name='python -c "import torch" (fresh process)',
            make_input=make_input,
            input_desc="fresh process, no data",
            repeats=3 if quick else 7,
            notes="peak memory is the harness's process, not the child's",
            check=lambda ours_s, base_s: f"python -c pass: {bare['s']:.3f} s",
            check_medians=True,
        )
    ]


if __name__ == "__main__":
    raise SystemExit(main())
