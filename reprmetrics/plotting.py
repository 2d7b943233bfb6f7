"""Figures of representation spectra (matplotlib is optional: ``pip install matplotlib``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["spectrum_figure"]


def spectrum_figure(
    spectrum: Mapping[str, Any], title: str = "covariance spectrum", ax: Any = None, missing_ok: bool = False
) -> Any:
    """A log-log plot of covariance eigenvalues with the α-ReQ fit line.

    Args:
        spectrum: what :meth:`reprmetrics.AlphaReQ.spectrum_fit` returns: ``eigenvalues`` (descending),
            ``alpha``, ``intercept``, the fitted 1-indexed ranks ``first``..``last`` and, when present,
            ``r2`` (the fit's coefficient of determination, shown in the legend).
        title: the axes' title.
        ax: draw into these matplotlib axes instead of a new figure.
        missing_ok: return ``None`` instead of raising when matplotlib is not installed.

    Returns:
        The matplotlib figure (``ax.figure`` when ``ax`` is given).
    """
    try:
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:
        if missing_ok:
            return None
        raise ImportError(
            'spectrum_figure needs matplotlib: pip install matplotlib (or "reprmetrics[lightning]")'
        ) from error
    lam = torch.as_tensor(spectrum["eigenvalues"]).detach().double().cpu()
    lam = lam[lam > 0]
    ranks = torch.arange(1, len(lam) + 1, dtype=torch.float64)
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    else:
        fig = ax.figure
    ax.loglog(ranks.numpy(), lam.numpy(), ".", markersize=3, label="eigenvalues")
    first, last = int(spectrum["first"]), int(spectrum["last"])
    alpha, intercept = float(spectrum["alpha"]), float(spectrum["intercept"])
    k = torch.arange(first, last + 1, dtype=torch.float64)
    fit = torch.exp(-alpha * k.log() + intercept)
    label = f"α-ReQ fit (ranks {first}–{last}): α = {alpha:.2f}"
    if spectrum.get("r2") is not None:
        label += f", R² = {float(spectrum['r2']):.3f}"
    ax.loglog(k.numpy(), fit.numpy(), "-", color="C3", label=label)
    ax.set_xlabel("rank k")
    ax.set_ylabel("eigenvalue λ_k")
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    return fig
