"""How a long data job reports on itself: a throttled progress meter and the peak memory of a process.

Why a module of its own: the generator and both importers stream millions of rows for minutes, and a run
that says nothing for that long looks hung; each had its own hand-rolled meter. One meter, time-throttled
so that a fast job does not flood the log and a slow one still speaks every ``every_s`` seconds, serves
them all (and later progress bars). ``enabled=False`` drops its lines to DEBUG rather than silencing them,
so ``-v`` still shows them.

The peak RSS is what the importers promise to bound (``docs/method.md §6``); it is logged and stored in
``stats.json`` so a regression in memory shows up in the data set it produced.
"""

from __future__ import annotations

import logging
import resource
import time

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Progress:
    """Counts work done out of ``total`` and logs ``what: done/total unit (rate)`` at most every ``every_s``.

    ``log`` is the caller's logger, so a line names the module whose work it reports, not this one.
    """

    def __init__(
        self,
        what: str,
        total: int,
        enabled: bool,
        *,
        unit: str = "lines",
        every_s: float = PROGRESS_EVERY_S,
        log: logging.Logger | None = None,
    ) -> None:
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.level = logging.INFO if enabled else logging.DEBUG
        self.log = log or logger
        self.t0 = self.last = time.perf_counter()
        self.done = 0

    def step(self, n: int) -> None:
        """Adds ``n`` units of work; logs a progress line when ``every_s`` has passed since the last one."""
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self.log.log(
                self.level,
                "%s: %d/%d %s (%.0f %s/s)",
                self.what,
                self.done,
                self.total,
                self.unit,
                self.done / (now - self.t0),
                self.unit,
            )

    def finish(self) -> float:
        """Logs the total and the mean rate; returns the seconds since the meter started."""
        dt = time.perf_counter() - self.t0
        self.log.log(
            self.level,
            "%s: %d %s in %.1fs (%.0f %s/s)",
            self.what,
            self.done,
            self.unit,
            dt,
            self.done / max(dt, 1e-9),
            self.unit,
        )
        return dt
