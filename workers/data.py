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
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np
import torch

from service.storage import filesystem, is_local, join, read_json, with_retries

IGNORE_INDEX = -100

T = TypeVar("T")


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

    def __init__(self, dataset_uri: str, seq_len: int, storage_options: dict[str, Any] | None = None,
                 retry_s: float = 0.0):
        """``retry_s``: how long reads from object storage retry a storage error (``data.read_retry_s``)."""
        self.uri = dataset_uri
        self.seq_len = seq_len
        self.retry_s = retry_s
        self._fs = filesystem(dataset_uri, storage_options)
        manifest_uri = join(dataset_uri, "manifest.json")
        self.manifest = self._retried(lambda: read_json(self._fs, manifest_uri), f"reading {manifest_uri}")
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
        uri = self._shard_uris[shard]
        raw = self._retried(lambda: self._fs.cat_file(uri, start=start * itemsize, end=(start + count) * itemsize),
                            f"reading {uri}")
        return np.frombuffer(raw, dtype=self._dtype)

    def _retried(self, call: Callable[[], T], description: str) -> T:
        return with_retries(call, description=description, budget_s=self.retry_s, setting="data.read_retry_s")

    def _locate(self, index: int) -> tuple[int, int]:
        """Return (shard, first token) of global sample ``index``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range [0, {self.num_samples})")
        shard = bisect.bisect_right(self._first_index, index) - 1
        return shard, (index - self._first_index[shard]) * self.seq_len

    def sample(self, index: int) -> np.ndarray:
        """Return the ``seq_len + 1`` tokens of global sample ``index`` as int64."""
        shard, offset = self._locate(index)
        return self._read(shard, offset, self.seq_len + 1).astype(np.int64)

    def samples(self, indices: Sequence[int]) -> np.ndarray:
        """Return the samples of ``indices`` stacked as int64, read concurrently from object storage."""
        if self._local:
            return np.stack([self.sample(index) for index in indices])
        itemsize = self._dtype.itemsize
        places = [self._locate(index) for index in indices]
        # One request per sample, in flight together: fsspec runs them on its event loop.
        raw = self._retried(lambda: self._fs.cat_ranges([self._shard_uris[shard] for shard, _ in places],
                                                        [offset * itemsize for _, offset in places],
                                                        [(offset + self.seq_len + 1) * itemsize for _, offset in places],
                                                        on_error="raise"),
                            f"reading {len(places)} samples of {self.uri}")
        return np.stack([np.frombuffer(chunk, dtype=self._dtype) for chunk in raw]).astype(np.int64)

    def micro_batch(self, sample_indices: list[int] | tuple[int, ...]) -> MicroBatch:
        windows = self.samples(sample_indices)
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


class BatchPrefetcher:
    """Reads the micro-batches of the next step in a background thread while this step computes.

    A prefetch is keyed by its sample indices: when the step requests other
    samples (a rollback changed the data skips, say), the prefetched batches are
    dropped and the right ones are read at once. A failed background read raises
    in ``load``, as a direct read would. With ``enabled=False`` every read is direct.
    """

    def __init__(self, dataset: TokenDataset, *, enabled: bool = True, pin_memory: bool = False):
        self.dataset = dataset
        self.pin_memory = pin_memory
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stalwart-prefetch") if enabled else None
        self._pending: tuple[tuple[tuple[int, ...], ...], Future[list[MicroBatch]]] | None = None

    def _read(self, chunks: Sequence[Sequence[int]]) -> list[MicroBatch]:
        batches = [self.dataset.micro_batch(chunk) for chunk in chunks]
        if self.pin_memory:
            # Page-locked host memory lets the copy to the GPU run asynchronously.
            batches = [MicroBatch(batch.inputs.pin_memory(), batch.targets.pin_memory(), batch.sample_indices)
                       for batch in batches]
        return batches

    def load(self, chunks: Sequence[Sequence[int]]) -> list[MicroBatch]:
        """Return the micro-batches of ``chunks``, from the prefetch when it read the same samples."""
        key = tuple(tuple(chunk) for chunk in chunks)
        pending, self._pending = self._pending, None
        if pending is not None:
            if pending[0] == key:
                return pending[1].result()
            pending[1].cancel()
        return self._read(chunks)

    def prefetch(self, chunks: Sequence[Sequence[int]]) -> None:
        """Start reading ``chunks`` in the background (no-op when disabled)."""
        if self._executor is not None:
            key = tuple(tuple(chunk) for chunk in chunks)
            self._pending = (key, self._executor.submit(self._read, key))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
