"""ORPO preference fine-tuning as an Axolotl plugin.

    plugins:
      - orpo_plugin.OrpoPlugin
    rl: orpo_plugin
    orpo_alpha: 0.1
    datasets:
      - path: data/prefs.jsonl
        ds_type: json
        type: orpo_plugin.preference
"""

from orpo_plugin.args import OrpoArgs
from orpo_plugin.datasets import preference
from orpo_plugin.formats import Pair, PreferenceFormat
from orpo_plugin.hookspecs import hookimpl
from orpo_plugin.losses import PreferenceLoss
from orpo_plugin.plugin import OrpoPlugin

# `type: orpo_plugin.preference`: Axolotl resolves dataset strategies as <module>.<function>.
__all__ = ["OrpoArgs", "OrpoPlugin", "Pair", "PreferenceFormat", "PreferenceLoss", "hookimpl", "preference"]
