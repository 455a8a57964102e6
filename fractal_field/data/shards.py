"""A split cut into fixed shards, each process loading only its own: [`ShardedDataset`][].

Example `i` of a split of `n` belongs to shard `i % num_shards`. Each shard draws its own
per-epoch order from `(seed, epoch, shard)`, and global batch `b` is the concatenation, in
shard order, of every shard's `b`-th slice of `batch_size // num_shards` examples. So the
global batches are a function of the seed and the number of shards alone: the same for one
process holding every shard as for `P` processes (`P` dividing `num_shards`) holding
`num_shards // P` consecutive shards each, whose local batches are consecutive slices of the
global one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np

from .dataset import ArrayDataset
from .formats import Select


def process_shards(num_shards: int, process_index: int, process_count: int) -> tuple[int, int]:
    """`(first, count)`: the consecutive shards that process `process_index` of
    `process_count` holds."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    if num_shards % process_count:
        raise ValueError(
            f"data.shards={num_shards} must be a multiple of the {process_count} processes "
            "(each process holds the same number of shards)."
        )
    count = num_shards // process_count
    return process_index * count, count


def shard_indices(n: int, *, num_shards: int, first: int = 0, count: int = 1) -> np.ndarray:
    """The examples (increasing indices in `[0, n)`) of shards `first, ..., first + count - 1`
    of a split of `n`: example `i` is in shard `i % num_shards`."""
    shard = np.arange(n) % num_shards
    return np.flatnonzero((shard >= first) & (shard < first + count))


def _shard_size(n: int, num_shards: int, shard: int) -> int:
    return len(range(shard, n, num_shards))


@dataclasses.dataclass(frozen=True, eq=False)
class ShardedDataset:
    """The shards `first, ..., first + count - 1` (of `num_shards`) of a split of `size`
    examples, held in host memory as `data` (in split order).

    Batches (see the module docstring) are this process's consecutive slice of the global
    batch; evaluation batches are padded, with a mask.
    """

    data: ArrayDataset
    size: int
    num_shards: int
    first: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.first < self.first + self.count <= self.num_shards:
            raise ValueError(
                f"shards {self.first}..{self.first + self.count - 1} are not among "
                f"{self.num_shards} shards."
            )
        if self.size < self.num_shards:
            raise ValueError(f"{self.size} examples cannot fill {self.num_shards} shards.")
        held = shard_indices(
            self.size, num_shards=self.num_shards, first=self.first, count=self.count
        )
        if len(held) != len(self.data):
            raise ValueError(
                f"shards {self.first}..{self.first + self.count - 1} of {self.size} examples "
                f"hold {len(held)} examples, but the data has {len(self.data)}."
            )
        # Positions in `data` of each held shard's examples.
        positions = [np.flatnonzero(held % self.num_shards == s) for s in self.shards]
        object.__setattr__(self, "_positions", positions)

    # ArrayDataset's descriptive interface.
    name = property(lambda self: self.data.name)
    split = property(lambda self: self.data.split)
    origin = property(lambda self: self.data.origin)
    num_classes = property(lambda self: self.data.num_classes)
    image_shape = property(lambda self: self.data.image_shape)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return (
            f"ShardedDataset(name={self.name!r}, split={self.split!r}, size={self.size}, "
            f"shards {self.first}..{self.first + self.count - 1} of {self.num_shards}, "
            f"held={len(self)})"
        )

    @property
    def shards(self) -> range:
        return range(self.first, self.first + self.count)

    def normalize(self, images, *, channels_first: bool = True):
        """[`normalize`][] with this dataset's mean and std."""
        return self.data.normalize(images, channels_first=channels_first)

    def _per_shard(self, batch_size: int) -> int:
        if batch_size <= 0 or batch_size % self.num_shards:
            raise ValueError(
                f"batch_size {batch_size} must be a positive multiple of data.shards="
                f"{self.num_shards}."
            )
        return batch_size // self.num_shards

    def num_batches(self, batch_size: int) -> int:
        """Global training batches per epoch (the smallest shard's full slices)."""
        return (self.size // self.num_shards) // self._per_shard(batch_size)

    def batches(
        self, batch_size: int, *, seed: int, epoch: int, start_batch: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield this process's part `(uint8 (B * count / num_shards, H, W, C), int32)` of
        each global training batch of `batch_size` of epoch `epoch`, from `start_batch` on."""
        k = self._per_shard(batch_size)
        orders = [
            np.random.default_rng([seed, epoch, s]).permutation(
                _shard_size(self.size, self.num_shards, s)
            )
            for s in self.shards
        ]
        for b in range(start_batch, self.num_batches(batch_size)):
            idx = np.concatenate(
                [
                    pos[order[b * k : (b + 1) * k]]
                    for pos, order in zip(self._positions, orders, strict=True)
                ]
            )
            yield self.data.images[idx], self.data.labels[idx]

    def eval_batch_size(self, batch_size: int, multiple: int = 1) -> int:
        """The global evaluation batch for a requested `batch_size`: rounded up so that
        every shard gives the same slice and the batch divides into `multiple` parts."""
        step = self.num_shards * multiple // math.gcd(self.num_shards, multiple)
        return -(-batch_size // step) * step

    def eval_batches(
        self, batch_size: int, multiple: int = 1
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield this process's part `(images, labels, bool mask)` of each global evaluation
        batch (every example once, in split order per shard; padding masked out)."""
        k = self.eval_batch_size(batch_size, multiple) // self.num_shards
        rounds = -(-_shard_size(self.size, self.num_shards, 0) // k)
        shape = self.data.images.shape[1:]
        for b in range(rounds):
            images = np.zeros((self.count * k, *shape), np.uint8)
            labels = np.zeros(self.count * k, np.int32)
            mask = np.zeros(self.count * k, bool)
            for j, pos in enumerate(self._positions):
                part = pos[b * k : (b + 1) * k]
                rows = slice(j * k, j * k + len(part))
                images[rows], labels[rows], mask[rows] = (
                    self.data.images[part],
                    self.data.labels[part],
                    True,
                )
            yield images, labels, mask


def load_sharded(
    load: Callable[[Select], ArrayDataset],
    *,
    num_shards: int,
    first: int = 0,
    count: int = 1,
    limit: int = 0,
    limit_seed: int = 0,
) -> ShardedDataset:
    """Shards `first, ..., first + count - 1` of a split, loading only those examples.

    `load(select=...)` loads the examples `select(n)` of a split of `n` (e.g.
    `functools.partial(load_dataset, "cifar10", "train")`).
    `limit > 0` shards a random subset of that many examples (drawn with `limit_seed`,
    as [`ArrayDataset.subset`][]) instead of the whole split.
    """
    size: dict[str, int] = {}

    def select(n: int) -> np.ndarray:
        pool = np.arange(n)
        if limit and limit < n:
            pool = np.sort(np.random.default_rng(limit_seed).permutation(n)[:limit])
        size["n"] = len(pool)
        if len(pool) < num_shards:
            raise ValueError(f"{len(pool)} examples cannot fill data.shards={num_shards} shards.")
        return pool[shard_indices(len(pool), num_shards=num_shards, first=first, count=count)]

    data = load(select=select)
    return ShardedDataset(data, size["n"], num_shards, first, count)
