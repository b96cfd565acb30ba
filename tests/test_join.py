"""The joiner: committed parts appended to the final shards in part order while later parts are still encoding."""

import json
import os
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from test_indexed import read_by_spec

from pile_tools.build import submission_order
from pile_tools.checksums import file_hash
from pile_tools.ground import InputError
from pile_tools.indexed import ShardWriter
from pile_tools.join import Joiner
from pile_tools.reader import Part

DTYPE = np.dtype(np.uint16)


def commit_part(parts_dir: Path, index: int, docs: dict[str, list[np.ndarray]]) -> None:
    """A committed part as process_part leaves it: NNNNN/PREFIX.bin/.idx and receipt.json, renamed into place."""
    tmp = parts_dir / f"{index:05d}.tmp-1"
    for prefix, seqs in docs.items():
        writer = ShardWriter(tmp / prefix, DTYPE)
        writer.add(np.concatenate(seqs), [len(s) for s in seqs])
        writer.close()
    (tmp / "receipt.json").write_text(json.dumps({"part": index, "shards": {p: {} for p in docs}}))
    os.rename(tmp, parts_dir / f"{index:05d}")


def random_parts(n: int) -> list[dict[str, list[np.ndarray]]]:
    rng = np.random.default_rng(0)

    def docs():
        return [rng.integers(0, 50000, rng.integers(1, 3000), dtype=np.uint16) for _ in range(rng.integers(1, 9))]

    return [{"train/a": docs(), **({"valid/b": docs()} if k % 2 else {})} for k in range(n)]


def wait_until(condition, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_parts_are_appended_as_they_are_committed_and_equal_the_whole(tmp_path):
    parts_dir, out = tmp_path / ".parts", tmp_path
    parts_dir.mkdir()
    parts = random_parts(4)
    joiner = Joiner(out, parts_dir, len(parts))
    joiner.start_joining_once(None, "gigatoken")
    commit_part(parts_dir, 1, parts[1])
    time.sleep(0.2)
    assert joiner.joined == 0 and not (out / "train").exists()  # part 0 comes first
    commit_part(parts_dir, 0, parts[0])
    wait_until(lambda: joiner.joined == 2)
    so_far = b"".join(d.tobytes() for p in parts[:2] for d in p["train/a"])
    assert (out / "train" / "a.bin.tmp").read_bytes() == so_far and not (out / "train" / "a.bin").exists()
    commit_part(parts_dir, 2, parts[2])
    commit_part(parts_dir, 3, parts[3])
    shards = joiner.finish()
    for prefix, joined in shards.items():
        digest = joined.commit(DTYPE)
        assert digest == file_hash(out / f"{prefix}.bin")
        got = read_by_spec(out / prefix)[7]
        assert got == [d.tolist() for p in parts for d in p.get(prefix, [])]
    assert sorted(shards) == ["train/a", "valid/b"] and not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("chosen,joined", [("gigatoken", 2), ("fastokens", 0)])
def test_parts_wait_for_the_check_to_confirm_their_engine(tmp_path, chosen, joined):
    """Parts made with an engine the exactness check refuses are made again: they must never reach the shards."""
    parts_dir = tmp_path / ".parts"
    parts_dir.mkdir()
    parts = random_parts(3)
    joiner, verdict = Joiner(tmp_path, parts_dir, 3), Future()
    joiner.start_joining_once(verdict, "gigatoken")
    commit_part(parts_dir, 0, parts[0])
    commit_part(parts_dir, 1, parts[1])
    time.sleep(0.2)
    assert joiner.joined == 0
    verdict.set_result(chosen)
    if joined:
        wait_until(lambda: joiner.joined == joined)
    else:
        time.sleep(0.3)
        assert joiner.joined == 0 and not (tmp_path / "train").exists()
    joiner.abandon()
    assert not list(tmp_path.rglob("*.bin.tmp"))


def test_an_unreadable_part_is_one_error_naming_it_and_leaves_no_partial_shard(tmp_path):
    parts_dir = tmp_path / ".parts"
    parts_dir.mkdir()
    parts = random_parts(2)
    joiner = Joiner(tmp_path, parts_dir, 2)
    commit_part(parts_dir, 0, parts[0])
    commit_part(parts_dir, 1, parts[1])
    (parts_dir / "00001" / "train" / "a.bin").unlink()
    joiner.start_joining_once(None, "gigatoken")
    wait_until(lambda: joiner.error is not None)  # the encoding asks after each part, and stops at once
    with pytest.raises(InputError, match=r"00001/train/a: cannot read this committed part"):
        joiner.raise_if_failed()
    assert not list(tmp_path.rglob("*.bin.tmp")) and not list(tmp_path.glob("*/*.bin"))


def test_parts_go_in_part_order_but_a_long_pole_starts_first():
    """Part order keeps the joiner moving; a part over half a worker's share would otherwise finish alone."""
    even = [Part(k, f"{k:02d}.jsonl", 0, 100 + k * 7 % 5) for k in range(30)]  # the Pile's 30 similar files
    assert submission_order(even, 16) == even
    small = [Part(k, "a.jsonl", k * 10, (k + 1) * 10) for k in range(20)]
    giant = Part(20, "b.jsonl", 0, 1000)
    assert submission_order([*small, giant], 4) == [giant, *small]
