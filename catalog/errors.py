"""Errors raised by the catalogue package: one root, typed subclasses that carry their data."""
from __future__ import annotations


class CatalogError(Exception):
    """Root of every error raised by :mod:`catalog`."""


class WeightsUnavailableError(CatalogError):
    """Pretrained weights could not be obtained; the message says what to do instead."""


class CatalogFileError(CatalogError):
    """A catalogue file is missing, unreadable, or not a shelfmatch catalogue."""


class FingerprintMismatchError(CatalogError):
    """The model at hand does not reproduce the vector space the catalogue was built in."""


class ImageRejected(CatalogError):
    """An image cannot be used; ``reason`` is a stable code (see :class:`RejectReason`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PlanogramError(CatalogError):
    """A planogram cannot be used; ``reason`` is a stable code (see ``catalog.planogram.PlanogramReason``),
    bounded, so it can label a metric."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = str(reason)
