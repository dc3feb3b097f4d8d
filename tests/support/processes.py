"""A test's view of a process in /proc."""
from __future__ import annotations

from pathlib import Path


def state(pid: int) -> str:
    """The process's state letter from /proc/PID/stat ("Z": a zombie), or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    return state(pid) not in ("Z", "")
