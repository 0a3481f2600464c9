"""What the absl binaries share: user errors as one line on stderr, not a traceback, and
quiet output: their own progress lines, TensorFlow's and absl's INFO chatter only when asked
for with ``--verbosity=1``."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags
from absl import logging as absl_logging

from mtz_tf import distribution, progress
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

flags.DEFINE_enum(
    "strategy",
    "default",
    list(distribution.STRATEGIES),
    "tf.distribute strategy: default (none), mirrored (this machine's GPUs), multi_worker "
    "(the cluster in TF_CONFIG; start one process per worker, only the chief writes) or "
    "one_device.",
)

logger = logging.getLogger("mtz_tf.experiments")
"""The binaries' own progress messages, routed with the library's (:func:`route_output`)."""

NOISY_LOGGERS = ("tensorflow", "absl", "keras")
"""Python loggers of the frameworks underneath, whose INFO lines (SavedModel "Assets
written", checkpoint sharding, signature renaming) bury the binaries' progress."""


def route_output(verbosity: int) -> None:
    """Routes messages by absl's ``--verbosity``: mtz_tf's progress as plain lines on
    stderr (at 0, the default: information; at 1 or more: debugging too; below 0: warnings
    only), and the frameworks' Python loggers (:data:`NOISY_LOGGERS`) at WARNING unless
    ``verbosity`` ≥ 1 asks for their INFO lines (then at INFO). TensorFlow's C++ log is set by the
    ``TF_CPP_MIN_LOG_LEVEL`` environment variable before TensorFlow loads (the Makefile
    sets 2: warnings and errors hidden)."""
    level = logging.DEBUG if verbosity >= 1 else logging.INFO if verbosity == 0 else logging.WARNING
    progress.show(level)
    framework_level = logging.WARNING if verbosity < 1 else logging.INFO
    if verbosity < 1:
        absl_logging.set_verbosity(absl_logging.WARNING)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(framework_level)


def own_flags() -> dict:
    """{name: value} of the flags the running binary defines itself (absl files a script's
    flags under ``sys.argv[0]`` as typed, which ``__file__`` is not: it is absolute)."""
    return {f.name: f.value for f in flags.FLAGS.get_key_flags_for_module(sys.argv[0])}


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
    """``absl.app.run(main)`` with output routed by ``--verbosity`` (:func:`route_output`),
    ``main`` run inside the scope of the ``--strategy`` every binary takes
    (:func:`mtz_tf.distribution.make_strategy`, created before any other TensorFlow work),
    printing a user error (a bad flag, or one of
    :data:`USER_ERRORS` from ``main``) as ``<binary>: error: <message>`` on one line of
    stderr and exiting with status 2."""
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["strategy"])

    def guarded(argv):
        route_output(flags.FLAGS.verbosity)
        try:
            strategy = distribution.make_strategy(flags.FLAGS.strategy)
            with strategy.scope():
                if flags.FLAGS.strategy != "default":
                    logger.info(
                        "Strategy %s: %d replica(s) in sync; this process is %s%s.",
                        flags.FLAGS.strategy,
                        strategy.num_replicas_in_sync,
                        distribution.worker_name(),
                        ""
                        if distribution.is_chief()
                        else " (not the chief: its writes go to scratch copies, then removed)",
                    )
                return main(argv)
        except USER_ERRORS as error:
            _fail(str(error) or type(error).__name__)

    app.run(guarded, flags_parser=_parse_flags)
