"""Peak resident memory of this process (Linux: VmHWM, which clear_refs resets; elsewhere the
process's maximum so far), for the export's stage table and the quantizer child's report."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path


def reset_peak() -> None:
    """Start a new peak measurement where the system allows it (Linux: clear_refs 5)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """Bytes."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
