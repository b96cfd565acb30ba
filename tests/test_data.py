"""GPT sample indices over a shard, against a simple implementation that concatenates the documents."""

import numpy as np
import pytest

from pile_tools.indexed import ShardWriter
from trainer.data import GPTDataset


def make_shard(path, sizes, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 50000, size=n) for n in sizes]
    writer = ShardWriter(path, np.uint16)
    writer.add(np.concatenate(docs), sizes)
    writer.close()
    return docs


def simple_samples(docs, num_samples, seq_length, seed):
    """Tile and shuffle the documents, lay them end to end, cut every seq_length tokens, shuffle the samples."""
    rng = np.random.default_rng(seed)
    total, epochs = sum(len(d) for d in docs), 1
    while epochs * total < num_samples * seq_length + 1:
        epochs += 1
    order = np.tile(np.arange(len(docs), dtype=np.int32), epochs)
    rng.shuffle(order)
    stream = np.concatenate([docs[k] for k in order])
    samples = [stream[j * seq_length : j * seq_length + seq_length + 1] for j in range(num_samples)]
    return [samples[j] for j in rng.permutation(num_samples)]


@pytest.mark.parametrize("seq_length,num_samples", [(16, 50), (7, 300), (64, 40)])
def test_samples_equal_the_simple_implementation(tmp_path, seq_length, num_samples):
    sizes = [1, 5, 40, 3, 16, 17, 2, 90, 1, 33]
    docs = make_shard(tmp_path / "s", sizes)
    dataset = GPTDataset(tmp_path / "s", num_samples, seq_length, seed=3)
    expected = simple_samples(docs, num_samples, seq_length, seed=3)
    assert len(dataset) == num_samples
    for i in range(num_samples):
        got = dataset[i]
        assert len(got) == seq_length + 1, "no sample reads past the shard's end"
        assert np.array_equal(got, expected[i]), i


def test_index_is_cached_and_keyed(tmp_path, monkeypatch):
    make_shard(tmp_path / "s", [30, 20, 10])
    first = GPTDataset(tmp_path / "s", 20, 8, seed=1)
    monkeypatch.setattr(GPTDataset, "build", lambda self, seed: pytest.fail("rebuilt a cached index"))
    again = GPTDataset(tmp_path / "s", 20, 8, seed=1)
    assert all(np.array_equal(first[i], again[i]) for i in range(20))
    assert len(list((tmp_path / "index-cache").glob("*.npy"))) == 3
    monkeypatch.undo()
    GPTDataset(tmp_path / "s", 20, 8, seed=2)
    assert len(list((tmp_path / "index-cache").glob("*.npy"))) == 6
