"""Library log noise, kept to what the service does not say itself.

aiokafka logs some conditions at ERROR or WARNING on every retry: a missing topic (hundreds of
lines in half a minute), a group coordinator that a fresh broker has not elected yet. The service
reports each once, naming the setting to check (readiness, the publish retry warning), so those
library lines are lowered to DEBUG. Everything else aiokafka logs is left as it is.
"""
from __future__ import annotations

import logging
import re

# (logger name prefix, message pattern) of aiokafka lines the service reports in its own words.
REPORTED_BY_THE_SERVICE = (
    ("aiokafka", re.compile(r"not found in cluster metadata")),
    ("aiokafka", re.compile(r"GroupCoordinatorNotAvailable|Group Coordinator Request failed")),
    ("aiokafka", re.compile(r"UnknownTopicOrPartition|LEADER_NOT_AVAILABLE|LeaderNotAvailable")),
)


class LowerReported(logging.Filter):
    """Lowers aiokafka's lines about conditions the service reports itself to DEBUG (dropped
    unless DEBUG is on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        message = record.getMessage()
        for prefix, pattern in REPORTED_BY_THE_SERVICE:
            if record.name.startswith(prefix) and pattern.search(message):
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def quiet_library_logs() -> None:
    """Install :class:`LowerReported` on the root handlers (aiokafka's records reach them there)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, LowerReported) for f in handler.filters):
            handler.addFilter(LowerReported())
