"""Megatron's memory-mapped indexed dataset, version 1: the `.bin`/`.idx` pair Megatron-LM and gpt-neox read.

`.idx`, little-endian, no padding:
    9 bytes  magic b"MMIDIDX\\x00\\x00"
    u64      version = 1
    u8       dtype code of the tokens (DTYPES)
    u64      N, the number of sequences
    u64      M = N + 1, the number of document boundaries
    i32[N]   sizes: tokens in each sequence
    i64[N]   pointers: byte offset of each sequence in `.bin`
    i64[M]   doc_idx: the first sequence of each document, then N; 0..N here (one sequence per document)
`.bin`: the tokens of all sequences back to back, in the dtype named by the code.
"""

import os
import struct
from pathlib import Path

import numpy as np
import xxhash

from pile_tools.ground import writing

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float32,
    7: np.float64,
    8: np.uint16,
}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits with room to spare (Megatron's own cut-off is 65,500), else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def write_index(path: Path, sizes: np.ndarray, dtype: np.dtype) -> None:
    """Write the `.idx` for sequences of `sizes` tokens of `dtype`, atomically (temp file, then rename)."""
    sizes = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    tmp = Path(f"{path}.tmp")
    with writing(path):
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC)
                f.write(struct.pack("<QBQQ", VERSION, CODES[np.dtype(dtype)], len(sizes), len(sizes) + 1))
                f.write(sizes.astype("<i4", copy=False).tobytes())
                f.write(pointers.astype("<i8", copy=False).tobytes())
                f.write(np.arange(len(sizes) + 1, dtype="<i8").tobytes())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def read_index(path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """Return (dtype, sizes, pointers, doc_idx) of an `.idx` file, memory-mapped."""
    with open(path, "rb") as f:
        header = f.read(len(MAGIC) + 25)
        size = os.fstat(f.fileno()).st_size
    if header[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{path}: not a Megatron MMapIndexedDataset index (bad magic)")
    if len(header) < len(MAGIC) + 25:
        raise ValueError(f"{path}: {size} bytes, shorter than an index's header (cut short)")
    version, code, n, m = struct.unpack("<QBQQ", header[len(MAGIC) :])
    if version != VERSION or code not in DTYPES:
        raise ValueError(f"{path}: unsupported index version {version} or dtype code {code}")
    offset = len(header)
    if size < offset + 12 * n + 8 * m:  # sizes, pointers and doc_idx as the header counts them
        raise ValueError(f"{path}: {size:,} bytes, where its header's {n:,} documents need {offset + 12 * n + 8 * m:,}")
    sizes = np.memmap(path, "<i4", "r", offset, (n,)) if n else np.zeros(0, np.int32)
    pointers = np.memmap(path, "<i8", "r", offset + 4 * n, (n,)) if n else np.zeros(0, np.int64)
    doc_idx = np.memmap(path, "<i8", "r", offset + 12 * n, (m,))
    return np.dtype(DTYPES[code]), sizes, pointers, doc_idx


def check_pair(prefix: Path) -> str | None:
    """What is wrong with a `.bin`/`.idx` pair, from their sizes alone (milliseconds), or None."""
    try:
        dtype, sizes, pointers, _ = read_index(Path(f"{prefix}.idx"))
        actual = os.path.getsize(f"{prefix}.bin")
    except (OSError, ValueError) as e:
        return str(e)
    if dtype.kind not in "iu":
        return f"{prefix}.idx: dtype {dtype.name} does not hold token ids"
    expected = int(np.asarray(sizes, np.int64).sum()) * dtype.itemsize
    if expected != actual:
        return f"{prefix}.bin: {actual:,} bytes, but the .idx sizes sum to {expected:,} (truncated or not its pair)"
    if len(sizes) and int(pointers[-1]) + int(sizes[-1]) * dtype.itemsize != actual:
        return f"{prefix}.idx: the pointers do not end at the end of .bin"
    return None


class ShardWriter:
    """Appends sequences to `<prefix>.bin`; `close()` writes `<prefix>.idx`. For files inside a temp directory."""

    def __init__(self, prefix: Path, dtype: np.dtype):
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(f"{prefix}.bin", "wb")
        self._sizes: list[np.ndarray] = []
        self.hash = xxhash.xxh3_128()  # of the .bin's bytes: whoever reads the file back can tell it is whole

    def add(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append sequences given as their concatenated tokens and each one's length."""
        data = np.ascontiguousarray(tokens, self.dtype.newbyteorder("<"))  # its buffer, not a copy
        self._bin.write(data)
        self.hash.update(data)
        self._sizes.append(np.asarray(sizes, np.int32))

    def close(self) -> None:
        """Flush the .bin and write the .idx beside it."""
        self._bin.close()
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)
        write_index(Path(f"{self.prefix}.idx"), sizes, self.dtype)


class Shard:
    """Read-only view of a `.bin`/`.idx` pair: `len(shard)` sequences, `shard[i]` the tokens of one."""

    def __init__(self, prefix: Path):
        self.prefix = Path(prefix)
        self.dtype, self.sizes, self.pointers, self.doc_idx = read_index(Path(f"{prefix}.idx"))
        nbytes = os.path.getsize(f"{prefix}.bin")
        self.tokens = np.memmap(f"{prefix}.bin", self.dtype, "r") if nbytes else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start : start + int(self.sizes[i])])
