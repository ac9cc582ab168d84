"""Who a process is, on Linux, beyond its pid: the host it runs on and its start time.

A pid is reused once its process is gone, so a pid alone never names a process for long. The
pair (pid, start time in clock ticks since boot, field 22 of ``/proc/<pid>/stat``) does, for
the life of the machine; the host name says which machine. A worker records its identity with
its running set (activity.py) and ``rl chaos`` signals a pid only while both still match.
Elsewhere than Linux the start time is unknown (0) and nothing can be matched.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

__all__ = ["children", "identity", "matches", "start_ticks"]

PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def start_ticks(pid: int) -> int:
    """The process's start time (clock ticks after boot), or 0 if there is no such process."""
    fields = _stat_fields(pid)
    # After the name: state (field 3) ... starttime (field 22), so index 22 - 3.
    return int(fields[19]) if fields and len(fields) > 19 else 0


def identity(pid: int | None = None) -> dict[str, str]:
    """This process's identity (or ``pid``'s): what a worker records with its lease."""
    pid = os.getpid() if pid is None else pid
    return {"pid": str(pid), "host": socket.gethostname(), "start": str(start_ticks(pid))}


def matches(recorded: dict[str, str]) -> bool:
    """Whether a recorded identity is a process alive now on this host (same pid, same start)."""
    try:
        pid, start = int(recorded["pid"]), int(recorded["start"])
    except (KeyError, TypeError, ValueError):
        return False
    if recorded.get("host") != socket.gethostname() or start <= 0:
        return False
    return start_ticks(pid) == start


def children(pid: int) -> list[int]:
    """The pids of a process's children (its pool processes, for a prefork worker)."""
    found = []
    for entry in PROC.iterdir() if PROC.is_dir() else []:
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            # ppid is field 4: index 1 after the name.
            if fields and len(fields) > 1 and fields[1] == str(pid):
                found.append(int(entry.name))
    return sorted(found)
