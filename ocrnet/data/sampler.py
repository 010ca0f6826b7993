"""The training sampler: deterministic global batches, independent of the number of processes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .datasets import TransformedDataset

__all__ = ["GlobalBatchSampler", "epoch_keyed"]


class GlobalBatchSampler:
    """Infinite, deterministic batches of ``(epoch, index)`` keys for one process.

    The global sample stream is the concatenation of per-epoch permutations
    (``numpy.random.default_rng([seed, epoch]).permutation(n)``, an epoch spanning batch
    boundaries like mmengine's ``InfiniteSampler``); iteration ``t`` takes the global batch at
    stream positions ``[t * G, (t + 1) * G)`` with ``G = batch * world``, and rank ``r`` its
    slice ``[r * batch, (r + 1) * batch)``. The stream depends on (n, seed, G) only, so the
    per-rank split of a global batch does not change which images an iteration sees, and
    restarting at ``start_iter`` continues exactly where a run stopped.
    """

    def __init__(self, n: int, batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                 start_iter: int = 0, shuffle: bool = True):
        if n < 1 or batch < 1 or not 0 <= rank < world or start_iter < 0:
            raise ValueError(f"GlobalBatchSampler: need n >= 1, batch >= 1, 0 <= rank < world "
                             f"and start_iter >= 0, got n={n} batch={batch} rank={rank} "
                             f"world={world} start_iter={start_iter}")
        self.n, self.batch, self.rank, self.world = n, batch, rank, world
        self.seed, self.start_iter, self.shuffle = seed, start_iter, shuffle

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = self.batch * self.world
        epoch, off = divmod(self.start_iter * g, self.n)
        order = self._order(epoch)
        lo, hi = self.rank * self.batch, (self.rank + 1) * self.batch
        while True:
            keys = []
            for _ in range(g):
                if off == self.n:
                    epoch, off = epoch + 1, 0
                    order = self._order(epoch)
                keys.append((epoch, int(order[off])))
                off += 1
            yield keys[lo:hi]


def epoch_keyed(base):
    """A :class:`ocrnet.data.TransformedDataset` indexed by ``(epoch, index)``: the sample is
    transformed with ``default_rng([seed, epoch, index])``, TransformedDataset's own rule, but
    without shared ``set_epoch`` state (a global batch may straddle two epochs, and DataLoader
    workers hold copies)."""

    class _EpochKeyed(TransformedDataset):
        def __getitem__(self, key):
            epoch, index = key
            rng = np.random.default_rng([self.seed, int(epoch), int(index)])
            img, label, meta = self.dataset[index]
            return self.pipeline(img, label, meta, rng)

    return _EpochKeyed(base.dataset, base.pipeline, base.seed)
