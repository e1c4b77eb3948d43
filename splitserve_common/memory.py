"""Handing memory that the C allocator holds free back to the system (glibc's malloc_trim).

glibc's malloc keeps freed blocks in its arenas for reuse. Tensors of many different shapes (each
forward pass of the dynamic batcher has its own rows x length) free blocks of many sizes, and once
a large block is freed glibc raises its mmap threshold (dynamically, up to 32 MiB), so later tensors
come from the arenas as well and fragment them. Measured with all-MiniLM-L6-v2 on 2 forward threads
(varied shapes): the memory in use stayed flat (~130 MiB, mallinfo2) while the arenas held more and
more of it free (120 -> 275 MiB over 500 passes); malloc_trim(0) brought RSS back to its start.
A fixed mmap threshold (`MALLOC_MMAP_THRESHOLD_`, which also stops the dynamic raise) keeps RSS flat
too, but maps and faults in every tensor over the threshold again: 30 % more CPU per forward pass at
128 KiB. Trimming at most once per interval, after work, costs a few milliseconds per interval.

Where there is no glibc (musl, macOS, Windows) releasing does nothing.

What the trim cannot give back is memory still in use. oneDNN (torch's CPU kernels for GELU,
convolutions, and generation's linear products) keeps every kernel it builds in caches keyed by the tensor
shapes, 1,024 entries each unless told otherwise, so each new rows x length of the batcher left one more
JIT-compiled GELU kernel behind (~27 KiB in use), each new prefill row count ~0.55 MiB: `bound_onednn_cache`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

from splitserve_common import metrics
from splitserve_common.settings import Option, positive_int, seconds


def _load_malloc_trim():
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # no glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def can_release() -> bool:
    return _MALLOC_TRIM is not None


def release_free_memory() -> bool:
    """Free pages anywhere in the allocator's heaps go back to the system (RSS drops); False where unsupported."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


class MemoryReleaser:
    """Releases free memory `interval` seconds after work, on a thread of its own: at most once per
    interval under steady load, and once after the last work when it stops (by then the answers built
    from it are gone too). `worked()` is cheap: call it after each unit of work, from any thread.
    `interval` 0 (or no glibc): never."""

    def __init__(self, interval: float, name: str = "memory-release"):
        self.interval = interval
        self.releases = 0
        self._worked = threading.Event()
        self._closed = threading.Event()
        self._thread = None
        if interval > 0 and can_release():
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    @property
    def active(self) -> bool:
        return self._thread is not None

    def worked(self) -> None:
        if self._thread is not None:
            self._worked.set()

    def _run(self) -> None:
        while True:
            self._worked.wait()
            self._worked.clear()  # work while we wait below asks for the next release
            if self._closed.wait(self.interval):
                return
            release_free_memory()
            self.releases += 1

    def close(self) -> None:
        self._closed.set()
        self._worked.set()



def release_memory_option(default: float = 1.0) -> Option:
    return Option("release-memory-seconds", default, "after work, hand memory the C allocator holds free back to "
                  "the system at most this often (glibc malloc_trim: buffers of ever-changing sizes fragment its "
                  "heaps and RSS grows without it); 0: never", seconds)


ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
IDEEP_CACHE_VARIABLE = "LRU_CACHE_CAPACITY"  # torch's oneDNN wrapper (ideep), for its linear/matmul operators


def bound_onednn_cache(entries: int) -> None:
    """At most `entries` (>= 1) oneDNN kernels stay cached, in oneDNN's primitive cache and in torch's
    wrapper around it (ideep, which keeps its own per shape for linear products); least recently used
    go first. Both read their bound once, when they first build a kernel: call this before the process's
    first forward pass. (ideep crashes with a bound of 0.)

    Measured in process (bench/NOTES.md, "oneDNN's caches of kernels per shape"), memory in use after a
    trim: all-MiniLM-L6-v2, forward passes of random shapes: 131 -> 140 MiB from pass 100 to 600 (97 ->
    444 distinct shapes) with oneDNN's default of 1,024, flat at 130 MiB bounded to 64; GELU alone over
    new shapes: +27 KiB each, level from the 1,024th shape on (+28 MiB in use, +38 MiB RSS). The linear
    product generation runs on oneDNN (model_service/matmuls.py): +0.55 MiB per new row count (0.27 of it
    ideep's), up to ~550 MiB at 1,024 entries; +0 bounded. The six layers' GELUs of one pass share a
    shape, so a miss costs one kernel build (~0.3 ms) per pass.
    """
    os.environ[ONEDNN_CACHE_VARIABLE] = str(entries)
    os.environ[IDEEP_CACHE_VARIABLE] = str(entries)


def onednn_cache_option(default: int = 64) -> Option:
    return Option("onednn-cache-entries", default, "most oneDNN kernels (CPU kernels built per tensor shape: GELU, "
                  "convolutions, generation's linear products) kept cached; sets "
                  f"{ONEDNN_CACHE_VARIABLE} and {IDEEP_CACHE_VARIABLE}, whose own 1,024 let the memory in use grow "
                  "with each new batch shape (up to ~0.5 MiB each)", positive_int)


def release_after_calls(releaser: MemoryReleaser) -> metrics.ObservingInterceptor:
    """A grpc.aio server interceptor: each call's end (its answer built) counts as work for `releaser`."""
    def wrap(behavior, _method):
        return metrics.observed(behavior, lambda _request, _context: None,
                                lambda _state, _context, _error: releaser.worked())

    return metrics.ObservingInterceptor(wrap)
