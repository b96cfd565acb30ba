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
    tmp, stats = parts_dir / f"{index:05d}.tmp-1", {}
    for prefix, seqs in docs.items():
        writer = ShardWriter(tmp / prefix, DTYPE)
        writer.add(np.concatenate(seqs), [len(s) for s in seqs])
        writer.close()
        stats[prefix] = {"tokens": sum(len(s) for s in seqs), "xxh3_128": writer.hash.hexdigest()}
    (tmp / "receipt.json").write_text(json.dumps({"part": index, "shards": stats}))
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
    wait_until(lambda: not (parts_dir / "00001" / "valid" / "b.bin").exists())  # journaled, then removed
    journal = json.loads((parts_dir / "joined.json").read_text())
    assert journal["joined"] == 2 and journal["shards"]["train/a"]["bytes"] == len(so_far)
    assert not list(parts_dir.glob("0000[01]/*/*.bin")) and len(list(parts_dir.glob("0000[01]/*/*.idx"))) == 3
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
    assert bool(list(tmp_path.rglob("*.bin.tmp"))) == bool(joined)  # kept only where a journal vouches for them


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
    with pytest.raises(InputError, match=r"00001/train/a: cannot read this committed part.*the part is removed"):
        joiner.raise_if_failed()
    assert not (parts_dir / "00001").exists()  # a rerun encodes it again
    assert not list(tmp_path.glob("*/*.bin"))  # no shard looks done; part 0, journaled, is kept for a rerun
    assert (tmp_path / "train" / "a.bin.tmp").read_bytes() == b"".join(d.tobytes() for d in parts[0]["train/a"])


@pytest.mark.parametrize(
    "damage,message",
    [
        ("zeroed", "content differs from the xxh3-128 its receipt records"),
        ("short", "where its receipt records"),
        ("receipt", "cannot read this committed part's receipt"),
    ],
)
def test_a_part_not_as_its_receipt_records_is_named_removed_and_made_again(tmp_path, damage, message):
    """A part is renamed into place before its bytes reach the disk: after a power cut it can be zeroed or short
    under its receipt, or its receipt can be. It never reaches the shards: the error names it, the part is
    removed, and the rerun (the part encoded again) gives one clean run's shards."""
    parts_dir = tmp_path / ".parts"
    parts_dir.mkdir()
    parts = random_parts(4)
    for k in range(4):
        commit_part(parts_dir, k, parts[k])
    part = parts_dir / "00002" / "train" / "a.bin"
    if damage == "zeroed":
        part.write_bytes(bytes(part.stat().st_size))
    elif damage == "short":
        os.truncate(part, part.stat().st_size - 2)
    else:
        (parts_dir / "00002" / "receipt.json").write_bytes(bytes(64))
    joiner = Joiner(tmp_path, parts_dir, 4)
    joiner.start_joining_once(None, "gigatoken")
    with pytest.raises(InputError, match=f"00002.*{message}.*the part is removed"):
        joiner.finish()
    assert not (parts_dir / "00002").exists() and not list(tmp_path.glob("*/*.bin"))
    commit_part(parts_dir, 2, parts[2])  # what the rerun does first
    assert join_all(tmp_path, parts_dir, 4) == whole(parts)


def join_all(out: Path, parts_dir: Path, n: int, echo=print) -> dict[str, list[list[int]]]:
    """A Joiner's whole run from where the journal ends: every shard's documents, as read back."""
    joiner = Joiner(out, parts_dir, n, echo)
    joiner.start_joining_once(None, "gigatoken")
    docs = {}
    for prefix, joined in joiner.finish().items():
        assert joined.commit(DTYPE) == file_hash(out / f"{prefix}.bin")
        docs[prefix] = read_by_spec(out / prefix)[7]
    return docs


def whole(parts) -> dict[str, list[list[int]]]:
    return {p: [d.tolist() for part in parts for d in part.get(p, [])] for p in ("train/a", "valid/b")}


def crash_after(out: Path, parts_dir: Path, parts, joined: int) -> None:
    """A run killed once `joined` of its parts are journaled: its files stay as they are, past-journal bytes too."""
    for k in range(len(parts)):
        commit_part(parts_dir, k, parts[k])
    joiner = Joiner(out, parts_dir, joined)  # stops after `joined` parts, as if killed there
    joiner.start_joining_once(None, "gigatoken")
    joiner.join()
    for shard in joiner.shards.values():
        shard.file.close()
    with open(out / "train" / "a.bin.tmp", "ab") as f:
        f.write(b"unsynced bytes of a part that was being appended")


def test_a_rerun_goes_on_from_the_journal(tmp_path):
    """The parts a crashed run joined are gone but for their index; the rerun cuts the shards back to the journal
    and appends the rest: the same shards as one uninterrupted run."""
    parts_dir = tmp_path / ".parts"
    parts_dir.mkdir()
    parts = random_parts(5)
    crash_after(tmp_path, parts_dir, parts, 3)
    assert not list(parts_dir.glob("0000[012]/*/*.bin"))
    said = []
    assert join_all(tmp_path, parts_dir, 5, said.append) == whole(parts) and said == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_shards_not_as_journaled_are_dropped_with_the_parts_they_held(tmp_path, damage):
    """A shard whose journaled bytes changed (a lost write, a bad disk, a hand) is never trusted: it is dropped,
    with every part whose tokens it held, and those parts are encoded again; the parts still whole are kept."""
    parts_dir = tmp_path / ".parts"
    parts_dir.mkdir()
    parts = random_parts(5)
    crash_after(tmp_path, parts_dir, parts, 3)
    shard = tmp_path / "valid" / "b.bin.tmp"
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[5] ^= 1
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        os.truncate(shard, shard.stat().st_size - 2)
    else:
        shard.unlink()
    said = []
    joiner = Joiner(tmp_path, parts_dir, 5, said.append)
    joiner.abandon()
    assert len(said) == 1 and "valid/b" in said[0] and "the 3 part(s) they held are encoded again" in said[0]
    assert sorted(p.name for p in parts_dir.iterdir()) == ["00003", "00004"]
    assert not list(tmp_path.rglob("*.bin.tmp")) and not (parts_dir / "joined.json").exists()
    for k in range(3):  # what build-shards does next: encode them again
        commit_part(parts_dir, k, parts[k])
    assert join_all(tmp_path, parts_dir, 5) == whole(parts)


def test_parts_go_in_part_order_but_a_long_pole_starts_first():
    """Part order keeps the joiner moving; a part over half a worker's share would otherwise finish alone."""
    even = [Part(k, f"{k:02d}.jsonl", 0, 100 + k * 7 % 5) for k in range(30)]  # the Pile's 30 similar files
    assert submission_order(even, 16) == even
    small = [Part(k, "a.jsonl", k * 10, (k + 1) * 10) for k in range(20)]
    giant = Part(20, "b.jsonl", 0, 1000)
    assert submission_order([*small, giant], 4) == [giant, *small]
