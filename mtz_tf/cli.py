"""What the absl binaries share: user errors as one line on stderr, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app

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


def run(main: Callable) -> None:
    """``absl.app.run(main)``, printing a user error as ``<binary>: error: <message>`` on
    one line of stderr and exiting with status 2."""

    def guarded(argv):
        try:
            return main(argv)
        except USER_ERRORS as error:
            message = " ".join(str(error).split()) or type(error).__name__
            name = os.path.basename(sys.argv[0]) or "mtz_tf"
            print(f"{name}: error: {message}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    app.run(guarded)
