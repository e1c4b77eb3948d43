"""How many torch intra-op threads a repeated forward pass uses (generation steps, the batcher's lone passes):
fixed, or chosen by measuring the passes (lone passes choose between all threads and a worker's share).

A decode step is ~100 small operators; with several intra-op threads each one ends in a barrier
where the threads wait for each other. On an idle node that splits the matrix products across
the cores; on a node whose cores are shared with other busy processes (preproc_service, the
client, other services) a thread that lost its core holds every barrier up: measured on 2
shared cores, GPT-2-small-sized decode steps of 32 rows took 1.4-4x the wall time and
1.4-10x the CPU with 2 threads than with 1 (bench/NOTES.md). Neither choice is right on every
node, so by default the loop measures: it runs with the current choice and every `period`
steps tries the other for `probe` steps, then keeps whichever cost less per row.

Only steps of like sizes are compared: a decode step reads every weight once whatever its rows,
so its cost per row falls as rows join. Comparing whole probes (before) kept 1 thread on
bench_generation's first wave, 32-row probe steps against 1-2-row steps on 2 threads (4.2 against
19.1 ms per row), and the stack ran at 112-119 tokens/s against 172-178 with this rule and 182-213
with 2 threads fixed (32 streams, shared machine, bench/NOTES.md stop 20).

The generation steps interleave their probes: a probe step, a step on the current count, the next probe
step, ..., each probe compared with the steps just before and after it. Probing 4 steps in a row, each
against the last steps before the probe, compared different minutes: the first probe of
bench_generation's first wave ran right after the 31 joining rows' first tokens had gone out (the client
and preproc_service busy on the same cores during the steps before it) and kept 1 thread on an idle
node ("0.81-0.85 times the cost per unit with 2") where 2 gave 380 against 280 tokens/s (bench/NOTES.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time

import torch

log = logging.getLogger(__name__)


class StepThreads:
    def __init__(self, available: int, fixed: int = 0, period: int = 48, probe: int = 4, margin: float = 0.9,
                 fewest: int = 1, start_with_fewest: bool = False, what: str = "generation steps",
                 alike: float = 1.25, history: int = 8, interleave: bool = False):
        """`available`: the worker's threads; `fixed` > 0 pins the count, 0 chooses between `fewest` and
        `available` (the batcher's lone forward passes choose between a forward worker's share and all),
        starting with `available` unless `start_with_fewest`; `what` names them in the log. A probe step
        is compared with the step of the nearest size among the last `history` on the current count, and
        only when their sizes differ by at most the factor `alike`. With `interleave`, probe steps alternate with
        steps on the current count and each is compared with its neighbours (the generation steps: see below)."""
        self.what = what
        self.choices = [fixed] if fixed else sorted({max(1, min(fewest, available)), max(1, available)})
        self.current = self.choices[0 if start_with_fewest else -1]
        self.period, self.probe, self.margin, self.alike, self.history = period, probe, margin, alike, history
        self._since_probe = period - probe  # the first probe comes early
        self._recent: list[tuple[int, float]] = []  # (units, seconds per unit) of the last steps on `current`
        self._probing: list[tuple[int, float]] | None = None  # the same, of the steps on the other choice
        self._ratios: list[float] = []  # a probe step's cost per unit over that of a like step on `current`
        self.interleave = interleave
        self._awaiting: tuple[int, float] | None = None  # interleaved: the last probe step, until its follower

    @property
    def _other(self) -> int:
        return self.choices[0] if self.current == self.choices[-1] else self.choices[-1]

    def threads(self) -> int:
        """The thread count for the next step."""
        if self._probing is None or self._awaiting is not None:
            return self.current
        return self._other

    def record(self, seconds: float, units: int) -> None:
        """One step of `units` rows (or tokens) took `seconds` on threads() threads."""
        if len(self.choices) == 1 or units <= 0:
            return
        cost = seconds / units
        if self._probing is None:
            self._recent = (self._recent + [(units, cost)])[-self.history:]
            self._since_probe += 1
            if self._since_probe >= self.period and len(self._recent) >= self.probe:
                self._probing, self._ratios = [], []
            return
        if self.interleave:
            if self._awaiting is None:  # a probe step: compared once the step on `current` after it is in
                self._awaiting = (units, cost)
                self._probing.append((units, cost))
                self._conclude()
                return
            probe, self._awaiting = self._awaiting, None
            neighbours = [self._recent[-1], (units, cost)]  # the steps on `current` just before and after it
            self._recent = (self._recent + [(units, cost)])[-self.history:]
            likes = [c for u, c in neighbours if max(u, probe[0]) <= self.alike * min(u, probe[0])]
            if likes:
                self._ratios.append(probe[1] / statistics.geometric_mean(likes))
        else:
            self._probing.append((units, cost))
            like = min(self._recent, key=lambda step: abs(math.log(step[0] / units)))
            if max(like[0], units) <= self.alike * min(like[0], units):
                self._ratios.append(cost / like[1])
        self._conclude()

    def _conclude(self) -> None:
        """End a probe with enough ratios (switching when the other count cost less), or after too many steps."""
        if len(self._ratios) >= self.probe:
            ratio = statistics.median(self._ratios)
            if ratio < self.margin:
                log.info("%s now use %d torch thread(s): %.2f times the cost per unit with %d", self.what,
                         self._other, ratio, self.current)
                self.current = self._other
                self._recent = self._probing[-self.history:]
            self._probing, self._awaiting, self._since_probe = None, None, 0
        elif len(self._probing) >= 3 * self.probe and self._awaiting is None:
            self._probing, self._since_probe = None, 0  # the sizes moved meanwhile: no verdict, keep the count

    @contextlib.contextmanager
    def step(self, rows: int):
        """Run a block (on the worker thread) with threads() intra-op threads; time it for `rows` rows
        (0: run it so, record nothing). The worker's own count is restored afterwards."""
        before = torch.get_num_threads()
        threads = self.threads()
        if threads != before:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        try:
            yield
        finally:
            if rows:
                self.record(time.perf_counter() - start, rows)
            if threads != before:
                torch.set_num_threads(before)
