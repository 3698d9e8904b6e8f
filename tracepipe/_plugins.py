"""One loader for the registries (stages, engines, output formats).

Each registry is a package whose modules register themselves when imported; a registry asks for
them all once, the first time it is queried, instead of importing every module at start-up.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

_LOADED: set[str] = set()


def load_submodules(package: str, entry_point_group: str | None = None) -> None:
    """Import every public submodule of ``package`` (not ``_private`` ones, not ``base``) once,
    then the plugins of ``entry_point_group``. Marked loaded first, so a module that queries its
    registry while being imported does not start the loading again."""
    if package in _LOADED:
        return
    _LOADED.add(package)
    for mod in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if not mod.name.startswith("_") and mod.name != "base":
            importlib.import_module(f"{package}.{mod.name}")
    if entry_point_group:
        for ep in entry_points(group=entry_point_group):
            ep.load()
