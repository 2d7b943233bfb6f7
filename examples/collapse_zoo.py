"""A collapse zoo: five SSL families, healthy and in their known failure modes, watched epoch by epoch.

    python examples/collapse_zoo.py --jobs 2                  # the zoo: 4 cells x 15 configurations x 3 seeds
                                                              # (~25 min, 2 shared cores)
    python examples/collapse_zoo.py --fast                    # 1 cell x 3 configurations x 1 seed, 4 epochs:
                                                              # the CI smoke run
    python examples/collapse_zoo.py --out-dir docs/zoo        # default runs/collapse_zoo

Each configuration is one SSL family (SimCLR, SimSiam, BYOL with an EMA teacher, VICReg, Barlow
Twins) either as published (*healthy* by design) or with one thing removed or changed that the
papers report to collapse (*collapsing* by design): SimSiam without stop-gradient or predictor,
BYOL without predictor or with momentum 0, VICReg without its variance and/or covariance term,
Barlow Twins without its redundancy term, SimCLR at a temperature that loses rank, and too high a
learning rate. They run in the model-selection study's four cells (the 8x8 digits and MNIST-1D, an
MLP and a small CNN encoder), 3 seeds each: 30 epochs on the digits (slow collapses need time to
show), 20 on MNIST-1D (whose epochs are 3x longer).

During training a RepresentationMonitor on the taps ``backbone`` and ``projector`` (2 fixed held-out
views, every validation epoch, the monitor's default metric set) records every value it logs, and a
callback records the backbone's 5-shot nearest-class-mean accuracy (labels for evaluation only; mean
over 10 fixed draws of the labelled examples) to date the onset of a collapse. Nothing stops a run
here: the analysis (``zoo_analysis``) replays stopping rules on the recorded values offline, checks
each configuration's design label against its outcome, and tunes the ``ssl_guard`` preset on the
digits cells, holding MNIST-1D out.

Measured: 24.7 min wall for the whole zoo with --jobs 2 on a 2-core machine shared with other jobs
(load 3.5-4; 31 min of CPU time), the analysis alone ~70 s; a rerun with the records present only analyses.

Outputs under OUT_DIR: records/*.json.gz (one per finished run: a rerun skips it, so the zoo
resumes), and the analysis' CSV, Markdown tables and figure.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared example modules

import lightning.pytorch as pl  # noqa: E402
import model_selection_study as study  # noqa: E402
import numpy as np  # noqa: E402
import zoo_analysis as analysis  # noqa: E402
from digits_ssl import BYOL, BarlowTwins, VICReg, example_session, make_trainer  # noqa: E402  (first: quiets Lightning)
from reprmetrics.callbacks import RepresentationMonitor  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

TAPS = ("backbone", "projector")
SEEDS = (0, 1, 2)
EPOCHS = {"digits": 30, "mnist1d": 20}
CELLS = study.CELLS
PROJECTOR_DIM = 64
ZOO_VERSION = 2  # in every record's key: bump when training or recording changes, so old records are retrained


# ---- configurations ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZooConfig:
    """One SSL configuration in one cell. ``options`` are the family's own keyword arguments
    (loss weights, temperature, predictor, momentum...), as sorted (name, value) pairs."""

    name: str
    family: str  # "simclr", "simsiam", "byol", "vicreg", "barlow_twins"
    design: str  # "healthy" or "collapsing": what the configuration was built to do
    mode: str  # the failure mode built in ("healthy" for the published setting)
    # what the papers report: "none", "complete" (all embeddings together) or "dimensional" (few directions used)
    expected: str
    lr: float = 2e-3
    options: tuple[tuple[str, Any], ...] = ()
    dataset: str = "digits"
    encoder: str = "mlp"

    @property
    def cell(self) -> str:
        return f"{self.dataset}-{self.encoder}"

    def key(self, epochs: int, seed: int, probe_draws: int) -> str:
        """Changes whenever anything that affects the record changes."""
        payload = {
            **asdict(self),
            "epochs": epochs,
            "seed": seed,
            "probe_draws": probe_draws,
            "v": ZOO_VERSION,
            "encoder_v": study.ENCODER_VERSION,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def config(
    name: str, family: str, mode: str = "healthy", expected: str = "none", lr: float = 2e-3, **options: Any
) -> ZooConfig:
    design = "healthy" if mode == "healthy" else "collapsing"
    return ZooConfig(name, family, design, mode, expected, lr, tuple(sorted(options.items())))


# Per cell. Each collapsing configuration changes one thing from its family's healthy one.
CELL_ZOO: tuple[ZooConfig, ...] = (
    config("simclr", "simclr", temperature=0.2),
    config(
        "simclr-t5", "simclr", "temperature 5", "dimensional", temperature=5.0
    ),  # weak repulsion: few directions suffice
    config("simsiam", "simsiam"),
    config("simsiam-no-stopgrad", "simsiam", "no stop-gradient", "complete", stop_gradient=False),
    config("simsiam-no-predictor", "simsiam", "no predictor", "complete", predictor=False),
    config("simsiam-lr0.05", "simsiam", "learning rate 0.05", "dimensional", lr=0.05),  # 25x the base rate
    config("byol", "byol", momentum=0.99),
    config("byol-no-predictor", "byol", "no predictor", "complete", momentum=0.99, predictor=False),
    config("byol-momentum0", "byol", "momentum 0", "complete", momentum=0.0),  # BYOL paper, Table 5: tau = 0 collapses
    config("vicreg", "vicreg"),
    config("vicreg-no-covariance", "vicreg", "no covariance term", "dimensional", covariance=0.0),
    # The slow collapse. Without the variance term alone the curves were the same to within
    # seed noise in a first pass (the covariance term cannot stop a uniform shrink), so only both are run.
    config(
        "vicreg-invariance-only", "vicreg", "no variance and covariance terms", "complete", variance=0.0, covariance=0.0
    ),
    config("vicreg-lr0.05", "vicreg", "learning rate 0.05", "dimensional", lr=0.05),
    config("barlow-twins", "barlow_twins", redundancy=5e-3),
    config("barlow-twins-no-redundancy", "barlow_twins", "no redundancy term", "dimensional", redundancy=0.0),
)
ZOO: tuple[ZooConfig, ...] = tuple(replace(c, dataset=d, encoder=e) for d, e in CELLS for c in CELL_ZOO)
_FAST_NAMES = ("vicreg", "vicreg-invariance-only", "byol")
FAST_ZOO: tuple[ZooConfig, ...] = tuple(c for c in ZOO if c.cell == "digits-mlp" and c.name in _FAST_NAMES)
FAMILIES = tuple(dict.fromkeys(c.family for c in CELL_ZOO))


# ---- models -----------------------------------------------------------------------------------------
class ZooBYOL(study._StudyAugmentation, BYOL):
    pass


class ZooVICReg(study._StudyAugmentation, VICReg):
    pass


class ZooBarlowTwins(study._StudyAugmentation, BarlowTwins):
    pass


def build_model(config: ZooConfig) -> pl.LightningModule:
    """The configuration's LightningModule with the cell's encoder as ``backbone``.

    BYOL's EMA teacher copies that encoder in ``__init__``, so the encoder is passed in rather than
    swapped in afterwards (a teacher copied from a replaced encoder would be another architecture).
    """
    options = dict(config.options)
    encoder = study.build_encoder(config.dataset, config.encoder)
    common = {"lr": config.lr, "feature_dim": study.FEATURE_DIM, "embedding_dim": PROJECTOR_DIM}
    if config.family == "simclr":
        model: Any = study.StudySimCLR(**common, **options)
        model.backbone = encoder
    elif config.family == "simsiam":
        model = study.StudySimSiam(**common, **options)
        model.backbone = encoder
    elif config.family == "byol":
        model = ZooBYOL(**common, backbone=encoder, **options)
    elif config.family == "vicreg":
        model = ZooVICReg(**common, backbone=encoder, **options)
    elif config.family == "barlow_twins":
        model = ZooBarlowTwins(**common, backbone=encoder, **options)
    else:
        raise ValueError(f"unknown family {config.family!r}")
    model.augmentation = study.AUGMENTATIONS[config.dataset]
    model.augmentation_strength = 1.0
    return model


# ---- one run ----------------------------------------------------------------------------------------
class FewShotCurve(pl.Callback):
    """After each validation pass: the backbone's 5-shot nearest-class-mean accuracy on the held-out
    split (labels for evaluation only), for ``draws`` fixed draws of the 5 labelled examples per class.

    ``values`` holds the mean over the draws per epoch (the onset curve: one draw, as the study's
    ``EpochProbe``, moves by a few points between draws and seeds), ``first_draw`` the study's single draw.
    """

    def __init__(self, splits: study.Splits, draws: int) -> None:
        self.splits, self.draws = splits, draws
        self.values: list[float] = []
        self.first_draw: list[float] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        s = self.splits
        train_x = study.embed(module.backbone, s.train_images).double().numpy()
        test_x = study.embed(module.backbone, s.held_out_images).double().numpy()
        scores = [
            study.nearest_mean_accuracy(train_x, s.train_labels.numpy(), test_x, s.held_out_labels.numpy(), seed=d)
            for d in range(self.draws)
        ]
        self.values.append(float(np.mean(scores)))
        self.first_draw.append(scores[0])


def train_and_record(config: ZooConfig, epochs: int, seed: int, probe_draws: int) -> dict[str, Any]:
    """Train one configuration for ``epochs`` epochs and return its record: every value the monitor
    logged per validation epoch (``history``), the tap widths, and the backbone's per-epoch 5-shot
    nearest-class-mean accuracy, averaged over ``probe_draws`` fixed draws (``epoch_probe``; its last
    value is ``probe_accuracy``) and for the first draw alone (``epoch_probe_first_draw``)."""
    pl.seed_everything(seed, verbose=False)
    splits = study.load_splits(config.dataset)
    model = build_model(config)
    view_1, view_2 = study.fixed_views(config.dataset, splits.held_out_images, 2)
    val = DataLoader(TensorDataset(view_1, view_2, splits.held_out_labels), batch_size=500)
    train = DataLoader(
        TensorDataset(splits.train_images, splits.train_labels), batch_size=128, shuffle=True, drop_last=True
    )
    monitor = RepresentationMonitor(
        list(TAPS), num_views=2, every_n_train_steps=0, log_figures=False, progress_bar=None
    )
    probe = FewShotCurve(splits, probe_draws)
    start = time.perf_counter()
    make_trainer(epochs, [monitor, probe], logger=False, progress_bar=False, enable_checkpointing=False).fit(
        model, train, val
    )
    train_seconds = time.perf_counter() - start

    # history: {"val/projector/rankme": [(step, value), ...]} -> {"projector/rankme": [value per epoch]}
    history = {
        key.split("/", 1)[1]: [value for _, value in values]
        for key, values in monitor.tracker.history.items()
        if key.startswith("val/")
    }
    return {
        **asdict(config),
        "options": dict(config.options),
        "cell": config.cell,
        "epochs": epochs,
        "seed": seed,
        "widths": {tap: int(monitor.tracker.num_features[tap]) for tap in TAPS},  # D of each tap, as the monitor saw it
        "history": history,
        "epoch_probe": probe.values,
        "epoch_probe_first_draw": probe.first_draw,
        # The final score is the last epoch's (a logistic-regression probe would cost ~8 s a run, a third of the
        # zoo's time).
        "probe_accuracy": probe.values[-1],
        "train_seconds": train_seconds,
    }


# ---- records ----------------------------------------------------------------------------------------
def record_path(out_dir: str, config: ZooConfig, seed: int) -> str:
    return os.path.join(out_dir, "records", f"{config.cell}-{config.name}-s{seed}.json.gz")


def load_record(path: str, key: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with gzip.open(path, "rt") as handle:
        record = json.load(handle)
    return record if record.get("key") == key else None


def save_record(path: str, record: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".tmp"  # written then renamed: an interrupted run never leaves half a record
    # mtime=0: the same record gives the same bytes, so a rerun does not dirty the committed copy.
    with open(partial, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        handle.write(json.dumps(record, sort_keys=True).encode())
    os.replace(partial, path)


# ---- running ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="runs/collapse_zoo", help="records, CSVs, tables and the figure go here")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs of every run (default 30 on the digits, 20 on MNIST-1D; 4 with --fast)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="*",
        default=None,
        help="training seeds of every configuration (default 0 1 2; 0 with --fast)",
    )
    parser.add_argument("--seed", type=int, default=None, help="shorthand for --seeds SEED")
    parser.add_argument(
        "--probe-draws",
        type=int,
        default=None,
        help="draws of the per-epoch 5-shot nearest-class-mean accuracy (default 10; 2 with --fast)",
    )
    parser.add_argument(
        "--only", nargs="*", default=None, help="train only these configuration names (then analyse what exists)"
    )
    parser.add_argument("--cells", nargs="*", default=None, help="only these cells, e.g. digits-mlp mnist1d-cnn")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs trained in parallel (processes, one torch thread each)"
    )
    parser.add_argument(
        "--fast", action="store_true", help="digits-mlp x 3 configurations x 1 seed x 4 epochs: the CI smoke run"
    )
    args = parser.parse_args(argv)
    if args.seed is not None:
        args.seeds = [args.seed]
    if args.seeds is None:
        args.seeds = [0] if args.fast else list(SEEDS)
    if args.epochs is None and args.fast:
        args.epochs = 4
    if args.probe_draws is None:
        args.probe_draws = 2 if args.fast else 10
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


def run_one(task: tuple[Any, ...]) -> dict[str, Any]:
    """Train one run, save its record, return it (top-level: picklable for the process pool)."""
    config, seed, epochs, probe_draws, path, key = task
    with example_session():
        clock = time.perf_counter()
        record = train_and_record(config, epochs, seed, probe_draws)
        record = {**record, "key": key, "seconds": time.perf_counter() - clock}
    save_record(path, record)
    return record


# Relative cost of a run per cell (measured): started longest first, two workers finish together.
_CELL_COST = {"mnist1d-cnn": 4, "mnist1d-mlp": 3, "digits-cnn": 2, "digits-mlp": 1}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with example_session():
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    zoo = FAST_ZOO if args.fast else ZOO
    if args.cells:
        zoo = tuple(c for c in zoo if c.cell in args.cells)
    os.makedirs(args.out_dir, exist_ok=True)

    tasks = []
    for cfg in zoo:
        epochs = args.epochs if args.epochs is not None else EPOCHS[cfg.dataset]
        for seed in args.seeds:
            tasks.append(
                (
                    cfg,
                    seed,
                    epochs,
                    args.probe_draws,
                    record_path(args.out_dir, cfg, seed),
                    cfg.key(epochs, seed, args.probe_draws),
                )
            )
    records: dict[int, dict[str, Any]] = {}
    pending = []
    for index, task in enumerate(tasks):
        record = load_record(task[4], task[5])
        if record is not None:
            records[index] = record
        elif args.only is None or task[0].name in args.only:
            pending.append(index)
    pending.sort(key=lambda i: -_CELL_COST.get(tasks[i][0].cell, 0))
    print(f"{len(tasks)} runs: {len(records)} done before, {len(pending)} to train with {args.jobs} job(s)", flush=True)

    def report(index: int, record: dict[str, Any]) -> None:
        records[index] = record
        print(
            f"[{len(records)}/{len(tasks)}] {record['cell']} {record['name']} seed {record['seed']}: 5-shot"
            f" probe {record['probe_accuracy']:.3f} ({record['seconds']:.0f} s)",
            flush=True,
        )

    trained = [f"{tasks[i][0].cell}-{tasks[i][0].name}-s{tasks[i][1]}" for i in pending]
    study.run_pending(run_one, tasks, pending, args.jobs, report)

    ordered = [records[i] for i in sorted(records)]
    outputs = analysis.write_outputs(args.out_dir, ordered, analysis.FAST_GRID if args.fast else analysis.GRID)
    elapsed = time.perf_counter() - start
    print(f"\n{len(ordered)} runs ({len(trained)} trained now) in {elapsed:.0f} s; outputs in {args.out_dir}")
    print(outputs["summary"])
    return {"records": ordered, "trained": trained, "out_dir": args.out_dir, "seconds": elapsed, **outputs}


if __name__ == "__main__":
    main()
