"""SIGReg streamed over batches vs computed on the full matrix at once.

- Ours: :class:`reprmetrics.SIGReg` fed batches of 4,096 rows: float64 sums of cos(t·y) and sin(t·y)
  per direction and node (K × 17 numbers each), temporaries bounded by a fixed chunk, whatever N.
- Baseline: what a user would copy from LeJEPA's reference code: the whole ``(N, K, num_points)``
  tensor of phases at once, cos/sin means over N, ``err @ weights · N``, in float32 (LeJEPA's dtype),
  on the same directions (LeJEPA's draw for global step 0, which is SIGReg's ``seed=0``).
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case
from reprmetrics import SIGReg

_BATCH = 4_096


def _embeddings(n: int, d: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    scale = torch.arange(1, d + 1, dtype=torch.float32).pow(-0.5)  # a decaying spectrum, like trained encoders
    z = torch.randn(n, d, generator=g) * scale * d**0.5 / scale.norm()
    return [b.to(device) for b in z.split(_BATCH)]


def _streaming(batches: list[torch.Tensor], num_slices: int) -> float:
    metric = SIGReg(num_slices=num_slices).to(batches[0].device)
    for b in batches:
        metric.update(b)
    return metric.compute().item()


def _full_matrix(batches: list[torch.Tensor], num_slices: int, t_max: float = 3.0, n_points: int = 17) -> float:
    z = torch.cat(batches)
    device = z.device
    a = torch.randn((z.shape[1], num_slices), generator=torch.Generator().manual_seed(0)).to(device)
    a = a / a.norm(p=2, dim=0)
    t = torch.linspace(0, t_max, n_points, dtype=torch.float32, device=device)
    dt = t_max / (n_points - 1)
    weights = torch.full((n_points,), 2 * dt, dtype=torch.float32, device=device)
    weights[[0, -1]] = dt
    phi = torch.exp(-0.5 * t.square())
    x_t = (z @ a).unsqueeze(-1) * t  # (N, K, n_points), all at once
    err = (x_t.cos().mean(0) - phi).square() + x_t.sin().mean(0).square()
    return ((err @ (weights * phi)) * z.shape[0]).mean().item()


def _agreement(ours: float, base: float) -> str:
    return f"rel. diff {abs(ours - base) / abs(base):.1e} (baseline float32)"


def cases(device: torch.device, quick: bool) -> list[Case]:
    n, d, k = (8_192, 128, 64) if quick else (65_536, 512, 256)
    return [
        Case(
            name="sigreg streaming",
            ours=lambda batches: _streaming(batches, k),
            baseline=lambda batches: _full_matrix(batches, k),
            baseline_name="LeJEPA's formula on the full (N, K, 17) tensor at once, float32",
            make_input=lambda: _embeddings(n, d, device),
            input_desc=f"{n:,} × {d} float32, K = {k}, batches of {_BATCH:,}",
            check=_agreement,
            repeats=3 if quick else 2,
            notes="ours accumulates in float64",
        )
    ]
