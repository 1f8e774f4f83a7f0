"""Bad inputs and what the pipeline must make of them (see cases.py)."""
