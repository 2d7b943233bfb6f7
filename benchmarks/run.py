"""Run every benchmark and print a Markdown table of ours vs the baseline (optionally JSON too).

python -m benchmarks.run                 # all benchmarks, full size, on CPU
python -m benchmarks.run --quick         # small inputs (seconds); what CI could afford
python -m benchmarks.run --device cuda --json results.json --only rankme
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import sys

import torch

import benchmarks
from benchmarks.harness import markdown_table, run_case


def discover() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="small inputs, for a smoke run")
    parser.add_argument("--only", default="", help="run only cases whose name contains this text")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")

    rows = []
    for module_name in discover():
        module = importlib.import_module(f"benchmarks.{module_name}")
        for case in module.cases(device, args.quick):
            if args.only and args.only not in case.name:
                continue
            print(f"running {case.name} on {case.input_desc} ...", file=sys.stderr, flush=True)
            rows.append(run_case(case, device))
    env = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    )
    print(f"\nDevice: {device} ({env}){' — quick mode' if args.quick else ''}\n")
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "environment": env, "quick": args.quick, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
