"""ORPO preference fine-tuning as an Axolotl plugin.

    plugins:
      - orpo_plugin.OrpoPlugin
    rl: orpo_plugin
    orpo_alpha: 0.1
    datasets:
      - path: data/prefs.jsonl
        ds_type: json
        type: orpo_plugin.preference

Importing this package is cheap: the Axolotl-facing names (OrpoPlugin, OrpoArgs, the
`preference` dataset strategy, PreferenceLoss) load on first access, so `orpo` commands and
third-party plugins that only need the core never import Axolotl or torch.
"""

from importlib import import_module

from orpo_plugin.core.formats import Pair, PreferenceFormat
from orpo_plugin.core.hookspecs import hookimpl

_LAZY = {
    "OrpoPlugin": "orpo_plugin.plugin",
    "OrpoArgs": "orpo_plugin.args",
    # `type: orpo_plugin.preference`: Axolotl resolves dataset strategies as <module>.<function>.
    "preference": "orpo_plugin.datasets",
    "PreferenceLoss": "orpo_plugin.losses",
}
__all__ = ["OrpoArgs", "OrpoPlugin", "Pair", "PreferenceFormat", "PreferenceLoss", "hookimpl", "preference"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'orpo_plugin' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
