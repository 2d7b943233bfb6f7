"""Kept for imports of the earlier name: the bounded uniform sample lives in :mod:`reprmetrics.statistics`."""

from reprmetrics.statistics import BoundedSample as BoundedSampleMetric

__all__ = ["BoundedSampleMetric"]
