"""The source map: for every document of every shard, the input file and the line it came from.

    DIR/<split>/<component>.lines.npy  one line number per document, in the shard's document order: the line of
                                       the decompressed input where the document's JSON line is, counting from 1
                                       (a .txt input's one document is line 1; a Hugging Face dataset's, its row
                                       from 1). uint32, 4 bytes a document: the Pile's largest input has ~7M
                                       lines; uint64 where an input has 2**32 lines or more.
    manifest.json, each shard's        {"runs": [[first document, input], ...], "xxh3_128": of the .lines.npy}:
    "source_map"                       which of manifest.json's "inputs" each run of the shard's documents came
                                       from (a shard's documents come part by part, in part order)

The .bin and .idx are not touched: gpt-neox and Megatron read the shards as before and never look at the
.lines.npy. A part writes its documents' lines relative to its own first line, with the lines it read in its
receipt; the assembly adds the lines of the parts before it in the same input, so a byte range of a large .jsonl
(a part of its own) numbers its lines as the whole file does, whatever ranks or restarts made the parts.
"""

import os
from bisect import bisect_right
from pathlib import Path

import numpy as np
import xxhash

from pile_tools.ground import InputError, writing

LINES = ".lines.npy"


def lines_file(prefix: Path) -> Path:
    """The source map of the shard `prefix`: its documents' lines."""
    return Path(f"{prefix}{LINES}")


def save_lines(path: Path, lines: np.ndarray) -> str:
    """Lines as a .npy, atomically, in uint32 unless a line number needs more; returns the file's xxh3-128."""
    top = int(lines.max()) if len(lines) else 0
    lines = lines.astype(np.uint32 if top < 2**32 else np.uint64)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.npy")
    with writing(path):
        try:
            np.save(tmp, lines)
            digest = xxhash.xxh3_128(tmp.read_bytes()).hexdigest()
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return digest


def load_lines(path: Path) -> np.ndarray:
    """A .lines.npy memory-mapped, as data only (no pickle); an InputError naming it when it is not a whole array
    of unsigned line numbers."""
    try:
        lines = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a whole .npy array of line numbers ({e})") from None
    if lines.ndim != 1 or lines.dtype not in (np.uint32, np.uint64):
        raise InputError(f"{path}: {lines.dtype} {list(lines.shape)}, not one unsigned line number per document")
    return lines


def line_offsets(receipts: list[tuple[Path, dict]]) -> dict[Path, int]:
    """Lines of its input before each part (by part directory): those of the parts before it in the same input.
    `receipts` in part order, each recording the lines its part read."""
    before, offsets = {}, {}
    for where, receipt in receipts:
        offsets[where] = before.get(receipt["source"], 0)
        before[receipt["source"]] = offsets[where] + receipt["lines"]
    return offsets


def write_source_map(prefix: Path, pieces: list[tuple[Path, dict, int, int]]) -> dict:
    """Join the parts' lines of the shard `prefix` into its .lines.npy; returns manifest.json's record of it.
    `pieces`, in part order: (the part's shard, its receipt's record of it, the input it read, its input's lines
    before it). A part's lines not as its receipt records (a power cut after its rename) are one line naming them."""
    arrays, runs, first = [], [], 0
    for part_shard, stat, source, offset in pieces:
        path, documents = lines_file(part_shard), stat["documents"]
        recorded = stat.get("lines_xxh3_128")
        if recorded is not None and (not path.is_file() or xxhash.xxh3_128(path.read_bytes()).hexdigest() != recorded):
            raise InputError(
                f"{path}: not the source map its part's receipt records; remove {part_shard.parent.parent} and run "
                "build-shards again to make that part anew"
            )
        lines = load_lines(path)
        if len(lines) != documents:
            raise InputError(f"{path}: {len(lines):,} lines for {documents:,} documents")
        arrays.append(lines.astype(np.uint64) + offset)
        if documents and (not runs or runs[-1][1] != source):
            runs.append([first, source])
        first += documents
    digest = save_lines(lines_file(prefix), np.concatenate(arrays) if arrays else np.zeros(0, np.uint64))
    return {"runs": runs, "xxh3_128": digest}


def source_map_problems(prefix: Path, record, documents: int, inputs: int) -> list[str]:
    """What is wrong with a shard's source map (`record`: manifest.json's), one line each; [] when it is whole:
    the file is there with the recorded hash, one line per document, lines from 1, runs from document 0 on,
    ascending, each naming one of the `inputs`."""
    path = lines_file(prefix)
    if not isinstance(record, dict) or not isinstance(record.get("runs"), list):
        return [f"{prefix}: manifest.json records no source map for this shard"]
    try:
        lines = load_lines(path)
    except InputError as e:
        return [str(e)]
    problems = []
    if xxhash.xxh3_128(path.read_bytes()).hexdigest() != record.get("xxh3_128"):
        problems.append(f"{path}: content differs from the xxh3-128 in manifest.json")
    if len(lines) != documents:
        problems.append(f"{path}: {len(lines):,} lines for the shard's {documents:,} documents")
    if len(lines) and int(lines.min()) < 1:
        problems.append(f"{path}: line 0 recorded (lines count from 1)")
    runs = record["runs"]
    firsts = [r[0] if isinstance(r, list) and len(r) == 2 else None for r in runs]
    ok = all(type(f) is int for f in firsts) and all(type(r[1]) is int and 0 <= r[1] < inputs for r in runs)
    if not ok or (runs and firsts[0] != 0) or firsts != sorted(set(firsts)) or (firsts and firsts[-1] >= documents):
        problems.append(f"{prefix}: manifest.json's source map runs are not [[first document, input], ...] in order")
    return problems


class SourceMap:
    """Where the documents of a build-shards directory's shards came from: (input file, line) by shard and document.
    Read from manifest.json (checked by its reader) and each shard's .lines.npy, memory-mapped, when first asked."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory = Path(directory)
        self.inputs = [i["path"] for i in manifest.get("inputs", [])]
        shards = [(name, e) for name, c in manifest.get("components", {}).items() for e in c["splits"].values()]
        self.records = {e["prefix"]: e.get("source_map") for _, e in shards}
        self.components = {e["prefix"]: name for name, e in shards}
        self.lines: dict[str, np.ndarray] = {}

    def covers(self, shard: str) -> bool:
        """Whether the shard (`train/pile-cc`) has a source map."""
        return isinstance(self.records.get(shard), dict)

    def locate(self, shard: str, document: int) -> tuple[str, int]:
        """(input file, line) of a shard's document."""
        if shard not in self.lines:
            if not self.covers(shard):
                raise InputError(f"{self.directory / shard}: no source map (built before neox-data kept one)")
            self.lines[shard] = load_lines(lines_file(self.directory / shard))
        runs = self.records[shard]["runs"]
        run = bisect_right([first for first, _ in runs], document) - 1
        if run < 0 or document >= len(self.lines[shard]):
            raise InputError(f"{self.directory / shard}: document {document} is not in its source map")
        return self.inputs[runs[run][1]], int(self.lines[shard][document])
