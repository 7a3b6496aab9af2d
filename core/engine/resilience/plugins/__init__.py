"""Error detectors shipped with the package (see :mod:`core.engine.resilience.classification`)."""
