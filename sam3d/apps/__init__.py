"""Bundle glue, one module (or package) per bundle: datasets, datalists and what else
only that bundle needs (shared engine pieces live in :mod:`sam3d.engine`)."""
