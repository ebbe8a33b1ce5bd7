"""Log setup for `gptserve serve`: plain text lines, or one JSON object per line.

Logs go to stderr. The start-up summary (where the server listens, what it serves) goes to stdout
through its own logger, at every log level, so scripts can wait for it; in json mode it is a JSON
object like every other line.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}

STARTUP_LOGGER = "gptserve.startup"  # the summary line on stdout
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info", log_format: str = "text") -> None:
    """Send every logger (uvicorn's and Python's warnings included) to stderr in one format."""
    is_json = log_format == "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if is_json else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.captureWarnings(True)  # warnings.warn(...) lines become log records too

    startup_handler = logging.StreamHandler(sys.stdout)
    startup_handler.setFormatter(
        JsonFormatter() if is_json else logging.Formatter("gptserve: %(message)s")
    )
    startup = logging.getLogger(STARTUP_LOGGER)
    startup.handlers[:] = [startup_handler]
    startup.setLevel(logging.INFO)
    startup.propagate = False
