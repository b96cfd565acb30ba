"""GPT training samples over a Megatron shard, indexed exactly as gpt-neox indexes them (megatron/data/gpt2_dataset.py
and blendable_dataset.py), built in numpy: the same arrays, so the same samples in the same order.

Three arrays, cached next to the shard (keyed by a hash of everything that determines them), and a record written
after them, `<key>.json`, that vouches for them: what they were built from, and each one's dtype, shape and xxh3-128
(checked at every start, at memory speed; a cache the record does not vouch for is built again, with a warning):
    doc_idx      the shard's documents tiled for as many epochs as the samples need, shuffled   int32 (epochs * N)
    sample_idx   for sample j, (position in doc_idx, token offset) of its first token           int64 (S + 1, 2)
    shuffle_idx  a seeded permutation of all S samples of those epochs                          int64 (S)
Sample j is the `seq_length + 1` tokens from global position j * seq_length of the document stream in doc_idx
order: samples cross document boundaries, and consecutive samples share one token (input and shifted target).
As in gpt-neox, one `np.random.RandomState(seed)` shuffles doc_idx and then the S = (epochs x tokens - 1) //
seq_length samples of all those epochs, not only the ones a run reads. gpt-neox builds sample_idx with a C++ loop
(Megatron's issue #795: 270 s for a large run on rank 0); here it is a cumulative sum and a binary search, equal to
it (tests/test_neox_order.py compares whole batches with gpt-neox's own code).
"""

import functools
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import xxhash

from pile_tools.ground import InputError, write_json, writing
from pile_tools.indexed import Shard
from pile_tools.readback import Count, Record, read_record
from trainer.config_keys import RunError


def epochs_needed(tokens_per_epoch: int, num_samples: int, seq_length: int) -> int:
    """The fewest epochs whose tokens hold `num_samples` samples of seq_length + 1 tokens (sharing one each)."""
    if tokens_per_epoch <= 0:
        raise ValueError("the shard holds no tokens")
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def samples_in(tokens_per_epoch: int, epochs: int, seq_length: int) -> int:
    """S: the samples that `epochs` epochs hold (gpt-neox indexes and shuffles all of them)."""
    return (epochs * tokens_per_epoch - 1) // seq_length


def build_doc_idx(documents: np.ndarray, epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """The documents, once per epoch, shuffled as one array (gpt-neox's _build_doc_idx)."""
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


def built_from(shard: Shard, documents: range, num_samples: int, seq_length: int, seed: int) -> str:
    """Everything the index arrays depend on: the shard (path, size, mtime), documents, samples, seq_length, seed."""
    stat = os.stat(f"{shard.prefix}.idx")
    return (
        f"neox-order|{shard.prefix.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{len(shard)}|"
        f"{documents.start}:{documents.stop}|{num_samples}|{seq_length}|{seed}"
    )


def save_npy(path: Path, array: np.ndarray) -> None:
    """An array to `path` atomically (ranks may build the same cache at once)."""
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def array_hash(array: np.ndarray) -> str:
    """xxh3-128 of an array's bytes (a memory map's: read at memory speed)."""
    return xxhash.xxh3_128(np.ascontiguousarray(array).view(np.uint8)).hexdigest()


class CachedArray(Record):
    dtype: str
    shape: list[Count]
    xxh3_128: str


class CacheRecord(Record):
    built_from: str
    arrays: dict[str, CachedArray]


def open_cache(record_path: Path, paths: dict[str, Path], source: str) -> dict[str, np.ndarray] | None:
    """The cached index arrays, memory-mapped, when the record beside them (written last) vouches for them: built
    from `source`, each with its dtype, shape and xxh3-128; None when there is no record (not built yet). A record
    or array that does not match is damage: a warning names it, and None has the arrays built again."""
    if not record_path.is_file():
        return None
    try:
        record = read_record(record_path, CacheRecord)
        if record["built_from"] != source or sorted(record["arrays"]) != sorted(paths):
            raise InputError(f"{record_path}: records other arrays than the sample index of this shard and run")
        arrays = {name: open_array(paths[name], record["arrays"][name]) for name in paths}
    except InputError as e:
        warnings.warn(f"the sample index cache is damaged, so it is built again: {e}", stacklevel=3)
        return None
    return arrays


def open_array(path: Path, want: dict) -> np.ndarray:
    """One cached array, memory-mapped and checked against its record; an InputError naming it otherwise."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a whole .npy array ({e})") from None
    if str(array.dtype) != want["dtype"] or list(array.shape) != want["shape"]:
        raise InputError(f"{path}: {array.dtype} {list(array.shape)}, recorded {want['dtype']} {want['shape']}")
    if array_hash(array) != want["xxh3_128"]:
        raise InputError(f"{path}: its content differs from the xxh3-128 recorded")
    return array


def save_cache(cache: Path, record_path: Path, paths: dict[str, Path], arrays: dict[str, np.ndarray], source: str):
    """The arrays, then the record that vouches for them (each written atomically)."""
    with writing(cache):
        cache.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.items():
            save_npy(paths[name], array)
        described = {
            name: {"dtype": str(a.dtype), "shape": list(a.shape), "xxh3_128": array_hash(a)}
            for name, a in arrays.items()
        }
        write_json(record_path, {"built_from": source, "arrays": described})


class GPTDataset:
    """Samples of `seq_length + 1` tokens from one shard (or a range of its documents, for a Megatron-style
    `split` of one shard): the whole epochs that hold `num_samples`, as gpt-neox's GPT2Dataset; indices cached
    under `cache_dir`."""

    def __init__(
        self,
        prefix: str | Path,
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: Path | None = None,
        documents: range | None = None,
        vocab_size: int | None = None,
    ):
        self.shard, self.vocab_size = Shard(Path(prefix)), vocab_size
        self.documents = documents if documents is not None else range(len(self.shard))
        self.num_samples, self.seq_length = num_samples, seq_length
        cache = Path(cache_dir) if cache_dir else self.shard.prefix.parent / "index-cache"
        source = built_from(self.shard, self.documents, num_samples, seq_length, seed)
        stem = f"{self.shard.prefix.name}_{hashlib.sha256(source.encode()).hexdigest()[:16]}"
        paths = {name: cache / f"{stem}_{name}.npy" for name in ("doc_idx", "sample_idx", "shuffle_idx")}
        arrays = open_cache(cache / f"{stem}.json", paths, source)
        if arrays is None:
            save_cache(cache, cache / f"{stem}.json", paths, self.build(seed), source)
            arrays = {name: np.load(path, mmap_mode="r") for name, path in paths.items()}
        self.doc_idx, self.sample_idx, self.shuffle_idx = (arrays[n] for n in paths)

    def build(self, seed: int) -> dict[str, np.ndarray]:
        """doc_idx, sample_idx and shuffle_idx, drawn from one RandomState(seed) in gpt-neox's order."""
        rng = np.random.RandomState(seed)  # gpt-neox's generator (MT19937), drawn in its order
        sizes = np.asarray(self.shard.sizes)
        documents = np.arange(self.documents.start, self.documents.stop)
        tokens = int(sizes[documents].sum(dtype=np.int64))
        epochs = epochs_needed(tokens, self.num_samples, self.seq_length)
        doc_idx = build_doc_idx(documents, epochs, rng)
        total = samples_in(tokens, epochs, self.seq_length)
        shuffle_idx = np.arange(total, dtype=np.int64)
        rng.shuffle(shuffle_idx)
        return {
            "doc_idx": doc_idx,
            "sample_idx": build_sample_idx(sizes, doc_idx, self.seq_length, total),
            "shuffle_idx": shuffle_idx,
        }

    def __len__(self) -> int:
        """gpt-neox's length: one less than the samples indexed (min of its two index lengths, minus one)."""
        return len(self.shuffle_idx) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        """The `seq_length + 1` tokens of the i-th sample (after shuffling), as int64. Past the index, i wraps
        modulo the length, as gpt-neox's IndexError fallback does."""
        j = int(self.shuffle_idx[i if i < len(self.shuffle_idx) else i % max(1, len(self))])
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

    def spans(self, i: int) -> list[tuple[int, int, int, int]]:
        """Where the i-th sample's tokens come from, in order: (position in doc_idx, document, first token, end
        token) of each document it spans; their token ranges, concatenated, are __getitem__(i)."""
        j = int(self.shuffle_idx[i if i < len(self.shuffle_idx) else i % max(1, len(self))])
        (first, offset), (last, end) = self.sample_idx[j], self.sample_idx[j + 1]
        out = []
        for k in range(int(first), int(last) + 1):
            doc = int(self.doc_idx[k])
            start = int(offset) if k == first else 0
            stop = int(end) + 1 if k == last else int(self.shard.sizes[doc])
            out.append((k, doc, start, stop))
        return out

    def report_bad_id(self, first: int, last: int):
        """The RunError naming the document (of the sample's documents first..last) that holds a bad id."""
        for k in range(first, last + 1):
            doc = int(self.doc_idx[k])
            ids = self.shard[doc]
            bad = ids[(ids >= self.vocab_size) | (ids < 0)] if ids.dtype.kind == "i" else ids[ids >= self.vocab_size]
            if len(bad):
                raise RunError(
                    f"shard {self.shard.prefix}: document {doc} holds token id {int(bad[0]):,}, outside "
                    f"the vocabulary ({self.vocab_size:,} ids); check it with: neox-data verify "
                    f"{self.shard.prefix}"
                )


def _largest_error_first(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    # gpt-neox's build_blending_indices (helpers.cpp), operation for operation: sample i goes to the first source
    # with the largest weight x max(i, 1) - samples so far.
    counts = np.zeros(len(weights), dtype=np.int64)
    source, within = np.empty(size, dtype=np.int16), np.empty(size, dtype=np.int64)
    for i in range(size):
        scale = max(float(i), 1.0)
        best, best_error = 0, weights[0] * scale - float(counts[0])
        for d in range(1, len(weights)):
            error = weights[d] * scale - float(counts[d])
            if error > best_error:
                best, best_error = d, error
        source[i], within[i] = best, counts[best]
        counts[best] += 1
    return source, within


def neox_weights(weights) -> list[float]:
    """Weights normalised as gpt-neox normalises them (in Python floats), the blend's input."""
    weights = [float(w) for w in weights]
    if not weights or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"blend weights must be >= 0 with a positive sum, got {weights}")
    return [w / sum(weights) for w in weights]


COMPILE_ABOVE = 50_000  # samples: fewer take the loop as Python (~4 us a sample) in less than numba's start-up


@functools.cache
def _compiled_loop():
    import numba  # ~0.2 s to import and ~0.5 s to load the cached machine code: paid only for long blends

    return numba.njit(cache=True)(_largest_error_first)


def blend_index(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, sample within the source) of the first `size` blended samples: gpt-neox's BlendableDataset order
    (its index is sequential, so a prefix is the same whatever its full length).

    Compiled with numba past COMPILE_ABOVE samples, as gpt-neox compiles its loop in C++: 10M samples over 22
    sources in ~0.5 s. The same code either way, in IEEE doubles without fused operations, so the same order.
    int16 sources: a blend has at most a few hundred shards.
    """
    weights = np.array(neox_weights(weights), dtype=np.float64)
    loop = _compiled_loop() if size > COMPILE_ABOVE else _largest_error_first
    return loop(weights / np.sum(weights), size)


class BlendedDataset:
    """Samples of several sources in gpt-neox's blended order. Its length is gpt-neox's (the sum of the sources'
    lengths), which decides where a read wraps; the index is built only as far as the run reads."""

    def __init__(self, sources: list, source: np.ndarray, within: np.ndarray, names=None, weights=None):
        self.sources, self.source, self.within = sources, source, within
        self.names = names or [str(i) for i in range(len(sources))]
        self.weights = weights or [1.0] * len(sources)

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.sources[self.source[i]][int(self.within[i])]

    def spans(self, i: int) -> tuple[int, list[tuple[int, int, int, int]]]:
        """(source, its GPTDataset.spans) of the i-th blended sample."""
        return int(self.source[i]), self.sources[self.source[i]].spans(int(self.within[i]))
