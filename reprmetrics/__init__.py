"""reprmetrics: representation-quality metrics as streaming, DDP-correct torchmetrics Metrics.

Functions live in :mod:`reprmetrics.functional`; Lightning callbacks in :mod:`reprmetrics.callbacks`
(installed with the ``lightning`` extra). This package itself never imports lightning.
"""

from reprmetrics.spectral import AlphaReQ, RankMe

__version__ = "0.1.0"

__all__ = ["AlphaReQ", "RankMe", "__version__"]
