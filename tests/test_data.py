"""Sample order, per-rank slices and token windows over a small prepared dataset."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import service.prepare
from service.config import DataSection
from service.prepare import prepare_dataset
from s3_server import TcpForwarder
from service.storage import with_retries
from workers.data import IGNORE_INDEX, BatchPrefetcher, MicroBatch, SampleOrder, TokenDataset, rank_micro_batches
from workers.tokenizer import BYTE_EOS_ID

NUM_SAMPLES = 10
GLOBAL_BATCH = 4
SEED = 1234
SEQ_LEN = 16

# Sorted by file name, which is the order prepare_dataset reads them in.
DOCUMENTS = {
    "a.txt": ["The quick brown fox jumps over the lazy dog.\n" * 3],
    "b.jsonl": ["first record, caf\u00e9", "second record with more words in it", "third"],
    "c.txt": ["def f(x):\n    return x + 1\n"],
}


def global_batch_via_ranks(order: SampleOrder, step: int, world_size: int, micro_batch: int) -> list[int]:
    """Concatenate every rank's micro-batches of ``step`` in rank order."""
    indices = order.global_batch(step, GLOBAL_BATCH)
    joined: list[int] = []
    for rank in range(world_size):
        for chunk in rank_micro_batches(indices, rank, world_size, micro_batch):
            joined.extend(chunk)
    return joined


@pytest.mark.parametrize(("world_size", "micro_batch"), [(1, 1), (1, 4), (2, 1), (2, 2), (4, 1)])
def test_rank_slices_rebuild_global_batch(world_size: int, micro_batch: int):
    order = SampleOrder(NUM_SAMPLES, SEED)
    reference = SampleOrder(NUM_SAMPLES, SEED)

    for step in range(1, 11):
        expected = reference.global_batch(step, GLOBAL_BATCH)
        assert global_batch_via_ranks(order, step, world_size, micro_batch) == expected, step


def test_rank_slice_is_contiguous():
    indices = [7, 3, 9, 0, 5, 1, 8, 2]

    assert rank_micro_batches(indices, 0, 2, 2) == [[7, 3], [9, 0]]
    assert rank_micro_batches(indices, 1, 2, 2) == [[5, 1], [8, 2]]
    assert rank_micro_batches(indices, 3, 4, 1) == [[8], [2]]


@pytest.mark.parametrize(("world_size", "micro_batch"), [(3, 1), (2, 3)])
def test_rank_split_indivisible_rejected(world_size: int, micro_batch: int):
    with pytest.raises(ValueError, match="cannot be split"):
        rank_micro_batches(list(range(8)), 0, world_size, micro_batch)


def test_order_same_seed_same_batches():
    first = [SampleOrder(NUM_SAMPLES, SEED).global_batch(step, GLOBAL_BATCH) for step in range(1, 8)]
    second = [SampleOrder(NUM_SAMPLES, SEED).global_batch(step, GLOBAL_BATCH) for step in range(1, 8)]

    assert first == second


def test_order_other_seed_other_batches():
    first = SampleOrder(100, SEED).global_batch(1, 16)
    second = SampleOrder(100, SEED + 1).global_batch(1, 16)

    assert first != second


def test_epochs_cover_every_sample_once():
    # 10 samples, 4 per step: steps 3, 5 and 8 cross an epoch boundary.
    order = SampleOrder(NUM_SAMPLES, SEED)
    stream = [index for step in range(1, 16) for index in order.global_batch(step, GLOBAL_BATCH)]

    epochs = [stream[start : start + NUM_SAMPLES] for start in range(0, len(stream), NUM_SAMPLES)]
    assert len(epochs) == 6
    for number, epoch in enumerate(epochs):
        assert sorted(epoch) == list(range(NUM_SAMPLES)), number


def test_epochs_use_fresh_permutations():
    order = SampleOrder(50, SEED)

    first_epoch = order.positions(0, 50)
    second_epoch = order.positions(50, 50)

    assert first_epoch != second_epoch
    assert first_epoch != list(range(50))


def test_step_straddling_epochs():
    order = SampleOrder(NUM_SAMPLES, SEED)
    epoch_zero = order.positions(0, NUM_SAMPLES)
    epoch_one = order.positions(NUM_SAMPLES, NUM_SAMPLES)

    # Step 3 contains positions 8..11: the last two of epoch 0 and the first two of epoch 1.
    assert order.global_batch(3, GLOBAL_BATCH) == epoch_zero[8:] + epoch_one[:2]


def test_order_independent_of_query_history():
    # A resumed run requests a late step first, and the result must not depend on earlier requests.
    warm = SampleOrder(NUM_SAMPLES, SEED)
    for step in range(1, 20):
        warm.global_batch(step, GLOBAL_BATCH)

    assert warm.global_batch(3, GLOBAL_BATCH) == SampleOrder(NUM_SAMPLES, SEED).global_batch(3, GLOBAL_BATCH)


@pytest.mark.parametrize("step", [0, -3])
def test_global_batch_step_below_one_rejected(step: int):
    with pytest.raises(ValueError, match="at least 1"):
        SampleOrder(NUM_SAMPLES, SEED).global_batch(step, GLOBAL_BATCH)


def write_corpus(folder: Path) -> list[Path]:
    folder.mkdir()
    paths = []
    for name, texts in DOCUMENTS.items():
        path = folder / name
        if name.endswith(".jsonl"):
            path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
        else:
            path.write_text(texts[0], encoding="utf-8")
        paths.append(path)
    return paths


def expected_token_stream() -> np.ndarray:
    """Byte-level tokens of every document in read order, each followed by end-of-document."""
    tokens: list[int] = []
    for texts in DOCUMENTS.values():
        for text in texts:
            tokens.extend(text.encode("utf-8"))
            tokens.append(BYTE_EOS_ID)
    return np.asarray(tokens, dtype=np.int64)


def prepared_dataset(tmp_path: Path) -> str:
    paths = write_corpus(tmp_path / "corpus")
    data = DataSection(paths=[str(path) for path in paths])
    return prepare_dataset(data, str(tmp_path / "storage"), {})


def test_windows_match_token_stream(tmp_path: Path):
    stream = expected_token_stream()
    dataset = TokenDataset(prepared_dataset(tmp_path), SEQ_LEN)

    assert dataset.num_samples == (stream.size - 1) // SEQ_LEN
    for index in range(dataset.num_samples):
        start = index * SEQ_LEN
        window = dataset.sample(index)
        assert window.dtype == np.int64
        np.testing.assert_array_equal(window, stream[start : start + SEQ_LEN + 1], err_msg=f"sample {index}")


def test_micro_batch_targets_shifted_by_one(tmp_path: Path):
    stream = torch.from_numpy(expected_token_stream())
    dataset = TokenDataset(prepared_dataset(tmp_path), SEQ_LEN)

    batch = dataset.micro_batch([3, 0])

    assert isinstance(batch, MicroBatch)
    assert batch.sample_indices == (3, 0)
    assert batch.inputs.shape == (2, SEQ_LEN)
    assert batch.targets.shape == (2, SEQ_LEN)
    assert torch.equal(batch.inputs[0], stream[3 * SEQ_LEN : 4 * SEQ_LEN])
    assert torch.equal(batch.targets[0], stream[3 * SEQ_LEN + 1 : 4 * SEQ_LEN + 1])
    assert torch.equal(batch.inputs[1], stream[:SEQ_LEN])
    assert torch.equal(batch.targets[1], stream[1 : SEQ_LEN + 1])
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    assert batch.num_target_tokens == 2 * SEQ_LEN


def test_windows_stay_inside_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Tiny shards: each is cut at the first document end after 40 tokens.
    monkeypatch.setattr(service.prepare, "SHARD_TOKENS", 40)
    stream = expected_token_stream()
    dataset = TokenDataset(prepared_dataset(tmp_path), SEQ_LEN)
    shards = dataset.manifest["shards"]

    assert len(shards) > 1
    assert sum(shard["num_tokens"] for shard in shards) == stream.size
    index, shard_start = 0, 0
    for shard in shards:
        for offset in range(0, shard["num_tokens"] - SEQ_LEN, SEQ_LEN):
            start = shard_start + offset
            np.testing.assert_array_equal(dataset.sample(index), stream[start : start + SEQ_LEN + 1], err_msg=f"sample {index}")
            index += 1
        shard_start += shard["num_tokens"]
    assert index == dataset.num_samples


def test_sample_index_out_of_range(tmp_path: Path):
    dataset = TokenDataset(prepared_dataset(tmp_path), SEQ_LEN)

    with pytest.raises(IndexError):
        dataset.sample(dataset.num_samples)
    with pytest.raises(IndexError):
        dataset.sample(-1)


def test_sequence_longer_than_dataset_rejected(tmp_path: Path):
    dataset_uri = prepared_dataset(tmp_path)

    with pytest.raises(ValueError, match="lower model.seq_len"):
        TokenDataset(dataset_uri, seq_len=expected_token_stream().size)


def test_ignore_index_not_counted():
    targets = torch.tensor([[1, 2, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 5]])
    batch = MicroBatch(inputs=torch.zeros_like(targets), targets=targets, sample_indices=(0, 1))

    assert batch.num_target_tokens == 3


def assert_same_batches(actual: list[MicroBatch], expected: list[MicroBatch]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.sample_indices == want.sample_indices
        assert torch.equal(got.inputs, want.inputs)
        assert torch.equal(got.targets, want.targets)


@contextmanager
def open_prefetcher(tmp_path: Path, enabled: bool = True) -> Iterator[tuple[TokenDataset, BatchPrefetcher]]:
    dataset = TokenDataset(prepared_dataset(tmp_path), SEQ_LEN)
    prefetcher = BatchPrefetcher(dataset, enabled=enabled)
    try:
        yield dataset, prefetcher
    finally:
        prefetcher.close()


@pytest.mark.parametrize("enabled", [True, False], ids=["prefetch", "direct"])
def test_prefetcher_returns_the_batches_a_direct_read_gives(tmp_path: Path, enabled: bool):
    steps = [[[0, 1], [2]], [[3], [4, 5]], [[5, 0]]]
    with open_prefetcher(tmp_path, enabled) as (dataset, prefetcher):
        for index, chunks in enumerate(steps):
            batches = prefetcher.load(chunks)
            if index + 1 < len(steps):
                prefetcher.prefetch(steps[index + 1])
            assert_same_batches(batches, [dataset.micro_batch(chunk) for chunk in chunks])


def test_prefetch_of_other_samples_is_dropped(tmp_path: Path):
    # A rollback changes which samples the next step takes after the prefetch started.
    with open_prefetcher(tmp_path) as (dataset, prefetcher):
        prefetcher.prefetch([[1, 2]])
        batches = prefetcher.load([[3, 4]])
        assert_same_batches(batches, [dataset.micro_batch([3, 4])])
        # The dropped prefetch is not served later either.
        prefetcher.prefetch([[0]])
        assert_same_batches(prefetcher.load([[0]]), [dataset.micro_batch([0])])


def test_prefetch_failure_raises_in_load(tmp_path: Path):
    with open_prefetcher(tmp_path) as (dataset, prefetcher):
        prefetcher.prefetch([[dataset.num_samples]])
        with pytest.raises(IndexError, match="out of range"):
            prefetcher.load([[dataset.num_samples]])


def test_samples_from_object_storage_match_local(tmp_path: Path, s3_server, s3_bucket: str):
    paths = write_corpus(tmp_path / "corpus")
    data = DataSection(paths=[str(path) for path in paths])
    local = TokenDataset(prepare_dataset(data, str(tmp_path / "storage"), {}), SEQ_LEN)
    options = s3_server.storage_options()
    remote = TokenDataset(prepare_dataset(data, f"s3://{s3_bucket}/storage", options), SEQ_LEN, options)
    indices = list(range(local.num_samples))[::-1]

    assert remote.num_samples == local.num_samples
    assert_same_batches([remote.micro_batch(indices)], [local.micro_batch(indices)])
    with pytest.raises(IndexError, match="out of range"):
        remote.micro_batch([0, remote.num_samples])


@pytest.fixture
def dataset_behind_forwarder(tmp_path: Path, s3_server, s3_bucket: str) -> Iterator[tuple[str, dict, TcpForwarder]]:
    """A dataset on the S3 server, reached through a TCP forwarder that a test can stop and start again."""
    data = DataSection(paths=[str(path) for path in write_corpus(tmp_path / "corpus")])
    dataset_uri = prepare_dataset(data, f"s3://{s3_bucket}/storage", s3_server.storage_options())
    forwarder = TcpForwarder(tmp_path / "forwarder.log", target_port=s3_server.port)
    forwarder.start()
    # One quick try per request, so that the retries under test are Stalwart's, not botocore's.
    options = s3_server.storage_options(forwarder.port, {"connect_timeout": 1, "read_timeout": 5,
                                                         "retries": {"max_attempts": 1}})
    try:
        yield dataset_uri, options, forwarder
    finally:
        forwarder.stop()


def test_samples_read_through_outage(dataset_behind_forwarder, caplog: pytest.LogCaptureFixture):
    dataset_uri, options, forwarder = dataset_behind_forwarder
    dataset = TokenDataset(dataset_uri, SEQ_LEN, options, retry_s=60)
    indices = list(range(dataset.num_samples))
    expected = dataset.samples(indices)

    forwarder.stop()
    restart = threading.Timer(3.0, forwarder.start)
    restart.start()
    try:
        assert np.array_equal(dataset.samples(indices), expected)
    finally:
        restart.join(timeout=60)
    assert "retry 1 in" in caplog.text
    assert "succeeded after" in caplog.text


def test_samples_outage_past_budget_fails(dataset_behind_forwarder):
    dataset_uri, options, forwarder = dataset_behind_forwarder
    dataset = TokenDataset(dataset_uri, SEQ_LEN, options, retry_s=2)
    forwarder.stop()
    with pytest.raises(OSError, match=r"past data.read_retry_s=2; check that the storage is reachable"):
        dataset.samples([0, 1])
    with pytest.raises(OSError, match="past data.read_retry_s=2"):
        dataset.sample(0)


def test_retries_only_transient_errors():
    calls: list[int] = []

    def missing() -> bytes:
        calls.append(1)
        raise FileNotFoundError("s3://bucket/storage/shard-00000.bin")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, description="reading a shard", budget_s=60, setting="data.read_retry_s", first_backoff_s=0.01)
    assert len(calls) == 1, "a missing file was retried"

    outcomes: list[Exception | bytes] = [ConnectionResetError("reset by peer"), TimeoutError("timed out"), b"tokens"]

    def flaky() -> bytes:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert with_retries(flaky, description="reading a shard", budget_s=60, setting="data.read_retry_s", first_backoff_s=0.01) == b"tokens"
    assert outcomes == []
