"""Multi-view metrics vs what a user would otherwise write.

- Streaming LiDAR (sum states, Cholesky-whitened eigenvalues) vs a direct computation on all views at
  once: per-sample centring, Σ_w^{-1/2} from an eigendecomposition, then the eigenvalues (float64).
- Blocked exact uniformity vs Wang & Isola's one-liner
  ``torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()`` on L2-normalised points.
- Uniformity as a loss, forward + backward: the tiled autograd.Function (backward recomputes tiles)
  vs autograd through the same one-liner, which stores the N(N−1)/2 pair distances.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case
from reprmetrics.functional.multiview import uniformity
from reprmetrics.multiview import LiDAR


def _view_batches(n: int, q: int, d: int, batch: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # Sample means with a decaying spectrum (like trained embeddings), views scattered around them.
    scale = torch.arange(1, d + 1, dtype=torch.float32).pow(-0.5)
    out = []
    for _ in range(n // batch):
        centres = torch.randn(batch, 1, d, generator=g) * scale
        out.append((centres + 0.3 * torch.randn(batch, q, d, generator=g) * scale).to(device))
    return out


def _streaming_lidar(batches: list[torch.Tensor]) -> float:
    metric = LiDAR().to(batches[0].device)
    for b in batches:
        metric.update(b)
    return metric.compute().item()


def _direct_lidar(batches: list[torch.Tensor], delta: float = 1e-4, eps: float = 1e-8) -> float:
    views = torch.cat(batches).double()
    n, q, d = views.shape
    means = views.mean(dim=1)
    spread = means - means.mean(dim=0)
    between = spread.T @ spread / (n - 1)
    residual = (views - means.unsqueeze(1)).reshape(n * q, d)
    within = residual.T @ residual / (n * (q - 1)) + delta * torch.eye(d, dtype=views.dtype, device=views.device)
    w, v = torch.linalg.eigh(within)
    inv_sqrt = (v * w.rsqrt()) @ v.T
    lam = torch.linalg.eigvalsh(inv_sqrt @ between @ inv_sqrt).clamp_min(0)
    p = lam / lam.sum() + eps
    return torch.exp(-(p * p.log()).sum()).item()


def _points(n: int, d: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g).to(device)


def _blocked_uniformity(x: torch.Tensor) -> float:
    return uniformity(x, t=2.0).item()


def _pdist_uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    x = torch.nn.functional.normalize(x, dim=1)
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log().item()


def _blocked_uniformity_backward(x: torch.Tensor) -> torch.Tensor:
    leaf = x.detach().requires_grad_()
    uniformity(leaf, t=2.0).backward()
    return leaf.grad


def _pdist_uniformity_backward(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    leaf = x.detach().requires_grad_()
    normalised = torch.nn.functional.normalize(leaf, dim=1)
    torch.pdist(normalised, p=2).pow(2).mul(-t).exp().mean().log().backward()
    return leaf.grad


def _gradient_agreement(ours: torch.Tensor, base: torch.Tensor) -> str:
    return f"gradient rel. diff {float((ours - base).norm() / base.norm()):.1e}"


def _agreement(ours: float, base: float) -> str:
    return f"rel. diff {abs(ours - base) / abs(base):.1e}"


def cases(device: torch.device, quick: bool) -> list[Case]:
    out = []
    d, q, batch = (64, 2, 128) if quick else (512, 2, 256)
    for n in (512, 2_048) if quick else (4_096, 16_384):
        out.append(
            Case(
                name="lidar streaming",
                ours=_streaming_lidar,
                baseline=_direct_lidar,
                baseline_name="all views at once, eigh(Σ_w)^(-1/2), float64",
                make_input=lambda n=n, d=d: _view_batches(n, q, d, batch, device),
                input_desc=f"{n:,} samples × {q} views × {d} float32, batches of {batch}",
                check=_agreement,
            )
        )
    width = 32 if quick else 128
    for n in (512, 1_024) if quick else (4_096, 16_384):
        out.append(
            Case(
                name="uniformity blocked",
                ours=_blocked_uniformity,
                baseline=_pdist_uniformity,
                baseline_name="torch.pdist(x̂).pow(2).mul(-t).exp().mean().log()",
                make_input=lambda n=n: _points(n, width, device),
                input_desc=f"{n:,} × {width} float32, t = 2",
                check=_agreement,
            )
        )
    for n in (512, 1_024) if quick else (4_096, 16_384):
        out.append(
            Case(
                name="uniformity forward+backward",
                ours=_blocked_uniformity_backward,
                baseline=_pdist_uniformity_backward,
                baseline_name="autograd through torch.pdist(x̂).pow(2).mul(-t).exp().mean().log()",
                make_input=lambda n=n: _points(n, width, device),
                input_desc=f"{n:,} × {width} float32, t = 2, gradient w.r.t. x",
                check=_gradient_agreement,
            )
        )
    return out
