"""Logging for the layerline processes: `--log-level`, and `--log-format json` for one JSON object per line
(time, level, logger, message, and the session / stage / peer a record is about, where it says)."""

from __future__ import annotations

import datetime
import json
import logging
import sys

FIELDS = ("session", "stage", "peer")  # passed as `extra=` by the code that logs


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tags = [f"{name}={getattr(record, name)}" for name in FIELDS if getattr(record, name, None) is not None]
        return f"{text} [{' '.join(tags)}]" if tags else text


def setup(level: str = "WARNING", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, str(level).upper(), logging.WARNING))
