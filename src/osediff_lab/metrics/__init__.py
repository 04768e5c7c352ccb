"""The paper's evaluation protocol over pyiqa, fed from the offline weights cache."""

from osediff_lab.data.images import load_image01
from osediff_lab.metrics.images import center_crop
from osediff_lab.metrics.suite import (
    MetricDef,
    MetricError,
    MetricSuite,
    Unavailable,
    availability,
    metric_defs,
)

__all__ = ["MetricDef", "MetricError", "MetricSuite", "Unavailable", "availability", "center_crop", "load_image01", "metric_defs"]
