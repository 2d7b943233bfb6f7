"""Local intrinsic dimension and TwoNN: our blocked exact kNN vs what a user would otherwise run.

Baselines, on the same float32 input and device:

- LDReg's recipe: ``torch.cdist`` of all pairs, then ``torch.sort`` of every row (values and indices),
  then the estimator on the first k columns. At N = 30,000 the distance matrix is 3.4 GiB, the sorted
  values another 3.4 GiB and the int64 indices 6.7 GiB: it runs in one piece on a 24 GB machine.
- scikit-dimension: ``MLE().fit(X, n_neighbors=k)`` (its per-point ``dimension_pw_`` is the LID with
  k − 1 instead of k in the numerator, so the check rescales it) and ``TwoNN().fit(X)``. These run
  on the CPU whatever ``--device`` says (imported inside the case; a test/benchmark dependency only).
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.harness import Case
from reprmetrics.functional.intrinsic_dimension import local_intrinsic_dimension, twonn_dimension

K = 20


def _points(n: int, d: int, device: torch.device) -> torch.Tensor:
    # A 16-D curved-ish subspace plus small isotropic noise: LIDs in the tens, like real embeddings.
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(n, 16, generator=g)
    x = torch.tanh(latent) @ torch.randn(16, d, generator=g) + 0.05 * torch.randn(n, d, generator=g)
    return x.to(device)


# ---- ours ------------------------------------------------------------------------------------


def _ours_lid(x: torch.Tensor) -> torch.Tensor:
    return local_intrinsic_dimension(x, k=K)


def _ours_twonn(x: torch.Tensor) -> float:
    return twonn_dimension(x).item()


# ---- LDReg's way: cdist + full sort ------------------------------------------------------------


def _cdist_sort_lid(x: torch.Tensor) -> torch.Tensor:
    r = torch.cdist(x, x)
    a, _ = torch.sort(r, dim=1)  # LDReg keeps the indices too
    del r
    return -K / torch.log(a[:, 1:K] / a[:, K : K + 1]).sum(dim=1)


def _cdist_sort_twonn(x: torch.Tensor, discard_fraction: float = 0.1) -> float:
    r = torch.cdist(x, x)
    a, _ = torch.sort(r, dim=1)
    del r
    r1, r2 = a[:, 1].double(), a[:, 2].double()
    del a
    mu = torch.sort(r2 / r1).values
    n = mu.numel()
    keep = int(n * (1 - discard_fraction))
    log_mu = mu[:keep].log()
    target = -torch.log(1 - torch.arange(1, keep + 1, dtype=torch.float64, device=x.device) / n)
    return ((log_mu * target).sum() / (log_mu * log_mu).sum()).item()


# ---- scikit-dimension --------------------------------------------------------------------------


def _skdim_mle_pointwise(x: torch.Tensor) -> np.ndarray:
    import skdim

    return skdim.id.MLE().fit(x.cpu().numpy(), n_neighbors=K).dimension_pw_


def _skdim_twonn(x: torch.Tensor) -> float:
    import skdim

    return float(skdim.id.TwoNN().fit(x.cpu().numpy()).dimension_)


# ---- agreement ---------------------------------------------------------------------------------


def _lid_agreement(ours: torch.Tensor, base: torch.Tensor) -> str:
    diff = ((ours.double() - base.double()).abs() / base.double().abs()).cpu()
    return f"max rel. diff {diff.max():.1e} (median {diff.median():.1e})"


def _lid_vs_skdim(ours: torch.Tensor, base: np.ndarray) -> str:
    ours_pw = ours.double().cpu().numpy() * (K - 1) / K  # skdim's (k−1)/Σ log(r_k/r_j)
    diff = np.abs(ours_pw - base) / np.abs(base)
    return f"max rel. diff {diff.max():.1e} (median {np.median(diff):.1e})"


def _scalar_agreement(ours: float, base: float) -> str:
    return f"{ours:.4f} vs {base:.4f} (rel. diff {abs(ours - base) / abs(base):.1e})"


def cases(device: torch.device, quick: bool) -> list[Case]:
    d = 32 if quick else 128
    sizes = (1_000,) if quick else (10_000, 30_000)
    out = []
    for n in sizes:
        make = lambda n=n: _points(n, d, device)  # noqa: E731
        desc = f"{n:,} × {d} float32"
        # The 30k baselines take tens of seconds each: one timed repeat after the warm-up.
        repeats = 3 if quick or n <= 10_000 else 1
        big = (
            ""
            if quick or n <= 10_000
            else " Full 30k×30k matrix, sorted values and int64 indices (~13.5 GiB), in one piece."
        )
        out += [
            Case(
                name=f"intrinsic dim: LID k={K}",
                ours=_ours_lid,
                baseline=_cdist_sort_lid,
                baseline_name="torch.cdist + torch.sort (LDReg's lid_mle, no 1e-4)",
                make_input=make,
                input_desc=desc,
                repeats=repeats,
                check=_lid_agreement,
                notes="per-sample LID, estimator mle." + big,
            ),
            Case(
                name=f"intrinsic dim: LID k={K}",
                ours=_ours_lid,
                baseline=_skdim_mle_pointwise,
                baseline_name="skdim.id.MLE().fit(X, n_neighbors=20).dimension_pw_ (CPU)",
                make_input=make,
                input_desc=desc,
                repeats=repeats,
                check=_lid_vs_skdim,
                notes="skdim's per-point MLE uses k−1 in the numerator; the check rescales ours by (k−1)/k.",
            ),
            Case(
                name="intrinsic dim: TwoNN",
                ours=_ours_twonn,
                baseline=_cdist_sort_twonn,
                baseline_name="torch.cdist + torch.sort, TwoNN fit",
                make_input=make,
                input_desc=desc,
                repeats=repeats,
                check=_scalar_agreement,
                notes=big.strip(),
            ),
            Case(
                name="intrinsic dim: TwoNN",
                ours=_ours_twonn,
                baseline=_skdim_twonn,
                baseline_name="skdim.id.TwoNN().fit(X) (CPU)",
                make_input=make,
                input_desc=desc,
                repeats=repeats,
                check=_scalar_agreement,
            ),
        ]
    return out
