"""Streaming spectral metrics vs what a user would otherwise write.

- RankMe: torch.linalg.svdvals on all embeddings.
- α-ReQ: the shifted centred moments (one GEMM of x − c per batch, exact Chan merge) vs the one-pass
  un-centred ZᵀZ, Σz formula (cov = ZᵀZ/N − μμᵀ) on embeddings offset by 1e5 × their spread: what
  the shift costs, and what the one-pass formula loses.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case
from reprmetrics import AlphaReQ, RankMe
from reprmetrics._linalg import add_gram_, eigvalsh_descending, nonzero_eigenvalue_tolerance
from reprmetrics.functional.spectral import _power_law_fit


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


def _offset_batches(n: int, d: int, batch: int, device: torch.device, offset: float = 1e5) -> list[torch.Tensor]:
    return [(b.double() + offset).to(device) for b in _batches(n, d, batch, device)]


def _streaming_alpha(batches: list[torch.Tensor]) -> float:
    metric = AlphaReQ().to(batches[0].device)
    for b in batches:
        metric.update(b)
    return metric.compute().item()


def _one_pass_alpha(batches: list[torch.Tensor]) -> float:
    d, device = batches[0].shape[1], batches[0].device
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    total = torch.zeros(d, dtype=torch.float64, device=device)
    for b in batches:
        add_gram_(gram, b.double())
        total += b.double().sum(0)
    n = sum(len(b) for b in batches)
    mean = total / n
    lam = eigvalsh_descending((gram - n * torch.outer(mean, mean)) / (n - 1))[: min(n, d)]
    tol = nonzero_eigenvalue_tolerance(lam, n, d, torch.finfo(torch.float64).eps, float(mean.square().mean()))
    try:
        slope, _, _, _, _ = _power_law_fit(lam, (11, 100), tol)
    except ValueError:
        return float("nan")
    return float(-slope)


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
    d_alpha = 128 if quick else 512
    out.append(
        Case(
            name="alpha_req streaming, centred moments",
            ours=_streaming_alpha,
            baseline=_one_pass_alpha,
            baseline_name="one-pass ZᵀZ, Σz (cov = ZᵀZ/N − μμᵀ), float64",
            make_input=lambda: _offset_batches(n, d_alpha, batch, device),
            input_desc=(
                f"{n:,} × {d_alpha} float64 (λ_k ∝ 1/k) + offset 1e5 (1e6 × the smallest spread), batches of {batch}"
            ),
            check=lambda ours, base: f"α {ours:.6f} vs one-pass {base:.6f}",
            notes="the one-pass α is off (or NaN: fit range cut) where the offset cancels its digits",
        )
    )
    return out
