"""Logging of every entry point: each message once in the console and once in the run's log file.

Hydra configures the handlers (conf/hydra/default.yaml, `job_logging`): INFO to stdout, warnings and
errors to stderr as `warning: ...` / `error: ...`, everything to `<run folder>/<entry>.log`. The
filters here drop what users should not have to read (advertisements, a deprecation warning of a
library's internals) and keep records meant only for the log file (a traceback Hydra already prints)
out of the console. `setup()` then routes the libraries that bring their own console handler
(Lightning) through those handlers and sends Python warnings to the log.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

# Third-party lines with nothing for a user to act on.
NOISE = (
    re.compile(r"Tip: .*litlogger", re.S),  # Lightning's advertisement for its cloud logger
    re.compile(r"isinstance\(treespec, LeafSpec\)` is deprecated"),  # Lightning's internals vs torch 2.9+
)
# Warnings (category, message regex) silenced at the source, before they reach any handler.
IGNORED_WARNINGS = ((FutureWarning, NOISE[1].pattern), (DeprecationWarning, NOISE[1].pattern))
# Loggers of libraries that attach a console handler of their own on import (Lightning always does).
OWN_HANDLER_LOGGERS = (
    "lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric",
)  # fmt: skip
FILE_ONLY = "file_only"  # `extra={FILE_ONLY: True}`: for the log file, not the console


class DropNoise(logging.Filter):
    """Drops third-party records listed in NOISE (every handler uses it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in NOISE)


class ConsoleFilter(DropNoise):
    """The console's records: no noise, and nothing marked FILE_ONLY."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, FILE_ONLY, False) and super().filter(record)


class BelowWarning(logging.Filter):
    """stdout takes DEBUG and INFO; stderr takes the rest, so nothing is printed twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


class ProblemFormatter(logging.Formatter):
    """`error: <message>` / `warning: <message>`: how command-line tools report problems on stderr."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def adopt_library_loggers() -> None:
    """Send the records of libraries with their own console handler (Lightning adds one on import) to
    the root's handlers only: otherwise each of their lines prints twice. Call after importing them."""
    for name in OWN_HANDLER_LOGGERS:
        if name not in logging.Logger.manager.loggerDict:
            continue
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # not a FileHandler someone added on purpose
                logger.removeHandler(handler)
        logger.propagate = True


def setup() -> None:
    """For an entry point, once Hydra has configured logging: warnings go to the log (once each), the
    NOISE warnings nowhere, and library loggers through the root's handlers."""
    for category, pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    logging.captureWarnings(True)
    adopt_library_loggers()


def shows_problems() -> bool:
    """Whether a root handler prints warnings and errors on the console (false when a user turned
    Hydra's job logging off: then an entry point prints its error itself)."""
    return any(isinstance(h.formatter, ProblemFormatter) for h in logging.getLogger().handlers)


def report_error(logger: logging.Logger, message: str) -> None:
    """An error a user can fix: `error: <message>` on stderr and, with the same words, in the run's log."""
    if shows_problems():
        logger.error(message)
        return
    print(f"error: {message}", file=sys.stderr)
    if logging.getLogger().handlers:  # e.g. a log file only (with none, Python's last resort would print)
        logger.error(message, extra={FILE_ONLY: True})
