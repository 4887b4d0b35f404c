"""Worker processes that die with their parent, so a killed job (even ``kill -9``) leaves no orphans behind.

Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` makes the kernel kill the worker when its parent goes. Elsewhere (or if
prctl is unavailable) a daemon thread polls the parent pid once a second and exits the worker when it changed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
WATCH_INTERVAL_S = 1.0


def die_with_parent(parent_pid: int) -> str:
    """Call first thing in a worker (a pool initializer); returns the mechanism used (``prctl`` or ``watchdog``)."""
    if sys.platform.startswith("linux") and _set_pdeathsig():
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
        return "prctl"
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watchdog", daemon=True).start()
    return "watchdog"


def _set_pdeathsig() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(WATCH_INTERVAL_S)
        if os.getppid() != parent_pid:
            os._exit(1)
