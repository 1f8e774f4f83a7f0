"""Errors of the ingestion side, one root type so callers can catch them all."""

from __future__ import annotations


class KasparroError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(KasparroError):
    """Bad configuration: a setting or the sources file is unusable.

    The message names the setting and is shown to the user as one line.
    """


class SourceError(KasparroError):
    """A source could not be read; the message is one line for the run record."""


class InjectedFailure(KasparroError):
    """The controlled mid-run failure requested by ``ETL_FAIL_AFTER_RECORDS``."""

    def __init__(self) -> None:
        super().__init__("injected failure")


class RunRecordError(KasparroError):
    """The end of a run could not be recorded (the database went away)."""


class DatabaseUnavailableError(KasparroError):
    """The database cannot be reached or dropped the connection."""
