"""Where things live: the repository's configs and models, and the per-user state/cache directory."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
MODELS = REPO_ROOT / "models"


def cache_dir() -> Path:
    """The per-user directory for run state that must survive a fresh work tree.

    Returns
    -------
    Path
        ``$NANOSEG_CACHE``, else ``$XDG_CACHE_HOME/nanoseg``, else ``~/.cache/nanoseg`` (not created).
    """
    base = os.environ.get("NANOSEG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanoseg"
    )
    return Path(base)


def resolve_config(name_or_path: str | os.PathLike[str], kind: str) -> Path:
    """A config file given as a path, or as a bare name under ``configs/<kind>/``.

    Parameters
    ----------
    name_or_path : str or PathLike
        A ``.yaml``/``.yml`` path or an existing file, else a name such as ``cpu_default``.
    kind : str
        The ``configs/`` subdirectory to look in (``training``, ``daemon``, ``synthetic``...).

    Returns
    -------
    Path
        The path as given, or ``configs/<kind>/<name>.yaml``.

    Raises
    ------
    FileNotFoundError
        If the name is not a config of that kind (the message lists the known ones).
    """
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    candidate = CONFIGS / kind / f"{p.name}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(q.stem for q in (CONFIGS / kind).glob("*.yaml"))
    raise FileNotFoundError(f"no {kind} config {str(name_or_path)!r}; known: {', '.join(known)}")


class NotRegularFile(OSError):
    """A path that names a directory, FIFO, socket or device where a file's contents are wanted;
    ``strerror`` says which (``"a FIFO, not a regular file"``)."""


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in words (for error messages)."""
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for binary reading, refused at once unless it is a regular file.

    A FIFO or a device would block the reader for ever (no writer, no end of file): the path is
    ``stat``-ed first and such a file is never opened; the opened file is checked again
    (``fstat``, opened non-blocking) in case it was replaced in between.

    Parameters
    ----------
    path : str or PathLike

    Returns
    -------
    BinaryIO
        The open file (blocking reads), to be closed by the caller.

    Raises
    ------
    NotRegularFile
        If ``path`` (after symlinks) is a directory, FIFO, socket or device.
    FileNotFoundError, OSError
        If it does not exist or cannot be opened.
    """
    def check(mode: int) -> None:
        if not stat.S_ISREG(mode):
            kind = _file_kind(mode)
            raise NotRegularFile(errno.EINVAL, kind if kind.endswith("regular file") else f"{kind}, not a regular file",
                                 str(path))

    check(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        check(os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")
