"""The metric registry: every metric the tracker, :func:`reprmetrics.evaluate` and the CLI know by name.

Read from the Metric classes' own traits (``registry_name``, ``in_default_set``, ``min_features``,
``higher_is_better`` / ``healthy_value``, and the ``input_kind`` of the statistic they read), so a new
metric joins by declaring them: no edit here, in the tracker, in ``evaluate`` or in the CLI.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torchmetrics import Metric

__all__ = [
    "MONITOR_MAX_SAMPLES",
    "MetricSpec",
    "MonitorConfigurationError",
    "available_metrics",
    "check_metric_choice",
    "check_metric_names",
    "default_metrics",
    "healthy_direction",
]

# Modules whose Metric classes declare registry traits (imported once, in this order).
_METRIC_MODULES = (
    "reprmetrics.spectral",
    "reprmetrics.collapse",
    "reprmetrics.multiview",
    "reprmetrics.intrinsic_dimension",
    "reprmetrics.isotropy",
)
# The order names are reported in (logs, tables); a new metric comes after these, in discovery order.
_ORDER = (
    "rankme",
    "alpha_req",
    "normalized_std",
    "uniformity",
    "lid",
    "nesum",
    "coding_rate",
    "wasserstein_uniformity",
    "isoscore",
    "lidar",
    "alignment",
    "sigreg",
    "twonn",
    "mle_dimension",
)
# The tracker computes every validation epoch, so its point metrics keep fewer points than the Metric
# classes' one-off default (25,600): uniformity and LID cost O(N²·D) per computation.
MONITOR_MAX_SAMPLES = 8192


class MonitorConfigurationError(ValueError):
    """A tap, metric name, view layout or setting that cannot work. Framework adapters re-raise it as
    their own misconfiguration error (Lightning's ``MisconfigurationException``)."""


@dataclass(frozen=True)
class MetricSpec:
    """How to build one named metric, read from its class's traits.

    ``direction`` is the healthy direction (``"↑"``, ``"↓"``, ``"≈1"``); ``default`` whether it is in
    the default set; it is included only when the embeddings have at least ``min_features`` dimensions
    and, for ``needs_views``, 2 views.
    """

    name: str
    cls: type
    direction: str
    default: bool = True
    min_features: int = 1
    needs_views: bool = False

    def factory(self, max_samples: int = MONITOR_MAX_SAMPLES, **options: Any) -> Metric:
        """A fresh Metric; ``max_samples`` reaches the metrics that keep a bounded sample."""
        if "max_samples" in inspect.signature(self.cls.__init__).parameters:
            options.setdefault("max_samples", max_samples)
        return self.cls(**options)


def healthy_direction(cls: type) -> str:
    """``"↑"`` (higher is healthier), ``"↓"`` or ``"≈v"`` (healthy near v), from a class's traits."""
    if cls.higher_is_better is True:
        return "↑"
    if cls.higher_is_better is False:
        return "↓"
    value = getattr(cls, "healthy_value", None)
    return f"≈{value:g}" if value is not None else ""


def _registered_classes() -> list[type]:
    from reprmetrics._base import ReprMetric

    for module in _METRIC_MODULES:
        importlib.import_module(module)
    found: list[type] = []

    def walk(cls: type) -> None:
        for sub in cls.__subclasses__():
            if "registry_name" in sub.__dict__ and sub.__dict__["registry_name"] and sub not in found:
                found.append(sub)
            walk(sub)

    walk(ReprMetric)
    return sorted(
        found,
        key=lambda cls: (
            _ORDER.index(cls.registry_name) if cls.registry_name in _ORDER else len(_ORDER),
            found.index(cls),
        ),
    )


_METRICS: dict[str, MetricSpec] | None = None


def available_metrics() -> dict[str, MetricSpec]:
    """Every metric known by name: ``{name: MetricSpec}`` (default and opt-in), default ones first."""
    global _METRICS
    if _METRICS is None:
        specs = {}
        for cls in _registered_classes():
            specs[cls.registry_name] = MetricSpec(
                name=cls.registry_name,
                cls=cls,
                direction=healthy_direction(cls),
                default=bool(cls.in_default_set),
                min_features=int(cls.min_features),
                needs_views=getattr(cls, "input_kind", "points") in ("views", "pairs"),
            )
        _METRICS = {n: s for n, s in specs.items() if s.default} | {n: s for n, s in specs.items() if not s.default}
    return dict(_METRICS)


def _closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, sorted(set(candidates)), n=n, cutoff=0.5)


def check_metric_names(names: Iterable[str], owner: str = "RepresentationTracker") -> list[str]:
    """``names`` as a list, or :class:`MonitorConfigurationError` naming the closest known names."""
    known = available_metrics()
    names = list(names)
    for name in names:
        if name not in known:
            close = _closest(str(name), known)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise MonitorConfigurationError(
                f"{owner}: unknown metric {name!r}{hint} Known: {', '.join(repr(k) for k in sorted(known))}"
            )
    return names


def check_metric_choice(
    metrics: Mapping[str, Metric] | Iterable[str] | None, use_default: bool, owner: str
) -> tuple[list[str], dict[str, Metric]]:
    """A tracker's ``metrics`` as registry names and ``{name: Metric}``, checked: the names known, the
    values Metrics, and something to compute with or without the default set (``use_default``)."""
    if isinstance(metrics, str):
        metrics = [metrics]
    names = [] if metrics is None or isinstance(metrics, Mapping) else check_metric_names(metrics, owner)
    given = dict(metrics) if isinstance(metrics, Mapping) else {}
    if not use_default and not given and not names:
        raise MonitorConfigurationError(f"{owner}: no metrics to compute (default_metrics=False and no `metrics`)")
    for name, metric in given.items():
        if not isinstance(metric, Metric):
            raise MonitorConfigurationError(
                f"{owner}: metric {name!r} must be a torchmetrics.Metric, got {type(metric).__name__}"
            )
    return names, given


def default_metrics(
    num_features: int,
    num_views: int,
    max_samples: int = MONITOR_MAX_SAMPLES,
    names: Iterable[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Metric]:
    """The metrics for one tap: the default set (or ``names``) that fits ``num_features`` and ``num_views``.

    The default set: RankMe, α-ReQ (D ≥ 13), normalised std, uniformity, local intrinsic dimension,
    NESum, coding rate, Wasserstein uniformity, IsoScore, and with views LiDAR and alignment. Opt in to
    the others (SIGReg, TwoNN, MLE dimension) by name. ``options``: constructor arguments per name,
    e.g. ``{"rankme": {"diagnostics": True}}``.
    """
    specs = available_metrics()
    default = [n for n, spec in specs.items() if spec.default]
    chosen = default if names is None else check_metric_names(names, "default_metrics")
    options = options or {}
    return {
        name: specs[name].factory(max_samples, **dict(options.get(name, {})))
        for name in chosen
        if num_features >= specs[name].min_features and (num_views >= 2 or not specs[name].needs_views)
    }
