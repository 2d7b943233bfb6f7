"""Pure functions: tensors in, tensor out. The definitions of every metric live here."""

from reprmetrics.functional.spectral import alpha_req, eigenspectrum, rankme, singular_values

__all__ = ["alpha_req", "eigenspectrum", "rankme", "singular_values"]
