"""The toolkit on a CUDA device, against the CPU and independent float64 references.

Covered: every Metric class of ``reprmetrics.__all__`` and every function of ``reprmetrics.functional``
(streamed or called on CUDA input, compared with the same call on the CPU and with a numpy reference);
the blocked kNN's tiles; a real ``lightning.Trainer(accelerator="gpu")`` run with the
``RepresentationMonitor``; the Hugging Face ``RepresentationCallback`` on a tiny model built from a
config; and the host syncs of the tracker's capture path.

Each check is a function of the device, ``check_*(device)``. The ``gpu``-marked tests call it with
``"cuda"``; CPU tests call the same functions with ``"cpu"`` so that every line runs in CI now. On the CPU
the cross-device comparison is trivial, but the comparisons with the float64 references, the device
placement and the bookkeeping assertions are not: a check that is wrong fails here first.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hugging Face check builds its model from a config

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from _helpers.harness import rel_err  # noqa: E402
from references import alpha_req_ref, rankme_ref  # noqa: E402
from references_centred import normalized_std_ref  # noqa: E402
from references_intrinsic_dimension import knn_distances_ref, ldreg_ref_torch, lid_ref, mle_ref, twonn_ref  # noqa: E402
from references_isotropy import coding_rate_ref, isoscore_steps_ref, nesum_ref, sigreg_ref, wasserstein_uniformity_ref  # noqa: E402
from references_multiview import alignment_ref, lidar_ref, uniformity_ref  # noqa: E402
from references_similarity import cka_ref, linear_cka_ref, minibatch_cka_ref  # noqa: E402
from scipy.spatial.distance import cdist  # noqa: E402
from torch import nn  # noqa: E402
from torchmetrics import Metric  # noqa: E402

import reprmetrics  # noqa: E402
from reprmetrics import functional as RF  # noqa: E402
from reprmetrics._knn import default_tile_bytes, knn, tile_plan  # noqa: E402
from reprmetrics.monitor import RepresentationTracker  # noqa: E402

CUDA = pytest.mark.gpu  # conftest skips these without CUDA
F64_EPS = float(torch.finfo(torch.float64).eps)
F32_EPS = float(torch.finfo(torch.float32).eps)

# Tolerances. Float64 work on two devices differs by round-off (summation order, solvers): measured
# ~1e-13 between the functionals and their numpy references. The Metric classes return float32
# (torch's default dtype), within half a float32 step (6e-8 relative) of the reference: two such
# values may differ by two steps. Float32 input adds float32 tiles (uniformity) whose round-off
# differs by device.
FUNCTIONAL_TOLERANCE = 1e-9
CLASS_TOLERANCE = {torch.float64: 2.4e-7, torch.float32: 1e-6}


def max_rel_err(a, b) -> float:
    """Largest difference relative to the largest magnitude: for vectors whose entries span scales."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def on(device: str) -> torch.device:
    return torch.device(device)


def assert_on(device: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.device.type == on(device).type, f"result on {t.device}, expected {device}"


# ---- data: float64 on the CPU, deterministic ---------------------------------------------------------

N, D = 600, 24
BATCH_SIZES = (64, 37, 100, 5, 90, 4, 128)  # uneven, every one ≥ 4 (MinibatchCKA's minimum)


def embeddings(n: int = N, d: int = D, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A decaying spectrum (λ_k ∝ 1/k), randomly rotated, off the origin: like trained embeddings."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, d + 1, dtype=torch.float64).pow(-0.5)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return ((torch.randn(n, d, generator=g, dtype=torch.float64) * scale) @ rotation.T + 0.3).to(dtype)


def pairs(n: int = N, seed: int = 1, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """x, and y = a random linear map of x plus noise (one width: alignment compares rows of both)."""
    x = embeddings(n, D, seed, torch.float64)
    g = torch.Generator().manual_seed(seed + 100)
    y = x @ torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5 + 0.3 * torch.randn(
        n, D, generator=g, dtype=torch.float64
    )
    return x.to(dtype), y.to(dtype)


def views(n: int = N, q: int = 2, seed: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    centres = embeddings(n, D, seed, torch.float64)
    g = torch.Generator().manual_seed(seed + 100)
    return (centres[:, None, :] + 0.3 * torch.randn(n, q, D, generator=g, dtype=torch.float64) * centres.std(0)).to(
        dtype
    )


def uneven_slices(n: int) -> list[slice]:
    out, start, i = [], 0, 0
    while start < n:
        stop = min(start + BATCH_SIZES[i % len(BATCH_SIZES)], n)
        if n - stop < 4:  # no tail of fewer than 4 rows
            stop = n
        out.append(slice(start, stop))
        start, i = stop, i + 1
    return out


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


SIGREG_DIRECTIONS = torch.randn(D, 64, generator=torch.Generator().manual_seed(7))


# ---- every Metric class ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassCase:
    """How to build a Metric, what it reads, and its float64 numpy reference on all batches."""

    make: Callable[[], Metric]
    kind: str  # "points": (B, D); "pairs": (B, D), (B, D); "views": (B, q, D)
    reference: Callable[[list[tuple[np.ndarray, ...]], float], float]  # (batches, input eps) -> value


def _all(batches: list[tuple[np.ndarray, ...]], i: int = 0) -> np.ndarray:
    return np.concatenate([b[i] for b in batches])


def _lid_geometric_mean(z: np.ndarray, k: int) -> float:
    return float(np.exp(np.mean(np.log(lid_ref(z, k)))))


CLASS_CASES: dict[str, ClassCase] = {
    "RankMe": ClassCase(reprmetrics.RankMe, "points", lambda b, eps: rankme_ref(_all(b))),
    "AlphaReQ": ClassCase(reprmetrics.AlphaReQ, "points", lambda b, eps: alpha_req_ref(_all(b), input_eps=eps)),
    "NESum": ClassCase(reprmetrics.NESum, "points", lambda b, eps: nesum_ref(_all(b))),
    "CodingRate": ClassCase(reprmetrics.CodingRate, "points", lambda b, eps: coding_rate_ref(_all(b))),
    "NormalizedStd": ClassCase(reprmetrics.NormalizedStd, "points", lambda b, eps: normalized_std_ref(_all(b))),
    "LiDAR": ClassCase(reprmetrics.LiDAR, "views", lambda b, eps: lidar_ref(_all(b))),
    "Alignment": ClassCase(reprmetrics.Alignment, "pairs", lambda b, eps: alignment_ref(_all(b, 0), _all(b, 1))),
    "Uniformity": ClassCase(reprmetrics.Uniformity, "points", lambda b, eps: uniformity_ref(_all(b))),
    "LocalIntrinsicDimension": ClassCase(
        reprmetrics.LocalIntrinsicDimension, "points", lambda b, eps: _lid_geometric_mean(_all(b), 20)
    ),
    "TwoNN": ClassCase(reprmetrics.TwoNN, "points", lambda b, eps: twonn_ref(_all(b))),
    "MLEDimension": ClassCase(reprmetrics.MLEDimension, "points", lambda b, eps: mle_ref(_all(b), 20)),
    "WassersteinUniformity": ClassCase(
        reprmetrics.WassersteinUniformity, "points", lambda b, eps: wasserstein_uniformity_ref(_all(b))
    ),
    "SIGReg": ClassCase(
        lambda: reprmetrics.SIGReg(directions=SIGREG_DIRECTIONS),
        "points",
        lambda b, eps: sigreg_ref(_all(b), SIGREG_DIRECTIONS.numpy()),
    ),
    "IsoScore": ClassCase(reprmetrics.IsoScore, "points", lambda b, eps: isoscore_steps_ref(_all(b))),
    "LinearCKA": ClassCase(reprmetrics.LinearCKA, "pairs", lambda b, eps: linear_cka_ref(_all(b, 0), _all(b, 1))),
    "MinibatchCKA": ClassCase(
        reprmetrics.MinibatchCKA, "pairs", lambda b, eps: minibatch_cka_ref([x for x, _ in b], [y for _, y in b])
    ),
}


def class_batches(kind: str, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    if kind == "points":
        data: tuple[torch.Tensor, ...] = (embeddings(dtype=dtype),)
    elif kind == "pairs":
        data = pairs(dtype=dtype)
    else:
        data = (views(dtype=dtype),)
    return [tuple(t[s] for t in data) for s in uneven_slices(N)]


def streamed(case: ClassCase, batches: list[tuple[torch.Tensor, ...]], device: str) -> tuple[torch.Tensor, Metric]:
    metric = case.make().to(on(device))
    for batch in batches:
        metric.update(*(t.to(on(device)) for t in batch))
    return metric.compute(), metric


def check_metric_class(name: str, device: str, dtype: torch.dtype = torch.float64) -> None:
    """Streamed on ``device`` over uneven batches: on the device, equal to the CPU, equal to the reference."""
    case = CLASS_CASES[name]
    batches = class_batches(case.kind, dtype)
    value, metric = streamed(case, batches, device)
    assert_on(device, value, *(t for t in metric.metric_state.values() if isinstance(t, torch.Tensor)))
    cpu_value, _ = streamed(case, batches, "cpu")
    assert math.isfinite(float(value))
    assert rel_err(float(value), float(cpu_value)) <= CLASS_TOLERANCE[dtype], (name, float(value), float(cpu_value))
    eps = F64_EPS if dtype == torch.float64 else F32_EPS
    expected = case.reference([tuple(np64(t) for t in b) for b in batches], eps)
    assert rel_err(float(value), expected) <= CLASS_TOLERANCE[dtype], (name, float(value), expected)


# ---- every functional --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionalCase:
    """A call of a functional on tensors, and its float64 reference on the same (numpy) data."""

    call: Callable[..., object]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    reference: Callable[..., object]  # numpy arrays in, a number, an array or a dict of them out
    differentiable: bool = False


def _singular_values_ref(z: np.ndarray) -> np.ndarray:
    return np.linalg.svd(z, compute_uv=False)


def _covariance_eigenvalues_ref(z: np.ndarray) -> np.ndarray:
    return np.sort(np.linalg.eigvalsh(np.cov(z, rowvar=False)))[::-1]


def _uncentred_eigenvalues_ref(z: np.ndarray) -> np.ndarray:
    return _singular_values_ref(z) ** 2 / len(z)


def _rankme_diagnostics_ref(z: np.ndarray) -> dict:
    sigma = _singular_values_ref(z)
    return {
        "rankme": rankme_ref(z),
        "top_singular_value": float(sigma[0]),
        "condition_number": float(sigma[0] / sigma[-1]),
    }


def _ldreg_ref(z: np.ndarray) -> float:
    return float(ldreg_ref_torch(torch.from_numpy(z), None, 16, "mom"))


FUNCTIONAL_CASES: dict[str, list[FunctionalCase]] = {
    "alignment": [FunctionalCase(RF.alignment, pairs, alignment_ref, differentiable=True)],
    "alpha_req": [FunctionalCase(RF.alpha_req, lambda: (embeddings(),), lambda z: alpha_req_ref(z, input_eps=F64_EPS))],
    "alpha_req_fit": [
        FunctionalCase(
            RF.alpha_req_fit, lambda: (embeddings(),), lambda z: {"alpha": alpha_req_ref(z, input_eps=F64_EPS)}
        )
    ],
    "cka": [
        FunctionalCase(
            lambda x, y, k=kernel, b=debiased: RF.cka(x, y, kernel=k, debiased=b),
            lambda: pairs(300),
            lambda x, y, k=kernel, b=debiased: cka_ref(x, y, k, 1.0, b),
        )
        for kernel in ("linear", "rbf")
        for debiased in (False, True)
    ],
    "coding_rate": [FunctionalCase(RF.coding_rate, lambda: (embeddings(),), coding_rate_ref)],
    "eigenspectrum": [
        FunctionalCase(RF.eigenspectrum, lambda: (embeddings(),), _covariance_eigenvalues_ref),
        FunctionalCase(
            lambda z: RF.eigenspectrum(z, center=False), lambda: (embeddings(),), _uncentred_eigenvalues_ref
        ),
    ],
    "isoscore": [FunctionalCase(RF.isoscore, lambda: (embeddings(),), isoscore_steps_ref)],
    "ldreg_regularizer": [
        FunctionalCase(
            lambda z: RF.ldreg_regularizer(z, k=16), lambda: (embeddings(),), _ldreg_ref, differentiable=True
        )
    ],
    "lidar": [FunctionalCase(RF.lidar, lambda: (views(),), lidar_ref)],
    "linear_cka": [FunctionalCase(RF.linear_cka, pairs, linear_cka_ref)],
    "local_intrinsic_dimension": [
        FunctionalCase(
            lambda z, e=estimator: RF.local_intrinsic_dimension(z, k=20, estimator=e),
            lambda: (embeddings(),),
            lambda z, e=estimator: lid_ref(z, 20, e),
        )
        for estimator in ("mle", "mom")
    ],
    "mle_dimension": [FunctionalCase(RF.mle_dimension, lambda: (embeddings(),), mle_ref)],
    "nesum": [FunctionalCase(RF.nesum, lambda: (embeddings(),), nesum_ref)],
    "normalized_std": [FunctionalCase(RF.normalized_std, lambda: (embeddings(),), normalized_std_ref)],
    "rankme": [FunctionalCase(RF.rankme, lambda: (embeddings(),), rankme_ref)],
    "rankme_diagnostics": [FunctionalCase(RF.rankme_diagnostics, lambda: (embeddings(),), _rankme_diagnostics_ref)],
    "sigreg": [
        FunctionalCase(
            lambda z: RF.sigreg(z, directions=SIGREG_DIRECTIONS),
            lambda: (embeddings(),),
            lambda z: sigreg_ref(z, SIGREG_DIRECTIONS.numpy()),
        )
    ],
    "singular_values": [FunctionalCase(RF.singular_values, lambda: (embeddings(),), _singular_values_ref)],
    "twonn_dimension": [FunctionalCase(RF.twonn_dimension, lambda: (embeddings(),), twonn_ref)],
    "uniformity": [FunctionalCase(RF.uniformity, lambda: (embeddings(),), uniformity_ref, differentiable=True)],
    "wasserstein_uniformity": [
        FunctionalCase(RF.wasserstein_uniformity, lambda: (embeddings(),), wasserstein_uniformity_ref)
    ],
}


def _as_numbers(result: object) -> dict[str, np.ndarray]:
    """A functional's result as named float64 arrays (tensors, Python numbers, or a dict of them)."""
    items = result.items() if isinstance(result, dict) else [("value", result)]
    return {k: np.asarray(np64(v) if isinstance(v, torch.Tensor) else v, dtype=np.float64) for k, v in items}


def _gradient(call: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], device: str) -> list[torch.Tensor]:
    leaves = [t.to(on(device)).requires_grad_() for t in inputs]
    call(*leaves).backward()
    return [leaf.grad for leaf in leaves]


def check_functional(name: str, device: str) -> None:
    """On ``device``: results live there, equal the CPU's to float64 round-off, and match the reference."""
    for case in FUNCTIONAL_CASES[name]:
        inputs = case.inputs()
        result = case.call(*(t.to(on(device)) for t in inputs))
        tensors = result.values() if isinstance(result, dict) else [result]
        assert_on(device, *(t for t in tensors if isinstance(t, torch.Tensor)))
        got, cpu = _as_numbers(result), _as_numbers(case.call(*inputs))
        assert got.keys() == cpu.keys()
        for key in got:
            assert np.all(np.isfinite(got[key])), (name, key)
            assert max_rel_err(got[key], cpu[key]) <= FUNCTIONAL_TOLERANCE, (name, key, got[key], cpu[key])
        for key, value in _as_numbers(case.reference(*(np64(t) for t in inputs))).items():
            assert max_rel_err(got[key], value) <= FUNCTIONAL_TOLERANCE, (name, key, got[key], value)
        if case.differentiable:
            for grad, cpu_grad in zip(_gradient(case.call, inputs, device), _gradient(case.call, inputs, "cpu")):
                assert_on(device, grad)
                assert torch.isfinite(grad).all()
                assert max_rel_err(np64(grad), np64(cpu_grad)) <= FUNCTIONAL_TOLERANCE, name


# ---- the kNN tiles -------------------------------------------------------------------------------------


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """What ``torch.set_float32_matmul_precision("high")`` does to CUDA matmuls: float32 GEMMs in TF32."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def brute_force_neighbours(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 kNN of the rows ``queries`` of ``x`` among the other rows: scipy's direct
    differences, each query's own index excluded, a stable sort."""
    distances = cdist(x[queries], x)
    distances[np.arange(len(queries)), queries] = np.inf
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


def check_knn_tiles(
    device: str, n: int, d: int, k: int, max_tile_bytes: int | None, dtype: torch.dtype = torch.float32,
    column_tiles: bool = False, tf32: bool = False, spot_queries: int = 300,
) -> None:  # fmt: skip
    """``knn`` on ``device`` with tiles of at most ``max_tile_bytes`` (None: the device's default) equals
    a brute-force float64 kNN on a spread of queries (those at tile boundaries included) and the CPU's
    run with its own tiles on all of them. ``column_tiles``: the tiles must split the reference too."""
    x = embeddings(n, d, seed=3, dtype=dtype)
    tile_bytes = max_tile_bytes if max_tile_bytes is not None else default_tile_bytes(on(device))
    rows, cols = tile_plan(n, n, x.element_size(), tile_bytes)
    assert rows < n, f"{n} points fit in one row tile of {tile_bytes} bytes: the check would not test tiling"
    assert cols < n or not column_tiles, f"the reference fits in one column tile of {tile_bytes} bytes"
    with tf32_matmuls(tf32):
        distances, index = knn(x.to(on(device)), k, max_tile_bytes=max_tile_bytes)
    assert_on(device, distances, index)
    boundaries = [i for r in range(rows, n, rows) for i in (r - 1, r)]
    queries = np.unique(np.concatenate([np.linspace(0, n - 1, spot_queries).astype(int), boundaries]))
    exact_distances, exact_index = brute_force_neighbours(np64(x), queries, k)
    got_index = index.cpu().numpy()[queries]
    assert np.array_equal(got_index, exact_index), (
        f"{int((got_index != exact_index).sum())} of {got_index.size} neighbours differ"
    )
    assert max_rel_err(np64(distances)[queries], exact_distances) <= 1e-12
    cpu_distances, cpu_index = knn(x, k)
    assert torch.equal(index.cpu(), cpu_index)
    assert max_rel_err(np64(distances), np64(cpu_distances)) <= 1e-12


def check_knn_against_reference_set(device: str, dtype: torch.dtype = torch.float32) -> None:
    """Queries against a separate reference holding their own copies: the zero-distance copy is dropped."""
    x = embeddings(700, 16, seed=4, dtype=dtype)
    queries, reference = x[:200], torch.cat([x[:200], embeddings(900, 16, seed=5, dtype=dtype)])
    distances, _ = knn(
        queries.to(on(device)), 10, reference=reference.to(on(device)), exclude_self=True, max_tile_bytes=64 * 1024
    )
    assert_on(device, distances)
    expected = knn_distances_ref(np64(queries), 10, reference=np64(reference), exclude_self=True)
    assert max_rel_err(np64(distances), expected) <= 1e-12
    assert float(distances.min()) > 0  # no query found itself


# ---- a real Lightning Trainer --------------------------------------------------------------------------


def _lightning_module():
    import lightning.pytorch as pl

    class TwoViewEncoder(pl.LightningModule):
        """Backbone + projector; each step returns its two views under ``"views"`` (an output-key tap)."""

        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 32))
            self.projector = nn.Linear(32, 16)

        def forward(self, x):
            return self.projector(self.backbone(x))

        def _views(self, x):
            return self(x), self(x.flip(1) * 0.1 + x)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            z1, z2 = self._views(x)
            zc = (z1 - z1.mean(0)) / (z1.std(0) + 1e-4)
            off_diagonal = (zc.T @ zc / (len(zc) - 1)).fill_diagonal_(0)
            loss = off_diagonal.square().mean() + (1 - z1.std(0)).clamp_min(0).mean() + (z1 - z2).square().mean()
            return {"loss": loss, "views": [z1.detach(), z2.detach()]}

        def validation_step(self, batch, batch_idx):
            (x,) = batch
            return {"views": list(self._views(x))}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return TwoViewEncoder


def _lightning_data(n: int, seed: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 24, generator=g) @ torch.randn(24, 24, generator=g) / 24**0.5
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)


def lightning_run(accelerator: str, root) -> tuple[dict[str, float], nn.Module, object]:
    import lightning.pytorch as pl
    from reprmetrics.callbacks import RepresentationMonitor

    pl.seed_everything(0, verbose=False)
    monitor = RepresentationMonitor(["projector", "views"], num_views=2, every_n_train_steps=4, train_buffer_size=128)
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[monitor], logger=False, default_root_dir=str(root), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, accelerator=accelerator, devices=1,
    )  # fmt: skip
    model = _lightning_module()()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*but have no logger configured.*")
        trainer.fit(model, _lightning_data(512, 1), _lightning_data(256, 2))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("repr/")}
    return logged, model, monitor


def check_lightning_monitor(accelerator: str, root) -> None:
    """The monitor in a real fit on ``accelerator``: metrics on its device, ``repr/...`` equal to a CPU fit."""
    logged, model, monitor = lightning_run(accelerator, root / accelerator)
    device = "cuda" if accelerator == "gpu" else "cpu"
    for tap in ("projector", "views"):
        for metric in monitor.tracker.metric_sets("val")[tap].metrics.values():
            assert metric.device.type == device
        for name in ("rankme", "alpha_req", "lidar", "alignment", "uniformity", "lid", "normalized_std"):
            assert math.isfinite(logged[f"repr/val/{tap}/{name}"]), (tap, name)
        assert logged[f"repr/val/{tap}/num_samples"] == 256
    cpu_logged, _, _ = lightning_run("cpu", root / "cpu")
    assert logged.keys() == cpu_logged.keys()
    for key, value in logged.items():  # two fits in float32 on two devices: round-off apart
        assert value == pytest.approx(cpu_logged[key], rel=1e-3, abs=1e-6), key
    # The last validation ran on the final weights: recompute its RankMe on the CPU from them.
    x = torch.cat([b[0] for b in _lightning_data(256, 2)])
    with torch.no_grad():
        first_view = model.cpu()(x).double().numpy()
    assert logged["repr/val/views/rankme"] == pytest.approx(rankme_ref(first_view), rel=1e-4)


# ---- the Hugging Face Trainer --------------------------------------------------------------------------


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int, length: int = 12, vocab: int = 100) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = (self.ids[:, 0] >= vocab // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert() -> nn.Module:
    """A two-layer, 32-wide BERT from a config: random weights, nothing downloaded."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=16,
    )
    return BertForSequenceClassification(config)


def check_huggingface_callback(device: str, root) -> None:
    """The Trainer callback on ``device``: metrics where the model is, values equal to a CPU recomputation."""
    from reprmetrics.callbacks.huggingface import RepresentationCallback

    trainer_class = pytest.importorskip("transformers").Trainer
    from transformers import TrainingArguments

    model, eval_set = tiny_bert(), RandomTokens(192, seed=1)
    callback = RepresentationCallback(["bert.pooler"], every_n_train_steps=2, train_buffer_size=128)
    args = TrainingArguments(
        output_dir=str(root / device), per_device_train_batch_size=64, per_device_eval_batch_size=64,
        learning_rate=5e-3, num_train_epochs=1, eval_strategy="epoch", logging_steps=2, save_strategy="no",
        report_to="none", use_cpu=device == "cpu", disable_tqdm=True, seed=0, dataloader_drop_last=True,
    )  # fmt: skip
    trainer = trainer_class(
        model=model, args=args, train_dataset=RandomTokens(512, seed=0), eval_dataset=eval_set, callbacks=[callback]
    )
    trainer.train()
    assert next(model.parameters()).device.type == device
    for metric in callback.tracker.metric_sets("val")["bert.pooler"].metrics.values():
        assert metric.device.type == device
    # The callback logs its values in an entry of its own, right after the evaluation's.
    (last,) = [e for e in trainer.state.log_history if "eval_repr/bert.pooler/rankme" in e]
    assert last["eval_repr/bert.pooler/num_samples"] == len(eval_set)
    model.cpu().eval()
    with torch.no_grad():
        pooled = model.bert(input_ids=eval_set.ids).pooler_output.double().numpy()
    assert last["eval_repr/bert.pooler/rankme"] == pytest.approx(rankme_ref(pooled), rel=1e-4)
    assert last["eval_repr/bert.pooler/normalized_std"] == pytest.approx(normalized_std_ref(pooled), rel=1e-4)
    train_steps = [e["step"] for e in trainer.state.log_history if "repr/bert.pooler/rankme" in e]
    assert train_steps == [2, 4, 6, 8]  # 512 rows / 64 per step = 8 steps, computed every 2


# ---- host syncs in the capture path --------------------------------------------------------------------

SYNC_WARNING = "synchronizing CUDA operation"  # what torch.cuda.set_sync_debug_mode("warn") warns


@contextlib.contextmanager
def sync_debug_mode(device: str, mode: str) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode(mode)`` for the block, restored after (nothing on a CPU)."""
    if on(device).type != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


@contextlib.contextmanager
def counting_host_syncs(device: str) -> Iterator[list]:
    """Records every host sync of the block (as warnings of the "warn" mode) in the yielded list."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sync_debug_mode(device, "warn"):
            syncs: list = []
            yield syncs
    syncs.extend(str(w.message) for w in caught if SYNC_WARNING in str(w.message))


class _TapModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.encoder(x))


def check_capture_path_syncs(device: str, batch: int = 64, every: int = 8, eval_batches: int = 4) -> None:
    """The tracker's capture path does not stall the GPU: no host sync at all on training steps that do
    not compute (off-schedule or capturing: ``"error"`` mode), at most one per captured evaluation batch
    (counted in ``"warn"`` mode). Scheduled computations and ``end_eval`` may sync; they run outside."""
    dev = on(device)
    torch.manual_seed(0)
    model = _TapModel().to(dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = RepresentationTracker(["encoder"], every_n_train_steps=every, train_buffer_size=2 * batch)
    tracker.attach(model)
    inputs = [torch.randn(batch, 32, device=dev) for _ in range(every)]

    def train_steps(count: int, checked: bool) -> list:
        computed = []
        for i in range(count):
            scheduled = (tracker.train_steps + 1) % every == 0
            with sync_debug_mode(device, "error") if checked else contextlib.nullcontext():
                tracker.start_train_step()
                loss = model(inputs[i % len(inputs)]).square().mean()
                values = None if scheduled else tracker.end_train_step()
            if scheduled:  # the computation may sync: outside the checked region
                values = tracker.end_train_step()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if values is not None:
                computed.append(values)
        return computed

    def eval_pass(checked: bool) -> tuple[dict, list]:
        counter = counting_host_syncs(device) if checked else contextlib.nullcontext([])
        with torch.no_grad(), counter as syncs:
            tracker.start_eval()
            for i in range(eval_batches):
                model(inputs[i])
                tracker.end_eval_step()
        return tracker.end_eval(), syncs  # end_eval computes: it may sync

    if dev.type == "cuda":  # the detectors detect: a deliberate sync is counted, and raises in "error" mode
        with counting_host_syncs(device) as control:
            float(inputs[0].sum())
        assert len(control) >= 1, 'the "warn" mode did not report a deliberate sync: the count below would mean nothing'
        with pytest.raises(RuntimeError, match=SYNC_WARNING), sync_debug_mode(device, "error"):
            float(inputs[0].sum())
    # Warm-up: one whole cycle (capture window, scheduled computation) and one evaluation pass, so
    # metric sets, buffers and the batch size exist before anything is checked.
    assert len(train_steps(every, checked=False)) == 1
    eval_pass(checked=False)
    computed = train_steps(every, checked=True)
    assert len(computed) == 1 and float(computed[0]["encoder/num_samples"]) == 2 * batch
    values, syncs = eval_pass(checked=True)
    assert float(values["encoder/num_samples"]) == eval_batches * batch
    assert len(syncs) <= eval_batches, (
        f"{len(syncs)} host syncs in {eval_batches} captured evaluation batches: {syncs[:3]}"
    )


# ---- the tests: on CUDA ----------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", sorted(CLASS_CASES))
def test_metric_class_on_cuda_equals_cpu(name, dtype):
    check_metric_class(name, "cuda", dtype)


@CUDA
@pytest.mark.parametrize("name", sorted(FUNCTIONAL_CASES))
def test_functional_on_cuda_equals_cpu(name):
    check_functional(name, "cuda")


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_knn_tiles_on_cuda(dtype):
    check_knn_tiles("cuda", 12_000, 32, 20, None, dtype)  # default 256 MiB tiles: several row tiles
    check_knn_tiles("cuda", 3_000, 32, 20, 2**20, dtype, column_tiles=True)  # 128 rows × 1,024 or 2,048 columns, merged
    check_knn_against_reference_set("cuda", dtype)


@CUDA
def test_knn_stays_exact_when_tf32_is_enabled():
    """Training scripts often enable TF32 (``torch.set_float32_matmul_precision("high")``); the kNN's
    float32 selection GEMM must not then lose true neighbours."""
    check_knn_tiles("cuda", 12_000, 128, 20, None, torch.float32, tf32=True)


@CUDA
def test_lightning_monitor_on_gpu(tmp_path):
    check_lightning_monitor("gpu", tmp_path)


@CUDA
def test_huggingface_callback_on_cuda(tmp_path):
    check_huggingface_callback("cuda", tmp_path)


@CUDA
def test_capture_path_has_no_unexpected_host_sync():
    check_capture_path_syncs("cuda")


# ---- the same checks on the CPU (CI), and their coverage ----------------------------------------------


def test_every_metric_class_and_functional_has_a_gpu_check():
    classes = {name for name in reprmetrics.__all__ if isinstance(getattr(reprmetrics, name), type)}
    assert classes == set(CLASS_CASES)
    assert set(RF.__all__) == set(FUNCTIONAL_CASES)


@pytest.mark.parametrize("name", sorted(CLASS_CASES))
def test_metric_class_check_runs_on_cpu(name):
    check_metric_class(name, "cpu")


@pytest.mark.parametrize("name", sorted(FUNCTIONAL_CASES))
def test_functional_check_runs_on_cpu(name):
    check_functional(name, "cpu")


def test_knn_check_runs_on_cpu():
    check_knn_tiles("cpu", 1_500, 8, 10, 64 * 1024, column_tiles=True)  # 128 × 128 tiles: 12 × 12 of them
    check_knn_tiles("cpu", 900, 8, 10, 32 * 1024, torch.float64, column_tiles=True)
    check_knn_against_reference_set("cpu")


def test_capture_path_check_runs_on_cpu():
    check_capture_path_syncs("cpu")


def test_lightning_check_runs_on_cpu(tmp_path):
    check_lightning_monitor("cpu", tmp_path)


def test_huggingface_check_runs_on_cpu(tmp_path):
    check_huggingface_callback("cpu", tmp_path)
