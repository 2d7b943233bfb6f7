"""Shared test helpers: a persistent DDP process pool, float64 references and metric checks."""
