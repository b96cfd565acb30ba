"""The Megatron MMapIndexedDataset v1 pair, checked against a reader written from the format's description."""

import struct

import numpy as np
import pytest

from pile_tools.indexed import Shard, ShardWriter, token_dtype


def read_by_spec(prefix):
    """Megatron's .idx layout, parsed byte by byte: magic, u64 version, u8 dtype code, u64 N, u64 M, sizes, ..."""
    raw = open(f"{prefix}.idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n, m = struct.unpack_from("<QBQQ", raw, 9)
    offset = 9 + 8 + 1 + 8 + 8
    sizes = struct.unpack_from(f"<{n}i", raw, offset)
    pointers = struct.unpack_from(f"<{n}q", raw, offset + 4 * n)
    doc_idx = struct.unpack_from(f"<{m}q", raw, offset + 12 * n)
    assert offset + 12 * n + 8 * m == len(raw), "no padding, nothing after doc_idx"
    fmt = {8: "H", 4: "i"}[code]
    width = struct.calcsize(fmt)
    data = open(f"{prefix}.bin", "rb").read()
    docs = [list(struct.unpack_from(f"<{s}{fmt}", data, p)) for s, p in zip(sizes, pointers)]
    return version, code, n, m, list(sizes), list(pointers), list(doc_idx), docs, width


@pytest.mark.parametrize("vocab,code", [(50277, 8), (65499, 8), (65500, 4), (128256, 4)])
def test_writer_matches_spec(tmp_path, vocab, code):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=n) for n in (5, 1, 17, 300)]
    writer = ShardWriter(tmp_path / "x", token_dtype(vocab))
    writer.add(np.concatenate(docs[:2]), [5, 1])
    writer.add(np.concatenate(docs[2:]), [17, 300])
    writer.close()
    version, got_code, n, m, sizes, pointers, doc_idx, got, width = read_by_spec(tmp_path / "x")
    assert (version, got_code, n, m) == (1, code, 4, 5)
    assert sizes == [5, 1, 17, 300]
    assert pointers == [0, 5 * width, 6 * width, 23 * width]
    assert doc_idx == [0, 1, 2, 3, 4]
    assert got == [d.tolist() for d in docs]
    shard = Shard(tmp_path / "x")
    assert [shard[i].tolist() for i in range(len(shard))] == got


def test_empty_shard_round_trips(tmp_path):
    writer = ShardWriter(tmp_path / "e", np.uint16)
    writer.close()
    assert read_by_spec(tmp_path / "e")[2:4] == (0, 1)
    assert len(Shard(tmp_path / "e")) == 0
