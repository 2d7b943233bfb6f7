"""Small LightningModules for callback tests: a healthy encoder and one that collapses on cue."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def toy_data(n: int = 512, d_in: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g) @ torch.randn(d_in, d_in, generator=g) / d_in**0.5


def loaders(n_train: int = 512, n_val: int = 256, batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    train = TensorDataset(toy_data(n_train, seed=1))
    val = TensorDataset(toy_data(n_val, seed=2))
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=batch_size)


class ToyEncoder(pl.LightningModule):
    """Backbone + projector. A decorrelation loss keeps embeddings spread (healthy); from
    ``collapse_from_epoch`` on, the loss pulls every embedding to the batch mean (complete collapse).
    Returns the projector output as ``"z"`` and two noisy views as ``"views"`` from every step."""

    def __init__(
        self, d_in: int = 24, width: int = 32, dim: int = 16, collapse_from_epoch: int | None = None, lr: float = 0.05
    ):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width))
        self.projector = nn.Linear(width, dim)
        self.collapse_from_epoch = collapse_from_epoch
        self.lr = lr

    def forward(self, x):
        return self.projector(self.backbone(x))

    def _views(self, x):
        # Deterministic "augmentations" (no global RNG use beyond the model's own): two fixed perturbations.
        return [self(x), self(x.flip(1) * 0.1 + x)]

    def training_step(self, batch, batch_idx):
        (x,) = batch
        z1, z2 = self._views(x)
        collapsing = self.collapse_from_epoch is not None and self.current_epoch >= self.collapse_from_epoch
        if collapsing:
            loss = 50 * (z1 - z1.mean(0)).square().sum(1).mean()
        else:
            zc = (z1 - z1.mean(0)) / (z1.std(0) + 1e-4)
            cov = zc.T @ zc / (len(zc) - 1)
            off_diag = cov - torch.diag(torch.diag(cov))
            loss = off_diag.square().sum() / len(cov) + (1 - z1.std(0)).clamp_min(0).mean() + (z1 - z2).square().mean()
        return {"loss": loss, "z": z1.detach(), "views": [z1.detach(), z2.detach()]}

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        z1, z2 = self._views(x)
        return {"z": z1, "views": [z1, z2]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class _NaNRows(nn.Module):
    """Replaces a share of its input rows by NaN when ``active()`` says so."""

    def __init__(self, share: float, active):
        super().__init__()
        self.share = share
        self.active = active

    def forward(self, z):
        if not self.active():
            return z
        rows = int(round(self.share * len(z)))
        return torch.cat([torch.full_like(z[:rows], float("nan")), z[rows:]])


class DivergingEncoder(ToyEncoder):
    """ToyEncoder whose projector output turns NaN in a share of the rows, in validation from
    ``nan_from_epoch`` on (the embeddings of a diverged run; training itself stays finite)."""

    def __init__(self, nan_from_epoch: int = 1, nan_share: float = 0.375, **kwargs):
        super().__init__(**kwargs)
        linear = self.projector
        self.projector = nn.Sequential(
            linear, _NaNRows(nan_share, lambda: not self.training and self.current_epoch >= nan_from_epoch)
        )


class ConcatViewsEncoder(ToyEncoder):
    """Calls the projector once per step on ``torch.cat([view_1, view_2])`` (one batch of 2B rows)."""

    def _views(self, x):
        z = self(torch.cat([x, x.flip(1) * 0.1 + x]))
        return list(z.chunk(2))


class ConvEncoder(pl.LightningModule):
    """A small CNN whose ``features`` submodule outputs a (B, C, H, W) feature map."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * 4 * 6, 16)

    def forward(self, x):
        return self.head(self.features(x.view(-1, 1, 4, 6)).flatten(1))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        z = self(x)
        return {"loss": z.square().mean(), "maps": self.features(x.view(-1, 1, 4, 6)).detach()}

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        return {"maps": self.features(x.view(-1, 1, 4, 6))}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)
