"""verify: the full audit of shards, in one read of each `.bin` at disk speed, shards in parallel; and of
checkpoints against their checksums.json.

For each `.bin`/`.idx` pair: the two agree (sizes, pointers, dtype); every document is non-empty and ends with the
EOD id; every id is below the tokenizer's vocabulary; the content checksum and the counts equal the ones
build-shards recorded in manifest.json; the source map (pile_tools/sourcemap.py) holds one line per document, with the
recorded hash; and blend.json's shards exist with the recorded token counts. Each problem
is one line naming the shard (and the document). For a checkpoint (a directory holding checksums.json) or a run
(holding such checkpoints): every recorded file is there with its size and xxh3-128, and `latest` names one.
"""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xxhash
from tqdm import tqdm

from pile_tools.checksums import recorded_bytes, verify_directory
from pile_tools.ground import InputError
from pile_tools.indexed import check_pair, read_index
from pile_tools.inspect import find_shards
from pile_tools.rundir import checkpoints_in, holds_unvouched_checkpoints, latest_file, read_latest
from pile_tools.shards_dir import BLEND, blend_file, manifest_entries, read_blend, read_manifest
from pile_tools.sourcemap import source_map_problems

CHUNK = 32 << 20  # bytes of .bin per read: large enough for numpy and xxhash to run at memory speed
MAX_LINES = 20  # problems of one kind listed per shard; the count is always complete
BUFFERS = threading.local()


class Audit:
    """The problems of one shard, at most MAX_LINES of each kind listed, all counted."""

    def __init__(self, name: str):
        self.name, self.lines, self.counts = name, [], {}

    def add(self, kind: str, line: str, n: int = 1) -> None:
        """Count `n` problems of `kind`; list `line` while fewer than MAX_LINES of that kind are listed."""
        self.counts[kind] = self.counts.get(kind, 0) + n
        if line and self.counts[kind] - n < MAX_LINES:
            self.lines.append(f"{self.name}: {line}")

    def summary(self) -> list[str]:
        """The problem lines kept, and a count of those left out per kind."""
        extra = [
            f"{self.name}: {n - MAX_LINES:,} more {kind} problems" for kind, n in self.counts.items() if n > MAX_LINES
        ]
        return self.lines + extra


def bad_ids(chunk: np.ndarray, vocab: int) -> np.ndarray:
    """Positions in `chunk` of ids outside [0, vocab)."""
    out = chunk >= vocab
    if chunk.dtype.kind == "i":
        out |= chunk < 0
    return np.flatnonzero(out)


def scan_bin(prefix: Path, dtype: np.dtype, starts: np.ndarray, sizes: np.ndarray, vocab, eod, audit, progress):
    """One pass over `.bin`: its xxh3-128, ids against the vocabulary, each document's last token against EOD.
    `starts`/`sizes`: each document's first token and its length, in tokens."""
    nonempty = np.flatnonzero(sizes > 0)
    ends = (starts + sizes)[nonempty]  # one past each non-empty document's last token, ascending
    h = xxhash.xxh3_128()
    if not hasattr(BUFFERS, "buf"):  # one buffer per thread, reused: a fresh 32 MB buffer per shard costs its zeroing
        BUFFERS.buf = bytearray(CHUNK)
    buf = memoryview(BUFFERS.buf)[: CHUNK - CHUNK % dtype.itemsize]
    offset = 0  # tokens before this chunk
    with open(f"{prefix}.bin", "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
            chunk = np.frombuffer(buf, dtype.newbyteorder("<"), n // dtype.itemsize)
            if vocab is not None and len(chunk) and (chunk.max() >= vocab or (dtype.kind == "i" and chunk.min() < 0)):
                bad = bad_ids(chunk, vocab)
                for pos in bad[:MAX_LINES] + offset:
                    doc = int(np.searchsorted(starts, pos, side="right")) - 1
                    where = (
                        f"document {doc}: token id {int(chunk[pos - offset]):,} at position {int(pos - starts[doc]):,}"
                    )
                    audit.add("id", f"{where} is outside the vocabulary ({vocab:,} ids)")
                if len(bad) > MAX_LINES:
                    audit.add("id", "", len(bad) - MAX_LINES)
            if eod is not None:
                lo, hi = np.searchsorted(ends, [offset + 1, offset + len(chunk) + 1])
                last = ends[lo:hi] - 1 - offset
                wrong = nonempty[np.flatnonzero(chunk[last] != eod) + lo]
                for doc in wrong[:MAX_LINES]:
                    audit.add("eod", f"document {int(doc)} does not end with the EOD id {eod}")
                if len(wrong) > MAX_LINES:
                    audit.add("eod", "", len(wrong) - MAX_LINES)
            offset += len(chunk)
            progress(n)
    return h.hexdigest()


def verify_shard(prefix: Path, name: str, entry: dict, vocab, eod, inputs: int, progress) -> list[str]:
    """The problems of one shard, one line each; its source map's too, when the manifest records one (of `inputs`)."""
    audit = Audit(name)
    if (problem := check_pair(prefix)) is not None:
        audit.add("pair", problem)
        progress(os.path.getsize(f"{prefix}.bin") if os.path.exists(f"{prefix}.bin") else 0)
        return audit.summary()
    dtype, sizes, pointers, _ = read_index(Path(f"{prefix}.idx"))
    sizes = np.asarray(sizes, np.int64)
    empty = np.flatnonzero(sizes == 0)
    for doc in empty[:MAX_LINES]:
        audit.add("empty", f"document {int(doc)} is empty")
    if len(empty) > MAX_LINES:
        audit.add("empty", "", len(empty) - MAX_LINES)
    digest = scan_bin(
        prefix, dtype, np.asarray(pointers, np.int64) // dtype.itemsize, sizes, vocab, eod, audit, progress
    )
    tokens = int(sizes.sum())
    for key, have in (("documents", len(sizes)), ("tokens", tokens), ("xxh3_128", digest)):
        if key in entry and entry[key] != have:
            audit.add(
                "manifest",
                f"{key} {have:,} but manifest.json records {entry[key]:,}"
                if key != "xxh3_128"
                else "content differs from the checksum in manifest.json",
            )
    if "source_map" in entry:
        for problem in source_map_problems(prefix, entry["source_map"], len(sizes), inputs):
            audit.add("source map", problem.removeprefix(f"{prefix}: "))
    return audit.summary()


def check_blend(root: Path) -> list[str]:
    """blend.json is well formed, its weights finite and >= 0 with a positive sum per split, and its shards exist
    with the token counts it records."""
    try:
        splits = read_blend(root)
    except InputError as e:
        return [str(e)]
    problems = []
    for split, shards in (splits or {}).items():
        if shards and sum(weight for _, weight, _ in shards) <= 0:
            problems.append(f"{blend_file(root)}: the {split} shards' weights sum to 0")
        for prefix, _, row in shards:
            if not Path(f"{prefix}.idx").is_file():
                problems.append(f"{BLEND}: {split} shard {row['prefix']} does not exist")
            elif check_pair(prefix) is None and row.get("tokens") is not None:
                tokens = int(np.asarray(read_index(Path(f"{prefix}.idx"))[1], np.int64).sum())
                if tokens != row["tokens"]:
                    problems.append(
                        f"{BLEND}: {row['prefix']} holds {tokens:,} tokens, {BLEND} records {row['tokens']:,}"
                    )
    return problems


def check_latest(root: Path, checkpoints: list[Path]) -> list[str]:
    """A run's `latest` names one of its checkpoints."""
    try:
        tag = read_latest(root)
    except InputError as e:
        return [str(e)]
    if tag is None or root / tag in checkpoints:
        return []
    return [f"{latest_file(root)}: names {tag}, which holds no checkpoint with checksums"]


def vocabulary(tokenizer: str | None, manifest: dict) -> tuple[int | None, int | None, str]:
    """(vocabulary size, EOD id, where they came from): --tokenizer, else the manifest's, else unknown."""
    if tokenizer is not None:
        from pile_tools.encoding import eod_id, load_reference, resolve_tokenizer

        path = resolve_tokenizer(tokenizer)
        reference = load_reference(path)
        return reference.get_vocab_size(with_added_tokens=True), eod_id(reference, path), str(path)
    t = manifest.get("tokenizer", {})
    if "vocab_size" in t:
        return t["vocab_size"], t.get("eod"), "manifest.json"
    return None, None, ""


def verify(targets: list[str], tokenizer: str | None, workers: int, echo) -> int:
    """Audit every shard under `targets`; prints each problem and a summary; returns the number of problems."""
    jobs, problems, checkpoints = [], [], []
    for target in targets:
        root = Path(target)
        if found := checkpoints_in(root):
            checkpoints += found
            problems += check_latest(root, found)
            continue
        if holds_unvouched_checkpoints(root):
            raise InputError(f"{root}: checkpoints without checksums.json (saved before they carried checksums)")
        prefixes, directory = find_shards(root)
        try:
            manifest = read_manifest(directory) if directory else {}
        except InputError as e:  # its records cannot vouch for the shards: the rest of the audit goes on
            problems.append(str(e))
            manifest = {}
        vocab, eod, source = vocabulary(tokenizer, manifest)
        if vocab is None:
            why = "no readable manifest.json" if directory else "no manifest.json"
            echo(f"note: {target}: {why} and no --tokenizer, so ids and EOD are not checked")
        entries = manifest_entries(manifest)
        for prefix in prefixes:
            name = f"{prefix.parent.name}/{prefix.name}"
            jobs.append((prefix, str(prefix), entries.get(name, {}), vocab, eod, len(manifest.get("inputs", []))))
        if root.is_dir():
            problems += check_blend(root)
    size = {p: os.path.getsize(f"{p}.bin") if os.path.exists(f"{p}.bin") else 0 for p, *_ in jobs}
    jobs.sort(key=lambda j: -size[j[0]])  # largest first: the threads finish together
    total = sum(size.values()) + sum(recorded_bytes(c) for c in checkpoints)
    start = time.perf_counter()
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="verifying", dynamic_ncols=True, leave=False, disable=None
    ) as bar:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            results = pool.map(lambda j: verify_shard(*j, bar.update), jobs)
            for lines in results:
                problems += lines
            for checkpoint in checkpoints:
                problems += verify_directory(checkpoint, pool=pool, progress=bar.update)
    for line in problems:
        echo(line)
    seconds = time.perf_counter() - start
    counts = [f"{len(jobs)} shard(s)"] * bool(jobs or not checkpoints)
    counts += [f"{len(checkpoints)} checkpoint(s)"] * bool(checkpoints)
    echo(
        f"{', '.join(counts)}, {total / 1e9:.2f} GB in {seconds:.2f} s ({total / 1e9 / max(seconds, 1e-9):.2f} "
        f"GB/s): " + (f"{len(problems)} problem(s)" if problems else "ok")
    )
    return len(problems)


def verify_or_fail(targets: list[str], tokenizer: str | None, workers: int, echo) -> None:
    """verify(), then an InputError (exit 1) if it found any problem."""
    if n := verify(targets, tokenizer, workers, echo):
        raise InputError(f"verify found {n} problem(s)")
