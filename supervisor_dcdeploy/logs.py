"""structlog set-up: key=value (or JSON with DCDEPLOY_LOG_FORMAT=json) on stderr."""

from __future__ import annotations

import logging
import os
import sys

import structlog


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
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # kazoo logs through the standard library: keep its warnings, on stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
