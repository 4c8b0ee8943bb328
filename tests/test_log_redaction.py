"""Log records of the driver and the workers lose credentials embedded in URLs."""

from __future__ import annotations

import io
import logging

from pipeline.log_redaction import RedactingFilter, install


def test_messages_arguments_and_tracebacks_are_redacted() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("reading %s", "https://ann:hunter2@host.org/a.tif")
        try:
            raise FileNotFoundError("s3://KEY:s3cr3t@bucket/x.tif")
        except FileNotFoundError:
            logger.exception("task failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "hunter2" not in text and "s3cr3t" not in text
    assert "https://***@host.org/a.tif" in text and "FileNotFoundError: s3://***@bucket/x.tif" in text


def test_install_filters_distributed_handlers_once() -> None:
    handler = logging.StreamHandler(io.StringIO())  # as distributed's logging configuration adds one
    logging.getLogger("distributed").addHandler(handler)
    try:
        install()
        install()
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    finally:
        logging.getLogger("distributed").removeHandler(handler)
