"""Regenerate the README figure: a collapse as the monitor sees it.

    python examples/make_figures.py                              # writes docs/collapse_curves.png (~1 min)
    python examples/make_figures.py --fast --out-dir /tmp/figs   # the CI smoke run

Trains the two runs of examples/collapse_caught.py (SimSiam with and without its stop-gradient) and
draws, per epoch, the held-out projector RankMe and normalised std of both, with the point where
CollapseEarlyStopping stopped the collapsing run. Here the collapsing run is also trained to the
end without the stopper, to show that it stays collapsed. The third panel is the covariance
spectrum of both projectors after the last epoch. No TensorBoard logs are written.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared digits_ssl module

import collapse_caught  # noqa: E402  (first: digits_ssl quiets an import-time warning of Lightning)
import torch  # noqa: E402
from digits_ssl import Stopwatch, digit_splits, example_session, fixed_views, metric_values  # noqa: E402

from reprmetrics.functional import eigenspectrum  # noqa: E402

HEALTHY, COLLAPSING = "#1f77b4", "#d62728"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 30; 8 with --fast)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="docs", help="where the PNG goes")
    parser.add_argument("--fast", action="store_true", help="fewer epochs (CI)")
    args = parser.parse_args(argv)
    # The collapse runs' own options, at their defaults (epochs and fast mode passed through).
    run_argv = (
        ["--seed", str(args.seed)]
        + (["--epochs", str(args.epochs)] if args.epochs else [])
        + (["--fast"] if args.fast else [])
    )
    args.run_args = collapse_caught.parse_args(run_argv)
    return args


@torch.no_grad()
def projector_spectrum(model: Any) -> torch.Tensor:
    """Covariance eigenvalues of the projector on view 1 of the held-out digits, as shares of the total."""
    model.eval()
    view_1, _ = fixed_views(digit_splits().held_out_images)
    eigenvalues = eigenspectrum(model.projector(model.backbone(view_1))).clamp_min(0)
    return eigenvalues / eigenvalues.sum()


def draw(runs: dict[str, dict[str, Any]], args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    healthy, stopped, full = runs["healthy"], runs["collapsing"], runs["collapsing, not stopped"]
    threshold = args.run_args.min_fraction_of_dim * collapse_caught.EMBEDDING_DIM
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)

    for ax, key, title in (
        (axes[0], "val/projector/rankme", "projector RankMe (of 64 dims)"),
        (axes[1], "val/projector/normalized_std", "projector normalised std"),
    ):
        curves = {name: metric_values(run["history"], key) for name, run in runs.items()}
        epochs = range(1, len(curves["healthy"]) + 1)
        ax.plot(
            epochs, curves["healthy"], color=HEALTHY, lw=2, label=f"healthy (probe {healthy['probe_accuracy']:.2f})"
        )
        ax.plot(
            range(1, len(curves["collapsing, not stopped"]) + 1),
            curves["collapsing, not stopped"],
            color=COLLAPSING,
            lw=1.5,
            ls=":",
            label=f"no stop-gradient, not stopped (probe {full['probe_accuracy']:.2f})",
        )
        ax.plot(
            range(1, len(curves["collapsing"]) + 1),
            curves["collapsing"],
            color=COLLAPSING,
            lw=2,
            label=f"no stop-gradient, stopped (probe {stopped['probe_accuracy']:.2f})",
        )
        ax.axvline(stopped["epochs_run"], color="0.4", lw=1, ls="--")
        ax.set_xlabel("epoch")
        ax.set_title(title)
    rank_top = max(max(metric_values(run["history"], "val/projector/rankme")) for run in runs.values())
    axes[0].set_ylim(0, rank_top * 1.45)  # headroom for the legend
    axes[0].axhline(threshold, color="0.4", lw=1, ls="-.")
    axes[0].annotate(
        f"stopped: below {threshold:.1f} (0.2·D)\nfor {args.run_args.patience} epochs",
        xy=(stopped["epochs_run"], threshold),
        xytext=(stopped["epochs_run"] + 0.12 * args.run_args.epochs, threshold + 0.12 * rank_top),
        fontsize=8,
        arrowprops={"arrowstyle": "->", "color": "0.3"},
    )
    axes[0].legend(fontsize=7.5, loc="upper right")
    isotropic = collapse_caught.EMBEDDING_DIM**-0.5
    axes[1].set_ylim(0, isotropic * 1.15)
    axes[1].axhline(isotropic, color="0.4", lw=1, ls="-.")
    axes[1].text(args.run_args.epochs, isotropic * 1.02, "1/√D: evenly spread", fontsize=8, ha="right", va="bottom")

    for name, color, ls in (("healthy", HEALTHY, "-"), ("collapsing, not stopped", COLLAPSING, ":")):
        shares = runs[name]["spectrum"].double().numpy()
        axes[2].loglog(range(1, len(shares) + 1), shares, color=color, ls=ls, lw=2, label=name)
    axes[2].set_ylim(bottom=1e-6)
    axes[2].set_xlabel("eigenvalue rank k")
    axes[2].set_title(
        f"projector covariance spectrum, epoch {len(metric_values(full['history'], 'val/projector/rankme'))}"
    )
    axes[2].set_ylabel("share of variance")
    axes[2].legend(fontsize=8)
    fig.suptitle("SimSiam on the digits: with and without stop-gradient (held-out views, label-free)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    clock = Stopwatch()
    runs = {}
    with example_session():
        for name, stop, run_name in (
            ("healthy", True, "healthy"),
            ("collapsing", True, "collapsing"),
            ("collapsing, not stopped", False, "collapsing"),
        ):
            run = collapse_caught.train_run(run_name, args.run_args, stop=stop, progress_bar=False)
            print(
                f"{name}: {run['epochs_run']} epochs, 5-shot probe {run['probe_accuracy']:.3f}"
                + (" (stopped)" if run["stopped"] else "")
            )
            run["spectrum"] = projector_spectrum(run.pop("model"))
            runs[name] = run
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "collapse_curves.png")
    draw(runs, args, path)
    print(f"wrote {path} ({clock})")
    return {"paths": [path], "runs": runs}


if __name__ == "__main__":
    main()
