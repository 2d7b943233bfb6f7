"""reprmetrics: representation-quality metrics as streaming, DDP-correct torchmetrics Metrics.

Functions live in :mod:`reprmetrics.functional`; Lightning callbacks in :mod:`reprmetrics.callbacks`
(installed with the ``lightning`` extra). This package itself never imports lightning.

The Metric classes and :func:`evaluate` are loaded on first use (PEP 562), so ``import reprmetrics``
and the ``reprmetrics --help`` / ``--version`` command line do not pay for importing torch and
torchmetrics (seconds on a loaded machine). ``from reprmetrics import RankMe`` works as usual.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

#: The package version: the single source, read by setuptools at build time (``pyproject.toml``,
#: ``[tool.setuptools.dynamic]``) and printed by ``reprmetrics --version``.
__version__ = "0.1.0"

# Public name -> the module that defines it. Kept equal to the TYPE_CHECKING imports below, which
# give type checkers, IDEs and the API reference (griffe reads them statically) the same names;
# tests/test_packaging.py checks that the two agree.
_LAZY: dict[str, str] = {
    "NormalizedStd": "reprmetrics.collapse",
    "evaluate": "reprmetrics.evaluate",
    "LocalIntrinsicDimension": "reprmetrics.intrinsic_dimension",
    "MLEDimension": "reprmetrics.intrinsic_dimension",
    "TwoNN": "reprmetrics.intrinsic_dimension",
    "IsoScore": "reprmetrics.isotropy",
    "SIGReg": "reprmetrics.isotropy",
    "WassersteinUniformity": "reprmetrics.isotropy",
    "Alignment": "reprmetrics.multiview",
    "LiDAR": "reprmetrics.multiview",
    "Uniformity": "reprmetrics.multiview",
    "LinearCKA": "reprmetrics.similarity",
    "MinibatchCKA": "reprmetrics.similarity",
    "AlphaReQ": "reprmetrics.spectral",
    "CodingRate": "reprmetrics.spectral",
    "NESum": "reprmetrics.spectral",
    "RankMe": "reprmetrics.spectral",
}

if TYPE_CHECKING:
    from reprmetrics.collapse import NormalizedStd
    from reprmetrics.evaluate import evaluate
    from reprmetrics.intrinsic_dimension import LocalIntrinsicDimension, MLEDimension, TwoNN
    from reprmetrics.isotropy import IsoScore, SIGReg, WassersteinUniformity
    from reprmetrics.multiview import Alignment, LiDAR, Uniformity
    from reprmetrics.similarity import LinearCKA, MinibatchCKA
    from reprmetrics.spectral import AlphaReQ, CodingRate, NESum, RankMe

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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``reprmetrics.evaluate`` the function.

    Importing the submodule ``reprmetrics.evaluate`` makes Python set the package attribute of that
    name to the submodule. With eager imports the package's own ``from reprmetrics.evaluate import
    evaluate`` ran last and rebound it to the function; loaded lazily, the submodule would win
    whenever something imported it first (the command line does), and ``reprmetrics.evaluate(z)``
    would fail depending on import order.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "evaluate" and isinstance(value, types.ModuleType):
            value = value.evaluate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
