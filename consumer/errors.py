"""Errors of the service: one root; a :class:`ConfigurationError` ends ``shelfmatch`` with one line
and exit code 2 (what to set or fix is in the message; the traceback only at DEBUG)."""
from __future__ import annotations


class ServiceError(Exception):
    """Root of the service's own errors."""


class ConfigurationError(ServiceError):
    """A setting, file or address is wrong: the message names it and says what to do."""
