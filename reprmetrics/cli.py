"""The ``reprmetrics`` command line: metrics of saved embeddings, files in, table/CSV/JSON/plot out.

``reprmetrics report FILE [FILE ...]`` prints one row per file; ``reprmetrics compare A B`` the
linear CKA between two embedding sets of the same rows. Both stream: ``.npy`` files are read through
memory maps of one chunk at a time, ``.npz`` members and ``.safetensors`` tensors chunk by chunk, so a
file larger than memory is fine. Every bad input ends in one line on stderr and exit status 2.

Built on click (a small, dependency-free, long-maintained library): typed options with choices and
ranges, generated ``--help`` for the group and each subcommand, and testable in process.

Start-up: numpy, torch and :mod:`reprmetrics.evaluate` are imported inside the commands, never at
module level, so ``--help``, ``--version`` and argument errors answer without loading torch
(``tests/test_cli.py`` checks it; ``benchmarks/bench_cli_startup.py`` times it).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from reprmetrics import __version__

if TYPE_CHECKING:  # annotations only: the commands import these when they run
    import numpy as np
    from torch import Tensor

    from reprmetrics.evaluate import EvaluationResult

__all__ = ["CliError", "cli", "main", "open_array"]

FORMATS = ("table", "csv", "json", "markdown")
SUFFIXES = (".pt", ".pth", ".npy", ".npz", ".safetensors")
EXIT_BAD_INPUT = 2
# evaluate's DEFAULT_BATCH_SIZE and DEFAULT_MAX_SAMPLES (the monitor's 8,192), repeated so that the
# defaults --help shows need no torch import; tests/test_cli.py checks that they agree.
DEFAULT_BATCH_SIZE = 4096
DEFAULT_MAX_SAMPLES = 8192


class CliError(Exception):
    """A bad input: reported as one line on stderr, exit status 2."""


# ---- reading arrays in chunks ----------------------------------------------------------------------
@dataclass
class ArrayFile:
    """One array in a file: its shape and dtype, and a reader of consecutive row chunks.

    ``read(start, stop)`` returns rows ``start:stop`` as a tensor that owns its memory, so nothing of
    the file stays mapped or referenced once a chunk has been used.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    read: Callable[[int, int], Tensor]
    close: Callable[[], None] = lambda: None

    @property
    def rows(self) -> int:
        return self.shape[0]

    def chunks(self, batch_size: int, on_rows: Callable[[int], None] | None = None) -> Iterator[Tensor]:
        for start in range(0, self.rows, batch_size):
            try:
                chunk = self.read(start, min(start + batch_size, self.rows))
            except (OSError, ValueError, RuntimeError) as error:
                raise CliError(f"{self.path}: cannot read rows {start}..: {_one_line(error)}") from error
            if on_rows is not None:
                on_rows(chunk.shape[0])
            yield chunk


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def _native(array: np.ndarray) -> Tensor:
    """An owned, native-byte-order tensor copy of a numpy chunk (memory maps are released at once)."""
    import numpy as np  # noqa: PLC0415  (see the module docstring: no torch or numpy at start-up)
    import torch  # noqa: PLC0415

    if array.dtype.kind not in "fiu" and array.dtype.kind != "b":
        raise ValueError(f"dtype {array.dtype} is not numeric")
    dtype = array.dtype.newbyteorder("=")
    return torch.from_numpy(np.array(array, dtype=dtype, order="C", copy=True))


def _check_numeric(path: str, dtype: np.dtype) -> None:
    if dtype.kind not in "fiu":
        raise CliError(f"{path}: holds {dtype} values; expected real numbers (float or integer)")


def _open_npy(path: str) -> ArrayFile:
    import numpy as np  # noqa: PLC0415

    try:
        whole = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise CliError(f"{path}: cannot read as .npy: {_one_line(error)}") from error
    if not isinstance(whole, np.memmap):
        raise CliError(f"{path}: cannot read as .npy (not a plain array file)")
    _check_numeric(path, whole.dtype)
    shape, dtype, offset = tuple(whole.shape), whole.dtype, int(whole.offset)
    row_items = math.prod(shape[1:])
    fortran = bool(whole.flags.f_contiguous and not whole.flags.c_contiguous)
    del whole

    def read(start: int, stop: int) -> Tensor:
        if fortran:  # rows are not contiguous on disk: slice the full map (rare; pages stay cached)
            return _native(np.load(path, mmap_mode="r")[start:stop])
        # A map of just this chunk, released when the copy is made: resident memory stays one chunk.
        window = np.memmap(
            path,
            dtype=dtype,
            mode="r",
            offset=offset + start * row_items * dtype.itemsize,
            shape=(stop - start, *shape[1:]),
        )
        try:
            return _native(window)
        finally:
            window._mmap.close()  # noqa: SLF001  (numpy keeps no public close)

    return ArrayFile(path, shape, str(dtype), read)


def _choose_key(path: str, keys: Sequence[str], key: str | None, what: str = "array") -> str:
    listing = ", ".join(keys) if keys else "none"
    if key is None:
        if len(keys) == 1:
            return keys[0]
        raise CliError(f"{path}: holds {len(keys)} {what}s; choose one with --key (keys: {listing})")
    if key not in keys:
        raise CliError(f"{path}: no key {key!r} (keys: {listing})")
    return key


def _open_npz(path: str, key: str | None) -> ArrayFile:
    import numpy as np  # noqa: PLC0415

    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise CliError(f"{path}: cannot read as .npz: {_one_line(error)}") from error
    members = {name[: -len(".npy")]: name for name in archive.namelist() if name.endswith(".npy")}
    try:
        member = members[_choose_key(path, list(members), key)]
    except CliError:
        archive.close()
        raise
    try:
        with archive.open(member) as stream:
            version = np.lib.format.read_magic(stream)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(stream)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        archive.close()
        raise CliError(f"{path}: cannot read member {member!r}: {_one_line(error)}") from error
    _check_numeric(path, dtype)
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    state: dict[str, Any] = {"stream": None, "next": 0}

    def read(start: int, stop: int) -> Tensor:
        if fortran:  # not row-contiguous: load the member whole (rare)
            with np.load(path, allow_pickle=False) as npz:
                return _native(npz[member[: -len(".npy")]][start:stop])
        if state["stream"] is None or state["next"] != start:  # chunks are read in order; restart otherwise
            if state["stream"] is not None:
                state["stream"].close()
            stream = archive.open(member)
            version = np.lib.format.read_magic(stream)
            (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(stream)
            stream.read(start * row_bytes)
            state["stream"] = stream
        want = (stop - start) * row_bytes
        data = state["stream"].read(want)
        if len(data) != want:
            raise ValueError(f"member {member!r} is truncated")
        state["next"] = stop
        return _native(np.frombuffer(data, dtype=dtype).reshape(stop - start, *shape[1:]))

    def close() -> None:
        if state["stream"] is not None:
            state["stream"].close()
        archive.close()

    return ArrayFile(path, tuple(shape), str(dtype), read, close)


# safetensors dtype codes -> torch dtype names (torch attributes, looked up when a file is read).
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
}


def _open_safetensors(path: str, key: str | None) -> ArrayFile:
    """Keys, shape and dtype through the ``safetensors`` package; chunks by plain reads of their bytes.

    ``safe_open`` maps the whole file, and every page a slice touches stays resident, so a file
    larger than memory would end up resident. The chunks are read instead from the byte range the
    format's header gives for the tensor (8-byte little-endian header length, JSON header with
    ``data_offsets`` relative to the end of the header), one chunk at a time.
    """
    import torch  # noqa: PLC0415

    try:
        from safetensors import safe_open  # noqa: PLC0415
    except ImportError as error:  # pragma: no cover - a core dependency
        raise CliError(
            f"{path}: reading .safetensors needs the `safetensors` package: pip install safetensors"
        ) from error
    try:
        with safe_open(path, framework="pt") as opened:
            keys = list(opened.keys())
            name = _choose_key(path, keys, key, what="tensor")
            view = opened.get_slice(name)
            shape, dtype_name = tuple(view.get_shape()), str(view.get_dtype()).upper()
        with open(path, "rb") as file:
            header_length = int.from_bytes(file.read(8), "little")
            begin, _ = json.loads(file.read(header_length))[name]["data_offsets"]
    except CliError:
        raise
    except Exception as error:  # noqa: BLE001  (safetensors raises its own error types)
        raise CliError(f"{path}: cannot read as .safetensors: {_one_line(error)}") from error
    if dtype_name not in _SAFETENSORS_DTYPES:
        raise CliError(f"{path}: tensor {name!r} holds {dtype_name} values; expected real numbers (float or integer)")
    dtype = getattr(torch, _SAFETENSORS_DTYPES[dtype_name])
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    data_start = 8 + header_length + begin
    file = open(path, "rb")  # noqa: SIM115  (closed by ArrayFile.close)

    def read(start: int, stop: int) -> Tensor:
        file.seek(data_start + start * row_bytes)
        data = bytearray((stop - start) * row_bytes)
        if file.readinto(data) != len(data):
            raise ValueError("the file is truncated")
        return torch.frombuffer(data, dtype=dtype).reshape(stop - start, *shape[1:])

    return ArrayFile(path, shape, dtype_name, read, file.close)


_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_RESAVE = (
    "save the embeddings as a tensor with torch.save(tensor) or torch.save({'name': tensor}), or as .npy or"
    " .safetensors"
)


def _first_sentence(error: BaseException) -> str:
    """The first sentence of an error, without terminal colour codes: torch's load errors run to
    paragraphs of advice, some of it (weights_only=False) what this tool must never do."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return _one_line(re.split(r"(?<=[.!?])\s|\n", text, maxsplit=1)[0]).rstrip(".")


def _open_torch(path: str, key: str | None) -> ArrayFile:
    """A tensor, or a dict of tensors, saved with ``torch.save``: always ``weights_only=True``.

    The safe loader never runs pickled code: a file that pickles anything beyond tensors and plain
    containers (a module, a numpy array, an arbitrary object) is refused with one line naming what it
    holds and how to re-save it. torch's own warnings (pickle protocol, legacy format) are silenced:
    the outcome is either the tensor or that one line. Zip-format files (every ``torch.save`` since
    torch 1.6) are memory-mapped; legacy ones cannot be and are read whole.
    """
    import torch  # noqa: PLC0415

    memory_map = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=memory_map)
    except pickle.UnpicklingError as error:
        found = _UNSAFE_GLOBAL.search(str(error))
        holds = f"pickled Python objects ({found.group(1)})" if found else "pickled data that is not tensors"
        raise CliError(
            f"{path}: not loaded: holds {holds}, and reprmetrics never unpickles code (it reads .pt files with"
            f" torch.load(weights_only=True)); {_RESAVE}"
        ) from error
    except Exception as error:  # noqa: BLE001  (zip, EOF and format errors of every kind)
        raise CliError(f"{path}: cannot read as a torch file ({_first_sentence(error)}); {_RESAVE}") from error
    if isinstance(obj, dict):
        tensors = [k for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)]
        if key is not None and key in obj and not isinstance(obj[key], torch.Tensor):
            raise CliError(
                f"{path}: key {key!r} holds a {type(obj[key]).__name__}, not a tensor (tensor keys:"
                f" {', '.join(tensors) or 'none'})"
            )
        tensor = obj[_choose_key(path, tensors, key, what="tensor")]
    elif isinstance(obj, torch.Tensor):
        tensor = obj
    else:
        raise CliError(f"{path}: holds a {type(obj).__name__}; expected a tensor or a dict of tensors")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise CliError(f"{path}: holds {tensor.dtype} values; expected real numbers (float or integer)")
    return ArrayFile(path, tuple(tensor.shape), str(tensor.dtype), lambda start, stop: tensor[start:stop].clone())


def open_array(path: str, key: str | None = None, ndim: int = 2, what: str = "embeddings") -> ArrayFile:
    """Open the array of ``path`` (``key`` for containers) and check that it has ``ndim`` dimensions."""
    file = Path(path)
    if not file.exists():
        raise CliError(f"{path}: no such file")
    if file.is_dir():
        raise CliError(f"{path}: is a directory, not a file")
    if not os.access(file, os.R_OK):
        raise CliError(f"{path}: cannot read: permission denied")
    suffix = file.suffix.lower()
    if suffix == ".npy":
        array = _open_npy(path)
    elif suffix == ".npz":
        array = _open_npz(path, key)
    elif suffix == ".safetensors":
        array = _open_safetensors(path, key)
    elif suffix in (".pt", ".pth"):
        array = _open_torch(path, key)
    else:
        raise CliError(f"{path}: unsupported file type {suffix or '(none)'!r}; expected {', '.join(SUFFIXES)}")
    layout = "(N, D)" if ndim == 2 else "(N, q, D)"
    if len(array.shape) != ndim:
        array.close()
        raise CliError(f"{path}: {what} must be a {ndim}-D {layout} array, got shape {array.shape}")
    if array.rows == 0 or array.shape[-1] == 0:
        array.close()
        raise CliError(f"{path}: {what} array is empty (shape {array.shape})")
    return array


# ---- output ----------------------------------------------------------------------------------------
def _header(name: str) -> str:
    from reprmetrics.evaluate import HEALTHY_DIRECTION  # noqa: PLC0415

    arrow = HEALTHY_DIRECTION.get(name, "")
    return f"{name} {arrow}" if arrow else name


def _number(value: Any) -> str:
    """A cell of the human-readable table: integers with thousands separators, floats rounded."""
    if isinstance(value, int):
        return f"{value:,}"
    if value is None:
        return "—"
    if value == 0 or 1e-3 <= abs(value) < 1e6:
        return f"{value:.4f}"
    return f"{value:.3e}"


def _as_computed(value: float) -> float:
    """``value`` with the digits its computation carries, for JSON and CSV.

    The metrics compute in the input's floating dtype: float32 for float32, float16 and bfloat16
    embeddings, float64 for float64. A float32 result widened to a Python float prints as
    209.00794982910156, digits float32 never had; a value that is exactly a float32 becomes the
    shortest decimal that reads back as the same float32 (209.00795: numpy's shortest round-trip
    printing). float64 results keep every digit (Python's repr is already their shortest
    round-trip). A float64 result that happens to be exactly a float32 (1.0, 0.5) prints the same
    either way.
    """
    import numpy as np  # noqa: PLC0415

    single = np.float32(value)
    if math.isfinite(value) and float(single) == value:
        return float(str(single))
    return value


def render(rows: list[dict[str, Any]], columns: list[str], fmt: str) -> str:
    """Rows (dicts) as a table, CSV, JSON (a list of objects) or Markdown; the header carries ↑/↓/≈1."""
    if fmt == "json":
        return json.dumps([{c: row[c] for c in columns if row.get(c) is not None} for row in rows], indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)  # plain names: a machine-readable header (the directions are in --help)
        for row in rows:
            writer.writerow(
                ["" if row.get(c) is None else (repr(row[c]) if isinstance(row[c], float) else row[c]) for c in columns]
            )
        return out.getvalue()
    header = [_header(c) for c in columns]
    cells = [[str(row[c]) if isinstance(row.get(c), str) else _number(row.get(c)) for c in columns] for row in rows]
    if fmt == "markdown":
        align = ["---" if isinstance(rows[0].get(c), str) else "---:" for c in columns]
        lines = [header, align, *cells]
        return "".join("| " + " | ".join(line) + " |\n" for line in lines)
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    text = [isinstance(rows[0].get(c), str) for c in columns]

    def line(values: list[str]) -> str:
        return " | ".join(v.ljust(w) if t else v.rjust(w) for v, w, t in zip(values, widths, text)).rstrip() + "\n"

    return line(header) + "-+-".join("-" * w for w in widths) + "\n" + "".join(line(r) for r in cells)


def _emit(text: str, output: str | None, quiet: bool) -> None:
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as error:
        raise CliError(f"{output}: cannot write: {_one_line(error)}") from error
    _note(f"wrote {output}", quiet)


def _note(message: str, quiet: bool) -> None:
    if not quiet:
        click.echo(f"reprmetrics: {message}", err=True)


def plot_spectra(spectra: list[tuple[str, dict[str, Any]]], path: str) -> None:
    """One PNG: each file's covariance spectrum on log-log axes, with its α-ReQ fit dashed."""
    import matplotlib  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=150)
    fit_ranges = set()
    for index, (label, spectrum) in enumerate(spectra):
        color = f"C{index % 10}"
        eigenvalues = spectrum["eigenvalues"].double().numpy()
        ranks = np.arange(1, len(eigenvalues) + 1)
        positive = eigenvalues > 0
        alpha = spectrum.get("alpha")
        name = f"{label} (α = {alpha:.2f})" if alpha is not None else f"{label} (no α-ReQ fit)"
        axes.loglog(ranks[positive], eigenvalues[positive], color=color, lw=1.3, label=name)
        if alpha is not None:
            k = np.arange(spectrum["first"], spectrum["last"] + 1, dtype=np.float64)
            fit = np.exp(spectrum["intercept"] - alpha * np.log(k))
            axes.loglog(k, fit, color="white", lw=3.2, zorder=3)  # a halo keeps the fit visible on its curve
            axes.loglog(k, fit, color=color, ls=(0, (4, 2)), lw=1.8, zorder=4)
            fit_ranges.add((spectrum["first"], spectrum["last"]))
    for first, last in fit_ranges:
        axes.axvspan(first, last, color="0.5", alpha=0.08, lw=0)
    axes.set_xlabel("rank k")
    axes.set_ylabel("covariance eigenvalue λ_k")
    axes.set_title("Covariance spectra; dashed: α-ReQ fit log λ_k ≈ −α log k + b over the shaded ranks", fontsize=8.5)
    axes.grid(True, which="both", alpha=0.25)
    axes.legend(fontsize=8)
    figure.tight_layout()
    try:
        figure.savefig(path)
    except OSError as error:
        raise CliError(f"{path}: cannot write the plot: {_one_line(error)}") from error
    finally:
        plt.close(figure)


# ---- running -----------------------------------------------------------------------------------------
def _check_device(device: str | None) -> str | None:
    if device is None:
        return None
    import torch  # noqa: PLC0415

    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise CliError(f"--device {device!r}: not a device ({_one_line(error)})") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {device!r}: CUDA is not available on this machine")
    return device


def _progress_bar(array: ArrayFile, quiet: bool, stack: ExitStack) -> Any:
    """A tqdm bar over the rows on a terminal (None otherwise, or with --quiet)."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm  # noqa: PLC0415

    return stack.enter_context(
        tqdm(total=array.rows, unit="rows", unit_scale=True, desc=Path(array.path).name, leave=False, file=sys.stderr)
    )


def _explain(error: ValueError, path: str, inputs: dict[str, str]) -> CliError:
    """A CLI-worded one-line error for a failure of evaluate() on ``path``."""
    from reprmetrics.evaluate import NonFiniteRowsError  # noqa: PLC0415

    if isinstance(error, NonFiniteRowsError):
        where = inputs.get(error.input_name, path)
        unit = "samples" if error.input_name == "views" else "rows"
        return CliError(
            f"{where}: {error.bad_rows:,} of {error.total_rows:,} {unit} contain NaN or infinite values;"
            " pass --drop-nonfinite to skip them"
        )
    message = _one_line(error).removeprefix("evaluate: ")
    return CliError(f"{path}: {message}")


def _evaluate_file(
    path: str,
    key: str | None,
    views: str | None,
    views_key: str | None,
    reference: str | None,
    reference_key: str | None,
    metrics: str | list[str],
    options: dict[str, Any],
    with_spectrum: bool,
    announce_phase: bool = True,
) -> EvaluationResult:
    """evaluate() on one file, streamed; with ``announce_phase``, a note on stderr once the rows are
    read, saying what is being computed (the point metrics' kNN and pairwise passes can take longer
    than the reading, and would otherwise run with no sign of life after the bar reaches 100 %)."""
    from reprmetrics.evaluate import _run  # noqa: PLC0415

    quiet = options["quiet"]
    with ExitStack() as stack:
        embeddings = open_array(path, key)
        stack.callback(embeddings.close)
        inputs = {"embeddings": path}
        views_array = reference_array = None
        if views is not None:
            views_array = open_array(views, views_key, ndim=3, what="views")
            stack.callback(views_array.close)
            inputs["views"] = views
            if views_array.shape[1] < 2:
                raise CliError(f"{views}: views need q >= 2 per sample, got shape {views_array.shape}")
            if views_array.shape[-1] != embeddings.shape[-1]:
                raise CliError(
                    f"{views}: views have D = {views_array.shape[-1]} but {path} has D = {embeddings.shape[-1]}"
                )
        if reference is not None:
            reference_array = open_array(reference, reference_key, what="reference embeddings")
            stack.callback(reference_array.close)
            inputs["reference"] = reference
            if reference_array.rows != embeddings.rows:
                raise CliError(
                    f"{reference}: has {reference_array.rows:,} rows but {path} has {embeddings.rows:,};"
                    " CKA compares the same samples, row by row"
                )
        batch_size = options["batch_size"]
        bar = _progress_bar(embeddings, quiet, stack)

        def on_phase(message: str) -> None:
            if bar is not None:
                bar.close()  # clears its line, so the note does not land in the middle of it
            if announce_phase:
                _note(f"{path}: {message}", quiet)

        try:
            result = _run(
                embeddings.chunks(batch_size, bar.update if bar is not None else None),
                views=views_array.chunks(batch_size) if views_array is not None else None,
                metrics=metrics,
                reference=reference_array.chunks(batch_size) if reference_array is not None else None,
                max_samples=options["max_samples"],
                batch_size=batch_size,
                device=options["device"],
                drop_nonfinite=options["drop_nonfinite"],
                with_spectrum=with_spectrum,
                on_phase=on_phase,
            )
        except ValueError as error:
            raise _explain(error, path, inputs) from error
    for name, count in result.dropped.items():
        unit = "samples" if name == "views" else "rows"
        total = {
            "embeddings": embeddings.rows,
            "reference": embeddings.rows,
            "views": views_array.rows if views_array else 0,
        }[name]
        _note(f"{inputs[name]}: skipped {count:,} of {total:,} {unit} with NaN or infinite values", quiet)
    return result


def _parse_metrics(value: str) -> str | list[str]:
    if value.strip() == "default":
        return "default"
    return [name.strip() for name in value.split(",") if name.strip()]


def _pair_views(files: Sequence[str], views: Sequence[str]) -> list[str | None]:
    """The views file of each FILE: the i-th --views belongs to the i-th FILE; later FILEs have none."""
    if len(views) > len(files):
        raise CliError(
            f"--views: {len(views)} views files for {len(files)} FILE(s); the i-th --views belongs to the i-th FILE,"
            " so give at most one per FILE"
        )
    return [*views, *[None] * (len(files) - len(views))]


def _row(values: dict[str, Any]) -> dict[str, Any]:
    return {name: _as_computed(v) if isinstance(v, float) else v for name, v in values.items()}


_COMMON = [
    click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default="table",
        show_default=True,
        help="Output format (JSON: a list of objects).",
    ),
    click.option(
        "--output", "-o", type=str, default=None, metavar="PATH", help="Write the output to PATH instead of stdout."
    ),
    click.option(
        "--device", type=str, default=None, help="Compute on this device, e.g. cuda or cuda:1 (default: cpu)."
    ),
    click.option(
        "--batch-size",
        type=click.IntRange(min=2),
        default=DEFAULT_BATCH_SIZE,
        show_default=True,
        help="Rows read and processed per chunk.",
    ),
    click.option(
        "--drop-nonfinite", is_flag=True, help="Skip rows with NaN/inf values (reported on stderr) instead of failing."
    ),
    click.option(
        "--quiet", "-q", is_flag=True, help="No progress bar and no notes on stderr (errors are still printed)."
    ),
]


def _common(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_COMMON):
        function = option(function)
    return function


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="reprmetrics")
def cli() -> None:
    """Label-free representation-quality metrics of saved embeddings.

    Files: .pt/.pth (a tensor, or a dict of tensors with --key; loaded with
    torch.load(weights_only=True), never unpickling code), .npy (memory-mapped), .npz (--key),
    .safetensors (--key). Embeddings are (N, D): one row per sample. Bad input exits with status 2.

    JSON and CSV carry each value with the digits it was computed with (float32 input: the
    shortest decimal that reads back as the same float32); the table rounds for reading.
    """


@cli.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE [FILE ...]")
@click.option(
    "--key", default=None, help="Array name inside .pt/.npz/.safetensors FILEs (optional when a file holds one)."
)
@click.option(
    "--views",
    "views",
    multiple=True,
    metavar="VIEWS",
    help=(
        "(N, q, D) views (q >= 2 augmentations per sample) for LiDAR and alignment. Matched by position: the i-th"
        " --views belongs to the i-th FILE; FILEs after the last --views have no views."
    ),
)
@click.option("--views-key", default=None, help="Array name inside the --views files (default: --key).")
@click.option(
    "--reference",
    default=None,
    metavar="FILE",
    help="Add `cka`: linear CKA of each FILE to these embeddings of the same N rows.",
)
@click.option("--reference-key", default=None, help="Array name inside the --reference file (default: --key).")
@click.option(
    "--metrics",
    "metric_names",
    default="default",
    show_default=True,
    help="Comma-separated metric names, or 'default' (the monitor's set); `reprmetrics metrics` lists every name.",
)
@click.option(
    "--max-samples",
    type=click.IntRange(min=2),
    default=DEFAULT_MAX_SAMPLES,
    show_default=True,
    help="Bounded uniform sample kept by uniformity, LID, TwoNN and MLE.",
)
@click.option(
    "--plot",
    default=None,
    metavar="PATH",
    help="Also write one PNG with every file's covariance spectrum (log-log) and α-ReQ fit; needs matplotlib.",
)
@_common
def report(
    files: tuple[str, ...],
    key: str | None,
    views: tuple[str, ...],
    views_key: str | None,
    reference: str | None,
    reference_key: str | None,
    metric_names: str,
    max_samples: int,
    plot: str | None,
    fmt: str,
    output: str | None,
    device: str | None,
    batch_size: int,
    drop_nonfinite: bool,
    quiet: bool,
) -> None:
    """Metrics of each FILE: one row per file, one column per metric.

    The header marks each metric's healthy direction: ↑ higher is healthier, ↓ lower, ≈1 closest to 1
    (α-ReQ). Default metrics, names and settings are those RepresentationMonitor logs: rankme,
    alpha_req (D >= 13), normalized_std, uniformity, lid, nesum, coding_rate, wasserstein_uniformity,
    isoscore, and with --views lidar and alignment. lid is the geometric mean of the per-sample LIDs.
    Sufficient-statistic metrics see every row; uniformity and LID use a uniform sample of at most
    --max-samples rows. A progress bar is shown on a terminal, and a note when the rows are read and
    the metrics are being computed, unless --quiet.
    """
    from reprmetrics.evaluate import _check_names  # noqa: PLC0415

    views_of = _pair_views(files, views)
    if plot is not None:
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError as error:
            raise CliError("--plot needs matplotlib, which is not installed: pip install matplotlib") from error
    options = {
        "quiet": quiet,
        "batch_size": batch_size,
        "max_samples": max_samples,
        "device": _check_device(device),
        "drop_nonfinite": drop_nonfinite,
    }
    metrics = _parse_metrics(metric_names)
    _check_names(metrics, bool(views), reference is not None)  # before any file is read
    if views and len(views) < len(files):
        try:  # named metrics that need views, and a FILE without them: say so before reading anything
            _check_names(metrics, False, reference is not None)
        except ValueError as error:
            reason = _one_line(error).removeprefix("evaluate: ")
            raise CliError(
                f"{files[len(views)]}: has no --views (the i-th --views belongs to the i-th FILE), and {reason}"
            ) from error
        without = ", ".join(files[len(views) :])
        _note(
            f"--views matched by position: {len(views)} of {len(files)} files have views; {without}: no lidar or"
            " alignment",
            quiet,
        )
    rows, spectra = [], []
    for path, views_path in zip(files, views_of):
        result = _evaluate_file(
            path,
            key,
            views_path,
            views_key if views_key is not None else key,
            reference,
            reference_key if reference_key is not None else key,
            metrics,
            options,
            plot is not None,
        )
        rows.append({"file": path, "N": result.num_samples, "D": result.num_features, **_row(result.values)})
        if result.spectrum is not None:
            spectra.append((Path(path).name, result.spectrum))
    columns = ["file", "N", "D"]
    for row in rows:
        columns += [c for c in row if c not in columns]
    _emit(render(rows, columns, fmt), output, quiet)
    if plot is not None:
        plot_spectra(spectra, plot)
        _note(f"wrote {plot}", quiet)


@cli.command()
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option(
    "--key", "keys", multiple=True, help="Array name inside container files: once for both, or twice (A's, then B's)."
)
@_common
def compare(
    a: str,
    b: str,
    keys: tuple[str, ...],
    fmt: str,
    output: str | None,
    device: str | None,
    batch_size: int,
    drop_nonfinite: bool,
    quiet: bool,
) -> None:
    """Linear CKA between embeddings A (N, D1) and B (N, D2) of the same N samples, streamed.

    Row i of A and row i of B must be the same sample. 1 means the same representation up to rotation
    and scale, 0 unrelated. With --drop-nonfinite a row is skipped when it is non-finite in A or B.
    """
    if len(keys) > 2:
        raise CliError(f"--key: give it once (both files) or twice (A, then B), got {len(keys)}")
    key_a = keys[0] if keys else None
    key_b = keys[-1] if keys else None
    options = {
        "quiet": quiet,
        "batch_size": batch_size,
        "max_samples": DEFAULT_MAX_SAMPLES,
        "device": _check_device(device),
        "drop_nonfinite": drop_nonfinite,
    }
    # Linear CKA is computed from streamed moments in an instant: no phase worth announcing.
    result = _evaluate_file(a, key_a, None, None, b, key_b, [], options, with_spectrum=False, announce_phase=False)
    row = {
        "a": a,
        "b": b,
        "N": result.num_samples,
        "D_a": result.num_features,
        "D_b": result.reference_features,
        "cka": result.values["cka"],
    }
    _emit(render([_row(row)], list(row), fmt), output, quiet)


@cli.command(name="metrics")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="Output format (JSON: a list of objects).",
)
def list_metrics(fmt: str) -> None:
    """Every metric name --metrics accepts: its healthy direction and when the default set has it."""
    from reprmetrics.evaluate import HEALTHY_DIRECTION, METRIC_NAMES  # noqa: PLC0415
    from reprmetrics.monitor import available_metrics  # noqa: PLC0415

    specs = available_metrics()
    rows = []
    for name in METRIC_NAMES:
        spec = specs.get(name)
        if spec is None:  # cka: not a monitor metric
            included = "with --reference (or `compare`)"
        elif not spec.default:
            included = "no: name it in --metrics"
        else:
            conditions = [f"D >= {spec.min_features}"] * (spec.min_features > 1) + ["with --views"] * spec.needs_views
            included = "yes" + (f", {' and '.join(conditions)}" if conditions else "")
        rows.append({"metric": name, "healthy": HEALTHY_DIRECTION.get(name) or "—", "in the default set": included})
    click.echo(render(rows, list(rows[0]), fmt), nl=False)


# ---- entry point -----------------------------------------------------------------------------------------
def _fail(message: str, status: int = EXIT_BAD_INPUT) -> int:
    click.echo(f"reprmetrics: error: {_one_line(message)}", err=True)
    return status


def _return_freed_memory_to_the_os() -> None:
    """glibc only: serve allocations of 128 KiB and more from their own mappings, so freed chunk
    buffers go back to the OS instead of staying in a fragmented heap. Measured on a 2,000,000 × 128
    float32 .npy: peak resident memory 477 → about 390 MB (torch and its imports are about 320 MB of it)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixing it also stops glibc from raising it)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl, ...): keep the allocator's defaults
        pass


def main(argv: Sequence[str] | None = None, prog_name: str = "reprmetrics") -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input or usage, 1 anything else)."""
    try:
        status = cli.main(args=list(argv) if argv is not None else None, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as error:
        click.echo(error.ctx.get_help() if error.ctx is not None else "", err=False)
        return 0
    except click.exceptions.UsageError as error:
        hint = f" (see `{error.ctx.command_path} --help`)" if error.ctx is not None else ""
        return _fail(f"{error.format_message()}{hint}")
    except CliError as error:
        return _fail(str(error))
    except ValueError as error:
        return _fail(str(error).removeprefix("evaluate: "))
    except click.exceptions.Abort:
        return _fail("aborted", 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as error:  # noqa: BLE001  (never a traceback unless asked for)
        if os.environ.get("REPRMETRICS_DEBUG"):
            raise
        return _fail(f"{type(error).__name__}: {error} (set REPRMETRICS_DEBUG=1 for the traceback)", 1)
    return status if isinstance(status, int) else 0


def console_main(prog_name: str = "reprmetrics") -> None:
    """The ``reprmetrics`` console script and ``python -m reprmetrics``: a process of its own, so it
    also tunes the allocator for streaming (see :func:`_return_freed_memory_to_the_os`)."""
    _return_freed_memory_to_the_os()
    sys.exit(main(prog_name=prog_name))


if __name__ == "__main__":  # pragma: no cover
    console_main()
