"""Atomic writes for the whole project: one helper that every module and binary uses.

A file or directory written here appears complete under its final name, or not at all, and
the version it replaces stays readable until the new one is in place:

* the new content is staged beside the target, in the target's own parent (a rename is
  atomic only within one file system), under a name ``.<target>.mtz-staging-<pid>-<random>``;
* a file then replaces its target with one ``rename``; a directory is swapped with an
  existing target by one ``renameat2(RENAME_EXCHANGE)`` (Linux), so there is no moment at
  which neither version exists. Where the kernel or file system cannot exchange, the old
  directory is first renamed to ``.<target>.mtz-previous`` and :func:`staged_directory`
  puts it back if a kill left the target missing;
* staging entries left by a killed process (its pid no longer runs) are removed by the next
  write to the same target;
* the result honours the process umask (temporary files are created 0600 and directories
  0700, so the mode is set explicitly before the rename).

A target whose parent is not writable is refused before anything is staged, with an error
that names the directory. Code that must write inside a writable directory whose parent is
read-only (a checkpoint directory) stages its entries inside that directory instead: the
staged entry's parent is then the directory itself (see :mod:`mtz_tf.checkpoint`).

Under a multi-worker strategy only the chief writes to the real path; the other workers
write the same content to private scratch directories and remove them
(:mod:`mtz_tf.distribution`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
from collections.abc import Iterator

import keras

from mtz_tf import distribution

STAGING_MARK = ".mtz-staging-"
"""Part of the name of every staged (not yet renamed) entry."""

PREVIOUS_MARK = ".mtz-previous"
"""Suffix of the name an old directory is parked under when no atomic exchange exists."""

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(path: str) -> None:
    """Gives ``path`` (and, for a directory, everything in it) the modes that plain
    ``open``/``mkdir`` would have given under the current umask."""
    mask = _umask()
    if not os.path.isdir(path):
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, directories, files in os.walk(path):
        for name in directories:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _writable_parent(path: str) -> str:
    """The absolute parent of ``path``, created if missing; refused unless writable."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise PermissionError(
            f"Cannot create directory {parent!r} to write {path!r}: {error.strerror}. "
            "Choose an output path in a writable directory."
        ) from None
    if not os.path.isdir(parent):
        raise NotADirectoryError(
            f"Cannot write {path!r}: {parent!r} exists and is not a directory."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"Cannot write {path!r}: directory {parent!r} is not writable. Choose an output "
            "path in a writable directory."
        )
    return parent


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def clean_stale(directory: str, base: str = "") -> list[str]:
    """Removes the staging entries in ``directory`` (of target ``base``, or of every
    target) left by processes that no longer run.

    Returns:
        The removed paths.
    """
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    prefix = f".{base}{STAGING_MARK}" if base else "."
    for name in names:
        if not name.startswith(prefix) or STAGING_MARK not in name:
            continue
        pid = name.split(STAGING_MARK, 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _pid_running(int(pid)):
            _remove(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
    return removed


def _staging_path(path: str, suffix: str = "") -> str:
    parent, base = os.path.split(os.path.abspath(path))
    name = f".{base}{STAGING_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    return os.path.join(parent, name)


@contextlib.contextmanager
def staged_file(path: str) -> Iterator[str]:
    """Yields a path to write ``path``'s new content to; on success it replaces ``path``.

    The staged name keeps ``path``'s extension (Keras checks ``.keras``). On an exception
    the staged file is removed and ``path`` is left as it was. A non-chief worker of a
    multi-worker strategy writes to a private scratch copy instead, removed afterwards
    (:mod:`mtz_tf.distribution`).
    """
    if not distribution.is_chief():
        with distribution.worker_scratch() as scratch:
            yield os.path.join(scratch, os.path.basename(path))
        return
    _writable_parent(path)
    clean_stale(*os.path.split(os.path.abspath(path)))
    staging = _staging_path(path, os.path.splitext(path)[1])
    try:
        yield staging
        if not os.path.exists(staging):
            raise FileNotFoundError(f"Nothing was written to the staging file for {path!r}.")
        _apply_umask(staging)
        _fsync(staging)
        os.replace(staging, path)
    finally:
        if os.path.lexists(staging):
            _remove(staging)


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps the directory entries ``a`` and ``b``; False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), b)


def _restore_previous(path: str) -> None:
    """Puts back a directory parked by an interrupted non-atomic swap (module docstring)."""
    previous = _previous_path(path)
    if os.path.isdir(previous):
        if os.path.lexists(path):
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.rename(previous, path)


def _previous_path(path: str) -> str:
    parent, base = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{base}{PREVIOUS_MARK}")


def _swap_into_place(staging: str, path: str) -> None:
    if not os.path.lexists(path):
        os.rename(staging, path)
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise FileExistsError(f"{path!r} exists and is not a directory; it was not replaced.")
    if _exchange(staging, path):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old version
        return
    previous = _previous_path(path)
    os.rename(path, previous)
    os.rename(staging, path)
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(path: str) -> Iterator[str]:
    """Yields an empty directory to fill; on success it replaces directory ``path``.

    An existing ``path`` stays whole until the swap, which is atomic where Linux's
    ``renameat2`` exchange is available (module docstring). On an exception the staging
    directory is removed and ``path`` is left as it was. A non-chief worker of a
    multi-worker strategy fills a private scratch directory instead, removed afterwards
    (:mod:`mtz_tf.distribution`).
    """
    if not distribution.is_chief():
        with distribution.worker_scratch() as scratch:
            staging = os.path.join(scratch, os.path.basename(path))
            os.mkdir(staging)
            yield staging
        return
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path!r} exists and is not a directory; it was not replaced.")
    _writable_parent(path)
    _restore_previous(path)
    clean_stale(*os.path.split(os.path.abspath(path)))
    staging = _staging_path(path)
    os.mkdir(staging)
    try:
        yield staging
        _apply_umask(staging)
        _swap_into_place(staging, path)
    finally:
        if os.path.lexists(staging):
            _remove(staging)


def save_model(model: keras.Model, path: str) -> None:
    """Saves ``model`` to ``path`` (``.keras``), atomically."""
    if not str(path).endswith(".keras"):
        raise ValueError(f"Model paths must end in '.keras'. Received: {path!r}")
    with staged_file(path) as staging:
        model.save(staging)


def write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path``, atomically."""
    with staged_file(path) as staging, open(staging, "w") as f:
        f.write(text)


def write_json(path: str, value) -> None:
    """Writes ``value`` as indented JSON to ``path``, atomically."""
    write_text(path, json.dumps(value, indent=2) + "\n")


def save_figure(figure, path: str, **kwargs) -> None:
    """Saves a Matplotlib ``figure`` to ``path`` (format from the extension), atomically."""
    extension = os.path.splitext(path)[1].lstrip(".") or "png"
    with staged_file(path) as staging:
        figure.savefig(staging, format=extension, **kwargs)


def read_json(path: str):
    """Reads a JSON file, with an error that names a missing or damaged file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No JSON file at {path!r}.")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path!r} is not valid JSON (truncated or edited?): {error}."
            ) from None


def load_model(path: str) -> keras.Model:
    """Loads a ``.keras`` model, with an error that names a missing or wrong path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model file at {path!r}; expected a '.keras' file.")
    return keras.saving.load_model(path)
