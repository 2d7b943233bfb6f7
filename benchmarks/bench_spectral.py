"""Streaming RankMe vs what a user would otherwise write: torch.linalg.svdvals on all embeddings."""

from __future__ import annotations

import torch

from benchmarks.harness import Case
from reprmetrics import RankMe


def _batches(n: int, d: int, batch: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # Decaying spectrum (λ_k ∝ 1/k), like trained embeddings, rather than isotropic noise.
    scale = torch.arange(1, d + 1, dtype=torch.float32).pow(-0.5)
    return [(torch.randn(batch, d, generator=g) * scale).to(device) for _ in range(n // batch)]


def _streaming_rankme(batches: list[torch.Tensor], accumulate_dtype: torch.dtype = torch.float64) -> float:
    metric = RankMe(accumulate_dtype=accumulate_dtype).to(batches[0].device)
    for b in batches:
        metric.update(b)
    return metric.compute().item()


def _svdvals_rankme(batches: list[torch.Tensor], eps: float = 1e-7) -> float:
    sigma = torch.linalg.svdvals(torch.cat(batches))
    p = sigma / sigma.sum() + eps
    return torch.exp(-(p * p.log()).sum()).item()


def _agreement(ours: float, base: float) -> str:
    return f"rel. diff {abs(ours - base) / abs(base):.1e}"


def cases(device: torch.device, quick: bool) -> list[Case]:
    d, batch = (256, 256) if quick else (2048, 256)
    sizes = (2_560, 10_240) if quick else (6_400, 25_600)
    out = []
    for n in sizes:
        out.append(
            Case(
                name="rankme streaming",
                ours=_streaming_rankme,
                baseline=_svdvals_rankme,
                baseline_name="torch.linalg.svdvals(torch.cat(batches)), float32",
                make_input=lambda n=n: _batches(n, d, batch, device),
                input_desc=f"{n:,} × {d:,} float32, batches of {batch}",
                check=_agreement,
            )
        )
    n = sizes[-1]
    out.append(
        Case(
            name="rankme streaming, float32 accumulator",
            ours=lambda b: _streaming_rankme(b, torch.float32),
            baseline=_svdvals_rankme,
            baseline_name="torch.linalg.svdvals(torch.cat(batches)), float32",
            make_input=lambda: _batches(n, d, batch, device),
            input_desc=f"{n:,} × {d:,} float32, batches of {batch}",
            check=_agreement,
            notes="faster, but loses small singular values on near-collapsed embeddings (see tests)",
        )
    )
    return out
