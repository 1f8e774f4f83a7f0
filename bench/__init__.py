"""``make bench``: Kasparro's ingestion and read figures beside baselines measured in the same run.

Entry point: ``python -m bench.run`` (``--help`` lists the options). The minimal
correct reference loader is the standalone script ``bench/reference.py``.
"""
