"""Where things live: the repository's configs and models, and the per-user state/cache directory."""

from __future__ import annotations

import os
from pathlib import Path

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
