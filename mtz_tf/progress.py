"""Where mtz_tf's progress messages go: the ``mtz_tf`` logger.

Every module logs to ``logging.getLogger(__name__)``, a child of ``mtz_tf``, so progress
(one line per zipped unit, a resumed checkpoint, a share allocation) reaches whatever the
application configured for Python's :mod:`logging`, and nothing is printed otherwise
(the package's logger has only a ``NullHandler``, as Python's logging guide asks of
libraries). :func:`show` is the one-call way to see the messages as plain lines; the
absl binaries call it through :func:`mtz_tf.cli.run` with their ``--verbosity``. Keras
progress bars (training, retraining) are Keras's own and follow each call's ``verbose``.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("mtz_tf")
logger.addHandler(logging.NullHandler())


class _PlainFormatter(logging.Formatter):
    """Information as the bare message; warnings and errors prefixed by their level."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def show(level: int = logging.INFO, stream=None) -> logging.Handler:
    """Prints mtz_tf's messages of ``level`` and above on ``stream`` (default stderr), one
    plain line each, instead of passing them to the root logger.

    Calling it again replaces the handler it installed before (it never stacks them).

    Args:
        level: int, a :mod:`logging` level: ``logging.INFO`` for progress lines,
            ``logging.WARNING`` for warnings only, ``logging.DEBUG`` for everything.
        stream: a text stream, or None for ``sys.stderr`` at the time of each message.

    Returns:
        The installed ``logging.Handler``.

    Example:
        >>> import logging, mtz_tf
        >>> mtz_tf.progress.show(logging.INFO)  # "[zip 1/2] fc1: shared 300/300, ..."
    """
    for handler in list(logger.handlers):
        if getattr(handler, "_mtz_tf_show", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(_PlainFormatter())
    handler._mtz_tf_show = True
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stderr`` is when a message is emitted (pytest and
    notebooks swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stderr)
        super().emit(record)
