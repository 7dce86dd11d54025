"""The one base of every expected error: bad input, a missing package, a file that is not what it
should be. Each entry point (`orpo …`, `axolotl merge-and-quantize`) turns it into one line on
stderr and exit status 1; anything else is a bug and keeps its traceback.

ORPO_DEBUG=1 shows the traceback of expected errors too."""

from __future__ import annotations

import os


class OrpoError(Exception):
    """An expected error; its message names the file, row, field or key and says how to fix it."""


def debugging() -> bool:
    """ORPO_DEBUG set to anything but empty or 0: expected errors keep their traceback."""
    return os.environ.get("ORPO_DEBUG", "") not in ("", "0")
