"""The one timer: steps run interleaved, round by round, in a rotating order.

Running every candidate once per round (instead of all rounds of one, then the next) spreads
slow drifts of the machine (frequency, other processes, cache state) over all of them, and
rotating the order removes the advantage of running first or last in a round. Garbage
collection is off while timing: a collection inside one timed call would bias that candidate.
Used by ``bench/`` (kernels and whole models) and ``ocrnet bench``.
"""

from __future__ import annotations

import gc
import time
from typing import Callable, Mapping

__all__ = ["time_interleaved"]


def time_interleaved(steps: Mapping[str, Callable[[int], object]], rounds: int, warmup: int,
                     sync: Callable[[], None] = lambda: None, *,
                     before: Callable[[str], None] | None = None,
                     after: Callable[[str], None] | None = None,
                     progress: Callable[[int, int], None] | None = None
                     ) -> dict[str, list[float]]:
    """Seconds of every call of every step.

    Args:
        steps: name -> ``step(round_index)``; warm-up rounds pass their own index too.
        rounds: timed rounds; each runs every step once, the order shifted by one per round.
        warmup: untimed rounds first (in the given order).
        sync: waits for the device (``torch.cuda.synchronize``); runs before and after every
            timed call.
        before, after: ``hook(name)`` around every timed call, outside the timed interval
            (peak-memory counters, for one).
        progress: ``progress(done, rounds)`` after every timed round.

    Returns:
        name -> ``rounds`` durations in seconds, in round order.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"time_interleaved: rounds must be >= 1 and warmup >= 0, got "
                         f"{rounds} and {warmup}")
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup):
        for name in names:
            steps[name](i)
    sync()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                if before is not None:
                    before(name)
                sync()
                start = time.perf_counter()
                steps[name](r)
                sync()
                times[name].append(time.perf_counter() - start)
                if after is not None:
                    after(name)
            if progress is not None:
                progress(r + 1, rounds)
    finally:
        gc.enable()
    return times
