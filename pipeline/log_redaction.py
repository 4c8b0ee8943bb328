"""Log records lose credentials embedded in URLs before any handler writes them.

Messages and tracebacks of the driver and of every worker (a task that failed on
``https://user:pass@host/...`` is logged by distributed with its exception) go through
:func:`pipeline.io.fs.redact`; what the pipeline prints itself is redacted where it is
written (the CLI's streams).
"""

from __future__ import annotations

import logging

from .io.fs import redact

LOGGERS = ("", "distributed", "dask")


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def install() -> None:
    """Add the filter to every handler of the root, distributed and dask loggers (once)."""
    import distributed  # noqa: F401  (configures its handlers on import: filter those too)

    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
