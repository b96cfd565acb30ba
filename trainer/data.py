"""GPT training samples over a Megatron shard, indexed by Megatron's and gpt-neox's algorithm, built in numpy.

The arrays follow their algorithm (and sample_idx equals their C++ helper's), but the shuffles draw from
numpy's PCG64, not their RandomState, and shuffle exactly the samples needed: the order is not theirs yet.

Three arrays, cached next to the shard (keyed by a hash of everything that determines them):
    doc_idx      the shard's documents tiled for as many epochs as the samples need, shuffled   int32 (epochs * N)
    sample_idx   for sample j, (position in doc_idx, token offset) of its first token           int64 (samples + 1, 2)
    shuffle_idx  a seeded permutation of the samples                                           int64 (samples)
Sample j is the `seq_length + 1` tokens from global position j * seq_length of the document stream in doc_idx
order: samples cross document boundaries, and consecutive samples share one token (input and shifted target).
Megatron builds sample_idx with a C++ loop (its issue #795: 270 s for a large run on rank 0); here it is a
cumulative sum and a binary search.
"""

import hashlib
import os
from pathlib import Path

import numba
import numpy as np

from pile_tools.atomic import writing
from pile_tools.indexed import Shard
from trainer.config import RunError


def epochs_needed(tokens_per_epoch: int, num_samples: int, seq_length: int) -> int:
    """The fewest epochs whose tokens hold `num_samples` samples of seq_length + 1 tokens (sharing one each)."""
    if tokens_per_epoch <= 0:
        raise ValueError("the shard holds no tokens")
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_doc_idx(documents: np.ndarray, epochs: int, rng: np.random.Generator) -> np.ndarray:
    doc_idx = np.tile(np.asarray(documents, dtype=np.int32), epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """(position in doc_idx, offset) of global token j * seq_length, for j = 0 .. num_samples."""
    starts = np.zeros(len(doc_idx) + 1, dtype=np.int64)
    np.cumsum(np.asarray(sizes, dtype=np.int64)[doc_idx], out=starts[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    where = np.searchsorted(starts, positions, side="right") - 1
    return np.stack([where, positions - starts[where]], axis=1)


def cache_key(shard: Shard, documents: range, num_samples: int, seq_length: int, seed: int) -> str:
    stat = os.stat(f"{shard.prefix}.idx")
    what = (f"{shard.prefix.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{len(shard)}|"
            f"{documents.start}:{documents.stop}|{num_samples}|{seq_length}|{seed}")  # fmt: skip
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


class GPTDataset:
    """`num_samples` samples of `seq_length + 1` tokens from one shard (or a range of its documents, for a
    Megatron-style `split` of one shard); indices cached under `cache_dir`."""

    def __init__(self, prefix: str | Path, num_samples: int, seq_length: int, seed: int,
                 cache_dir: Path | None = None, documents: range | None = None,
                 vocab_size: int | None = None):  # fmt: skip
        self.shard, self.vocab_size = Shard(Path(prefix)), vocab_size
        self.documents = documents if documents is not None else range(len(self.shard))
        self.num_samples, self.seq_length = num_samples, seq_length
        cache = Path(cache_dir) if cache_dir else self.shard.prefix.parent / "index-cache"
        stem = f"{self.shard.prefix.name}_{cache_key(self.shard, self.documents, num_samples, seq_length, seed)}"
        paths = {name: cache / f"{stem}_{name}.npy" for name in ("doc_idx", "sample_idx", "shuffle_idx")}
        if not all(p.is_file() for p in paths.values()):
            with writing(cache):
                cache.mkdir(parents=True, exist_ok=True)
                for name, array in self.build(seed).items():
                    save_npy(paths[name], array)
        self.doc_idx, self.sample_idx, self.shuffle_idx = (np.load(paths[n], mmap_mode="r") for n in paths)

    def build(self, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        sizes = np.asarray(self.shard.sizes)
        documents = np.arange(self.documents.start, self.documents.stop)
        epochs = epochs_needed(int(sizes[documents].sum(dtype=np.int64)), self.num_samples, self.seq_length)
        doc_idx = build_doc_idx(documents, epochs, rng)
        return {
            "doc_idx": doc_idx,
            "sample_idx": build_sample_idx(sizes, doc_idx, self.seq_length, self.num_samples),
            "shuffle_idx": rng.permutation(self.num_samples).astype(np.int64),
        }

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        """The `seq_length + 1` tokens of the i-th sample (after shuffling), as int64."""
        j = int(self.shuffle_idx[i])
        (first, offset), (last, end) = self.sample_idx[j], self.sample_idx[j + 1]
        if first == last:
            tokens = self.shard[int(self.doc_idx[first])][offset : end + 1].astype(np.int64)
        else:
            pieces = [self.shard[int(self.doc_idx[first])][offset:]]
            pieces += [self.shard[int(self.doc_idx[k])] for k in range(first + 1, last)]
            pieces.append(self.shard[int(self.doc_idx[last])][: end + 1])
            tokens = np.concatenate(pieces).astype(np.int64)
        if self.vocab_size is not None and len(tokens) and (tokens.max() >= self.vocab_size or tokens.min() < 0):
            self.report_bad_id(first, last)
        return tokens

    def report_bad_id(self, first: int, last: int):
        """The RunError naming the document (of the sample's documents first..last) that holds a bad id."""
        for k in range(first, last + 1):
            doc = int(self.doc_idx[k])
            ids = self.shard[doc]
            bad = ids[(ids >= self.vocab_size) | (ids < 0)] if ids.dtype.kind == "i" else ids[ids >= self.vocab_size]
            if len(bad):
                raise RunError(f"shard {self.shard.prefix}: document {doc} holds token id {int(bad[0]):,}, outside "
                               f"the vocabulary ({self.vocab_size:,} ids); check it with: neox-data verify "
                               f"{self.shard.prefix}")  # fmt: skip


@numba.njit(cache=True)
def _earliest_due_first(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    # Sample i goes to the source whose next sample is due soonest ((count + 1) / weight), among the sources
    # whose share so far lags their weight. Megatron's largest-deficit-first rule can stray 1.6 samples from a
    # weight; this rule stays within one sample of every source's weight at every prefix (tests/test_data.py).
    counts = np.zeros(len(weights), dtype=np.int64)
    source, within = np.empty(size, dtype=np.int16), np.empty(size, dtype=np.int64)
    for i in range(size):
        best, best_due = -1, np.inf
        for d in range(len(weights)):
            if weights[d] * (i + 1) > counts[d] and (counts[d] + 1) / weights[d] < best_due:
                best, best_due = d, (counts[d] + 1) / weights[d]
        source[i], within[i] = best, counts[best]
        counts[best] += 1
    return source, within


def blend_index(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, sample within the source) of each of `size` blended samples, each source's share its weight.

    A sequential greedy, compiled with numba (Megatron compiles its own in C++): 10M samples in ~0.4 s.
    int16 sources: a blend has at most a few hundred shards.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) == 0 or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"blend weights must be >= 0 with a positive sum, got {weights.tolist()}")
    return _earliest_due_first(weights / weights.sum(), size)


class BlendedDataset:
    """Samples of several sources, each source's share equal to its weight, in a deterministic order."""

    def __init__(self, sources: list, source: np.ndarray, within: np.ndarray, names: list[str] | None = None):
        self.sources, self.source, self.within = sources, source, within
        self.names = names or [str(i) for i in range(len(sources))]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.sources[self.source[i]][int(self.within[i])]
