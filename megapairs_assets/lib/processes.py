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


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists here (owned by anyone). Signal 0 only checks; none is sent."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


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
