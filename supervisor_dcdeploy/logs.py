"""structlog set-up: key=value (or JSON with DCDEPLOY_LOG_FORMAT=json) on stderr."""

from __future__ import annotations

import logging
import os
import sys

import structlog


class _StderrLogger:
    """Writes each line to ``sys.stderr`` as it is *when the line is written*.

    ``PrintLoggerFactory(file=sys.stderr)`` binds the stream of the moment ``configure``
    runs; when a caller swaps ``sys.stderr`` (pytest's capture, a tool embedding the CLI)
    and closes it later, every later log line would raise ``ValueError`` on a closed file.
    """

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = err = critical = fatal = exception = msg


def configure(level: str = "info") -> None:
    renderer = (structlog.processors.JSONRenderer()
                if os.environ.get("DCDEPLOY_LOG_FORMAT") == "json"
                else structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True))
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars,
                    structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info,
                    renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)),
        logger_factory=lambda *args: _StderrLogger(),
        cache_logger_on_first_use=True,
    )
    # kazoo logs through the standard library: keep its warnings, on stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
