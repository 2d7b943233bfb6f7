"""Shared pieces of the digits examples: data, augmentations, encoder, SSL models, evaluation.

Everything runs offline on CPU: the 1,797 handwritten 8×8 digits ship inside scikit-learn
(``sklearn.datasets.load_digits``), the augmentations are plain torch, and the encoder is a small MLP.

- :func:`digit_splits`: a fixed split into an SSL training split (labels unused by SSL) and a
  held-out split, whose labels are used only to score the backbone afterwards.
- :func:`augment`: batched random affine warp, contrast, cutout and noise, from any generator.
- :class:`SimCLR`, :class:`SimSiam`, :class:`BYOL`, :class:`VICReg`, :class:`BarlowTwins`:
  LightningModules with submodules ``backbone`` and ``projector`` (the taps a
  :class:`~reprmetrics.callbacks.RepresentationMonitor` reads). Their ``validation_step`` embeds
  two fixed views of each held-out image: two forward calls, i.e. views 1 and 2 for LiDAR and
  alignment.
- :func:`knn_accuracy`, :func:`few_shot_probe_accuracy`: label-based scores of the backbone. On the
  digits a full-label kNN is ~0.95 even for a random encoder, so the few-shot linear probe
  (5 labels per class, averaged over 10 draws) is the score that separates good from bad.
- :func:`representation_metrics`: the monitor's metric set evaluated once on a model, outside a
  Trainer (a :class:`~reprmetrics.monitor.RepresentationTracker` on the same taps and views).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# Lightning on this torch warns at import about a deprecated torch API it uses; not ours to act on.
warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*is deprecated.*")

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from reprmetrics.monitor import RepresentationTracker  # noqa: E402

# The held-out split and its fixed views do not depend on --seed, so runs with different seeds are
# scored on the same images and the same augmented views.
SPLIT_SEED = 0
VIEW_SEED = 1234
NUM_CLASSES = 10


# ---- data -----------------------------------------------------------------------------------------
@dataclass
class DigitSplits:
    """Images ``(N, 1, 8, 8)`` in [0, 1] and integer labels, split once with a fixed seed."""

    train_images: Tensor
    train_labels: Tensor
    held_out_images: Tensor
    held_out_labels: Tensor


def digit_splits(held_out: int = 500) -> DigitSplits:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, train = order[:held_out], order[held_out:]
    return DigitSplits(images[train], labels[train], images[test], labels[test])


def augment(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One random view of each image of a ``(B, 1, 8, 8)`` batch, torch only.

    A random affine warp (rotation ±15°, scale 0.85–1.15, shear, shift up to ~1 px), a random contrast
    factor, a 3×3 cutout on half the images, and Gaussian pixel noise. Pass a seeded ``generator``
    for reproducible views; by default the global generator (seeded by ``pl.seed_everything``).
    """
    b, device = images.shape[0], images.device

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(b, *shape, generator=generator, device=device)

    angle = uniform(-math.pi / 12, math.pi / 12)
    scale = uniform(0.85, 1.15)
    shear = uniform(-0.15, 0.15)
    shift = uniform(-0.2, 0.2, 2)  # normalised coordinates: 0.25 is one pixel of 8
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    views = views * uniform(0.6, 1.4).view(b, 1, 1, 1)

    # Cutout: hiding part of a stroke forces the encoder to use the whole digit.
    rows = torch.arange(8, device=device).view(1, 8, 1)
    centre_r = torch.randint(0, 8, (b, 1, 1), generator=generator, device=device)
    centre_c = torch.randint(0, 8, (b, 1, 1), generator=generator, device=device)
    patch = ((rows - centre_r).abs() <= 1) & ((rows.transpose(1, 2) - centre_c).abs() <= 1)
    apply = torch.rand(b, 1, 1, generator=generator, device=device) < 0.5
    views = views.masked_fill((patch & apply).unsqueeze(1), 0.0)

    noise = torch.randn(views.shape, generator=generator, device=device)
    return views + 0.1 * noise


def fixed_views(images: Tensor, num_views: int = 2, seed: int = VIEW_SEED) -> list[Tensor]:
    """``num_views`` augmented copies of ``images``, drawn once from a fixed generator."""
    generator = torch.Generator().manual_seed(seed)
    return [augment(images, generator) for _ in range(num_views)]


def train_loader(splits: DigitSplits, batch_size: int) -> DataLoader:
    # drop_last: BatchNorm and the contrastive loss both want full batches.
    return DataLoader(
        TensorDataset(splits.train_images, splits.train_labels), batch_size=batch_size, shuffle=True, drop_last=True
    )


def validation_loader(splits: DigitSplits, batch_size: int = 250) -> DataLoader:
    """Held-out images as (view 1, view 2, label) batches; the views are the same every epoch."""
    view_1, view_2 = fixed_views(splits.held_out_images)
    return DataLoader(TensorDataset(view_1, view_2, splits.held_out_labels), batch_size=batch_size)


# ---- models -----------------------------------------------------------------------------------------
def mlp_backbone(width: int = 256, out_dim: int = 128) -> nn.Sequential:
    """A small MLP on the 64 pixels: fast on CPU, and enough to learn the digits without labels."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, out_dim),
        nn.BatchNorm1d(out_dim),
        nn.ReLU(),
    )


def projector(in_dim: int = 128, hidden: int = 128, out_dim: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class SSLModule(pl.LightningModule):
    """Backbone + projector trained on two augmented views per image; subclasses define the loss.

    ``validation_step`` reads the fixed held-out views: one forward call of each tapped module per
    view, so a ``RepresentationMonitor(num_views=2)`` sees views 1 and 2 of every held-out image.
    """

    def __init__(self, lr: float = 2e-3, weight_decay: float = 1e-4, feature_dim: int = 128) -> None:
        super().__init__()
        self.lr = lr
        self.weight_decay = weight_decay
        self.backbone = mlp_backbone(out_dim=feature_dim)

    def ssl_loss(self, view_1: Tensor, view_2: Tensor) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        images, _ = batch
        loss = self.ssl_loss(augment(images), augment(images))
        self.log("ssl/train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        view_1, view_2, _ = batch
        self.log("ssl/val_loss", self.ssl_loss(view_1, view_2))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.trainer is None or not self.trainer.max_epochs or self.trainer.max_epochs < 2:
            return optimizer
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def nt_xent(z_1: Tensor, z_2: Tensor, temperature: float) -> Tensor:
    """SimCLR's loss: each view must pick its partner out of the other 2B − 2 embeddings in the batch."""
    z = F.normalize(torch.cat([z_1, z_2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is not its own positive
    b = z_1.shape[0]
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, partner)


class SimCLR(SSLModule):
    """SimCLR (Chen et al. 2020): contrastive, so its negatives keep the embeddings spread out."""

    def __init__(
        self,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        temperature: float = 0.2,
        feature_dim: int = 128,
        embedding_dim: int = 64,
    ) -> None:
        super().__init__(lr, weight_decay, feature_dim)
        self.save_hyperparameters()
        self.projector = projector(feature_dim, 128, embedding_dim)
        self.temperature = temperature

    def ssl_loss(self, view_1: Tensor, view_2: Tensor) -> Tensor:
        return nt_xent(self.projector(self.backbone(view_1)), self.projector(self.backbone(view_2)), self.temperature)


class SimSiam(SSLModule):
    """SimSiam (Chen & He 2021): predict one view's embedding from the other, no negatives.

    Nothing in the loss prevents every embedding from being the same point; the stop-gradient on
    the target branch (with the predictor) is what avoids that. ``stop_gradient=False`` and
    ``predictor=False`` remove those, and the representation collapses over a few epochs.

    Unlike the paper's, the projector does not end in BatchNorm. On these digits that layer keeps
    every output dimension's variance up, so without stop-gradient the projector still loses rank
    (RankMe ~27 → 6 of 64) but the backbone's few-shot probe barely suffers; without it the collapse
    is the paper's (the normalised std falls towards 0) and costs the backbone ~6 probe points.
    """

    def __init__(
        self,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        stop_gradient: bool = True,
        predictor: bool = True,
        feature_dim: int = 128,
        embedding_dim: int = 64,
    ) -> None:
        super().__init__(lr, weight_decay, feature_dim)
        self.save_hyperparameters()
        self.projector = projector(feature_dim, 128, embedding_dim)
        self.predictor = (
            nn.Sequential(nn.Linear(embedding_dim, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, embedding_dim))
            if predictor
            else nn.Identity()
        )
        self.stop_gradient = stop_gradient

    def ssl_loss(self, view_1: Tensor, view_2: Tensor) -> Tensor:
        z_1, z_2 = self.projector(self.backbone(view_1)), self.projector(self.backbone(view_2))
        p_1, p_2 = self.predictor(z_1), self.predictor(z_2)
        if self.stop_gradient:
            z_1, z_2 = z_1.detach(), z_2.detach()
        return -(F.cosine_similarity(p_1, z_2).mean() + F.cosine_similarity(p_2, z_1).mean()) / 2


def off_diagonal(matrix: Tensor) -> Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    d = matrix.shape[0]
    return matrix.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def vicreg_loss(
    z_1: Tensor, z_2: Tensor, invariance: float = 25.0, variance: float = 25.0, covariance: float = 1.0
) -> Tensor:
    """VICReg's loss (Bardes et al. 2022): mean squared distance between the views (invariance), a hinge
    keeping each dimension's std above 1 (variance), and the squared off-diagonal covariances over D
    (covariance), weighted as in the paper (25, 25, 1). A weight of 0 removes that term."""
    loss = invariance * F.mse_loss(z_1, z_2)
    for z in (z_1, z_2):
        centred = z - z.mean(0)
        std = torch.sqrt(centred.var(0) + 1e-4)
        cov = centred.T @ centred / (z.shape[0] - 1)
        loss = (
            loss + variance * F.relu(1 - std).mean() / 2 + covariance * off_diagonal(cov).pow(2).sum() / z.shape[1] / 2
        )
    return loss


def barlow_twins_loss(z_1: Tensor, z_2: Tensor, redundancy: float = 5e-3) -> Tensor:
    """Barlow Twins' loss (Zbontar et al. 2021) on the cross-correlation C of the batch-standardised
    views: (1 - C_ii)² on the diagonal (invariance) plus ``redundancy`` × C_ij² off it (redundancy
    reduction). ``redundancy=0`` leaves only the invariance term."""
    n = z_1.shape[0]
    standardise = lambda z: (z - z.mean(0)) / (z.std(0) + 1e-5)  # noqa: E731  (BatchNorm without affine)
    c = standardise(z_1).T @ standardise(z_2) / n
    return (torch.diagonal(c) - 1).pow(2).sum() + redundancy * off_diagonal(c).pow(2).sum()


class VICReg(SSLModule):
    """VICReg (Bardes et al. 2022): invariance, variance and covariance terms, no negatives, no teacher.

    Setting ``variance`` and/or ``covariance`` to 0 gives the paper's ablations: without the variance
    term nothing stops the embeddings from shrinking together (a slow, steady collapse here); without
    the covariance term the dimensions become redundant (dimensional collapse).
    """

    def __init__(
        self,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        invariance: float = 25.0,
        variance: float = 25.0,
        covariance: float = 1.0,
        feature_dim: int = 128,
        embedding_dim: int = 64,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__(lr, weight_decay, feature_dim)
        self.save_hyperparameters(ignore=["backbone"])
        if backbone is not None:
            self.backbone = backbone
        self.projector = projector(feature_dim, 128, embedding_dim)
        self.weights = (invariance, variance, covariance)

    def ssl_loss(self, view_1: Tensor, view_2: Tensor) -> Tensor:
        return vicreg_loss(self.projector(self.backbone(view_1)), self.projector(self.backbone(view_2)), *self.weights)


class BarlowTwins(SSLModule):
    """Barlow Twins (Zbontar et al. 2021): drive the views' cross-correlation matrix to the identity.

    The standardisation inside the loss rules out complete collapse; ``redundancy=0`` removes the
    off-diagonal term, so the dimensions are free to encode the same feature (dimensional collapse).
    """

    def __init__(
        self,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        redundancy: float = 5e-3,
        feature_dim: int = 128,
        embedding_dim: int = 64,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__(lr, weight_decay, feature_dim)
        self.save_hyperparameters(ignore=["backbone"])
        if backbone is not None:
            self.backbone = backbone
        self.projector = projector(feature_dim, 128, embedding_dim)
        self.redundancy = redundancy

    def ssl_loss(self, view_1: Tensor, view_2: Tensor) -> Tensor:
        return barlow_twins_loss(
            self.projector(self.backbone(view_1)), self.projector(self.backbone(view_2)), self.redundancy
        )


class BYOL(SSLModule):
    """BYOL (Grill et al. 2020): the online network predicts a slowly moving (EMA) teacher's embedding.

    The teacher is a copy of backbone and projector made here, in ``__init__``: a
    ``RepresentationMonitor`` attaches its forward hooks in ``setup``, later, to the student's
    ``backbone`` and ``projector`` only, so the teacher's forward calls are never captured as the
    student's. After every optimiser step the teacher moves towards the student,
    θ_teacher ← m·θ_teacher + (1 − m)·θ_student (buffers are copied). ``predictor=False`` and
    ``momentum=0`` (the teacher is the student of the last step) are the paper's collapsing ablations.
    """

    def __init__(
        self,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        momentum: float = 0.99,
        predictor: bool = True,
        feature_dim: int = 128,
        embedding_dim: int = 64,
        backbone: nn.Module | None = None,
    ) -> None:
        import copy

        super().__init__(lr, weight_decay, feature_dim)
        self.save_hyperparameters(ignore=["backbone"])
        if backbone is not None:
            self.backbone = backbone
        self.projector = projector(feature_dim, 128, embedding_dim)
        self.predictor = (
            nn.Sequential(nn.Linear(embedding_dim, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, embedding_dim))
            if predictor
            else nn.Identity()
        )
        self.teacher = nn.ModuleDict(
            {"backbone": copy.deepcopy(self.backbone), "projector": copy.deepcopy(self.projector)}
        )
        self.teacher.requires_grad_(False)  # no gradient: the optimiser skips it, only the EMA moves it
        self.momentum = momentum

    def ssl_loss(self, view_1: Tensor, view_2: Tensor) -> Tensor:
        z_1, z_2 = self.projector(self.backbone(view_1)), self.projector(self.backbone(view_2))
        p_1, p_2 = self.predictor(z_1), self.predictor(z_2)
        with torch.no_grad():
            t_1 = self.teacher["projector"](self.teacher["backbone"](view_1))
            t_2 = self.teacher["projector"](self.teacher["backbone"](view_2))
        # 2 - 2 cos: the normalised squared distance of the paper, symmetrised over the views.
        return (4 - 2 * F.cosine_similarity(p_1, t_2).mean() - 2 * F.cosine_similarity(p_2, t_1).mean()) / 2

    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        student = nn.ModuleDict({"backbone": self.backbone, "projector": self.projector})
        for teacher_p, student_p in zip(self.teacher.parameters(), student.parameters()):
            teacher_p.mul_(self.momentum).add_(student_p.detach(), alpha=1 - self.momentum)
        for teacher_b, student_b in zip(self.teacher.buffers(), student.buffers()):
            teacher_b.copy_(student_b)


# ---- evaluation -------------------------------------------------------------------------------------
@torch.no_grad()
def backbone_features(backbone: nn.Module, images: Tensor, batch_size: int = 512) -> np.ndarray:
    was_training = backbone.training
    backbone.eval()
    features = torch.cat([backbone(chunk) for chunk in images.split(batch_size)])
    backbone.train(was_training)
    return features.double().cpu().numpy()


def knn_accuracy(backbone: nn.Module, splits: DigitSplits, k: int = 5) -> float:
    """k-NN (cosine) on the backbone features: every training label, scored on the held-out split."""
    from sklearn.neighbors import KNeighborsClassifier

    classifier = KNeighborsClassifier(n_neighbors=k, metric="cosine")
    classifier.fit(backbone_features(backbone, splits.train_images), splits.train_labels.numpy())
    return float(classifier.score(backbone_features(backbone, splits.held_out_images), splits.held_out_labels.numpy()))


def few_shot_probe_accuracy(
    backbone: nn.Module, splits: DigitSplits, shots: int = 5, draws: int = 10, seed: int = 0
) -> tuple[float, float]:
    """Mean and std over ``draws`` of a logistic regression on standardised backbone features,
    trained on ``shots`` labelled training images per class, scored on the held-out split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_x, train_y = backbone_features(backbone, splits.train_images), splits.train_labels.numpy()
    test_x, test_y = backbone_features(backbone, splits.held_out_images), splits.held_out_labels.numpy()
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(draws):
        chosen = np.concatenate(
            [rng.choice(np.flatnonzero(train_y == c), shots, replace=False) for c in range(NUM_CLASSES)]
        )
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant (dead) features make the scaler warn
            probe.fit(train_x[chosen], train_y[chosen])
            scores.append(probe.score(test_x, test_y))
    return float(np.mean(scores)), float(np.std(scores))


@torch.no_grad()
def representation_metrics(
    model: nn.Module,
    loader: DataLoader,
    taps: Sequence[str] = ("backbone", "projector"),
    num_views: int = 2,
    forward: Callable[[Sequence[Tensor]], Any] | None = None,
) -> dict[str, float]:
    """``{"tap/metric": value}``, what the monitor logs at a validation epoch end, for any model.

    A :class:`~reprmetrics.monitor.RepresentationTracker` (the monitor's core, no Trainer) reads the
    taps while ``forward(batch)`` runs on every batch of ``loader``; by default that is
    ``model.ssl_loss(view_1, view_2)``: the same forward calls as ``validation_step``.
    """
    if forward is None:
        forward = lambda batch: model.ssl_loss(batch[0], batch[1])  # noqa: E731
    tracker = RepresentationTracker(taps, num_views=num_views, every_n_train_steps=0)
    was_training = model.training
    model.eval()
    tracker.attach(model)
    try:
        tracker.start_eval()
        for batch in loader:
            forward(batch)
            tracker.end_eval_step()
        values = tracker.end_eval()
    finally:
        tracker.detach()
        model.train(was_training)
    return {key: float(value) for key, value in values.items()}


def score(model: SSLModule, splits: DigitSplits, loader: DataLoader, probe_draws: int = 10) -> dict[str, float]:
    """The representation metrics of ``model`` on ``loader`` next to its backbone's label scores."""
    values = representation_metrics(model, loader)
    values["knn_accuracy"] = knn_accuracy(model.backbone, splits)
    values["probe_accuracy"], values["probe_std"] = few_shot_probe_accuracy(model.backbone, splits, draws=probe_draws)
    return values


# ---- running ----------------------------------------------------------------------------------------
@contextmanager
def example_session() -> Iterator[None]:
    """What every example runs inside; the previous settings come back afterwards (tests call the
    examples in-process).

    - Lightning's banners and the warnings that do not apply to this tiny CPU data set are hidden:
      the examples print what matters themselves, a collapse stop's reason included.
    - One intra-op thread: the matrices are tiny, and on a 2-core machine a second OpenMP thread
      costs more in synchronisation than it gains (5× slower when the machine is busy).
    """
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        for message in (
            ".*does not have many workers.*",
            ".*smaller than the logging interval.*",
            ".*Checkpoint directory .* exists and is not empty.*",
            ".*but have no logger configured.*",
            ".*but have no `val_dataloader`.*",
            ".*treespec, LeafSpec.*is deprecated.*",
        ):
            warnings.filterwarnings("ignore", message)
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def make_trainer(
    max_epochs: int, callbacks: list[pl.Callback], logger: Any, progress_bar: bool, **kwargs: Any
) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=logger,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        log_every_n_steps=5,
        num_sanity_val_steps=0,
        **kwargs,
    )


def metric_values(history: Mapping[str, list[tuple[int, float]]], key: str) -> list[float]:
    """The values a monitor recorded for ``key`` (e.g. ``"val/projector/rankme"``), in order."""
    return [value for _, value in history.get(key, [])]


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table: floats to 3 decimals, one row per mapping."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths)))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [
        " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells
    ]
    return "\n".join(lines)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __str__(self) -> str:
        return f"{time.perf_counter() - self.start:.1f} s"
