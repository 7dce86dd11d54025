"""The pluggy plugin manager. Each consumer asks for the one hook it needs: its built-in module is
registered then, third parties (the `orpo_plugin` entry-point group) once, on first use.
Looking up a loss therefore never imports the GGUF architectures, nor formats the exporter."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache

import pluggy

from orpo_plugin.core import hookspecs

ENTRY_POINT_GROUP = hookspecs.PROJECT

pm = pluggy.PluginManager(hookspecs.PROJECT)
pm.add_hookspecs(hookspecs)
_getters: list = []


@cache
def _load_third_parties() -> None:
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)


def registered(hook_name: str, builtin: str) -> Callable[[], dict]:
    """A cached getter of {name: item} over one hook, with the module `builtin` registered first."""

    @cache
    def get() -> dict:
        if pm.get_plugin(builtin) is None:
            pm.register(importlib.import_module(builtin), name=builtin)
        _load_third_parties()
        items: dict = {}

        def register(item):
            if item.name in items:
                raise ValueError(f"orpo_plugin: two plugins register {item.name!r}; names must be unique")
            items[item.name] = item

        getattr(pm.hook, hook_name)(register=register)
        return items

    _getters.append(get)
    return get


def refresh() -> None:
    """Forget the cached registrations (after pm.register / pm.unregister)."""
    for get in _getters:
        get.cache_clear()
