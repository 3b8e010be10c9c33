"""Training data from the project's episode format: a held-out split by episode, rationale dropout, and a batch order
that is a pure function of (seed, batch number) so a resumed run sees exactly the batches an uninterrupted one would.

Why by episode: neighbouring frames of one episode are near-duplicates; validating on frames of training episodes
would measure memorisation. Why a pure-function order: resuming after kill -9 needs no sampler state beyond the
number of batches already consumed (saved with every checkpoint), and nothing is loaded to skip ahead.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from refinevla_core.data.episode import DataError, Episode
from refinevla_core.data.episode_dataset import EpisodeDataset
from refinevla_core.data.stats import ActionStats, compute_stats
from refinevla_core.rationale import Rationale

# Sub-streams of the run seed, so the split, the order and the dropout never share random numbers.
_SPLIT_STREAM, _ORDER_STREAM, _DROPOUT_STREAM = 1, 2, 3


@dataclass
class TrainingSample:
    """One frame as the processor needs it; `rationale` is None for frames without one or dropped ones."""

    image: np.ndarray
    instruction: str
    action: np.ndarray
    rationale: Rationale | None
    episode: int
    frame: int
    rationale_dropped: bool = False


def split_episodes(num_episodes: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) episode indices: a seeded shuffle, at least one validation episode when there are two or
    more and val_fraction > 0, never all of them."""
    if num_episodes < 1:
        raise DataError("the dataset has no episodes; collect or convert some first")
    if val_fraction <= 0 or num_episodes < 2:
        return list(range(num_episodes)), []
    n_val = min(num_episodes - 1, max(1, round(val_fraction * num_episodes)))
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(num_episodes)
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])


class EpisodeFrames:
    """Frames of some episodes of an EpisodeDataset, indexable by (frame number, epoch) for rationale dropout.

    Episodes are loaded lazily and kept in an LRU cache of up to `cache_mb` of images, so a dataset that fits in
    memory is decoded once (a random batch touches ~16 episodes: at ~0.1-0.2 s per npz decode, a small cache made
    data loading most of a CPU step), and a larger one streams.
    """

    def __init__(self, dataset: EpisodeDataset, episodes: Sequence[int], seed: int = 0,
                 rationale_dropout: float = 0.0, cache_mb: float = 4096) -> None:
        self.dataset = dataset
        self.seed = seed
        self.rationale_dropout = rationale_dropout
        self.cache_bytes = max(0.0, cache_mb) * 2**20
        self._cached_bytes = 0
        self._cache: OrderedDict[int, Episode] = OrderedDict()
        self.refs: list[tuple[int, int]] = []
        for e in episodes:
            length = int(dataset.episode_info(e)["length"])
            self.refs.extend((e, t) for t in range(length))
        rats = dataset.rationales()
        self.num_with_rationale = sum(1 for ref in self.refs if ref in rats)

    def __len__(self) -> int:
        return len(self.refs)

    def _episode(self, index: int) -> Episode:
        ep = self._cache.get(index)
        if ep is None:
            ep = self.dataset.load_episode(index)
            self._cache[index] = ep
            self._cached_bytes += ep.images.nbytes
            while len(self._cache) > 1 and self._cached_bytes > self.cache_bytes:
                self._cached_bytes -= self._cache.popitem(last=False)[1].images.nbytes
        else:
            self._cache.move_to_end(index)
        return ep

    def dropped(self, index: int, epoch: int) -> bool:
        """Whether frame `index` is shown without its rationale in `epoch` (deterministic)."""
        if self.rationale_dropout <= 0:
            return False
        if self.rationale_dropout >= 1:
            return True
        return bool(np.random.default_rng([self.seed, _DROPOUT_STREAM, epoch, index]).random() < self.rationale_dropout)

    def __getitem__(self, key: int | tuple[int, int]) -> TrainingSample:
        index, epoch = key if isinstance(key, tuple) else (key, -1)
        e, t = self.refs[index]
        ep = self._episode(e)
        rationale = ep.rationales[t] if ep.rationales is not None else None
        drop = rationale is not None and epoch >= 0 and self.dropped(index, epoch)
        return TrainingSample(
            image=ep.images[t], instruction=ep.instruction, action=ep.actions[t],
            rationale=None if drop else rationale, episode=e, frame=t, rationale_dropped=drop,
        )


class ResumableBatchSampler:
    """Batches of (frame index, epoch) keys. Global batch b of epoch e = b // per_epoch takes the next `batch_size`
    frames of a permutation seeded by (seed, e); the last partial batch of an epoch is dropped. Starting at
    `start_batch` skips without touching data. With `num_shards` processes (DDP), shard s takes the global batches
    b with b % num_shards == s."""

    def __init__(self, num_items: int, batch_size: int, seed: int, *, total_batches: int, start_batch: int = 0,
                 num_shards: int = 1, shard: int = 0) -> None:
        if num_items < batch_size:
            raise DataError(
                f"the training split has {num_items} frames, fewer than batch_size={batch_size}; "
                "lower batch_size or add episodes"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.total_batches = total_batches
        self.start_batch = start_batch
        self.per_epoch = num_items // batch_size
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is not in 0..{num_shards - 1}")
        self.num_shards = num_shards
        self.shard = shard

    def __len__(self) -> int:
        return len(range(self.start_batch, self.total_batches)[self._first_offset() :: self.num_shards])

    def _first_offset(self) -> int:
        return (self.shard - self.start_batch) % self.num_shards

    def batch(self, b: int) -> list[tuple[int, int]]:
        epoch, within = divmod(b, self.per_epoch)
        order = np.random.default_rng([self.seed, _ORDER_STREAM, epoch]).permutation(self.num_items)
        chunk = order[within * self.batch_size : (within + 1) * self.batch_size]
        return [(int(i), epoch) for i in chunk]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cached_epoch, order = -1, None
        for b in range(self.start_batch + self._first_offset(), self.total_batches, self.num_shards):
            epoch, within = divmod(b, self.per_epoch)
            if epoch != cached_epoch:
                order = np.random.default_rng([self.seed, _ORDER_STREAM, epoch]).permutation(self.num_items)
                cached_epoch = epoch
            chunk = order[within * self.batch_size : (within + 1) * self.batch_size]
            yield [(int(i), epoch) for i in chunk]


def training_split_actions(dataset: EpisodeDataset, episodes: Sequence[int]) -> np.ndarray:
    """Every action of the training episodes, (N, 7): what statistics fitted for training may see."""
    if not episodes:
        raise DataError("the training split has no episodes")
    return np.concatenate([dataset.load_episode(e, with_images=False).actions for e in episodes])


def training_split_stats(dataset: EpisodeDataset, episodes: Sequence[int]) -> ActionStats:
    """Action statistics of the training episodes only: the action bins (q01/q99) and the mean-action baseline
    must not be fitted on the held-out actions they are scored against."""
    return compute_stats(training_split_actions(dataset, episodes))


def validation_indices(num_items: int, max_frames: int) -> list[int]:
    """Evenly spaced frame indices of the validation split (all of them when there are few)."""
    if num_items <= max_frames:
        return list(range(num_items))
    return sorted({round(x) for x in np.linspace(0, num_items - 1, max_frames)})
