"""Ingestion: sources, transformation, drift detection and the run loop."""
