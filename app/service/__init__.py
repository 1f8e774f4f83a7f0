"""The service around the API: its lifespan (pools, the run schedule, runs on
demand), how a run is executed and stopped (a ``kasparro etl run`` child), the
live events fan-out and the kept ``/data`` pages. Knows nothing of HTTP."""
