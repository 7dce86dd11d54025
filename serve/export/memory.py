"""Peak resident memory of this process (Linux: VmHWM, which clear_refs resets; elsewhere the
process's maximum so far), for the export's stage table and the quantizer child's report, and of
this process with its children together (TreePeak, sampled)."""

from __future__ import annotations

import contextlib
import os
import resource
import threading
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


def _rss(pid: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _children(pid: str) -> list[str]:
    found = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += (task / "children").read_text().split()
    return found


def tree_rss(pid: str | None = None) -> int:
    """Resident bytes of a process and all its descendants now (Linux; 0 elsewhere)."""
    pid = pid or str(os.getpid())
    return _rss(pid) + sum(tree_rss(child) for child in _children(pid))


class TreePeak:
    """The largest resident set of this process and its children together, sampled every
    `every` seconds while the block runs (children that run beside this process's own work)."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._done = every, 0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss())
            if self._done.wait(self.every):
                return

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
