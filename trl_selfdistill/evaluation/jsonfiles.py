"""The benchmark's small JSON files (records, settings, cached results): read if there, written whole or not at all."""

from __future__ import annotations

import json
import os
from typing import Any

from ..files import atomic_file


def read_json(path: str) -> dict[str, Any] | None:
    """The file's JSON value, or None if there is no such file; a damaged file is an error naming it."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is damaged ({error}). Delete it and rerun: what it recorded is computed again."
            ) from None


def write_json(path: str, value: dict[str, Any], indent: int = 2) -> None:
    """Writes `value` to `path` whole or not at all (see `trl_selfdistill.files`)."""
    with atomic_file(path) as handle:
        json.dump(value, handle, indent=indent)
