"""Quiet native logging for the binaries; import it before anything loads TensorFlow.

TensorFlow's C++ code writes straight to file descriptor 2, and part of it before its own
log level applies: "WARNING: All log messages before absl::InitializeLog() is called are
written to STDERR", "I0000 ... cudart_stub.cc] Could not find cuda drivers", "E0000 ...
failed call to cuInit" on a machine without a GPU, and TFLite's "INFO: Created TensorFlow
Lite XNNPACK delegate". Importing this module, unless ``--verbosity`` (``-v``) of 1 or more
is on the command line:

* sets ``TF_CPP_MIN_LOG_LEVEL=2`` when the environment does not set it (TensorFlow's C++
  INFO and WARNING lines hidden once its logging starts);
* passes descriptor 2 through a filter that drops the lines above (:data:`NOISE`) and
  forwards every other line at once. Python's ``sys.stderr`` keeps writing to the real
  descriptor, so the binaries' own progress and errors never wait in the filter.

At exit the real descriptor is put back and the filter drains.
"""

import atexit
import os
import re
import sys
import threading

NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|INFO: Created TensorFlow Lite XNNPACK delegate"
    rb"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] "
    rb"|E\d{4} [\d:.]+ +\d+ cuda_\w+\.cc:\d+\] (failed call to cuInit|retrieving CUDA)"
    rb"|To enable the following instructions: .* rebuild TensorFlow)"
)
"""Native lines that say nothing a user of the binaries can act on."""


def _verbosity(argv: list[str]) -> int:
    """The ``--verbosity``/``-v`` value on the command line (0 when absent or unreadable)."""
    for index, arg in enumerate(argv):
        for flag in ("--verbosity", "-v"):
            value = None
            if arg.startswith(flag + "="):
                value = arg[len(flag) + 1 :]
            elif arg == flag and index + 1 < len(argv):
                value = argv[index + 1]
            if value is not None:
                try:
                    return int(value)
                except ValueError:
                    return 0
    return 0


def _filter_descriptor_2() -> None:
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr.flush()
    sys.stderr = open(os.dup(real), "w", buffering=1, encoding="utf-8", errors="replace")

    def forward():
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not NOISE.match(line):
                    os.write(real, line)

    pump = threading.Thread(target=forward, name="native-stderr-filter", daemon=True)
    pump.start()

    def restore():
        os.dup2(real, 2)  # closes the pipe's last write end: the filter reads EOF and drains
        pump.join(timeout=5)

    atexit.register(restore)


if _verbosity(sys.argv[1:]) < 1:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _filter_descriptor_2()
