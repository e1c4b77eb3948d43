"""Bulk work at a lower CPU priority: on Linux each thread is a task with its own nice value.

The services run large requests' work (preproc's tokenizing of large requests, model_service's passes
for long requests) on threads of their own whose nice value is raised once, when the thread starts:
while they compete with a small request's threads for the cores, the kernel gives the small one most
of the time (at nice 10 a thread weighs about a tenth of one at nice 0). An unprivileged process can
raise a thread's nice value but never lower it again, so these threads only ever run bulk work.
"""

from __future__ import annotations

import logging
import os
import threading

from splitserve_common.errors import ConfigurationError

log = logging.getLogger(__name__)

MAX_NICE = 19


def check_nice(flag: str, nice: int) -> None:
    if not 0 <= nice <= MAX_NICE:
        raise ConfigurationError(f"--{flag} must be 0-{MAX_NICE} (a thread's nice value can only be raised), "
                                 f"not {nice}")


def raise_thread_nice(nice: int) -> None:
    """Raise the calling thread's nice value by `nice` (0: leave it). Where that is impossible (not Linux,
    a sandbox refusing it) the thread keeps its priority and a warning says so."""
    if not nice:
        return
    try:
        thread = threading.get_native_id()  # PRIO_PROCESS with a thread's id names that thread alone (Linux)
        os.setpriority(os.PRIO_PROCESS, thread, min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, thread) + nice))
    except (OSError, AttributeError) as exc:
        log.warning("thread %s keeps its CPU priority: %s", threading.current_thread().name, exc)


def thread_nice(native_id: int) -> int:
    """A thread's nice value (Linux), for tests and logs."""
    return os.getpriority(os.PRIO_PROCESS, native_id)
