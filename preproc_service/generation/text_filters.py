"""Filters over streamed text that must see across chunk boundaries."""

from __future__ import annotations

import re

from splitserve_common.errors import InvalidArgument


class StopMatcher:
    """Finds stop strings in streamed text, even when one spans several chunks.

    `feed` returns the text that is safe to emit: anything that could still be the start
    of a stop string is held back until the next chunk decides. Once a stop string is
    found the text before it is returned, `stopped` is set and the stop is never emitted.
    """

    def __init__(self, stops):
        stops = list(stops)
        if any(not s for s in stops):
            raise InvalidArgument("stop strings must not be empty")
        self.stops = stops
        self.pending = ""
        self.stopped = ""  # the stop string found

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        found = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if found:
            index, self.stopped = min(found)
            out, self.pending = self.pending[:index], ""
            return out
        hold = self._held_suffix()
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def _held_suffix(self) -> int:
        """Length of the longest suffix of pending text that begins some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if stop.startswith(self.pending[-n:]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class WhitespaceCollapser:
    """Streaming `re.sub(r"\\s+", " ", text).strip()` (MLflow's collapse_whitespace)."""

    def __init__(self):
        self.started = False
        self.space_pending = False

    def feed(self, text: str) -> str:
        out = []
        for run in re.findall(r"\s+|\S+", text):
            if run.isspace():
                self.space_pending = self.started
            else:
                if self.space_pending:
                    out.append(" ")
                out.append(run)
                self.started, self.space_pending = True, False
        return "".join(out)
