"""Where the package keeps its on-disk caches (converted bundled model, rewrite caches)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "TRL_SELFDISTILL_CACHE"


def default_cache_dir() -> Path:
    """Return the root cache directory of the package (not created).

    Resolution order: ``$TRL_SELFDISTILL_CACHE``, then ``$XDG_CACHE_HOME/trl_selfdistill``, then
    ``~/.cache/trl_selfdistill``.
    """
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "trl_selfdistill"
