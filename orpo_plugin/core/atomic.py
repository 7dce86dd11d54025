"""The one way the project writes a file or a directory: under a temporary name beside the final
one, renamed when complete, so nothing half-written is ever left under a final name."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

SUFFIX = ".partial"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(final: str | Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `final` to write a file or a directory into. When the block
    ends without an error it takes the final name, replacing what was there; with keep_existing an
    existing `final` wins instead (several processes writing the same content). On any error the
    temporary is removed. The temporary name carries the process id, so concurrent writers never
    share one."""
    final = Path(final)
    tmp = final.with_name(f"{final.name}.{os.getpid()}{SUFFIX}")
    _remove(tmp)
    try:
        yield tmp
        if keep_existing and final.exists():
            return
        if tmp.is_dir() and final.is_dir() and not keep_existing:
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (keep_existing and final.exists()):  # another writer got there first
                raise
    finally:
        _remove(tmp)


@contextlib.contextmanager
def scratch_path(directory: str | Path, name: str) -> Iterator[Path]:
    """A temporary file `name` in `directory` for the duration of the block, removed when it ends
    (error and Ctrl-C included), and by remove_stale after a process that was killed."""
    path = Path(directory) / f"{name}.{os.getpid()}{SUFFIX}"
    _remove(path)
    try:
        yield path
    finally:
        _remove(path)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(directory: str | Path, names) -> list[Path]:
    """Remove what atomic_path and scratch_path left in `directory` for these final names when their
    process was killed (SIGKILL, power loss): `{name}.{pid}.partial...` of a pid that no longer runs.
    Nothing else is touched."""
    removed = []
    for path in Path(directory).glob(f"*{SUFFIX}"):
        for name in names:
            pid = path.name[len(name) + 1 :].split(".", 1)[0] if path.name.startswith(f"{name}.") else ""
            if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
                _remove(path)
                removed.append(path)
                break
    return removed


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(data, indent=indent))
