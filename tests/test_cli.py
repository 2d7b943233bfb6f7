"""The `reprmetrics` command line: every file format gives evaluate()'s numbers; bad input is one line and exit 2."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from references_similarity import linear_cka_ref
from safetensors.torch import save_file

from reprmetrics import evaluate
from reprmetrics.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = shutil.which("reprmetrics") or str(Path(sys.executable).with_name("reprmetrics"))


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


def embeddings(n: int = 700, d: int = 24, seed: int = 0, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.arange(1, d + 1) ** -0.5
    return (rng.standard_normal((n, d)) * scale + 0.3).astype(dtype)


def assert_values(row: dict, expected: dict, rtol: float = 1e-6) -> None:
    for name, value in expected.items():
        assert math.isclose(row[name], value, rel_tol=rtol, abs_tol=1e-12), (name, row[name], value)


def write(path: Path, z: np.ndarray, kind: str, key: str = "emb") -> Path:
    if kind == "npy":
        np.save(path, z)
    elif kind == "npz":
        np.savez(path, **{key: z, "labels": np.arange(len(z))})
    elif kind == "npz_compressed":
        np.savez_compressed(path, **{key: z})
    elif kind == "safetensors":
        save_file({key: torch.from_numpy(z), "other": torch.zeros(2)}, str(path))
    elif kind == "pt_tensor":
        torch.save(torch.from_numpy(z), path)
    elif kind == "pt_dict":
        torch.save({key: torch.from_numpy(z), "epoch": 3}, path)
    return path


FORMATS = {
    "npy": ("x.npy", None),
    "npz": ("x.npz", "emb"),
    "npz_compressed": ("x.npz", None),
    "safetensors": ("x.safetensors", "emb"),
    "pt_tensor": ("x.pt", None),
    "pt_dict": ("x.pth", "emb"),
}


# ---- the numbers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(FORMATS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_every_format_gives_evaluates_numbers(tmp_path, capsys, kind, dtype):
    z = embeddings(dtype=dtype)
    name, key = FORMATS[kind]
    path = write(tmp_path / name, z, kind)
    args = ["report", path, "--format", "json", "--batch-size", "97"] + (["--key", key] if key else [])
    status, out, err = run_cli(*args, capsys=capsys)
    assert status == 0, err
    (row,) = json.loads(out)
    assert (row["file"], row["N"], row["D"]) == (str(path), 700, 24)
    expected = evaluate(torch.from_numpy(z))
    assert set(expected) <= set(row)
    assert_values(row, expected)


def test_bfloat16_safetensors(tmp_path, capsys):
    z = torch.from_numpy(embeddings()).bfloat16()
    save_file({"e": z}, str(tmp_path / "b.safetensors"))
    status, out, _ = run_cli("report", tmp_path / "b.safetensors", "--format", "json", capsys=capsys)
    assert status == 0
    assert_values(json.loads(out)[0], evaluate(z))


def test_views_reference_and_every_metric(tmp_path, capsys):
    z = embeddings(500, 16)
    rng = np.random.default_rng(1)
    views = (z[:, None, :] + 0.1 * rng.standard_normal((500, 3, 16))).astype(np.float32)
    reference = np.tanh(z @ rng.standard_normal((16, 20))).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "v.npy", views)
    np.save(tmp_path / "r.npy", reference)
    names = "rankme,alpha_req,normalized_std,uniformity,lid,lidar,alignment,twonn,mle_dimension,cka"
    status, out, err = run_cli(
        "report",
        tmp_path / "z.npy",
        "--views",
        tmp_path / "v.npy",
        "--reference",
        tmp_path / "r.npy",
        "--metrics",
        names,
        "--format",
        "json",
        "--batch-size",
        "64",
        capsys=capsys,
    )
    assert status == 0, err
    row = json.loads(out)[0]
    expected = evaluate(
        torch.from_numpy(z),
        views=torch.from_numpy(views),
        metrics=names.split(","),
        reference=torch.from_numpy(reference),
    )
    assert list(expected) == names.split(",")
    assert_values(row, expected)
    assert math.isclose(row["cka"], linear_cka_ref(z, reference), rel_tol=1e-6)


def test_several_files_are_rows_and_formats_agree(tmp_path, capsys):
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"c{seed}.npy")
        np.save(paths[-1], embeddings(400, 16 if seed < 2 else 8, seed=seed))  # D = 8: no alpha_req
    outputs = {}
    for fmt in ("json", "csv", "table", "markdown"):
        status, out, _ = run_cli("report", *paths, "--format", fmt, "--quiet", capsys=capsys)
        assert status == 0
        outputs[fmt] = out
    rows = json.loads(outputs["json"])
    assert [r["file"] for r in rows] == [str(p) for p in paths]
    assert "alpha_req" in rows[0] and "alpha_req" not in rows[2]
    parsed = list(csv.DictReader(io.StringIO(outputs["csv"])))
    for row, line in zip(rows, parsed):
        for name, value in row.items():
            if isinstance(value, float):
                assert float(line[name]) == value  # CSV keeps full precision
    assert parsed[2]["alpha_req"] == ""
    header = outputs["table"].splitlines()[0]
    for marked in ("rankme ↑", "alpha_req ≈1", "normalized_std ↑", "uniformity ↓", "lid ↑"):
        assert marked in header and marked in outputs["markdown"].splitlines()[0]
    assert outputs["markdown"].splitlines()[1].startswith("| --- | ---: |")
    assert len(outputs["table"].splitlines()) == 2 + len(paths)


def test_output_file_and_plot(tmp_path, capsys):
    for name, seed in (("a.npy", 0), ("b.npy", 1)):
        np.save(tmp_path / name, embeddings(600, 32, seed=seed))
    status, out, err = run_cli(
        "report",
        tmp_path / "a.npy",
        tmp_path / "b.npy",
        "--output",
        tmp_path / "out.json",
        "--format",
        "json",
        "--plot",
        tmp_path / "spectra.png",
        capsys=capsys,
    )
    assert status == 0, err
    assert out == ""
    assert len(json.loads((tmp_path / "out.json").read_text())) == 2
    png = (tmp_path / "spectra.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "wrote" in err


def test_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "a.npy", embeddings())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    status, _, err = run_cli("report", tmp_path / "a.npy", "--plot", tmp_path / "p.png", capsys=capsys)
    assert status == 2
    assert err.strip() == "reprmetrics: error: --plot needs matplotlib, which is not installed: pip install matplotlib"


def test_compare(tmp_path, capsys):
    z = embeddings(800, 16)
    other = (np.tanh(z @ np.random.default_rng(2).standard_normal((16, 40)))).astype(np.float32)
    np.save(tmp_path / "a.npy", z)
    save_file({"emb": torch.from_numpy(other)}, str(tmp_path / "b.safetensors"))
    status, out, err = run_cli(
        "compare",
        tmp_path / "a.npy",
        tmp_path / "b.safetensors",
        "--format",
        "json",
        "--batch-size",
        "100",
        capsys=capsys,
    )
    assert status == 0, err
    (row,) = json.loads(out)
    assert (row["N"], row["D_a"], row["D_b"]) == (800, 16, 40)
    assert math.isclose(row["cka"], linear_cka_ref(z, other), rel_tol=1e-6)


def test_progress_bar_only_on_a_terminal_and_a_note_when_computing(tmp_path, capsys, monkeypatch):
    path = tmp_path / "a.npy"
    np.save(path, embeddings())
    phase = (
        f"reprmetrics: {path}: computing rankme, alpha_req, normalized_std, uniformity, lid, nesum, coding_rate,"
        " wasserstein_uniformity, isoscore (uniformity, lid on 700 sampled rows)"
    )
    status, _, err = run_cli("report", path, capsys=capsys)
    assert status == 0 and err == phase + "\n"  # not a TTY: no bar, but the compute phase is announced
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    status, _, err = run_cli("report", path, "--metrics", "rankme,lid", capsys=capsys)
    assert status == 0 and "rows" in err
    # The bar is closed (its line cleared) before the note, which is the last line.
    assert err.splitlines()[-1] == f"reprmetrics: {path}: computing rankme, lid (lid on 700 sampled rows)"
    status, _, err = run_cli("report", path, "--metrics", "rankme", "--quiet", capsys=capsys)
    assert status == 0 and err == ""
    status, _, err = run_cli("compare", path, path, "--format", "json", capsys=capsys)
    assert status == 0 and "computing" not in err  # linear CKA has no slow phase to announce


# ---- bad input: one line, exit 2 ----------------------------------------------------------------------------
def bad_files(tmp: Path) -> dict[str, Path]:
    z = embeddings(300, 8)
    nan = z.copy()
    nan[[4, 50, 51]] = np.nan
    nan[99, 0] = np.inf
    np.save(tmp / "good.npy", z)
    np.save(tmp / "nan.npy", nan)
    np.save(tmp / "one_d.npy", z[:, 0])
    np.save(tmp / "three_d.npy", z.reshape(300, 2, 4))
    np.save(tmp / "views.npy", np.stack([z, z + 0.01], axis=1))
    np.save(tmp / "empty.npy", np.zeros((0, 8), np.float32))
    np.save(tmp / "strings.npy", np.array([["a", "b"]]))
    np.save(tmp / "short.npy", z[:299])
    np.savez(tmp / "two.npz", a=z, b=z)
    save_file({"a": torch.from_numpy(z), "b": torch.zeros(3)}, str(tmp / "two.safetensors"))
    torch.save({"a": torch.from_numpy(z), "b": torch.zeros(3), "meta": "x"}, tmp / "two.pt")
    torch.save([1, 2], tmp / "list.pt")
    (tmp / "garbage.npy").write_bytes(b"not an array at all")
    (tmp / "garbage.safetensors").write_bytes(b"\x00" * 3)
    (tmp / "garbage.pt").write_bytes(b"PK\x03\x04 broken")
    (tmp / "data.csv").write_text("1,2\n")
    (tmp / "folder.npy").mkdir()
    full = tmp / "truncated.npy"
    np.save(full, z)
    full.write_bytes(full.read_bytes()[:-100])
    return {p.name: p for p in tmp.iterdir()}


BAD_INPUTS = [
    (["report", "missing.npy"], "missing.npy: no such file"),
    (["report", "folder.npy"], "folder.npy: is a directory"),
    (["report", "garbage.npy"], "garbage.npy: cannot read as .npy"),
    (["report", "garbage.safetensors"], "garbage.safetensors: cannot read as .safetensors"),
    (["report", "garbage.pt"], "garbage.pt: cannot read as a torch file"),
    (["report", "truncated.npy"], "truncated.npy: cannot read as .npy"),
    (["report", "data.csv"], "data.csv: unsupported file type '.csv'"),
    (["report", "two.npz", "--key", "c"], "two.npz: no key 'c' (keys: a, b)"),
    (["report", "two.npz"], "two.npz: holds 2 arrays; choose one with --key (keys: a, b)"),
    (["report", "two.safetensors", "--key", "z"], "two.safetensors: no key 'z' (keys: a, b)"),
    (["report", "two.pt", "--key", "z"], "two.pt: no key 'z' (keys: a, b)"),
    (["report", "two.pt", "--key", "meta"], "two.pt: key 'meta' holds a str, not a tensor"),
    (["report", "two.pt"], "two.pt: holds 2 tensors; choose one with --key"),
    (["report", "list.pt"], "list.pt: holds a list; expected a tensor or a dict of tensors"),
    (["report", "one_d.npy"], r"one_d.npy: embeddings must be a 2-D (N, D) array, got shape (300,)"),
    (["report", "three_d.npy"], r"three_d.npy: embeddings must be a 2-D (N, D) array, got shape (300, 2, 4)"),
    (["report", "two.safetensors", "--key", "b"], "two.safetensors: embeddings must be a 2-D (N, D) array"),
    (["report", "empty.npy"], "empty.npy: embeddings array is empty"),
    (["report", "strings.npy"], "strings.npy: holds <U1 values; expected real numbers"),
    (
        ["report", "nan.npy"],
        "nan.npy: 4 of 300 rows contain NaN or infinite values; pass --drop-nonfinite to skip them",
    ),
    (["report", "good.npy", "--views", "good.npy"], r"good.npy: views must be a 3-D (N, q, D) array"),
    (["report", "good.npy", "--views", "three_d.npy"], "three_d.npy: views have D = 4 but good.npy has D = 8"),
    (
        ["report", "good.npy", "--views", "views.npy", "--views", "views.npy"],
        "--views: 2 views files for 1 FILE(s); the i-th --views belongs to the i-th FILE",
    ),
    (
        ["report", "good.npy", "nan.npy", "--views", "views.npy", "--metrics", "lidar"],
        "nan.npy: has no --views (the i-th --views belongs to the i-th FILE), and lidar need(s) augmented views",
    ),
    (["report", "good.npy", "--metrics", "rankme,lidr"], "unknown metric 'lidr'; did you mean 'lidar' or 'lid'?"),
    (["report", "good.npy", "--metrics", "lidar"], "lidar need(s) augmented views"),
    (["report", "good.npy", "--format", "xml"], "Invalid value for '--format'"),
    (["report", "good.npy", "--batch-size", "1"], "Invalid value for '--batch-size'"),
    (["report", "good.npy", "--device", "nodevice"], "--device 'nodevice': not a device"),
    (["report"], "Missing argument 'FILE [FILE ...]'"),
    (
        ["report", "good.npy", "--reference", "short.npy"],
        "short.npy: has 299 rows but good.npy has 300; CKA compares the same samples",
    ),
    (
        ["compare", "good.npy", "short.npy"],
        "short.npy: has 299 rows but good.npy has 300; CKA compares the same samples",
    ),
    (["compare", "good.npy", "nan.npy"], "nan.npy: 4 of 300 rows contain NaN or infinite values"),
    (["compare", "good.npy"], "Missing argument 'B'"),
    (["compare", "good.npy", "good.npy", "--key", "a", "--key", "b", "--key", "c"], "--key: give it once"),
    (["frobnicate"], "No such command 'frobnicate'"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((["report", "good.npy", "--device", "cuda"], "--device 'cuda': CUDA is not available"))


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, message):
    bad_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli(*args, capsys=capsys)
    assert status == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("reprmetrics: error: ")
    assert message in lines[0], lines[0]
    assert "Traceback" not in err


def test_drop_nonfinite_skips_and_reports(tmp_path, capsys):
    files = bad_files(tmp_path)
    status, out, err = run_cli("report", files["nan.npy"], "--drop-nonfinite", "--format", "json", capsys=capsys)
    assert status == 0
    assert err.splitlines()[-1] == f"reprmetrics: {files['nan.npy']}: skipped 4 of 300 rows with NaN or infinite values"
    z = np.load(files["nan.npy"])
    finite = z[np.isfinite(z).all(1)]
    row = json.loads(out)[0]
    assert row["N"] == 296
    assert_values(row, evaluate(torch.from_numpy(finite)))


@pytest.mark.slow  # a fresh interpreter
def test_bad_input_in_a_fresh_process_has_no_traceback(tmp_path):
    result = subprocess.run(
        [SCRIPT, "report", str(tmp_path / "nope.npy")], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr == f"reprmetrics: error: {tmp_path / 'nope.npy'}: no such file\n"


# ---- views matched by position -------------------------------------------------------------------------
def test_views_for_some_files_are_matched_by_position(tmp_path, capsys):
    paths = [tmp_path / f"e{i}.npy" for i in range(3)]
    zs = [embeddings(300, 16, seed=i) for i in range(3)]
    for path, z in zip(paths, zs):
        np.save(path, z)
    views = np.stack([zs[0], zs[0] + 0.05 * np.random.default_rng(5).standard_normal(zs[0].shape)], axis=1).astype(
        np.float32
    )
    np.save(tmp_path / "v0.npy", views)
    status, out, err = run_cli("report", *paths, "--views", tmp_path / "v0.npy", "--format", "json", capsys=capsys)
    assert status == 0, err
    rows = json.loads(out)
    assert_values(rows[0], evaluate(torch.from_numpy(zs[0]), views=torch.from_numpy(views)))
    assert "lidar" in rows[0] and "alignment" in rows[0]
    for row, z in zip(rows[1:], zs[1:]):
        assert "lidar" not in row and "alignment" not in row
        assert_values(row, evaluate(torch.from_numpy(z)))
    note = [line for line in err.splitlines() if "--views" in line]
    assert note == [
        "reprmetrics: --views matched by position: 1 of 3 files have views;"
        f" {paths[1]}, {paths[2]}: no lidar or alignment"
    ]
    status, out, _ = run_cli("report", *paths, "--views", tmp_path / "v0.npy", "--quiet", capsys=capsys)
    assert status == 0
    table = out.splitlines()
    assert "lidar ↑" in table[0] and table[3].rstrip().endswith("—")  # a file without views: no value


# ---- numbers as computed, integers in one format ----------------------------------------------------------
def test_as_computed_drops_digits_float32_never_had():
    from reprmetrics.cli import _as_computed

    widened = float(np.float32(209.00795))
    assert repr(widened) == "209.00794982910156"
    assert repr(_as_computed(widened)) == "209.00795"
    assert np.float32(_as_computed(widened)) == np.float32(widened)  # reads back as the same float32
    double = float(np.nextafter(widened, np.inf))  # a float64 value no float32 can hold
    assert float(np.float32(double)) != double and repr(_as_computed(double)) == repr(double)  # untouched
    assert math.isnan(_as_computed(float("nan"))) and _as_computed(1.0) == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_json_and_csv_print_the_precision_computed(tmp_path, capsys, dtype):
    z = embeddings(1_500, 16, dtype=dtype)
    np.save(tmp_path / "z.npy", z)
    outputs = {}
    for fmt in ("json", "csv", "table", "markdown"):
        status, outputs[fmt], err = run_cli("report", tmp_path / "z.npy", "--format", fmt, "--quiet", capsys=capsys)
        assert status == 0, err
    row = json.loads(outputs["json"])[0]
    expected = evaluate(torch.from_numpy(z))
    csv_row = next(csv.DictReader(io.StringIO(outputs["csv"])))
    for name, value in expected.items():
        text = csv_row[name]
        assert float(text) == row[name]
        if float(np.float32(value)) == value:  # computed in float32 (the metrics return float32 today,
            # whatever the input): the shortest decimal of the same float32, at most 9 significant digits
            assert np.float32(float(text)) == np.float32(value), name
            assert len(text.lstrip("-").replace(".", "").lstrip("0").split("e")[0]) <= 9, text
        else:  # computed in float64: every digit
            assert float(text) == value, name
    assert (row["N"], csv_row["N"]) == (1500, "1500")  # machine formats: plain integers
    assert '"N": 1500' in outputs["json"]
    assert outputs["table"].splitlines()[2].split("|")[1].strip() == "1,500"  # human formats: separators
    assert outputs["markdown"].splitlines()[2].split("|")[2].strip() == "1,500"


def test_small_and_large_integers_share_one_table_format(tmp_path, capsys):
    np.save(tmp_path / "small.npy", embeddings(600, 8))
    np.save(tmp_path / "large.npy", embeddings(10_500, 8))
    status, out, _ = run_cli(
        "report", tmp_path / "small.npy", tmp_path / "large.npy", "--metrics", "rankme", "--quiet", capsys=capsys
    )
    assert status == 0
    assert [line.split("|")[1].strip() for line in out.splitlines()[2:]] == ["600", "10,500"]


# ---- .pt files: weights_only, always; refusals are one line --------------------------------------------------
class _WritesAFileWhenUnpickled:
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _unsafe_torch_files(tmp: Path) -> dict[str, Path]:
    import pickle

    marker = tmp / "code_ran"
    _WritesAFileWhenUnpickled.marker = marker
    files = {
        "pickle": tmp / "pickle.pt",
        "module": tmp / "module.pt",
        "zip_object": tmp / "zip_object.pt",
        "numpy": tmp / "numpy.pt",
        "truncated": tmp / "truncated.pt",
    }
    with open(files["pickle"], "wb") as f:
        pickle.dump(_WritesAFileWhenUnpickled(), f)  # a plain (legacy-style) pickle that runs code
    torch.save(torch.nn.Linear(3, 4), files["module"])
    torch.save({"emb": torch.zeros(10, 3), "hook": _WritesAFileWhenUnpickled()}, files["zip_object"])
    torch.save(np.zeros((10, 3), np.float32), files["numpy"])
    whole = tmp / "whole.pt"
    torch.save(torch.zeros(100, 8), whole)
    files["truncated"].write_bytes(whole.read_bytes()[:300])
    return files


UNSAFE_TORCH_FILES = [
    ("pickle", "holds pickled data that is not tensors"),
    ("module", "holds pickled Python objects (torch.nn.modules.linear.Linear)"),
    ("zip_object", "holds pickled Python objects"),
    ("numpy", "holds pickled Python objects (numpy."),
    ("truncated", "cannot read as a torch file (PytorchStreamReader failed reading zip archive"),
]


@pytest.mark.slow  # a fresh interpreter
@pytest.mark.parametrize("kind, message", UNSAFE_TORCH_FILES, ids=[k for k, _ in UNSAFE_TORCH_FILES])
def test_unloadable_torch_file_is_one_line_and_never_runs_its_code(tmp_path, kind, message):
    files = _unsafe_torch_files(tmp_path)
    result = subprocess.run([SCRIPT, "report", files[kind].name], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # no torch warnings, no traceback
    assert lines[0].startswith(f"reprmetrics: error: {files[kind].name}: ") and message in lines[0], lines[0]
    assert "torch.save(tensor)" in lines[0] and ".npy or .safetensors" in lines[0]
    assert "weights_only=False" not in lines[0] and "\x1b" not in lines[0]
    assert not (tmp_path / "code_ran").exists()


def test_legacy_format_tensor_still_loads(tmp_path, capsys):
    z = embeddings()
    torch.save(torch.from_numpy(z), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    status, out, err = run_cli("report", tmp_path / "legacy.pt", "--format", "json", "--quiet", capsys=capsys)
    assert status == 0, err
    assert_values(json.loads(out)[0], evaluate(torch.from_numpy(z)))


def test_torch_load_is_always_weights_only(tmp_path, capsys, monkeypatch):
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    torch.save(torch.from_numpy(embeddings()), tmp_path / "z.pt")
    torch.save(torch.from_numpy(embeddings()), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("z.pt", "legacy.pt"):
        status, _, err = run_cli("report", tmp_path / name, "--metrics", "rankme", "--quiet", capsys=capsys)
        assert status == 0, err
    assert calls == [True, True]


# ---- start-up: --help, --version and usage errors never import torch ---------------------------------------
HEAVY_MODULES = ("torch", "torchmetrics", "numpy", "reprmetrics.evaluate")


def imported_modules(command: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``command`` (a Python entry point) under ``-X importtime``; the modules it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True, cwd="/")
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return result, modules


@pytest.mark.parametrize(
    "args, status",
    [
        (["--help"], 0),
        (["--version"], 0),
        (["report", "--help"], 0),
        (["compare", "--help"], 0),
        (["metrics", "--help"], 0),
        (["report"], 2),
        (["report", "x.npy", "--format", "xml"], 2),
        (["report", "x.npy", "--batch-size", "1"], 2),
        (["frobnicate"], 2),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
@pytest.mark.parametrize("entry", ["script", "python -m"])
def test_help_version_and_usage_errors_do_not_import_torch(args, status, entry):
    command = [SCRIPT, *args] if entry == "script" else ["-m", "reprmetrics", *args]
    result, modules = imported_modules(command)
    assert result.returncode == status, result.stderr[-2000:]
    assert "click" in modules and "reprmetrics.cli" in modules  # the measurement sees the imports
    assert not modules & set(HEAVY_MODULES), sorted(modules & set(HEAVY_MODULES))


@pytest.mark.slow  # a fresh interpreter
def test_import_reprmetrics_is_lazy_and_complete():
    code = (
        "import sys, reprmetrics; assert 'torch' not in sys.modules, 'import reprmetrics loaded torch';"
        "assert set(reprmetrics.__all__) <= set(dir(reprmetrics));"
        "from reprmetrics import RankMe, evaluate; import reprmetrics.evaluate;"
        "assert callable(reprmetrics.evaluate) and reprmetrics.evaluate is evaluate,"
        " 'the submodule shadowed evaluate()';"
        "missing = [n for n in reprmetrics.__all__ if getattr(reprmetrics, n, None) is None];"
        " assert not missing, missing;"
        "print(RankMe.__module__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reprmetrics.spectral"


def test_version_is_one_source():
    import importlib.metadata

    import reprmetrics

    result = subprocess.run([SCRIPT, "--version"], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0
    assert result.stdout == f"reprmetrics, version {reprmetrics.__version__}\n"
    assert importlib.metadata.version("reprmetrics") == reprmetrics.__version__
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{reprmetrics.__version__}]" in changelog  # the released version has its entry


def test_cli_defaults_are_evaluates():
    import reprmetrics.cli as cli_module
    from reprmetrics import evaluate as _  # noqa: F401  (loads the submodule)

    evaluate_module = sys.modules["reprmetrics.evaluate"]
    assert cli_module.DEFAULT_BATCH_SIZE == evaluate_module.DEFAULT_BATCH_SIZE
    assert cli_module.DEFAULT_MAX_SAMPLES == evaluate_module.DEFAULT_MAX_SAMPLES


def test_metrics_command_lists_every_name(capsys):
    evaluate_module = sys.modules["reprmetrics.evaluate"]
    status, out, _ = run_cli("metrics", "--format", "json", capsys=capsys)
    assert status == 0
    rows = {row["metric"]: row for row in json.loads(out)}
    assert list(rows) == list(evaluate_module.METRIC_NAMES)
    assert rows["rankme"]["healthy"] == "↑" and rows["rankme"]["in the default set"] == "yes"
    assert rows["alpha_req"]["in the default set"] == "yes, D >= 13"
    assert rows["lidar"]["in the default set"] == "yes, with --views"
    assert rows["twonn"]["in the default set"].startswith("no")
    assert rows["cka"]["in the default set"].startswith("with --reference")


# ---- help, console script, python -m --------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["report"], ["compare"]])
def test_help(capsys, command):
    status, out, err = run_cli(*command, "--help", capsys=capsys)
    assert status == 0 and err == ""
    assert out.startswith("Usage: reprmetrics")
    if command == ["report"]:
        for option in (
            "--key",
            "--views",
            "--format",
            "--output",
            "--plot",
            "--device",
            "--quiet",
            "--drop-nonfinite",
            "--batch-size",
        ):
            assert option in out


def test_console_script_is_installed():
    (script,) = entry_points(group="console_scripts", name="reprmetrics")
    assert script.value == "reprmetrics.cli:console_main"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'reprmetrics = "reprmetrics.cli:console_main"' in pyproject


@pytest.mark.parametrize(
    "command",
    [
        [SCRIPT, "--help"],
        [SCRIPT, "report", "--help"],
        [SCRIPT, "compare", "--help"],
        [sys.executable, "-m", "reprmetrics", "--help"],
        [sys.executable, "-m", "reprmetrics", "report", "--help"],
    ],
    ids=["script", "script report", "script compare", "python -m", "python -m report"],
)
def test_help_in_a_fresh_process(command):
    result = subprocess.run(command, capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: ")
    assert ("python -m reprmetrics" if "-m" in command else "Usage: reprmetrics") in result.stdout


@pytest.mark.slow  # a fresh interpreter
def test_console_script_report_in_a_fresh_process(tmp_path):
    z = embeddings()
    np.save(tmp_path / "z.npy", z)
    result = subprocess.run(
        [SCRIPT, "report", "z.npy", "--format", "json"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert_values(json.loads(result.stdout)[0], evaluate(torch.from_numpy(z)))


def test_npz_members_are_read_in_order_and_restart(tmp_path):
    """The chunked .npz reader: rows in order, a fresh stream when asked out of order."""
    from reprmetrics.cli import open_array

    z = embeddings(50, 4)
    np.savez_compressed(tmp_path / "z.npz", z=z)
    array = open_array(str(tmp_path / "z.npz"))
    assert torch.equal(torch.cat(list(array.chunks(7))), torch.from_numpy(z))
    assert torch.equal(array.read(10, 20), torch.from_numpy(z[10:20]))  # out of order: restarts
    array.close()
    assert "z.npy" in zipfile.ZipFile(tmp_path / "z.npz").namelist()


# ---- out of core ----------------------------------------------------------------------------------------------
ROWS, FEATURES = 2_000_000, 128


def peak_rss_mb(child: subprocess.Popen) -> float:
    """The child's VmHWM (peak resident set of its own address space since exec), polled until it exits.

    Not getrusage: a child forked from this large test process inherits its peak in ru_maxrss.
    VmHWM only grows, so the last reading is the peak of everything before it; the run ends with
    rendering and interpreter shutdown, far longer than the polling interval.
    """
    peak_kb = 0
    while child.poll() is None:
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
        except OSError:  # exited between poll() and the read
            break
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak_kb = max(peak_kb, int(line.split()[1]))
        time.sleep(0.005)
    return peak_kb / 1024


def _report_peak_mb(path, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(tmp_path / "out.json", "w") as out, open(tmp_path / "err.txt", "w") as err:
        child = subprocess.Popen(
            [SCRIPT, "report", str(path), "--format", "json", "--quiet"], stdout=out, stderr=err, env=env
        )
        peak_mb = peak_rss_mb(child)
    assert child.returncode == 0, (tmp_path / "err.txt").read_text()
    return peak_mb, json.loads((tmp_path / "out.json").read_text())[0]


@pytest.mark.slow
def test_report_streams_a_1gb_npy_in_bounded_memory(tmp_path):
    """2,000,000 × 128 float32 (1 GB) through `report` with the default metrics, in bounded memory.

    The bound is on what the data costs: peak RSS of the 1 GB run minus that of the same command on a
    1,000-row file (the interpreter plus imports, which here include the transformers, scipy and
    matplotlib that torchmetrics imports whenever they are installed: about 360 MB in the test
    environment, about 240 MB with the core install; docs/guide/saved-embeddings.md, "Any size").
    """
    scale = (np.arange(1, FEATURES + 1) ** -0.5).astype(np.float32)
    rng = np.random.default_rng(0)
    small = tmp_path / "small.npy"
    np.save(small, rng.standard_normal((1_000, FEATURES), dtype=np.float32) * scale)
    floor_mb, _ = _report_peak_mb(small, tmp_path)
    path = tmp_path / "big.npy"
    big = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(ROWS, FEATURES))
    for start in range(0, ROWS, 250_000):
        big[start : start + 250_000] = rng.standard_normal((250_000, FEATURES), dtype=np.float32) * scale
    big.flush()
    del big
    assert path.stat().st_size > 1_000_000_000
    try:
        peak_mb, row = _report_peak_mb(path, tmp_path)
    finally:
        path.unlink()
    assert row["N"] == ROWS and row["D"] == FEATURES
    assert 100 < row["rankme"] <= 128 and 0.9 < row["alpha_req"] < 1.1  # λ_k ∝ 1/k: α ≈ 1
    print(f"report on {ROWS:,} × {FEATURES} float32: peak RSS {peak_mb:.0f} MB, {floor_mb:.0f} MB on 1,000 rows")
    assert peak_mb - floor_mb < 100, f"peak RSS {peak_mb:.0f} MB against {floor_mb:.0f} MB on 1,000 rows"


@pytest.mark.slow
def test_save_embeddings_example_feeds_report(tmp_path, capsys):
    """examples/save_embeddings.py on a SimCLR checkpoint of the main job's model, then `report` on its files."""
    pytest.importorskip("sklearn")
    pl = pytest.importorskip("lightning.pytorch")
    sys.path.insert(0, str(ROOT / "examples"))
    import digits_ssl
    import save_embeddings

    splits = digits_ssl.digit_splits()
    model = digits_ssl.SimCLR()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, digits_ssl.train_loader(splits, 64))
    checkpoint = tmp_path / "epoch0.ckpt"
    trainer.save_checkpoint(checkpoint)
    written = save_embeddings.main(
        [str(checkpoint), "--out-dir", str(tmp_path / "emb"), "--views", "--format", "safetensors"]
    )
    capsys.readouterr()
    assert [p.name for p in written] == ["epoch0.safetensors", "epoch0_views.safetensors"]
    status, out, err = run_cli("report", written[0], "--views", written[1], "--format", "json", capsys=capsys)
    assert status == 0, err
    model.eval()
    with torch.no_grad():
        z = model.backbone(splits.held_out_images)
        views = torch.stack([model.backbone(v) for v in digits_ssl.fixed_views(splits.held_out_images)], dim=1)
    assert_values(json.loads(out)[0], evaluate(z, views=views))


@pytest.mark.gpu
def test_device_cuda_gives_the_cpu_numbers(tmp_path, capsys):
    z = embeddings(3000, 64)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "v.npy", np.stack([z, z + 0.1], axis=1))
    outputs = []
    for device in ("cpu", "cuda"):
        status, out, err = run_cli(
            "report",
            tmp_path / "z.npy",
            "--views",
            tmp_path / "v.npy",
            "--device",
            device,
            "--format",
            "json",
            capsys=capsys,
        )
        assert status == 0, err
        outputs.append(json.loads(out)[0])
    assert_values(outputs[1], {k: v for k, v in outputs[0].items() if isinstance(v, float)}, rtol=1e-5)
