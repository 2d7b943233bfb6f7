"""Framework-agnostic representation monitoring, in one import (the names users import from here).

The pieces live in their own modules: :mod:`reprmetrics.taps` (taps, hooks),
:mod:`reprmetrics.views` (``reduce`` functions, view layouts), :mod:`reprmetrics.registry` (metric
names, defaults, directions), :mod:`reprmetrics.metric_set` (several metrics in one pass per batch),
:mod:`reprmetrics.train_window` (which training steps capture), :mod:`reprmetrics.tracker` (schedule,
counts, results) and :mod:`reprmetrics.results` (what one computation gives).
"""

from reprmetrics._warnings import register_library_dir, user_stacklevel, warn
from reprmetrics.metric_set import MetricSet
from reprmetrics.registry import (
    MONITOR_MAX_SAMPLES,
    MetricSpec,
    MonitorConfigurationError,
    available_metrics,
    check_metric_names,
    default_metrics,
)
from reprmetrics.results import CaptureReport, TrackerResult
from reprmetrics.taps import Tap
from reprmetrics.tracker import DEFAULT_MIN_SAMPLES, RepresentationTracker
from reprmetrics.views import VIEW_LAYOUTS, first_token, flatten_output, group_views

__all__ = [
    "DEFAULT_MIN_SAMPLES",
    "MONITOR_MAX_SAMPLES",
    "VIEW_LAYOUTS",
    "CaptureReport",
    "MetricSet",
    "MetricSpec",
    "MonitorConfigurationError",
    "RepresentationTracker",
    "Tap",
    "TrackerResult",
    "available_metrics",
    "check_metric_names",
    "default_metrics",
    "first_token",
    "flatten_output",
    "group_views",
    "register_library_dir",
    "user_stacklevel",
    "warn",
]
