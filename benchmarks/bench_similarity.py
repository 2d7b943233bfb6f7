"""Streaming linear CKA vs the Gram-matrix form.

- ``LinearCKA`` over batches (packed centred moments of concat([x, y]): one (D1 + D2)² GEMM per
  batch, O(D²) memory) vs :func:`reprmetrics.functional.cka` on all rows at once (two N×N float64
  kernels, centred: O(N²) memory, O(N²·D) work).
- The same against the Gram form a user would write after Kornblith et al.'s notebook, in float32
  torch: ``K = X Xᵀ``, ``HKH`` by subtracting row/column means, ``⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖)``.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case
from reprmetrics import LinearCKA
from reprmetrics.functional import cka


def _pairs(n: int, d: int, batch: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    # x with a decaying spectrum (like trained embeddings); y a fixed linear map of x plus noise.
    scale = torch.arange(1, d + 1, dtype=torch.float32).pow(-0.5)
    mix = torch.randn(d, d, generator=g) / d**0.5
    out = []
    for _ in range(n // batch):
        x = torch.randn(batch, d, generator=g) * scale
        y = x @ mix + 0.3 * torch.randn(batch, d, generator=g) * scale
        out.append((x.to(device), y.to(device)))
    return out


def _streaming(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    metric = LinearCKA().to(pairs[0][0].device)
    for x, y in pairs:
        metric.update(x, y)
    return metric.compute().item()


def _gram_form(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    x = torch.cat([p[0] for p in pairs])
    y = torch.cat([p[1] for p in pairs])
    return cka(x, y).item()


def _notebook_gram_form(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    x = torch.cat([p[0] for p in pairs])
    y = torch.cat([p[1] for p in pairs])

    def centred_gram(a: torch.Tensor) -> torch.Tensor:
        k = a @ a.T
        means = k.mean(dim=0)
        return k.sub_(means[None, :]).sub_(means[:, None]).add_(means.mean())

    k = centred_gram(x)
    l_ = centred_gram(y)
    return (torch.dot(k.flatten(), l_.flatten()) / (torch.linalg.norm(k) * torch.linalg.norm(l_))).item()


def _agreement(ours: float, base: float) -> str:
    return f"{ours:.6f} vs {base:.6f} (rel. diff {abs(ours - base) / abs(base):.1e})"


def cases(device: torch.device, quick: bool) -> list[Case]:
    n, d, batch = (2_048, 128, 256) if quick else (16_384, 768, 1_024)
    desc = f"x, y: {n:,} × {d} float32 each, batches of {batch}"
    repeats = 3 if quick else 2  # the full-size Gram form takes tens of seconds per call on a CPU
    return [
        Case(
            name="linear cka streaming vs Gram form",
            ours=_streaming,
            baseline=_gram_form,
            baseline_name="reprmetrics.functional.cka (N×N Gram form, float64)",
            make_input=lambda: _pairs(n, d, batch, device),
            input_desc=desc,
            repeats=repeats,
            check=_agreement,
        ),
        Case(
            name="linear cka streaming vs notebook",
            ours=_streaming,
            baseline=_notebook_gram_form,
            baseline_name="X Xᵀ, HKH, ⟨HKH, HLH⟩/(‖HKH‖‖HLH‖) in float32 (Kornblith et al.'s notebook, in torch)",
            make_input=lambda: _pairs(n, d, batch, device),
            input_desc=desc,
            repeats=repeats,
            check=_agreement,
        ),
    ]
