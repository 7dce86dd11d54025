"""Moved to `orpo_plugin.core.formats`; this path stays for format plugins written against it."""

from orpo_plugin.core.formats import *  # noqa: F403
