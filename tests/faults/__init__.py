"""Fault-injection scenarios: kill, graceful stop, database outage,
hostile upstream, replicas. Each ends with :func:`tests.faults.audit.audit`."""
