"""When this process started, for the time a user waited (``extract``'s summary).

Linux: from ``/proc/self/stat`` (start time in clock ticks since boot, field 22) and
``/proc/uptime``, so interpreter start-up and every import count too. Elsewhere: the time this
module was first imported, with the CLI modules (torch and timm load later, in commands).
"""

from __future__ import annotations

import os
import time

_IMPORTED = time.time()


def process_started() -> float:
    """``time.time()`` at process start (10 ms resolution on Linux)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        # Fields after the command name, which is in parentheses and may contain spaces.
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED
    return min(time.time() - age, _IMPORTED)
