"""Whether a process of this machine still runs, and a tag naming this machine's processes.

Used to tell what a killed process left behind (a temporary file, a Dagster run still marked
started) from what a live one is still working on. A process id means something only on the
machine, and in the process namespace, that issued it: `machine_tag` names both, so a file
written by another machine (a shared data folder) is never judged by this one's process table.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket

# Process start times from /proc are in clock ticks, so compare with a little slack.
_START_TIME_SLACK_S = 2.0


def process_alive(pid: int, seen_at: float | None = None) -> bool:
    """Whether process `pid` exists here (owned by anyone). Signal 0 only checks; none is sent.

    `seen_at`: a time (epoch seconds) at which the process we mean was known to run (a file it
    wrote, an event it logged). A process with that id that started later is another one that
    reused the id, so ours is gone. Where the start time cannot be read (not Linux), the id
    alone decides.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    if seen_at is not None:
        started = process_start_time(pid)
        if started is not None and started > seen_at + _START_TIME_SLACK_S:
            return False
    return True


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (epoch seconds), from Linux's /proc; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read()
        with open("/proc/stat", encoding="ascii") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime "))
        # Field 22 (starttime, in clock ticks after boot); the command name (field 2) may hold
        # spaces and parentheses, so count from the last ')'.
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


@functools.cache
def machine_tag() -> str:
    """8 hex digits naming this host and its process namespace (containers on one host that
    share a hostname still differ)."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:  # not Linux: the hostname alone
        namespace = ""
    return hashlib.blake2b(
        f"{socket.gethostname()}/{namespace}".encode(), digest_size=4
    ).hexdigest()
