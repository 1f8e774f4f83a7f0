"""Ingestion: sources, transformation, drift detection and the run loop."""

import observability  # noqa: F401  (structlog first, without rich: see there)
