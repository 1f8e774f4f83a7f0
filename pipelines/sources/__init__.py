"""Readers, one module per source kind; each yields chunks for the runner."""
