"""Building the GPT sample index for 10M samples of 2,048 tokens, against Megatron's algorithm as a Python loop.

    .venv/bin/python benchmarks/data.py [--samples 10000000] [--seq-length 2048] [--docs 1000000]

The shard is synthetic but Pile-like in shape: --docs documents with log-normal lengths (median ~600 tokens,
mean ~1,500), written as a real .idx with a sparse .bin. Ours builds doc_idx, sample_idx and shuffle_idx in numpy
(trainer/data.py, cache off). The baseline is Megatron's build_sample_idx loop (one document step at a time),
written in Python, timed on --baseline-samples samples and scaled linearly (its cost is linear in the samples);
Megatron compiles that loop in C++, which is still ~270 s on its rank 0 for a large run (Megatron issue #795).
Goal (issue 5): 10M samples in <= 10 s here. Also timed: the blend of 10M samples across 22 sources.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from pile_tools.indexed import write_index
from trainer.data import GPTDataset, blend_index


def megatron_sample_idx(sizes, doc_idx, seq_length, num_samples):
    """Megatron's helpers.cpp build_sample_idx, step for step, in Python."""
    sample_idx = np.zeros((num_samples + 1, 2), dtype=np.int64)
    doc_idx_index, doc_offset = 0, 0
    for sample in range(1, num_samples + 1):
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = int(sizes[doc_idx[doc_idx_index]]) - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        sample_idx[sample] = doc_idx_index, doc_offset
    return sample_idx


def names_same_tokens(megatron_idx, sizes, doc_idx, seq_length) -> bool:
    """Megatron's (document, offset) of each boundary is global token j * seq_length, as ours is by construction."""
    starts = np.cumsum(np.r_[0, sizes[doc_idx[: megatron_idx[-1, 0] + 1]].astype(np.int64)])
    positions = starts[megatron_idx[:, 0]] + megatron_idx[:, 1]
    return bool(np.array_equal(positions, np.arange(len(megatron_idx), dtype=np.int64) * seq_length))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000_000)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--baseline-samples", type=int, default=100_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sizes = np.clip(rng.lognormal(6.4, 1.3, args.docs), 1, 200_000).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "shard"
        write_index(Path(f"{prefix}.idx"), sizes, np.uint16)
        with open(f"{prefix}.bin", "wb") as f:
            f.truncate(int(sizes.sum(dtype=np.int64)) * 2)
        start = time.perf_counter()
        dataset = GPTDataset(prefix, args.samples, args.seq_length, seed=1234, cache_dir=Path(tmp) / "cache")
        ours = time.perf_counter() - start
        start = time.perf_counter()
        reference = megatron_sample_idx(sizes, dataset.doc_idx, args.seq_length, args.baseline_samples)
        loop = (time.perf_counter() - start) * args.samples / args.baseline_samples
        same = names_same_tokens(reference, sizes, dataset.doc_idx, args.seq_length)
        print(
            f"{args.docs:,} documents, {int(sizes.sum(dtype=np.int64)):,} tokens; {args.samples:,} samples of "
            f"{args.seq_length + 1} tokens ({len(dataset.doc_idx) // args.docs} epochs)"
        )
        print(f"ours (numpy, doc_idx + sample_idx + shuffle_idx, saved):  {ours:8.1f} s   (goal <= 10 s)")
        print(f"Megatron's sample_idx loop in Python, scaled:            {loop:8.1f} s   ({loop / ours:.0f}x ours)")
        print(f"Megatron's sample boundaries are the tokens ours start at (first {args.baseline_samples:,}): {same}")
    weights = rng.random(22)  # the Pile's 22 components
    blend_index(weights, 1000)  # compile (cached on disk after the first run)
    start = time.perf_counter()
    blend_index(weights, args.samples)
    print(f"blend of {args.samples:,} samples over 22 sources (numba):       {time.perf_counter() - start:8.1f} s")


if __name__ == "__main__":
    main()
