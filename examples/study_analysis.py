"""The analysis half of the model-selection study: pure functions on rows of results (scipy), no torch.

- :func:`spearman`, :func:`kendall_tau_b`: rank correlations (scipy's, with non-finite pairs dropped and
  NaN for a constant side).
- :func:`oriented_score`: each metric turned into "higher predicts better" (see :data:`DIRECTIONS`),
  so a positive correlation always means "the metric ranks configurations the way accuracy does".
- :func:`correlation_rows`, :func:`pick_rows`: one row per (metric, tap, group); a group is one SSL
  method, all of them together ("all"), or all but the settings built to collapse ("all-healthy").
- :data:`CONFIG_COLUMNS`, :func:`result_columns`: the schema of ``results.csv``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

TAPS = ("backbone", "projector")

# How a pick reads each metric, i.e. which value the metric says is the better representation.
# These follow the metric classes' ``higher_is_better`` (a test checks they agree); α-ReQ's is None
# (Agrawal et al. 2022: a decay exponent near 1 generalises best; much lower is noise-like, much
# higher is collapsed), so the study reads it as "closest to 1 is best".
# The intrinsic dimensions (local ID, TwoNN) are read as "higher is better", the collapse-avoidance
# reading of LDReg; note that Ansuini et al. (2019) found the opposite trend for the last layer of
# supervised networks, so these are the least settled directions in the table.
DIRECTIONS: dict[str, str] = {
    "rankme": "max",
    "lidar": "max",
    "alpha_req": "closest_to_1",
    "lid": "max",
    "twonn": "max",
    "uniformity": "min",
    "alignment": "min",
    "normalized_std": "max",
    # Issue 14. NESum, coding rate and IsoScore: more (evenly) used directions is read as better, as the
    # papers do; Wasserstein uniformity: closer to the uniform-on-the-sphere Gaussian is better (Fang et
    # al.); SIGReg: closer to N(0, I) is better, LeJEPA's target. These are choices for model selection:
    # none of the papers claims its metric ranks hyperparameters.
    "nesum": "max",
    "coding_rate": "max",
    "wasserstein_uniformity": "min",
    "sigreg": "min",
    "isoscore": "max",
}
METRICS = tuple(DIRECTIONS)

# The papers' protocols, scored next to the monitor's settings: LiDAR with q augmented views per
# held-out sample (Thilak et al. use many views per sample; the monitor uses 2) and RankMe on every
# image there is (Garrido et al. recommend >= ~25,000 samples; these datasets have 1,797 and 5,000).
PROTOCOL_DIRECTIONS: dict[str, str] = {**{f"lidar_q{q}": "max" for q in (2, 4, 8, 16)}, "rankme_all": "max"}
SCORED_DIRECTIONS: dict[str, str] = {**DIRECTIONS, **PROTOCOL_DIRECTIONS}
SCORED_METRICS = tuple(SCORED_DIRECTIONS)

# Configuration columns of results.csv, in order; then one column per (tap, metric), then accuracies.
CONFIG_COLUMNS = (
    "name",
    "method",
    "dataset",  # "digits" or "mnist1d"
    "encoder",  # "mlp" or "cnn"
    "cell",  # dataset-encoder
    "collapse_setting",  # "none", "partial" or "full": what the configuration was designed to do
    "temperature",
    "lr",
    "batch_size",
    "projector_dim",
    "augmentation_strength",
    "stop_gradient",
    "predictor",
    "epochs",
    "seed",
)
# probe_accuracy is the 5-shot probe (the study's headline accuracy, as before); linear_probe_accuracy
# is the full linear probe (logistic regression on every training label).
ACCURACY_COLUMNS = (
    "probe_1shot",
    "probe_accuracy",
    "probe_10shot",
    "linear_probe_accuracy",
    "knn_accuracy",
    "probe_std",
)
RANKED_ACCURACIES = ("probe_1shot", "probe_accuracy", "probe_10shot", "linear_probe_accuracy", "knn_accuracy")
ACCURACY_LABELS = {
    "probe_1shot": "1-shot probe",
    "probe_accuracy": "5-shot probe",
    "probe_10shot": "10-shot probe",
    "linear_probe_accuracy": "full linear probe",
    "knn_accuracy": "5-NN",
}
EXTRA_COLUMNS = ("train_seconds",)


def metric_column(tap: str, metric: str) -> str:
    return f"{tap}/{metric}"


def result_columns() -> list[str]:
    """Every column of results.csv, in order."""
    metric_columns = [metric_column(tap, metric) for tap in TAPS for metric in SCORED_METRICS]
    return [*CONFIG_COLUMNS, *metric_columns, *ACCURACY_COLUMNS, *EXTRA_COLUMNS]


# ---- rank correlations ------------------------------------------------------------------------------
def _finite_pairs(x: Sequence[float], y: Sequence[float]) -> tuple[list[float], list[float]]:
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if math.isfinite(float(a)) and math.isfinite(float(b))]
    return [a for a, _ in pairs], [b for _, b in pairs]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (``scipy.stats.spearmanr``: Pearson correlation of average ranks).

    Pairs with a non-finite value are dropped; NaN if fewer than 2 pairs remain or either side is constant.
    """
    from scipy.stats import spearmanr

    x, y = _finite_pairs(x, y)
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan  # a constant variable has no ranking to agree with
    return float(spearmanr(x, y)[0])


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (``scipy.stats.kendalltau``'s default, corrected for ties on either side).

    Pairs with a non-finite value are dropped; NaN if fewer than 2 pairs remain or either side is constant.
    """
    from scipy.stats import kendalltau

    x, y = _finite_pairs(x, y)
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    return float(kendalltau(x, y)[0])


# ---- orientation and picks --------------------------------------------------------------------------
def oriented_score(metric: str, value: float) -> float:
    """The metric's value turned so that higher means "the metric predicts a better representation"."""
    direction = SCORED_DIRECTIONS[metric]
    if direction == "max":
        return value
    if direction == "min":
        return -value
    if direction == "closest_to_1":
        return -abs(value - 1.0)
    raise ValueError(f"unknown direction {direction!r} for metric {metric!r}")


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def groups_of(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Rows per method in order of first appearance, then "all", then "all-healthy": every row whose
    ``collapse_setting`` is "none" (or missing). The last asks the question of a hyperparameter
    search that avoids known-broken settings, where telling collapse apart is not the metric's job."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row["method"]), []).append(row)
    groups["all"] = list(rows)
    groups["all-healthy"] = [r for r in rows if r.get("collapse_setting", "none") in ("none", "")]
    return groups


def correlation_rows(rows: Sequence[Mapping[str, Any]], accuracy: str = "probe_accuracy") -> list[dict[str, Any]]:
    """Spearman and Kendall tau-b between each oriented metric and ``accuracy``, per tap and group."""
    table = []
    for group, members in groups_of(rows).items():
        target = [_as_float(r[accuracy]) for r in members]
        for metric in SCORED_METRICS:
            for tap in TAPS:
                column = metric_column(tap, metric)
                scores = [oriented_score(metric, _as_float(r.get(column))) for r in members]
                used = len(_finite_pairs(scores, target)[0])
                table.append(
                    {
                        "metric": metric,
                        "tap": tap,
                        "direction": SCORED_DIRECTIONS[metric],
                        "group": group,
                        "accuracy": accuracy,
                        "n": used,
                        "spearman": spearman(scores, target),
                        "kendall": kendall_tau_b(scores, target),
                    }
                )
    return table


def pick(rows: Sequence[Mapping[str, Any]], key: Callable[[Mapping[str, Any]], float]) -> Mapping[str, Any] | None:
    """The row with the highest finite ``key``; ties go to the earliest row. None if no row has one."""
    best, best_key = None, -math.inf
    for row in rows:
        value = key(row)
        if math.isfinite(value) and (best is None or value > best_key):
            best, best_key = row, value
    return best


def pick_rows(rows: Sequence[Mapping[str, Any]], accuracy: str = "probe_accuracy") -> list[dict[str, Any]]:
    """For each (metric, tap, group): the configuration the metric would choose without labels, its
    accuracy, and its gap to the group's accuracy-best configuration (0 = the metric chose as well as labels)."""
    table = []
    for group, members in groups_of(rows).items():
        oracle = pick(members, lambda r: _as_float(r[accuracy]))
        if oracle is None:
            continue
        oracle_accuracy = _as_float(oracle[accuracy])
        for metric in SCORED_METRICS:
            for tap in TAPS:
                column = metric_column(tap, metric)
                chosen = pick(
                    members, lambda r, metric=metric, column=column: oriented_score(metric, _as_float(r.get(column)))
                )
                chosen_accuracy = _as_float(chosen[accuracy]) if chosen is not None else math.nan
                table.append(
                    {
                        "metric": metric,
                        "tap": tap,
                        "direction": SCORED_DIRECTIONS[metric],
                        "group": group,
                        "pick": chosen["name"] if chosen is not None else "",
                        "pick_value": _as_float(chosen.get(column)) if chosen is not None else math.nan,
                        "pick_accuracy": chosen_accuracy,
                        "best": oracle["name"],
                        "best_accuracy": oracle_accuracy,
                        "gap": oracle_accuracy - chosen_accuracy,
                    }
                )
    return table


# ---- files ------------------------------------------------------------------------------------------
def write_csv(path: str, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    def cell(value: Any) -> Any:
        if value is None:
            return ""
        if isinstance(value, float):
            return "" if math.isnan(value) else repr(value)  # repr: the exact float, read back identically
        return value

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: cell(row.get(c)) for c in columns})


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _number(value: float, digits: int = 2) -> str:
    return "–" if not math.isfinite(value) else f"{value:+.{digits}f}"


def correlations_markdown(correlations: Sequence[Mapping[str, Any]], groups: Sequence[str]) -> str:
    """One line per (metric, tap); Spearman / Kendall per group, signed so that + means "agrees with accuracy"."""
    by_key = {(c["metric"], c["tap"], c["group"]): c for c in correlations}
    header = ["metric (pick direction)", "tap", *[f"{g} ρ / τ (n={_group_size(correlations, g)})" for g in groups]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(groups)) + "|"]
    for metric in METRICS:
        for tap in TAPS:
            cells = [f"{metric} ({DIRECTIONS[metric]})", tap]
            for group in groups:
                c = by_key.get((metric, tap, group))
                cells.append("–" if c is None else f"{_number(c['spearman'])} / {_number(c['kendall'])}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _group_size(correlations: Sequence[Mapping[str, Any]], group: str) -> int:
    return max((int(c["n"]) for c in correlations if c["group"] == group), default=0)


def picks_markdown(picks: Sequence[Mapping[str, Any]], groups: Sequence[str]) -> str:
    """One line per (metric, tap); per group the chosen configuration, its probe accuracy and the gap to the best."""
    by_key = {(p["metric"], p["tap"], p["group"]): p for p in picks}
    best = {p["group"]: (p["best"], p["best_accuracy"]) for p in picks}
    lines = [
        "Accuracy-best configuration: "
        + "; ".join(f"{g}: `{best[g][0]}` ({best[g][1]:.3f})" for g in groups if g in best)
        + ".",
        "",
        "| metric (pick direction) | tap | " + " | ".join(f"{g}: pick (probe acc., gap)" for g in groups) + " |",
        "|---|---|" + "|".join(["---"] * len(groups)) + "|",
    ]
    for metric in METRICS:
        for tap in TAPS:
            cells = [f"{metric} ({DIRECTIONS[metric]})", tap]
            for group in groups:
                p = by_key.get((metric, tap, group))
                if p is None or not p["pick"]:
                    cells.append("–")
                else:
                    cells.append(f"`{p['pick']}` ({p['pick_accuracy']:.3f}, −{p['gap']:.3f})")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- seeds, bootstrap, noise floor ------------------------------------------------------------------
def average_seeds(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (cell, configuration): every numeric column averaged over the seeds (non-finite
    values skipped), ``n_seeds``, and per accuracy its across-seed std (``ACC_seed_std``, ddof 1)."""
    by_config: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        by_config.setdefault((str(row.get("cell", "")), str(row["name"])), []).append(row)
    averaged = []
    for members in by_config.values():
        out: dict[str, Any] = {c: members[0].get(c) for c in CONFIG_COLUMNS if c != "seed"}
        out["n_seeds"] = len(members)
        for column in [metric_column(t, m) for t in TAPS for m in SCORED_METRICS] + list(ACCURACY_COLUMNS):
            values = [v for v in (_as_float(r.get(column)) for r in members) if math.isfinite(v)]
            out[column] = sum(values) / len(values) if values else math.nan
        for accuracy in RANKED_ACCURACIES:
            values = [v for v in (_as_float(r.get(accuracy)) for r in members) if math.isfinite(v)]
            mean = sum(values) / len(values) if values else math.nan
            out[f"{accuracy}_seed_std"] = (
                math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
            )
        averaged.append(out)
    return averaged


def _rank_rows(matrix: Any) -> Any:
    from scipy.stats import rankdata

    return rankdata(matrix, axis=1, method="average")


def batched_spearman(x: Any, y: Any) -> Any:
    """Spearman's rho of each row pair of two ``(B, n)`` arrays (average ranks); NaN where a row is constant."""
    import numpy as np

    rx, ry = _rank_rows(np.asarray(x, float)), _rank_rows(np.asarray(y, float))
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    denominator = np.sqrt((rx**2).sum(1) * (ry**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rx * ry).sum(1) / np.where(denominator > 0, denominator, 1), np.nan)


def batched_kendall_tau_b(x: Any, y: Any) -> Any:
    """Kendall's tau-b of each row pair of two ``(B, n)`` arrays (the tie correction of :func:`kendall_tau_b`)."""
    import numpy as np

    x, y = np.asarray(x, float), np.asarray(y, float)
    n = x.shape[1]
    upper = np.triu(np.ones((n, n), bool), 1)
    dx = np.sign(x[:, :, None] - x[:, None, :])[:, upper]
    dy = np.sign(y[:, :, None] - y[:, None, :])[:, upper]
    pairs = upper.sum()
    denominator = np.sqrt((pairs - (dx == 0).sum(1)) * (pairs - (dy == 0).sum(1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (dx * dy).sum(1) / np.where(denominator > 0, denominator, 1), np.nan)


def bootstrap_indices(n: int, resamples: int = 1000, seed: int = 0) -> Any:
    """``(resamples, n)`` indices drawn with replacement: configurations resampled, seeds already averaged."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(values: Any, level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of the finite values (NaN, NaN if none)."""
    import numpy as np

    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def correlation_ci_rows(
    averaged: Sequence[Mapping[str, Any]], resamples: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """Per cell, group, (metric, tap) and accuracy: Spearman and Kendall tau-b on the seed-averaged
    configurations with percentile-bootstrap 95 % intervals (configurations resampled with replacement,
    ``resamples`` times; a resample in which either side is constant is left out of the interval)."""
    import numpy as np

    table = []
    for cell, cell_rows in _by_cell(averaged).items():
        for group, members in groups_of(cell_rows).items():
            for accuracy in RANKED_ACCURACIES:
                target = np.array([_as_float(r.get(accuracy)) for r in members])
                for metric in SCORED_METRICS:
                    for tap in TAPS:
                        column = metric_column(tap, metric)
                        scores = np.array([oriented_score(metric, _as_float(r.get(column))) for r in members])
                        keep = np.isfinite(scores) & np.isfinite(target)
                        s, t = scores[keep], target[keep]
                        row = {
                            "cell": cell,
                            "metric": metric,
                            "tap": tap,
                            "direction": SCORED_DIRECTIONS[metric],
                            "group": group,
                            "accuracy": accuracy,
                            "n": int(keep.sum()),
                        }
                        row["spearman"], row["kendall"] = spearman(list(s), list(t)), kendall_tau_b(list(s), list(t))
                        if len(s) >= 3:
                            index = bootstrap_indices(len(s), resamples, seed)
                            row["spearman_lo"], row["spearman_hi"] = percentile_interval(
                                batched_spearman(s[index], t[index])
                            )
                            row["kendall_lo"], row["kendall_hi"] = percentile_interval(
                                batched_kendall_tau_b(s[index], t[index])
                            )
                        else:
                            row.update(
                                spearman_lo=math.nan, spearman_hi=math.nan, kendall_lo=math.nan, kendall_hi=math.nan
                            )
                        table.append(row)
    return table


def pick_ci_rows(
    averaged: Sequence[Mapping[str, Any]], accuracy: str = "probe_accuracy", resamples: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """:func:`pick_rows` per cell on the seed-averaged configurations, plus a bootstrap 95 % interval of
    the gap: in each resample of configurations, the best resampled accuracy minus the accuracy of the
    resampled configuration the metric picks."""
    import numpy as np

    table = []
    for cell, cell_rows in _by_cell(averaged).items():
        groups = groups_of(cell_rows)
        picks = pick_rows(cell_rows, accuracy)
        for p in picks:
            members = groups[p["group"]]
            target = np.array([_as_float(r.get(accuracy)) for r in members])
            scores = np.array(
                [oriented_score(p["metric"], _as_float(r.get(metric_column(p["tap"], p["metric"])))) for r in members]
            )
            gaps = []
            if np.isfinite(scores).any():
                scores = np.where(np.isfinite(scores), scores, -np.inf)
                for index in bootstrap_indices(len(members), resamples, seed):
                    gaps.append(np.nanmax(target[index]) - target[index][int(np.argmax(scores[index]))])
            lo, hi = percentile_interval(gaps)
            table.append({"cell": cell, **p, "gap_lo": lo, "gap_hi": hi})
    return table


def noise_floor_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per cell and accuracy: the std of accuracy across seeds of one configuration (ddof 1), its
    median and maximum over the configurations: differences below it are seed noise."""
    table = []
    for cell, cell_rows in _by_cell(average_seeds(rows)).items():
        for accuracy in RANKED_ACCURACIES:
            stds = sorted(v for v in (_as_float(r.get(f"{accuracy}_seed_std")) for r in cell_rows) if math.isfinite(v))
            median = (stds[(len(stds) - 1) // 2] + stds[len(stds) // 2]) / 2 if stds else math.nan
            table.append(
                {
                    "cell": cell,
                    "accuracy": accuracy,
                    "configurations": len(stds),
                    "median_seed_std": median,
                    "max_seed_std": stds[-1] if stds else math.nan,
                }
            )
    return table


def _by_cell(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    cells: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        cells.setdefault(str(row.get("cell") or ""), []).append(row)
    return cells


# ---- collapse stopping as a detector ----------------------------------------------------------------
CHANCE = 0.1  # ten balanced classes
COLLAPSE_KEEP = 0.75  # a collapsed run keeps less than this share of the base configurations' gain over chance


def replay_ssl_guard(
    rankme_series: Sequence[float], std_series: Sequence[float], dim: int, min_fraction_of_dim: float = 0.2
) -> tuple[int | None, str]:
    """The recommended SSL guard replayed on one run's per-epoch projector values:
    ``CollapseEarlyStopping("repr/val/projector/rankme", min_fraction_of_dim=0.2, patience=3)`` and
    ``CollapseEarlyStopping("repr/val/projector/normalized_std", min_value=0.25/√D)`` (patience 3, the
    default), both fed every validation epoch. Returns (the 0-based epoch of the first stop or None, reason).
    ``min_fraction_of_dim`` other than 0.2 replays a variant of the rank rule (the threshold sweep)."""
    from reprmetrics.stopping import CollapseCriteria

    rank = CollapseCriteria("repr/val/projector/rankme", patience=3, min_fraction_of_dim=min_fraction_of_dim, dim=dim)
    spread = CollapseCriteria("repr/val/projector/normalized_std", patience=3, min_value=0.25 / math.sqrt(dim), dim=dim)
    for epoch, (r, s) in enumerate(zip(rankme_series, std_series)):
        for criterion, value in ((rank, r), (spread, s)):
            stop, reason = criterion.check(value, dim=dim, normalized_std=s)
            if stop:
                return epoch, reason
    return None, ""


def replay_finetune_guard(cka_series: Sequence[float], std_series: Sequence[float], dim: int) -> tuple[int | None, str]:
    """The recommended fine-tuning guard replayed: CKA to the pretrained backbone ``min_value=0.8,
    patience=2`` and backbone normalised std ``min_value=0.25/√D, patience=1``."""
    from reprmetrics.stopping import CollapseCriteria

    drift = CollapseCriteria("repr/val/backbone/cka_to_reference", patience=2, min_value=0.8)
    spread = CollapseCriteria("repr/val/backbone/normalized_std", patience=1, min_value=0.25 / math.sqrt(dim), dim=dim)
    for epoch, (c, s) in enumerate(zip(cka_series, std_series)):
        for criterion, value in ((drift, c), (spread, s)):
            stop, reason = criterion.check(value, dim=dim)
            if stop:
                return epoch, reason
    return None, ""


def _series(value: Any) -> list[float]:
    if isinstance(value, str):
        import json

        value = json.loads(value) if value else []
    return [float(v) for v in (value or [])]


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2


def first_below(series: Sequence[float], threshold: float) -> int | None:
    """The first 0-based index whose value is below ``threshold`` (None if none is)."""
    return next((i for i, v in enumerate(series) if v < threshold), None)


ONSET_MARGIN = 0.03  # the per-epoch label curve this far below the base runs' at the same epoch: onset


def ssl_detector_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per SSL run: its labels, the replayed guard's stop epoch, the onset epoch.

    Two labels, neither read from the signal the guard uses:

    - ``collapsed`` (the primary one): the configuration was built to collapse fully
      (``collapse_setting == "full"``: SimSiam without its predictor, or without predictor and
      stop-gradient, the SimSiam paper's collapsing settings);
    - ``harmful``: the final 5-shot probe accuracy keeps less than ``COLLAPSE_KEEP`` of the gain over
      chance that the cell's base configurations reach (their median, every seed):
      accuracy < chance + 0.75 (reference − chance).

    The *onset* is the first epoch at which the per-epoch label curve (5-shot nearest-class-mean
    accuracy of the backbone) is more than ``ONSET_MARGIN`` below the median curve of the cell's base
    runs at the same epoch; None if it never is.
    """
    table = []
    for cell, members in _by_cell(rows).items():
        base = [r for r in members if r["name"] in ("simclr-base", "simsiam-base")]
        reference = _median([_as_float(r["probe_accuracy"]) for r in base])
        curves = [_series(r.get("epoch_probe")) for r in base]
        length = min((len(c) for c in curves), default=0)
        base_curve = [_median([c[e] for c in curves]) for e in range(length)]
        threshold = CHANCE + COLLAPSE_KEEP * (reference - CHANCE)
        for r in members:
            dim = int(float(r["projector_dim"]))
            stop, reason = replay_ssl_guard(
                _series(r.get("epoch_projector_rankme")), _series(r.get("epoch_projector_normalized_std")), dim
            )
            curve = _series(r.get("epoch_probe"))
            onset = next((e for e in range(min(len(curve), length)) if curve[e] < base_curve[e] - ONSET_MARGIN), None)
            collapsed = r.get("collapse_setting", "none") == "full"
            table.append(
                {
                    "cell": cell,
                    "name": r["name"],
                    "method": r["method"],
                    "seed": r["seed"],
                    "collapse_setting": r.get("collapse_setting", "none"),
                    "probe_accuracy": _as_float(r["probe_accuracy"]),
                    "threshold": threshold,
                    "collapsed": collapsed,
                    "harmful": bool(math.isfinite(reference) and _as_float(r["probe_accuracy"]) < threshold),
                    "epochs": len(_series(r.get("epoch_projector_rankme"))),
                    "stop_epoch": stop,
                    "onset_epoch": onset,
                    "onset_to_stop": (stop - onset) if (stop is not None and onset is not None) else None,
                    "reason": reason,
                }
            )
    return table


def threshold_sweep_rows(
    rows: Sequence[Mapping[str, Any]], fractions: Sequence[float] = (0.1, 0.15, 0.2, 0.3)
) -> list[dict[str, Any]]:
    """The SSL guard replayed with other ``min_fraction_of_dim`` values: per value, the collapsing runs
    (built to collapse fully) stopped, the other runs stopped, and the latest stop epoch of a collapsing run."""
    table = []
    for fraction in fractions:
        stops = []
        for r in rows:
            stop, _ = replay_ssl_guard(
                _series(r.get("epoch_projector_rankme")),
                _series(r.get("epoch_projector_normalized_std")),
                int(float(r["projector_dim"])),
                fraction,
            )
            stops.append((r.get("collapse_setting", "none") == "full", stop))
        caught = [stop for collapsing, stop in stops if collapsing and stop is not None]
        table.append(
            {
                "min_fraction_of_dim": fraction,
                "collapsing_runs": sum(c for c, _ in stops),
                "detected": len(caught),
                "healthy_runs": sum(not c for c, _ in stops),
                "false_stops": sum((not c) and stop is not None for c, stop in stops),
                "latest_stop_epoch": max(caught) if caught else None,
            }
        )
    return table


def finetune_detector_rows(rows: Sequence[Mapping[str, Any]], harm: float = 0.03) -> list[dict[str, Any]]:
    """One row per fine-tune: *harmful* when the backbone's final 5-shot probe accuracy is more than
    ``harm`` below the pretrained backbone's (what the guard protects); the onset is the first epoch at
    which the per-epoch nearest-class-mean curve is more than ``harm`` below its pretrained value."""
    table = []
    for r in rows:
        dim = int(float(r.get("feature_dim", 128)))
        stop, reason = replay_finetune_guard(_series(r.get("epoch_cka")), _series(r.get("epoch_normalized_std")), dim)
        harmful = _as_float(r["probe_accuracy"]) < _as_float(r["pretrained_probe_accuracy"]) - harm
        onset = (
            first_below(_series(r.get("epoch_probe")), _as_float(r["pretrained_epoch_probe"]) - harm)
            if harmful
            else None
        )
        cka = _series(r.get("epoch_cka"))
        table.append(
            {
                "cell": "digits-mlp",
                "name": r["name"],
                "lr": _as_float(r["lr"]),
                "seed": r["seed"],
                "collapsed": harmful,
                "pretrained_probe_accuracy": _as_float(r["pretrained_probe_accuracy"]),
                "probe_accuracy": _as_float(r["probe_accuracy"]),
                "min_cka": min(cka) if cka else math.nan,
                "epochs": len(cka),
                "stop_epoch": stop,
                "onset_epoch": onset,
                "onset_to_stop": (stop - onset) if (stop is not None and onset is not None) else None,
                "reason": reason,
            }
        )
    return table


def detector_summary(
    detections: Sequence[Mapping[str, Any]], by: str = "cell", label: str = "collapsed"
) -> list[dict[str, Any]]:
    """Per value of ``by`` and overall: runs labelled ``label`` and the share the guard stopped
    (detection rate), the other runs and the share stopped (false-stop rate), and the median (min–max)
    of epochs from onset to stop over the detected runs with an onset."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for d in detections:
        groups.setdefault(str(d[by]), []).append(d)
    groups["all"] = list(detections)
    table = []
    for name, members in groups.items():
        bad = [d for d in members if d[label]]
        good = [d for d in members if not d[label]]
        lags = [float(d["onset_to_stop"]) for d in bad if d["onset_to_stop"] is not None]
        table.append(
            {
                by: name,
                "collapsed_runs": len(bad),
                "detected": sum(d["stop_epoch"] is not None for d in bad),
                "detection_rate": (sum(d["stop_epoch"] is not None for d in bad) / len(bad)) if bad else math.nan,
                "healthy_runs": len(good),
                "false_stops": sum(d["stop_epoch"] is not None for d in good),
                "false_stop_rate": (sum(d["stop_epoch"] is not None for d in good) / len(good)) if good else math.nan,
                "onset_to_stop_median": _median(lags),
                "onset_to_stop_min": min(lags) if lags else math.nan,
                "onset_to_stop_max": max(lags) if lags else math.nan,
            }
        )
    return table


# ---- tables and figures -----------------------------------------------------------------------------
# The (metric, tap) pairs of the compact summary: the paper protocols next to the monitor's settings.
SUMMARY_METRICS = (
    ("rankme", "projector"),
    ("rankme", "backbone"),
    ("rankme_all", "backbone"),
    ("lidar", "projector"),
    ("lidar_q16", "projector"),
    ("lidar_q16", "backbone"),
    ("alpha_req", "backbone"),
    ("alignment", "backbone"),
    ("uniformity", "backbone"),
    ("normalized_std", "projector"),
    ("nesum", "backbone"),
    ("coding_rate", "backbone"),
    ("isoscore", "backbone"),
)
CORRELATION_COLUMNS = [
    "cell",
    "metric",
    "tap",
    "direction",
    "group",
    "accuracy",
    "n",
    "spearman",
    "spearman_lo",
    "spearman_hi",
    "kendall",
    "kendall_lo",
    "kendall_hi",
]
PICK_COLUMNS = [
    "cell",
    "metric",
    "tap",
    "direction",
    "group",
    "pick",
    "pick_value",
    "pick_accuracy",
    "best",
    "best_accuracy",
    "gap",
    "gap_lo",
    "gap_hi",
]
NOISE_COLUMNS = ["cell", "accuracy", "configurations", "median_seed_std", "max_seed_std"]
SSL_DETECTION_COLUMNS = [
    "cell",
    "name",
    "method",
    "seed",
    "collapse_setting",
    "probe_accuracy",
    "threshold",
    "collapsed",
    "harmful",
    "epochs",
    "stop_epoch",
    "onset_epoch",
    "onset_to_stop",
    "reason",
]
FINETUNE_DETECTION_COLUMNS = [
    "cell",
    "name",
    "lr",
    "seed",
    "pretrained_probe_accuracy",
    "probe_accuracy",
    "collapsed",
    "min_cka",
    "epochs",
    "stop_epoch",
    "onset_epoch",
    "onset_to_stop",
    "reason",
]


def rho_cell(c: Mapping[str, Any] | None) -> str:
    if c is None or not math.isfinite(_as_float(c["spearman"])):
        return "–"
    lo, hi = _as_float(c.get("spearman_lo")), _as_float(c.get("spearman_hi"))
    interval = f" [{lo:+.2f}, {hi:+.2f}]" if math.isfinite(lo) else ""
    return f"{c['spearman']:+.2f}{interval}"


def summary_markdown(
    correlations: Sequence[Mapping[str, Any]],
    group: str,
    accuracy: str,
    metrics: Sequence[tuple[str, str]] = SUMMARY_METRICS,
) -> str:
    """metric × cell: Spearman ρ [bootstrap 95 % CI] against ``accuracy`` within ``group``."""
    cells = list(dict.fromkeys(c["cell"] for c in correlations))
    by_key = {(c["cell"], c["metric"], c["tap"], c["group"], c["accuracy"]): c for c in correlations}
    n = {
        cell: max(
            (
                int(c["n"])
                for c in correlations
                if c["cell"] == cell and c["group"] == group and c["accuracy"] == accuracy
            ),
            default=0,
        )
        for cell in cells
    }
    lines = [
        "| metric (tap) | " + " | ".join(f"{cell} (n={n[cell]})" for cell in cells) + " |",
        "|---|" + "---:|" * len(cells),
    ]
    for metric, tap in metrics:
        lines.append(
            f"| {metric} ({tap}) | "
            + " | ".join(rho_cell(by_key.get((cell, metric, tap, group, accuracy))) for cell in cells)
            + " |"
        )
    return "\n".join(lines)


def full_correlations_markdown(correlations: Sequence[Mapping[str, Any]], accuracy: str) -> str:
    cells = list(dict.fromkeys(c["cell"] for c in correlations))
    groups = list(dict.fromkeys(c["group"] for c in correlations))
    parts = []
    for cell in cells:
        parts.append(f"### {cell}: Spearman ρ [95 % CI] / Kendall τ-b vs the {ACCURACY_LABELS[accuracy]}\n")
        by_key = {
            (c["metric"], c["tap"], c["group"]): c
            for c in correlations
            if c["cell"] == cell and c["accuracy"] == accuracy
        }
        lines = ["| metric (direction) | tap | " + " | ".join(groups) + " |", "|---|---|" + "---:|" * len(groups)]
        for metric in SCORED_METRICS:
            for tap in TAPS:
                cells_text = []
                for g in groups:
                    c = by_key.get((metric, tap, g))
                    cells_text.append("–" if c is None else f"{rho_cell(c)} / {_number(_as_float(c['kendall']))}")
                lines.append(f"| {metric} ({SCORED_DIRECTIONS[metric]}) | {tap} | " + " | ".join(cells_text) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def picks_ci_markdown(
    picks: Sequence[Mapping[str, Any]], group: str, metrics: Sequence[tuple[str, str]] = SUMMARY_METRICS
) -> str:
    cells = list(dict.fromkeys(p["cell"] for p in picks))
    by_key = {(p["cell"], p["metric"], p["tap"]): p for p in picks if p["group"] == group}
    best = {p["cell"]: (p["best"], p["best_accuracy"]) for p in picks if p["group"] == group}
    lines = [
        "Accuracy-best configuration (seed mean): "
        + "; ".join(f"{c}: `{best[c][0]}` ({best[c][1]:.3f})" for c in cells if c in best)
        + ".",
        "",
        "| metric (tap) | " + " | ".join(f"{c}: pick, gap [95 % CI]" for c in cells) + " |",
        "|---|" + "---|" * len(cells),
    ]
    for metric, tap in metrics:
        row = []
        for cell in cells:
            p = by_key.get((cell, metric, tap))
            row.append(
                "–"
                if p is None or not p["pick"]
                else f"`{p['pick']}` {p['gap']:.3f} [{p['gap_lo']:.3f}, {p['gap_hi']:.3f}]"
            )
        lines.append(f"| {metric} ({tap}) | " + " | ".join(row) + " |")
    return "\n".join(lines)


def noise_markdown(noise: Sequence[Mapping[str, Any]]) -> str:
    cells = list(dict.fromkeys(n["cell"] for n in noise))
    by_key = {(n["cell"], n["accuracy"]): n for n in noise}
    lines = [
        "| accuracy | " + " | ".join(f"{c}: median (max) seed std" for c in cells) + " |",
        "|---|" + "---:|" * len(cells),
    ]
    for accuracy in RANKED_ACCURACIES:
        row = []
        for cell in cells:
            n = by_key.get((cell, accuracy))
            row.append(
                "–"
                if n is None or not math.isfinite(_as_float(n["median_seed_std"]))
                else f"{n['median_seed_std']:.3f} ({n['max_seed_std']:.3f})"
            )
        lines.append(f"| {ACCURACY_LABELS[accuracy]} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def detector_markdown(
    summary: Sequence[Mapping[str, Any]], by: str, positive: str = "collapsing runs", negative: str = "healthy runs"
) -> str:
    lines = [
        f"| {by} | {positive} | detected | {negative} | false stops | epochs onset → stop, median (min–max) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for s in summary:
        lag = (
            "–"
            if not math.isfinite(_as_float(s["onset_to_stop_median"]))
            else (
                f"{s['onset_to_stop_median'] + 0.0:+g} ({s['onset_to_stop_min'] + 0.0:+g} to"
                f" {s['onset_to_stop_max'] + 0.0:+g})"
            )
        )  # + 0.0: no "-0"
        detected = f"{s['detected']} ({s['detection_rate']:.0%})" if s["collapsed_runs"] else "–"
        false = f"{s['false_stops']} ({s['false_stop_rate']:.0%})" if s["healthy_runs"] else "–"
        lines.append(f"| {s[by]} | {s['collapsed_runs']} | {detected} | {s['healthy_runs']} | {false} | {lag} |")
    return "\n".join(lines)


def plot_summary(correlations: Sequence[Mapping[str, Any]], path: str) -> None:
    """Left: ρ (5-shot probe, all configurations) per summary metric and cell with its CI; right: LiDAR's ρ
    against q."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys(c["cell"] for c in correlations))
    by_key = {(c["cell"], c["metric"], c["tap"], c["group"], c["accuracy"]): c for c in correlations}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.2), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / max(1, len(cells))
    for j, cell in enumerate(cells):
        xs, ys, los, his = [], [], [], []
        for i, (metric, tap) in enumerate(SUMMARY_METRICS):
            c = by_key.get((cell, metric, tap, "all", "probe_accuracy"))
            if c is None or not math.isfinite(_as_float(c["spearman"])):
                continue
            xs.append(i + (j - (len(cells) - 1) / 2) * width)
            ys.append(c["spearman"])
            lo, hi = _as_float(c.get("spearman_lo")), _as_float(c.get("spearman_hi"))
            los.append(c["spearman"] - lo if math.isfinite(lo) else 0)
            his.append(hi - c["spearman"] if math.isfinite(hi) else 0)
        left.errorbar(xs, ys, yerr=[los, his], fmt="o", ms=4, capsize=2, label=cell)
    left.axhline(0, color="gray", lw=0.8)
    left.set_xticks(
        range(len(SUMMARY_METRICS)), [f"{m}\n({t[:4]})" for m, t in SUMMARY_METRICS], fontsize=7, rotation=60
    )
    left.set_ylabel("Spearman ρ vs 5-shot probe (all configurations)")
    left.set_ylim(-1.05, 1.05)
    left.legend(fontsize=8)
    for cell in cells:
        for tap, style in (("projector", "-"), ("backbone", "--")):
            qs = [2, 4, 8, 16]
            values = [
                _as_float(by_key.get((cell, f"lidar_q{q}", tap, "all", "probe_accuracy"), {}).get("spearman"))
                for q in qs
            ]
            right.plot(qs, values, style, marker="o", label=f"{cell} {tap[:4]}")
    right.set_xscale("log", base=2)
    right.set_xticks([2, 4, 8, 16], ["2", "4", "8", "16"])
    right.axhline(0, color="gray", lw=0.8)
    right.set_xlabel("LiDAR views per held-out sample q")
    right.set_ylabel("Spearman ρ vs 5-shot probe")
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(
    out_dir: str, rows: Sequence[Mapping[str, Any]], finetunes: Sequence[Mapping[str, Any]] = (), resamples: int = 1000
) -> dict[str, Any]:
    """Every CSV, Markdown table and figure of the study from its run records; returns them and a printable summary."""
    import os

    path = lambda name: os.path.join(out_dir, name)  # noqa: E731
    write_csv(path("results.csv"), rows, result_columns())
    averaged = average_seeds(rows)
    write_csv(
        path("results_seed_mean.csv"),
        averaged,
        [c for c in CONFIG_COLUMNS if c != "seed"]
        + ["n_seeds"]
        + result_columns()[len(CONFIG_COLUMNS) : -1]
        + [f"{a}_seed_std" for a in RANKED_ACCURACIES],
    )
    correlations = correlation_ci_rows(averaged, resamples) if averaged else []
    picks = pick_ci_rows(averaged, "probe_accuracy", resamples) if averaged else []
    noise = noise_floor_rows(rows)
    detections = ssl_detector_rows(rows)
    finetune_detections = finetune_detector_rows(finetunes)
    write_csv(path("correlations.csv"), correlations, CORRELATION_COLUMNS)
    write_csv(path("picks.csv"), picks, PICK_COLUMNS)
    write_csv(path("noise_floor.csv"), noise, NOISE_COLUMNS)
    write_csv(
        path("detector_runs.csv"),
        [*detections, *finetune_detections],
        sorted(
            set(SSL_DETECTION_COLUMNS) | set(FINETUNE_DETECTION_COLUMNS),
            key=(SSL_DETECTION_COLUMNS + FINETUNE_DETECTION_COLUMNS).index,
        ),
    )

    seeds = sorted({str(r["seed"]) for r in rows})
    scheme = (
        f"Seeds {', '.join(seeds)} are averaged per configuration first; ρ and τ-b are over configurations; the"
        f" 95 % intervals are percentile bootstraps ({resamples} resamples of the configurations with"
        " replacement)."
    )
    summary_parts = []
    for accuracy in ("probe_accuracy", "linear_probe_accuracy"):
        for group in ("all", "all-healthy"):
            summary_parts.append(
                f"#### Spearman ρ [95 % CI] vs the {ACCURACY_LABELS[accuracy]}, group {group}\n\n"
                + summary_markdown(correlations, group, accuracy)
            )
    summary = scheme + "\n\n" + "\n\n".join(summary_parts)
    ssl_summary = detector_summary(detections, "cell")
    design_summary = detector_summary(detections, "collapse_setting")
    harm_summary = detector_summary(detections, "cell", label="harmful")
    finetune_summary = detector_summary(finetune_detections, "cell")
    detector = (
        "SSL runs, the recommended guard replayed per epoch (projector RankMe < 0.2·D for 3 epochs, or"
        " normalised std < 0.25/√D for 3). Collapsing = built to collapse fully (SimSiam without predictor /"
        " without predictor and stop-gradient):\n\n"
        + detector_markdown(ssl_summary, "cell")
        + '\n\nThe same runs by design setting ("partial": SimCLR τ = 2, built to lose projector rank; counted as'
        " healthy above):\n\n"
        + detector_markdown(design_summary, "collapse_setting")
        + '\n\nThe same runs labelled by outcome instead ("harmful": final 5-shot probe < chance +'
        f" {COLLAPSE_KEEP} × (base − chance)):\n\n"
        + detector_markdown(harm_summary, "cell", "harmful runs", "other runs")
        + "\n\nThe rank rule replayed with other `min_fraction_of_dim` (normalised std rule unchanged):\n\n"
        + "| min_fraction_of_dim | collapsing runs detected | false stops (of healthy)"
        " | latest stop epoch of a collapsing run |\n|---:|---:|---:|---:|\n"
        + "\n".join(
            f"| {t['min_fraction_of_dim']:g} | {t['detected']} of {t['collapsing_runs']}"
            f" | {t['false_stops']} of {t['healthy_runs']} | {t['latest_stop_epoch']} |"
            for t in threshold_sweep_rows(rows)
        )
        + "\n\nFine-tunes, the drift guard replayed (CKA to pretrained < 0.8 for 2 epochs, or normalised std <"
        " 0.25/√D):\n\n"
        + (
            detector_markdown(finetune_summary, "cell", "harmful fine-tunes", "healthy fine-tunes")
            if finetune_detections
            else "(none run)"
        )
    )
    protocol_metrics = [
        (m, t) for t in TAPS for m in ("lidar", "lidar_q2", "lidar_q4", "lidar_q8", "lidar_q16", "rankme", "rankme_all")
    ]
    protocol = (
        "The papers' protocols next to the monitor's: LiDAR from the monitor's 2 fixed views (`lidar`) and from"
        " q = 2, 4, 8, 16 other fixed views per held-out sample (`lidar_qQ`); RankMe as the monitor computes it"
        " on the held-out views (`rankme`) and on every clean image, training + held-out (`rankme_all`). "
        + scheme
        + "\n\n"
        + "\n\n".join(
            f"#### vs the {ACCURACY_LABELS[a]}, group {g}\n\n" + summary_markdown(correlations, g, a, protocol_metrics)
            for a in ("probe_accuracy", "linear_probe_accuracy")
            for g in ("all", "all-healthy")
        )
    )
    files = {
        "summary.md": summary + "\n",
        "protocol.md": protocol + "\n",
        "correlations.md": scheme
        + "\n\n"
        + "\n".join(full_correlations_markdown(correlations, a) for a in RANKED_ACCURACIES),
        "picks.md": "Picks on the seed-averaged configurations, 5-shot probe; gap = best accuracy − the pick's.\n\n"
        + "\n\n".join(f"#### group {g}\n\n" + picks_ci_markdown(picks, g) for g in ("all", "all-healthy"))
        + "\n",
        "noise_floor.md": "Std of accuracy across the seeds of one configuration: median (max) over configurations.\n\n"
        + noise_markdown(noise)
        + "\n",
        "detector.md": detector + "\n",
    }
    for name, text in files.items():
        with open(path(name), "w") as handle:
            handle.write(text)
    figure = path("summary.png")
    if correlations:
        plot_summary(correlations, figure)
    printable = "\n\n".join([summary, "Seed-noise floor:\n\n" + noise_markdown(noise), detector])
    return {
        "correlations": correlations,
        "picks": picks,
        "noise": noise,
        "detections": detections,
        "finetune_detections": finetune_detections,
        "summary": printable,
        "figure": figure,
    }
