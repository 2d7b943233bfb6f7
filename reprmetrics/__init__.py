"""reprmetrics: representation-quality metrics as streaming, DDP-correct torchmetrics Metrics.

Functions live in :mod:`reprmetrics.functional`; Lightning callbacks in :mod:`reprmetrics.callbacks`
(installed with the ``lightning`` extra). This package itself never imports lightning.
"""

from reprmetrics.collapse import NormalizedStd
from reprmetrics.evaluate import evaluate
from reprmetrics.intrinsic_dimension import LocalIntrinsicDimension, MLEDimension, TwoNN
from reprmetrics.isotropy import IsoScore, SIGReg, WassersteinUniformity
from reprmetrics.multiview import Alignment, LiDAR, Uniformity
from reprmetrics.similarity import LinearCKA, MinibatchCKA
from reprmetrics.spectral import AlphaReQ, CodingRate, NESum, RankMe

__version__ = "0.1.0"

__all__ = [
    "Alignment",
    "AlphaReQ",
    "CodingRate",
    "IsoScore",
    "LiDAR",
    "LinearCKA",
    "LocalIntrinsicDimension",
    "MLEDimension",
    "MinibatchCKA",
    "NESum",
    "NormalizedStd",
    "RankMe",
    "SIGReg",
    "TwoNN",
    "Uniformity",
    "WassersteinUniformity",
    "__version__",
    "evaluate",
]
