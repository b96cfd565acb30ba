"""Our samples, in our order, against gpt-neox's own data pipeline: whole global batches of train, of each
evaluation's valid part and of test, for 32 cases (weighted, equal-weight, split data, and weights from document
counts; two seeds; two sequence lengths; 1 and 2 data-parallel ranks; 2 micro-batches a step). The expected ids
were made by gpt-neox's megatron/data (tests/fixtures/make_neox_order.py says how to make them again); gpt-neox is
not needed here."""

import json
from pathlib import Path

import pytest
from neox_order import (
    ACCUMULATION,
    EVAL_INTERVAL,
    EVAL_ITERS,
    MICRO,
    TRAIN_ITERS,
    cases,
    global_batch,
    make_shards,
    with_paths,
)

from trainer.config import build
from trainer.samples import build_datasets, micro_batch, resolve_sources, source_samples, split_samples

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "neox_order.json").read_text())["cases"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("neox-order")
    make_shards(directory)
    return directory


def our_global_batch(dataset, step: int, dp: int) -> list[list[int]]:
    """What train feeds at 0-based step `step`: every micro-batch of every data-parallel rank, in order."""
    rows = []
    for m in range(ACCUMULATION):
        for rank in range(dp):
            rows += micro_batch(dataset, step, m, MICRO, dp, rank, global_batch(dp)).tolist()
    return rows


@pytest.mark.parametrize("name,data,seed,seq_length,dp", list(cases()), ids=[c[0] for c in cases()])
def test_batches_equal_gpt_neox(shards, name, data, seed, seq_length, dp):
    config = build(
        {
            "seq_length": seq_length,
            "max_position_embeddings": seq_length,
            "seed": seed,
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": ACCUMULATION,
            "train_iters": TRAIN_ITERS,
            "eval_interval": EVAL_INTERVAL,
            "eval_iters": EVAL_ITERS,
            **with_paths(data, shards),
        }
    )
    sources = resolve_sources(config.data)
    datasets = build_datasets(config, sources, global_batch(dp), shards / "cache")
    expected = FIXTURES[name]
    for split, asked in expected["asked"].items():  # ceil(N x w x 1.005) per source; N for one data_path
        samples = split_samples(config, global_batch(dp))[split]
        assert (source_samples(sources[split], samples) if isinstance(asked, list) else samples) == asked, split
    for step, ids in expected["train"].items():
        assert our_global_batch(datasets["train"], int(step), dp) == ids, f"train step {step}"
    for part, ids in expected["valid"].items():  # evaluation `part` reads valid steps part x eval_iters ...
        assert our_global_batch(datasets["valid"], int(part) * EVAL_ITERS, dp) == ids, f"valid part {part}"
    assert our_global_batch(datasets["test"], 0, dp) == expected["test"]["0"]
