"""Lightning callbacks, installed and imported as ``reprmetrics.callbacks`` (needs the ``lightning`` extra)."""
