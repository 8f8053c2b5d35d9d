"""Token shards, sample order and per-rank batches.

A sample is a window of ``seq_len + 1`` tokens inside one shard. The order of
samples is a seeded permutation of global sample indices, one per epoch, and
the global batch of optimizer step ``s`` is positions ``(s - 1) * B`` to
``s * B - 1`` of that endless order. The data position is therefore the step
alone: it does not depend on the world size, and a resume at step ``s + 1``
neither repeats nor skips a sample.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from service.storage import filesystem, is_local, join, read_json

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MicroBatch:
    inputs: torch.Tensor  # (batch, seq_len) token ids
    targets: torch.Tensor  # (batch, seq_len) next-token ids, IGNORE_INDEX where no target
    sample_indices: tuple[int, ...]

    @property
    def num_target_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


class TokenDataset:
    """Fixed-length samples over the token shards of a prepared dataset."""

    def __init__(self, dataset_uri: str, seq_len: int, storage_options: dict[str, Any] | None = None):
        self.uri = dataset_uri
        self.seq_len = seq_len
        self._fs = filesystem(dataset_uri, storage_options)
        self.manifest = read_json(self._fs, join(dataset_uri, "manifest.json"))
        self._dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self._shard_uris = [join(dataset_uri, shard["name"]) for shard in self.manifest["shards"]]
        counts = [max(0, (shard["num_tokens"] - 1) // seq_len) for shard in self.manifest["shards"]]
        self._first_index = list(np.cumsum([0] + counts[:-1]))
        self.num_samples = int(sum(counts))
        if self.num_samples == 0:
            raise ValueError(
                f"dataset {dataset_uri} has {self.manifest['num_tokens']} tokens, too few for one sample of "
                f"model.seq_len={seq_len} + 1; lower model.seq_len or add data"
            )
        self._local = is_local(dataset_uri)
        self._memmaps: dict[int, np.ndarray] = {}

    def _read(self, shard: int, start: int, count: int) -> np.ndarray:
        if self._local:
            if shard not in self._memmaps:
                self._memmaps[shard] = np.memmap(self._shard_uris[shard], dtype=self._dtype, mode="r")
            return np.asarray(self._memmaps[shard][start : start + count])
        itemsize = self._dtype.itemsize
        raw = self._fs.cat_file(self._shard_uris[shard], start=start * itemsize, end=(start + count) * itemsize)
        return np.frombuffer(raw, dtype=self._dtype)

    def sample(self, index: int) -> np.ndarray:
        """Return the ``seq_len + 1`` tokens of global sample ``index`` as int64."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range [0, {self.num_samples})")
        shard = bisect.bisect_right(self._first_index, index) - 1
        offset = (index - self._first_index[shard]) * self.seq_len
        return self._read(shard, offset, self.seq_len + 1).astype(np.int64)

    def micro_batch(self, sample_indices: list[int] | tuple[int, ...]) -> MicroBatch:
        windows = np.stack([self.sample(index) for index in sample_indices])
        tokens = torch.from_numpy(windows)
        return MicroBatch(inputs=tokens[:, :-1], targets=tokens[:, 1:], sample_indices=tuple(sample_indices))


class SampleOrder:
    """Seeded order of global sample indices, a fresh permutation per epoch."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self._permutation = lru_cache(maxsize=2)(self._make_permutation)

    def _make_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def positions(self, start: int, count: int) -> list[int]:
        """Return the sample indices at positions ``start`` .. ``start + count - 1`` of the endless order."""
        result: list[int] = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.num_samples)
            result.append(int(self._permutation(epoch)[offset]))
        return result

    def global_batch(self, step: int, global_batch: int) -> list[int]:
        """Return the sample indices of optimizer step ``step`` (1-based), identical at every world size."""
        if step < 1:
            raise ValueError(f"step must be at least 1, got {step}")
        return self.positions((step - 1) * global_batch, global_batch)


def rank_micro_batches(
    indices: list[int], world_rank: int, world_size: int, micro_batch: int
) -> list[list[int]]:
    """Split one global batch: rank ``r`` takes the ``r``-th contiguous slice, cut into micro-batches."""
    per_rank = len(indices) // world_size
    if per_rank * world_size != len(indices) or per_rank % micro_batch:
        raise ValueError(
            f"global batch of {len(indices)} cannot be split into {world_size} ranks x micro-batches of {micro_batch}"
        )
    mine = indices[world_rank * per_rank : (world_rank + 1) * per_rank]
    return [mine[i : i + micro_batch] for i in range(0, per_rank, micro_batch)]
