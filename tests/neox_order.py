"""The cases on which our sample order is compared with gpt-neox's: small shards made from a seed, and the data
settings of each case. Shared by tests/test_neox_order.py and tests/fixtures/make_neox_order.py (which runs
gpt-neox's own megatron/data on them to write tests/fixtures/neox_order.json)."""

import itertools
from pathlib import Path

import numpy as np

from pile_tools.indexed import ShardWriter

SHARDS = {"a": 40, "b": 25, "c": 60, "d": 12}  # documents per shard
MICRO, ACCUMULATION, TRAIN_ITERS, EVAL_INTERVAL, EVAL_ITERS = 2, 2, 12, 5, 2
TRAIN_STEPS = (0, 1, 6, 11)  # 0-based steps whose global batches are compared (the log's steps 1, 2, 7, 12)
KINDS = {
    "weighted": {
        "train_data_paths": ["a", "b", "c"],
        "train_data_weights": [0.5, 0.3, 0.2],
        "valid_data_paths": ["d", "a"],
        "test_data_paths": ["c"],
    },
    "equal": {
        "train_data_paths": ["b", "d"],
        "valid_data_paths": ["c"],
        "test_data_paths": ["d", "b"],
        "test_data_weights": [2.0, 1.0],
    },
    "split": {"data_path": "c", "split": "8,1,1"},
    "by-docs": {  # weights from each shard's document count (the given weights are replaced)
        "train_data_paths": ["a", "b", "c"],
        "train_data_weights": [0.1, 0.1, 0.8],
        "valid_data_paths": ["d", "a"],
        "test_data_paths": ["c", "d"],
        "weight_by_num_documents": True,
        "weighted_sampler_alpha": 0.3,
    },
}


def make_shards(directory: Path) -> None:
    """Four uint16 shards of documents 1 to 120 tokens long, the same bytes for the same code on any machine."""
    for k, (name, documents) in enumerate(SHARDS.items()):
        rng = np.random.default_rng(100 + k)
        sizes = rng.integers(1, 121, size=documents)
        writer = ShardWriter(directory / name, np.uint16)
        writer.add(rng.integers(0, 50_000, size=int(sizes.sum())).astype(np.uint16), sizes)
        writer.close()


def cases():
    """(name, data keys with shard names, seed, seq_length, data-parallel size) of every compared case."""
    for kind, seed, seq_length, dp in itertools.product(KINDS, (1234, 7), (16, 9), (1, 2)):
        yield f"{kind}-s{seed}-l{seq_length}-dp{dp}", KINDS[kind], seed, seq_length, dp


def with_paths(data: dict, directory: Path) -> dict:
    """The case's data keys with shard names made prefixes under `directory`."""
    out = dict(data)
    for key in ("train_data_paths", "valid_data_paths", "test_data_paths"):
        if key in out:
            out[key] = [str(directory / name) for name in out[key]]
    if "data_path" in out:
        out["data_path"] = str(directory / out["data_path"])
    return out


def global_batch(dp: int) -> int:
    return MICRO * ACCUMULATION * dp
