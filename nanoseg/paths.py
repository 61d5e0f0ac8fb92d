"""Where things live: the repository's configs and models, and the per-user state/cache directory."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
MODELS = REPO_ROOT / "models"


def cache_dir() -> Path:
    """Run state that must survive a fresh work tree: ``$NANOSEG_CACHE`` or ``~/.cache/nanoseg``."""
    base = os.environ.get("NANOSEG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanoseg"
    )
    return Path(base)


def resolve_config(name_or_path: str | os.PathLike[str], kind: str) -> Path:
    """A config given as a path, or as a bare name looked up in ``configs/<kind>/<name>.yaml``."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    candidate = CONFIGS / kind / f"{p.name}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(q.stem for q in (CONFIGS / kind).glob("*.yaml"))
    raise FileNotFoundError(f"no {kind} config {str(name_or_path)!r}; known: {', '.join(known)}")
