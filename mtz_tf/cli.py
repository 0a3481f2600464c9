"""What the absl binaries share: user errors as one line on stderr, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags

from mtz_tf.exporter import ParityError
from mtz_tf.retrain import RetrainingDivergedError

USER_ERRORS = (
    app.UsageError,
    ValueError,
    TypeError,
    OSError,  # FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, ...
    ParityError,
    RetrainingDivergedError,
)
"""Exceptions that bad flags, paths or data cause; anything else is a bug and keeps its
traceback."""

EXIT_USER_ERROR = 2


def _fail(message: str) -> NoReturn:
    """Prints ``<binary>: error: <message>`` as one line of stderr and exits with status 2."""
    name = os.path.basename(sys.argv[0]) or "mtz_tf"
    print(f"{name}: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an unknown flag or a bad flag value (and a missing required
    flag) reported by :func:`_fail` instead of absl's two-line "FATAL Flags parsing error"."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _fail(f"{error} (--helpshort or --helpfull lists the flags)")


def run(main: Callable) -> None:
    """``absl.app.run(main)``, printing a user error (a bad flag, or one of
    :data:`USER_ERRORS` from ``main``) as ``<binary>: error: <message>`` on one line of
    stderr and exiting with status 2."""

    def guarded(argv):
        try:
            return main(argv)
        except USER_ERRORS as error:
            _fail(str(error) or type(error).__name__)

    app.run(guarded, flags_parser=_parse_flags)
