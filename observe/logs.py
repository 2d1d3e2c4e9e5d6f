"""One logging set-up for every command, text or JSON lines (``POLOS_LOG_FORMAT``).

Records carry ``execution_id``, ``project_id`` and ``queue_name`` when the code
that logs knows them: either as ``extra={...}`` on the call, or for a whole
task through ``log_context(...)`` (a context variable, so an asyncio task and
what it awaits see its own values and no other task's).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import orjson

from observe.settings import ObserveSettings

CONTEXT_FIELDS = ("execution_id", "project_id", "queue_name", "workflow_id")
_NONE: Mapping[str, str] = MappingProxyType({})
_context: ContextVar[Mapping[str, str]] = ContextVar("polos_log_context", default=_NONE)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def bind(**fields: str | None) -> None:
    """Add fields to the current context for good (a task that ends with its work)."""
    current = _context.get()
    _context.set({**current, **{k: v for k, v in fields.items() if v is not None}})


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Add fields to every record logged inside the block (in this task)."""
    current = _context.get()
    token = _context.set({**current, **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = dict(_context.get())
    for name in CONTEXT_FIELDS:
        value = record.__dict__.get(name)
        if value is not None:
            fields[name] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the context, the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: a field someone passed in extra= never breaks a log line.
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """The readable line, with the context appended when there is one."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _fields(record)
        if not fields:
            return text
        suffix = " ".join(f"{k}={v}" for k, v in fields.items())
        head, sep, tail = text.partition("\n")  # keep a traceback below the line
        return f"{head} [{suffix}]{sep}{tail}"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to ``sys.stderr`` as it is at each record (a test may have swapped it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(settings: ObserveSettings, *, level: str | None = None) -> None:
    """Configure the root logger for the whole process (what each ``main`` calls).

    Called again (a command run in process, as tests do), it replaces its own
    handler and leaves any other in place.
    """
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _StderrHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel((level or settings.log_level).upper())
