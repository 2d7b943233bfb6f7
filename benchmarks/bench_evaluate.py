"""Throughput of `reprmetrics report` on a large .npy, next to a plain read of the same file (the disk limit).

Both read the file from disk: before every run its pages are dropped from the page cache
(``posix_fadvise(POSIX_FADV_DONTNEED)``, which touches no other file). "Ours" is the whole command,
in process: chunked memory-mapped reads, every default metric (RankMe, α-ReQ, normalised std,
uniformity, LID) and the output. The baseline reads the same bytes in 64 MiB blocks and does nothing
with them, so the ratio says how far from the disk the metrics are.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import Case


@dataclass
class _File:
    directory: tempfile.TemporaryDirectory
    path: Path
    rows: int
    features: int

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size


def _write(rows: int, features: int) -> _File:
    directory = tempfile.TemporaryDirectory(prefix="bench_evaluate_")
    path = Path(directory.name) / "embeddings.npy"
    rng = np.random.default_rng(0)
    scale = (np.arange(1, features + 1) ** -0.5).astype(np.float32)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, features))
    step = 250_000
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        array[start:stop] = rng.standard_normal((stop - start, features), dtype=np.float32) * scale
    array.flush()
    del array
    return _File(directory, path, rows, features)


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _report(file: _File) -> str:
    from reprmetrics.cli import main

    _drop_from_page_cache(file.path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["report", str(file.path), "--format", "json", "--quiet"])
    if status != 0:
        raise RuntimeError(f"reprmetrics report failed with status {status}")
    return out.getvalue()


def _plain_read(file: _File) -> int:
    _drop_from_page_cache(file.path)
    buffer = bytearray(64 * 2**20)
    total = 0
    with open(file.path, "rb", buffering=0) as f:
        while read := f.readinto(buffer):
            total += read
    return total


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cpu":
        return []  # reading files is the point; `--device cuda` for report itself is a CLI option
    rows, features = (200_000, 128) if quick else (2_000_000, 128)
    holder: dict[str, _File] = {}

    def make_input() -> _File:
        holder["file"] = _write(rows, features)
        return holder["file"]

    def throughput(ours_s: float, base_s: float) -> str:
        file = holder["file"]
        gb = file.bytes / 1e9
        return (
            f"report {file.rows / ours_s / 1e6:.2f} M rows/s = {gb / ours_s:.3f} GB/s;"
            f" plain read {gb / base_s:.3f} GB/s ({base_s:.2f} s); report takes {ours_s / base_s:.1f}× the read"
        )

    return [
        Case(
            name="report (default metrics) vs plain read",
            ours=_report,
            baseline=_plain_read,
            baseline_name="read the file (64 MiB blocks, page cache dropped)",
            make_input=make_input,
            input_desc=f"{rows:,} × {features} float32 .npy ({rows * features * 4 / 1e9:.2f} GB)",
            repeats=3 if quick else 1,
            notes="whole `reprmetrics report`, in process; speed-up < 1 is the metrics' cost over the disk",
            check=throughput,
            check_medians=True,
        )
    ]
