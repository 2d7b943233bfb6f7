"""Label-free model selection on the digits: do the metrics rank SSL configurations the way accuracy does?

    python examples/model_selection_study.py                 # the sweep: 27 configurations, ~4 min on a 2-core CPU
    python examples/model_selection_study.py --fast          # 4 short runs: the CI smoke run
    python examples/model_selection_study.py --out-dir DIR   # default runs/model_selection_study

RankMe and LiDAR were proposed as ways to choose SSL hyperparameters without labels. This study trains
a sweep of SimCLR (contrastive) and SimSiam (non-contrastive) configurations on the digits that ship
with scikit-learn (temperature, learning rate, projector width, augmentation strength, batch size, and
settings that collapse partly or fully), then, on the 500 held-out digits (two fixed augmented views):

- every label-free metric of the toolkit on the backbone and the projector outputs: RankMe, LiDAR,
  alpha-ReQ, local intrinsic dimension, TwoNN, uniformity, alignment, the normalised std, NESum,
  coding rate, Wasserstein uniformity, SIGReg and IsoScore;
- with labels, used for evaluation only: a 5-shot linear probe of the backbone (mean over draws),
  the accuracy the metrics are compared with, and a k-NN on all training labels.

Outputs under OUT_DIR: records/NAME.json (one per finished configuration: a rerun skips it),
results.csv (one row per configuration), correlations.csv/.md (Spearman and Kendall tau-b of each
metric with the probe accuracy, within each method and overall), picks.csv/.md (the configuration each
metric would choose and its accuracy gap to the best one) and metric_vs_accuracy.png.

Correlations are of the metric read in its "better" direction (see study_analysis.DIRECTIONS:
uniformity, alignment, Wasserstein uniformity and SIGReg lower is better, alpha-ReQ closest to 1, the
rest higher), so a positive value means the metric ranks configurations as the probe does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared digits_ssl module

from digits_ssl import (  # noqa: E402  (first: it quiets an import-time warning of Lightning)
    SimCLR,
    SimSiam,
    digit_splits,
    example_session,
    few_shot_probe_accuracy,
    knn_accuracy,
    make_trainer,
    projector,
    representation_metrics,
    train_loader,
    validation_loader,
)

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

import study_analysis as analysis  # noqa: E402
from reprmetrics.functional import coding_rate, isoscore, nesum, sigreg, wasserstein_uniformity  # noqa: E402
from reprmetrics.functional.intrinsic_dimension import twonn_dimension  # noqa: E402


# ---- configurations ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyConfig:
    name: str
    method: str  # "simclr" or "simsiam"
    lr: float = 2e-3
    batch_size: int = 128
    projector_dim: int = 64  # output width of the projector (its hidden layer stays 128)
    augmentation_strength: float = 1.0  # 1 = the examples' augmentations; 0 = none
    temperature: float | None = 0.2  # SimCLR only
    stop_gradient: bool | None = None  # SimSiam only
    predictor: bool | None = None  # SimSiam only
    collapse_setting: str = "none"  # "partial" / "full": built to collapse (marked in the plot)

    def key(self, epochs: int, seed: int, probe_draws: int) -> str:
        """Changes whenever anything that affects the record changes (the metrics scored included, so a
        record made before a metric was added lacks it and is retrained)."""
        payload = {**asdict(self), "epochs": epochs, "seed": seed, "probe_draws": probe_draws, "metrics": list(analysis.METRICS)}
        payload = json.dumps(payload, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def simclr(name: str, **kwargs: Any) -> StudyConfig:
    return StudyConfig(name, "simclr", **kwargs)


def simsiam(name: str, **kwargs: Any) -> StudyConfig:
    return StudyConfig(name, "simsiam", temperature=None, stop_gradient=kwargs.pop("stop_gradient", True), predictor=kwargs.pop("predictor", True), **kwargs)


# Each configuration changes one thing from its method's base, so a reader can say what each point is.
SWEEP: tuple[StudyConfig, ...] = (
    simclr("simclr-base"),
    simclr("simclr-t0.05", temperature=0.05),
    simclr("simclr-t0.1", temperature=0.1),
    simclr("simclr-t0.5", temperature=0.5),
    simclr("simclr-t2.0", temperature=2.0, collapse_setting="partial"),  # weak repulsion: the projector loses rank
    simclr("simclr-lr3e-4", lr=3e-4),
    simclr("simclr-lr1e-2", lr=1e-2),
    simclr("simclr-proj8", projector_dim=8),  # a narrow projector: full rank of a small space (and too few dims for α-ReQ)
    simclr("simclr-proj16", projector_dim=16),
    simclr("simclr-proj256", projector_dim=256),
    # Identical views: not a collapse (the rank stays high) but a failure all the same: the encoder learns
    # instance identity and no invariance. The study keeps it to show which metrics see that.
    simclr("simclr-aug0", augmentation_strength=0.0),
    simclr("simclr-aug0.3", augmentation_strength=0.3),
    simclr("simclr-aug1.6", augmentation_strength=1.6),
    simclr("simclr-bs32", batch_size=32),
    simclr("simclr-bs512", batch_size=512),
    simsiam("simsiam-base"),
    simsiam("simsiam-lr3e-4", lr=3e-4),
    simsiam("simsiam-lr1e-2", lr=1e-2),
    simsiam("simsiam-proj16", projector_dim=16),
    simsiam("simsiam-proj256", projector_dim=256),
    simsiam("simsiam-aug0.3", augmentation_strength=0.3),
    simsiam("simsiam-aug1.6", augmentation_strength=1.6),
    simsiam("simsiam-bs32", batch_size=32),
    simsiam("simsiam-bs512", batch_size=512),
    simsiam("simsiam-no-predictor", predictor=False, collapse_setting="full"),  # SimSiam paper: collapses without it
    # DESIGN.md saw a partial collapse over tens of epochs; by 80 epochs the projector has collapsed fully.
    simsiam("simsiam-no-stopgrad", stop_gradient=False, collapse_setting="full"),
    simsiam("simsiam-no-stopgrad-no-predictor", stop_gradient=False, predictor=False, collapse_setting="full"),
)
FAST_SWEEP: tuple[StudyConfig, ...] = (
    simclr("simclr-base"),
    simclr("simclr-t2.0", temperature=2.0, collapse_setting="partial"),
    simsiam("simsiam-base"),
    simsiam("simsiam-no-stopgrad-no-predictor", stop_gradient=False, predictor=False, collapse_setting="full"),
)


# ---- training ---------------------------------------------------------------------------------------
def scaled_augment(images: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """digits_ssl.augment with every magnitude multiplied by ``strength`` (1 reproduces its ranges).

    Warp (rotation, scale, shear, shift), contrast, cutout probability (capped at 1) and pixel noise
    all scale together, so one number moves the SSL task from trivial (0) to hard (>1).
    """
    b, device = images.shape[0], images.device

    def symmetric(half_width: float, *shape: int) -> Tensor:
        return half_width * (2 * torch.rand(b, *shape, generator=generator, device=device) - 1)

    angle = symmetric(strength * math.pi / 12)
    scale = 1 + symmetric(strength * 0.15)
    shear = symmetric(strength * 0.15)
    shift = symmetric(strength * 0.2, 2)
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    views = views * (1 + symmetric(strength * 0.4)).view(b, 1, 1, 1)

    rows = torch.arange(8, device=device).view(1, 8, 1)
    centre_r = torch.randint(0, 8, (b, 1, 1), generator=generator, device=device)
    centre_c = torch.randint(0, 8, (b, 1, 1), generator=generator, device=device)
    patch = ((rows - centre_r).abs() <= 1) & ((rows.transpose(1, 2) - centre_c).abs() <= 1)
    apply = torch.rand(b, 1, 1, generator=generator, device=device) < min(1.0, 0.5 * strength)
    views = views.masked_fill((patch & apply).unsqueeze(1), 0.0)
    return views + strength * 0.1 * torch.randn(views.shape, generator=generator, device=device)


class _ScaledAugmentation:
    """Mixin: train on :func:`scaled_augment` views; validation keeps the shared fixed views, so every
    configuration is scored on the same held-out inputs whatever augmentation it trained with."""

    augmentation_strength: float = 1.0

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        images, _ = batch
        loss = self.ssl_loss(scaled_augment(images, self.augmentation_strength), scaled_augment(images, self.augmentation_strength))
        self.log("ssl/train_loss", loss)
        return loss


class StudySimCLR(_ScaledAugmentation, SimCLR):
    pass


class StudySimSiam(_ScaledAugmentation, SimSiam):
    pass


def build_model(config: StudyConfig) -> pl.LightningModule:
    if config.method == "simclr":
        model: Any = StudySimCLR(lr=config.lr, temperature=config.temperature, embedding_dim=config.projector_dim)
    elif config.method == "simsiam":
        model = StudySimSiam(lr=config.lr, stop_gradient=config.stop_gradient, predictor=config.predictor, embedding_dim=config.projector_dim)
    else:
        raise ValueError(f"unknown method {config.method!r}")
    model.augmentation_strength = config.augmentation_strength
    return model


# Metrics outside the monitor's default set, computed here on view 1 of the held-out digits, as the
# monitor computes its point metrics: TwoNN and the isotropy / spectral signals of issue 14.
EXTRA_METRICS = {
    "twonn": twonn_dimension,
    "nesum": nesum,
    "coding_rate": coding_rate,  # ε = 0.5, rows L2-normalised (MCR²'s defaults)
    "wasserstein_uniformity": wasserstein_uniformity,
    "sigreg": sigreg,  # K = 256 directions of seed 0, on the embeddings as they are (not standardised)
    "isoscore": isoscore,
}


@torch.no_grad()
def extra_metric_values(model: pl.LightningModule, images: Tensor) -> dict[str, float]:
    """``{"tap/metric": value}`` for :data:`EXTRA_METRICS` on the backbone and projector outputs of ``images``."""
    model.eval()
    features = model.backbone(images)
    outputs = {"backbone": features.double(), "projector": model.projector(features).double()}
    return {f"{tap}/{name}": float(fn(z)) for tap, z in outputs.items() for name, fn in EXTRA_METRICS.items()}


def train_and_score(config: StudyConfig, epochs: int, seed: int, probe_draws: int) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)  # the same seed for every configuration: only the setting differs
    splits = digit_splits()
    model = build_model(config)
    start = time.perf_counter()
    if epochs > 0:
        trainer = make_trainer(epochs, [], logger=False, progress_bar=False, enable_checkpointing=False)
        trainer.fit(model, train_loader(splits, config.batch_size))
    train_seconds = time.perf_counter() - start

    val = validation_loader(splits)
    values: dict[str, Any] = representation_metrics(model, val)
    values.update(extra_metric_values(model, val.dataset.tensors[0]))
    values["knn_accuracy"] = knn_accuracy(model.backbone, splits)
    values["probe_accuracy"], values["probe_std"] = few_shot_probe_accuracy(model.backbone, splits, draws=probe_draws)
    return {**asdict(config), "epochs": epochs, "seed": seed, "train_seconds": train_seconds, **values}


# ---- running ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="runs/model_selection_study", help="records, CSVs, tables and the PNG go here")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per configuration (default 80; 2 with --fast)")
    parser.add_argument("--seed", type=int, default=0, help="the training seed of every configuration")
    parser.add_argument("--probe-draws", type=int, default=None, help="5-shot probe draws averaged (default 10; 3 with --fast)")
    parser.add_argument("--only", nargs="*", default=None, help="train only these configuration names (then analyse what exists)")
    parser.add_argument("--fast", action="store_true", help="4 configurations (2 per method) x 2 epochs: the CI smoke run")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 2 if args.fast else 80
    if args.probe_draws is None:
        args.probe_draws = 3 if args.fast else 10
    return args


def record_path(out_dir: str, config: StudyConfig) -> str:
    return os.path.join(out_dir, "records", f"{config.name}.json")


def load_record(path: str, key: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        record = json.load(handle)
    return record if record.get("key") == key else None


def save_record(path: str, record: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".tmp"  # written then renamed: an interrupted run never leaves half a record
    with open(partial, "w") as handle:
        json.dump(record, handle, indent=1, sort_keys=True)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with example_session():
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    sweep = FAST_SWEEP if args.fast else SWEEP
    os.makedirs(args.out_dir, exist_ok=True)
    rows, trained = [], []
    for index, config in enumerate(sweep, 1):
        path, key = record_path(args.out_dir, config), config.key(args.epochs, args.seed, args.probe_draws)
        record = load_record(path, key)
        if record is None and (args.only is None or config.name in args.only):
            clock = time.perf_counter()
            record = {**train_and_score(config, args.epochs, args.seed, args.probe_draws), "key": key}
            save_record(path, record)
            trained.append(config.name)
            print(
                f"[{index}/{len(sweep)}] {config.name}: probe {record['probe_accuracy']:.3f}, "
                f"projector RankMe {record['projector/rankme']:.1f} ({time.perf_counter() - clock:.0f} s)",
                flush=True,
            )
        elif record is not None:
            print(f"[{index}/{len(sweep)}] {config.name}: done before, not retrained", flush=True)
        if record is not None:
            rows.append(record)

    results = analysis.result_columns()
    analysis.write_csv(os.path.join(args.out_dir, "results.csv"), rows, results)
    correlations = analysis.correlation_rows(rows, "probe_accuracy") + analysis.correlation_rows(rows, "knn_accuracy")
    picks = analysis.pick_rows(rows, "probe_accuracy")
    correlation_columns = ["metric", "tap", "direction", "group", "accuracy", "n", "spearman", "kendall"]
    pick_columns = ["metric", "tap", "direction", "group", "pick", "pick_value", "pick_accuracy", "best", "best_accuracy", "gap"]
    analysis.write_csv(os.path.join(args.out_dir, "correlations.csv"), correlations, correlation_columns)
    analysis.write_csv(os.path.join(args.out_dir, "picks.csv"), picks, pick_columns)

    groups = list(analysis.groups_of(rows)) if rows else []
    probe_correlations = [c for c in correlations if c["accuracy"] == "probe_accuracy"]
    correlation_table = analysis.correlations_markdown(probe_correlations, groups)
    pick_table = analysis.picks_markdown(picks, groups) if rows else ""
    with open(os.path.join(args.out_dir, "correlations.md"), "w") as handle:
        handle.write(
            "Spearman ρ / Kendall τ-b between each label-free metric (read in its pick direction: + means it ranks\n"
            "configurations as the 5-shot probe accuracy does) and the backbone's 5-shot linear-probe accuracy.\n"
            "Groups: each SSL method alone, all configurations, and all but the settings built to collapse (all-healthy).\n\n"
            + correlation_table
            + "\n"
        )
    with open(os.path.join(args.out_dir, "picks.md"), "w") as handle:
        handle.write(pick_table + "\n")
    figure = os.path.join(args.out_dir, "metric_vs_accuracy.png")
    plot_grid(rows, probe_correlations, figure)

    elapsed = time.perf_counter() - start
    print(f"\n{len(rows)} configurations ({len(trained)} trained now, {args.epochs} epochs each) in {elapsed:.0f} s; outputs in {args.out_dir}")
    print("\nRank correlation with the 5-shot probe accuracy (Spearman / Kendall tau-b; + = agrees):\n")
    print(correlation_table)
    print("\nWhat each metric would pick, and the pick's probe-accuracy gap to the best configuration:\n")
    print(pick_table)
    return {"rows": rows, "correlations": correlations, "picks": picks, "trained": trained, "out_dir": args.out_dir, "figure": figure, "seconds": elapsed}


# ---- figure -----------------------------------------------------------------------------------------
METHOD_COLOURS = {"simclr": "tab:blue", "simsiam": "tab:orange"}
COLLAPSE_MARKERS = {"none": "o", "partial": "^", "full": "X"}
GROUP_SHORT_NAMES = {"simclr": "CLR", "simsiam": "Siam", "all": "all"}


def plot_grid(rows: Sequence[dict[str, Any]], correlations: Sequence[dict[str, Any]], path: str) -> None:
    """One panel per (metric, tap): metric value vs probe accuracy, coloured by method, collapse settings marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on CI or servers
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    spearman = {(c["metric"], c["tap"], c["group"]): c["spearman"] for c in correlations}
    panels = [(tap, metric) for tap in analysis.TAPS for metric in analysis.METRICS]
    columns = 4  # backbone panels first, then projector: fits a README's width
    grid_rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(3.2 * columns, 2.7 * grid_rows + 0.5), squeeze=False)
    for index, (tap, metric) in enumerate(panels):
        ax = axes[index // columns][index % columns]
        column = analysis.metric_column(tap, metric)
        for row in rows:
            ax.scatter(
                row.get(column, math.nan),
                row["probe_accuracy"],
                c=METHOD_COLOURS.get(row["method"], "tab:gray"),
                marker=COLLAPSE_MARKERS.get(row["collapse_setting"], "o"),
                s=28,
                alpha=0.85,
            )
        rho = " ".join(f"{short} {spearman.get((metric, tap, g), math.nan):+.2f}" for g, short in GROUP_SHORT_NAMES.items())
        ax.set_title(f"{tap} {metric} ({analysis.DIRECTIONS[metric].replace('closest_to_1', '≈1')})\nSpearman ρ: {rho}", fontsize=8)
        ax.tick_params(labelsize=7)
        if index % columns == 0:
            ax.set_ylabel("5-shot probe accuracy", fontsize=8)
    for index in range(len(panels), grid_rows * columns):
        axes[index // columns][index % columns].set_visible(False)  # the last row's unused panels
    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=m) for m, c in METHOD_COLOURS.items()]
    handles += [Line2D([], [], color="gray", marker=mk, linestyle="", label=f"collapse setting: {s}") for s, mk in COLLAPSE_MARKERS.items()]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (2.7 * grid_rows + 0.5)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
