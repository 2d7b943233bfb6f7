"""The analysis half of the model-selection study: pure functions on rows of results, no torch.

- :func:`spearman`, :func:`kendall_tau_b`: rank correlations, written out so that the tie handling
  is explicit (average ranks for Spearman, tau-b for Kendall) and tested against hand-computed values.
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

# Configuration columns of results.csv, in order; then one column per (tap, metric), then accuracies.
CONFIG_COLUMNS = (
    "name",
    "method",
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
ACCURACY_COLUMNS = ("probe_accuracy", "probe_std", "knn_accuracy")
EXTRA_COLUMNS = ("train_seconds",)


def metric_column(tap: str, metric: str) -> str:
    return f"{tap}/{metric}"


def result_columns() -> list[str]:
    """Every column of results.csv, in order."""
    metric_columns = [metric_column(tap, metric) for tap in TAPS for metric in METRICS]
    return [*CONFIG_COLUMNS, *metric_columns, *ACCURACY_COLUMNS, *EXTRA_COLUMNS]


# ---- rank correlations ------------------------------------------------------------------------------
def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they occupy ([10, 20, 20] -> [1, 2.5, 2.5])."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        shared = (start + end) / 2 + 1  # mean of the 1-based positions start+1 .. end+1
        for position in range(start, end + 1):
            ranks[order[position]] = shared
        start = end + 1
    return ranks


def _finite_pairs(x: Sequence[float], y: Sequence[float]) -> tuple[list[float], list[float]]:
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if math.isfinite(float(a)) and math.isfinite(float(b))]
    return [a for a, _ in pairs], [b for _, b in pairs]


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    mean_x, mean_y = sum(x) / n, sum(y) / n
    cov = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y))
    var_x = sum((a - mean_x) ** 2 for a in x)
    var_y = sum((b - mean_y) ** 2 for b in y)
    if var_x == 0 or var_y == 0:
        return math.nan  # a constant variable has no ranking to agree with
    return cov / math.sqrt(var_x * var_y)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks (scipy.stats.spearmanr).

    Pairs with a non-finite value are dropped; NaN if fewer than 2 pairs remain or either side is constant.
    """
    x, y = _finite_pairs(x, y)
    if len(x) < 2:
        return math.nan
    return _pearson(average_ranks(x), average_ranks(y))


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (scipy.stats.kendalltau's default), which corrects for ties on either side:

        tau_b = (concordant - discordant) / sqrt((n0 - ties_x) * (n0 - ties_y)),  n0 = n (n - 1) / 2,

    where ties_x counts pairs tied in x (whatever y does), and likewise ties_y. Pairs with a
    non-finite value are dropped; NaN if fewer than 2 pairs remain or either side is constant.
    """
    x, y = _finite_pairs(x, y)
    n = len(x)
    if n < 2:
        return math.nan
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0:
                ties_x += 1
            if dy == 0:
                ties_y += 1
            if dx * dy > 0:
                concordant += 1
            elif dx * dy < 0:
                discordant += 1
    pairs = n * (n - 1) / 2
    denominator = math.sqrt((pairs - ties_x) * (pairs - ties_y))
    return (concordant - discordant) / denominator if denominator > 0 else math.nan


# ---- orientation and picks --------------------------------------------------------------------------
def oriented_score(metric: str, value: float) -> float:
    """The metric's value turned so that higher means "the metric predicts a better representation"."""
    direction = DIRECTIONS[metric]
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
        for metric in METRICS:
            for tap in TAPS:
                column = metric_column(tap, metric)
                scores = [oriented_score(metric, _as_float(r.get(column))) for r in members]
                used = len(_finite_pairs(scores, target)[0])
                table.append(
                    {
                        "metric": metric,
                        "tap": tap,
                        "direction": DIRECTIONS[metric],
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
        for metric in METRICS:
            for tap in TAPS:
                column = metric_column(tap, metric)
                chosen = pick(members, lambda r: oriented_score(metric, _as_float(r.get(column))))
                chosen_accuracy = _as_float(chosen[accuracy]) if chosen is not None else math.nan
                table.append(
                    {
                        "metric": metric,
                        "tap": tap,
                        "direction": DIRECTIONS[metric],
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
