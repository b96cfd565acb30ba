"""GPT sample indices over a shard, against a simple implementation that concatenates the documents."""

import math

import numpy as np
import pytest

from pile_tools.indexed import ShardWriter
from trainer.data import COMPILE_ABOVE, GPTDataset, blend_index
from trainer.samples import Source, megatron_split, split_dataset


def make_shard(path, sizes, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 50000, size=n) for n in sizes]
    writer = ShardWriter(path, np.uint16)
    writer.add(np.concatenate(docs), sizes)
    writer.close()
    return docs


def simple_samples(docs, num_samples, seq_length, seed):
    """gpt-neox's recipe written plainly: tile and shuffle the documents (RandomState), lay them end to end, cut
    every seq_length tokens, and shuffle all the samples those epochs hold with the same generator."""
    rng = np.random.RandomState(seed)
    total, epochs = sum(len(d) for d in docs), 1
    while epochs * total < num_samples * seq_length + 1:
        epochs += 1
    order = np.tile(np.arange(len(docs), dtype=np.int32), epochs)
    rng.shuffle(order)
    stream = np.concatenate([docs[k] for k in order])
    count = (len(stream) - 1) // seq_length
    samples = [stream[j * seq_length : j * seq_length + seq_length + 1] for j in range(count)]
    permutation = np.arange(count)
    rng.shuffle(permutation)
    return [samples[j] for j in permutation]


@pytest.mark.parametrize("seq_length,num_samples", [(16, 50), (7, 300), (64, 40)])
def test_samples_equal_the_simple_implementation(tmp_path, seq_length, num_samples):
    sizes = [1, 5, 40, 3, 16, 17, 2, 90, 1, 33]
    docs = make_shard(tmp_path / "s", sizes)
    dataset = GPTDataset(tmp_path / "s", num_samples, seq_length, seed=3)
    expected = simple_samples(docs, num_samples, seq_length, seed=3)
    assert len(dataset) == len(expected) - 1 >= num_samples - 1  # gpt-neox: all samples of the epochs, less one
    for i in range(len(expected)):
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


def simple_blend(weights, size):
    """gpt-neox's blend rule in plain Python: each sample to the first source furthest behind its share."""
    weights = [w / sum(weights) for w in weights]
    weights = [float(w) for w in np.array(weights) / np.sum(weights)]
    counts, order = [0] * len(weights), []
    for i in range(size):
        errors = [w * max(i, 1.0) - c for w, c in zip(weights, counts)]
        d = errors.index(max(errors))
        order.append((d, counts[d]))
        counts[d] += 1
    return order


@pytest.mark.parametrize("size", [5000, COMPILE_ABOVE + 1000])  # the loop in Python, then compiled by numba
@pytest.mark.parametrize("weights", [[1, 1], [0.7, 0.2, 0.1], [5, 0, 1, 3, 0.25], list(range(1, 23))])
def test_blend_is_gpt_neox_rule(weights, size):
    source, within = blend_index(weights, size)
    assert list(zip(source.tolist(), within.tolist())) == simple_blend(weights, size)
    share = np.asarray(weights, float) / sum(weights)
    seen = np.bincount(source, minlength=len(weights))
    assert np.abs(seen - share * size).max() < 2.0


def test_blended_samples_equal_the_simple_implementation(tmp_path):
    docs = {
        name: make_shard(tmp_path / name, sizes, seed=k)
        for k, (name, sizes) in enumerate({"a": [5, 40, 3, 16], "b": [90, 1, 33], "c": [7, 7, 7, 7, 7, 7]}.items())
    }
    sources = [Source(tmp_path / name, w) for name, w in zip(docs, (0.5, 0.3, 0.2))]
    dataset = split_dataset(sources, 200, 9, seed=5)
    order = simple_blend([0.5, 0.3, 0.2], 200)
    expected = {
        name: simple_samples(docs[name], math.ceil(200 * w * 1.005), 9, seed=5)
        for name, w in zip(docs, (0.5, 0.3, 0.2))
    }
    for i, (d, j) in enumerate(order):
        got = dataset[i]
        assert len(got) == 10, "no sample reads past its shard's end"
        assert np.array_equal(got, expected[list(docs)[d]][j]), i


def test_megatron_split_of_one_shard():
    assert megatron_split("969,30,1", 1000) == [range(0, 969), range(969, 999), range(999, 1000)]
    assert megatron_split("8,1,1", 7) == [range(0, 5), range(5, 6), range(6, 7)]  # Megatron: rounded, then shifted
    ranges = megatron_split("1,1,1", 10)
    assert ranges[0].start == 0 and ranges[-1].stop == 10 and sum(map(len, ranges)) == 10
