"""One part of a build-shards run: read -> split by hash -> encode -> write per (split, component) shards.

A part's results go to `.parts/NNNNN.tmp-PID/` and become `.parts/NNNNN/` by one rename once its receipt is
written, so a part is either absent or complete: a crash redoes only unfinished parts. The files are not synced
before the rename, so a power cut can leave a committed part short or zeroed: the receipt records each shard's
xxh3-128 and token count, which the join checks.
"""

import json
import os
import shutil
import time
from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import xxhash

from pile_tools.components import SPLITS, slugify
from pile_tools.encoding import Encoder
from pile_tools.ground import InputError, prefetch, writing
from pile_tools.indexed import ShardWriter
from pile_tools.reader import Part, PartReader, Skips, batched_by_chars
from pile_tools.sourcemap import lines_file, save_lines

BATCH_CHARS = 4 << 20  # text per encode call: large enough to amortise the call, small enough to stream


@dataclass(frozen=True)
class PartConfig:
    """What every part of a run needs; picklable so it can be sent to worker processes."""

    tokenizer: str
    engine: str
    eod: int
    dtype: str
    split_thresholds: tuple[int, ...]
    component: str | None = None
    max_doc_bytes: int = 0
    strict: bool = False
    threaded: bool = False  # one worker: the engine encodes on all cores, reading runs in a thread ahead


def split_thresholds(weights: list[float]) -> tuple[int, ...]:
    """Cumulative cut points on [0, 2**64) for the train/valid/test weights."""
    total = sum(weights)
    cuts, acc = [], 0.0
    for w in weights[:-1]:
        acc += w
        cuts.append(min(int(acc / total * 2**64), 2**64))
    return tuple(cuts)


def split_of(data: bytes, thresholds: tuple[int, ...]) -> int:
    """A document's split from a hash of its text: stable across runs, orders and workers; duplicates agree.

    XXH3-64 is a fixed, documented algorithm (stable across xxhash versions) and ~80x faster than blake2b here."""
    return bisect_right(thresholds, xxhash.xxh3_64_intdigest(data))


def append_eod(ids: np.ndarray, counts: np.ndarray, eod: int) -> tuple[np.ndarray, np.ndarray]:
    """Interleave one EOD after each document's ids: returns (tokens, sizes) with sizes = counts + 1."""
    sizes = counts + 1
    out = np.empty(len(ids) + len(counts), dtype=ids.dtype)
    ends = np.cumsum(sizes) - 1
    is_eod = np.zeros(len(out), dtype=bool)
    is_eod[ends] = True
    out[is_eod] = eod
    out[~is_eod] = ids
    return out, sizes


class PartWriter:
    """Routes encoded documents to one ShardWriter per (split, component) and keeps their counts and the input
    line of each document (the part's source map)."""

    def __init__(self, root: Path, dtype: str):
        self.root, self.dtype = root, np.dtype(dtype)
        self.writers: dict[tuple[str, str], ShardWriter] = {}
        self.stats: dict[str, dict] = {}
        self.lines: dict[tuple[str, str], list[np.ndarray]] = {}

    def write(self, keys: list[tuple[str, str]], tokens: np.ndarray, sizes: np.ndarray, nbytes: list[int], lines):
        """Route one encoded batch to the shard of each document's (split, component); `lines`: each document's
        line in the part."""
        lines = np.asarray(lines, np.uint64)
        uniq = sorted(set(keys))
        codes = np.array([uniq.index(k) for k in keys], np.int16) if len(uniq) > 1 else np.zeros(len(keys), np.int16)
        token_codes = np.repeat(codes, sizes) if len(uniq) > 1 else None  # int16: a tenth of the memory traffic
        for code, key in enumerate(uniq):
            docs = codes == code
            mine = tokens if token_codes is None else tokens[token_codes == code]
            self._writer(key).add(mine, sizes[docs])
            self.lines[key].append(lines[docs])
            stat = self.stats[prefix_of(key)]
            stat["max_id"] = max(stat["max_id"], int(mine.max()))  # train checks it against the model's vocabulary
            stat["documents"] += int(docs.sum())
            stat["tokens"] += int(sizes[docs].sum())
            stat["text_bytes"] += sum(b for b, d in zip(nbytes, docs) if d)

    def _writer(self, key: tuple[str, str]) -> ShardWriter:
        if key not in self.writers:
            prefix = prefix_of(key)
            if prefix in self.stats:
                raise InputError(
                    f"components {key[1]!r} and {self.stats[prefix]['component']!r} share the file name {prefix}"
                )
            self.stats[prefix] = {
                "split": key[0],
                "component": key[1],
                "documents": 0,
                "tokens": 0,
                "text_bytes": 0,
                "max_id": 0,
            }
            self.writers[key] = ShardWriter(self.root / prefix, self.dtype)
            self.lines[key] = []
        return self.writers[key]

    def close(self):
        """Close every shard writer of the part; each shard's stats get the xxh3-128 of its .bin, which the joiner
        checks (a part renamed into place is not yet on the disk: a power cut can leave it short or zeroed)."""
        for key, w in self.writers.items():
            w.close()
            self.stats[prefix_of(key)]["xxh3_128"] = w.hash.hexdigest()
            lines = np.concatenate(self.lines[key])
            self.stats[prefix_of(key)]["lines_xxh3_128"] = save_lines(lines_file(self.root / prefix_of(key)), lines)


def prefix_of(key: tuple[str, str]) -> str:
    """The shard of a (split, component): `train/pile-cc`."""
    return f"{key[0]}/{slugify(key[1])}"


def batches(reader: PartReader, thresholds: tuple[int, ...]):
    """Yield ([(key, text, utf-8 size, line)...] of about BATCH_CHARS characters, input bytes read so far).

    Runs in the prefetch thread, so the read position is taken here, beside the reads, not from another thread.
    """

    def keyed():
        for component, text, line in reader.documents():
            data = text.encode("utf-8")
            yield (SPLITS[split_of(data, thresholds)], component), text, len(data), line

    for batch in batched_by_chars(keyed(), BATCH_CHARS, lambda item: len(item[1])):
        yield batch, reader.consumed  # read up to the batch's last document: the generators read lazily


@lru_cache(maxsize=2)
def cached_encoder(tokenizer: str, engine: str, threaded: bool) -> Encoder:
    """One encoder per worker process, not per part: loading a tokenizer costs more than a small part."""
    return Encoder(Path(tokenizer), engine, threaded)


def process_part(part: Part, config: PartConfig, parts_dir: Path, report=None) -> dict:
    """Encode one part into `parts_dir/NNNNN/` and return its receipt. `report(bytes, docs, tokens, text)`."""
    start = time.time()
    final, tmp = parts_dir / f"{part.index:05d}", parts_dir / f"{part.index:05d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    encoder = cached_encoder(config.tokenizer, config.engine, config.threaded)
    skips = Skips(config.strict)
    reader = PartReader(part, config.component, skips, config.max_doc_bytes)
    writer, reported = PartWriter(tmp, config.dtype), 0
    docs = batches(reader, config.split_thresholds)
    docs = iter(prefetch(docs) if config.threaded else docs)
    phases = {"read": 0.0, "encode": 0.0, "write": 0.0}  # read: decompress, parse, split (or the wait for it)
    with writing(tmp):
        while True:
            mark = time.perf_counter()
            item = next(docs, None)
            phases["read"] += time.perf_counter() - mark
            if item is None:
                break
            batch, consumed = item
            mark = time.perf_counter()
            ids, counts = encoder.encode([text for _, text, _, _ in batch])
            phases["encode"] += time.perf_counter() - mark
            mark = time.perf_counter()
            tokens, sizes = append_eod(ids, counts, config.eod)
            writer.write([d[0] for d in batch], tokens, sizes, [d[2] for d in batch], [d[3] for d in batch])
            phases["write"] += time.perf_counter() - mark
            if report:
                report(consumed - reported, len(batch), len(tokens), sum(d[2] for d in batch))
                reported = consumed
        mark = time.perf_counter()
        writer.close()
        phases["write"] += time.perf_counter() - mark
    receipt = {
        "part": part.index,
        "source": part.source,
        "start": part.start,
        "end": part.end,
        "engine": config.engine,
        "shards": writer.stats,
        "skipped": skips.counts,
        "skip_examples": skips.examples,
        "components_seen": sorted(reader.components_seen),
        "lines": reader.lines,  # of the input, read by this part: the source map's lines of later parts follow
        "seconds": round(time.time() - start, 3),
        "phase_seconds": {k: round(v, 3) for k, v in phases.items()},
    }
    with writing(tmp):
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "receipt.json").write_text(json.dumps(receipt, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return receipt
