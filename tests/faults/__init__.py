"""Fault-injection scenarios (issue 6): kill, graceful stop, database outage,
hostile upstream, replicas. Each ends with :func:`tests.faults.audit.audit`."""
