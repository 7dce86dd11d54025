"""ORPO preference fine-tuning as an Axolotl plugin.

    plugins:
      - orpo_plugin.OrpoPlugin
    rl: orpo_plugin
    orpo_alpha: 0.1
"""

from orpo_plugin.args import OrpoArgs
from orpo_plugin.plugin import OrpoPlugin

__all__ = ["OrpoArgs", "OrpoPlugin"]
