"""HTTP controllers, one module per domain: system, data, runs, quality."""
