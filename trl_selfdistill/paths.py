"""Where the package keeps its on-disk caches (converted bundled model, rewrite caches) and finds its bundled files."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

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


def bundled_resource(name: str) -> Traversable:
    """A file shipped in the package's `resources/` folder (data, licenses, the model card template)."""
    return importlib.resources.files("trl_selfdistill").joinpath("resources", name)
