"""Pure functions: tensors in, tensor out. The definitions of every metric live here."""

from reprmetrics.functional.collapse import normalized_std
from reprmetrics.functional.intrinsic_dimension import (
    ldreg_regularizer,
    local_intrinsic_dimension,
    mle_dimension,
    twonn_dimension,
)
from reprmetrics.functional.isotropy import isoscore, sigreg, wasserstein_uniformity
from reprmetrics.functional.multiview import alignment, lidar, uniformity
from reprmetrics.functional.similarity import cka, linear_cka
from reprmetrics.functional.spectral import (
    alpha_req,
    alpha_req_fit,
    coding_rate,
    eigenspectrum,
    nesum,
    rankme,
    rankme_diagnostics,
    singular_values,
)

__all__ = [
    "alignment",
    "alpha_req",
    "alpha_req_fit",
    "cka",
    "coding_rate",
    "eigenspectrum",
    "isoscore",
    "ldreg_regularizer",
    "lidar",
    "linear_cka",
    "local_intrinsic_dimension",
    "mle_dimension",
    "nesum",
    "normalized_std",
    "rankme",
    "rankme_diagnostics",
    "sigreg",
    "singular_values",
    "twonn_dimension",
    "uniformity",
    "wasserstein_uniformity",
]
