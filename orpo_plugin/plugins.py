"""The pluggy plugin manager: built-ins first, then third parties from entry points."""

from __future__ import annotations

import importlib
from functools import cache

import pluggy

from orpo_plugin import hookspecs

ENTRY_POINT_GROUP = "orpo_plugin"
DEFAULT_PLUGINS = ("orpo_plugin.formats", "orpo_plugin.losses", "serve.architectures")

pm = pluggy.PluginManager("orpo_plugin")
pm.add_hookspecs(hookspecs)


@cache
def _load_plugins() -> None:
    """On first use, not at import: a third-party plugin imports orpo_plugin itself, and training
    should not pay for importing the export side (gguf)."""
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)


def _collect(hook) -> dict:
    _load_plugins()
    items: dict = {}

    def register(item):
        if item.name in items:
            raise ValueError(f"orpo_plugin: two plugins register {item.name!r}; names must be unique")
        items[item.name] = item

    hook(register=register)
    return items


@cache
def get_formats() -> dict:
    return _collect(pm.hook.register_formats)


@cache
def get_losses() -> dict:
    return _collect(pm.hook.register_losses)


@cache
def get_architectures() -> dict:
    return _collect(pm.hook.register_architectures)


def refresh() -> None:
    """Forget the cached registrations (after pm.register / pm.unregister)."""
    for getter in (get_formats, get_losses, get_architectures):
        getter.cache_clear()
