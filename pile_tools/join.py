"""Final shards from committed parts: each part's shard appended in part order, hashed as its bytes go by.

A single-machine run joins while it encodes: a thread appends each part as soon as it and every part before it
are committed, so the copy of the tokens into the final files overlaps the encoding instead of following it, and
when the last part is done only its own shards are left to append. The final names appear by rename (the `.bin`,
then its `.idx`); until then the files are `PREFIX.bin.tmp`, never mistaken for a shard.

A joined part's tokens are not kept twice: once they are synced to disk, the journal `.parts/joined.json` records
how far each `PREFIX.bin.tmp` goes (bytes and xxh3-128 so far) and the part's `.bin` files are removed, so the disk
holds about one copy of the shards at any time, as gpt-neox's preprocessor needs (keeping every part until the end
needed two). The parts' `.idx` and receipts stay until the run is done. A rerun after a crash cuts each file back to
the journal, checks its hash, and goes on from the next part; a file that fails the check is dropped with the parts
it held, which are encoded again. Each part is checked as it is joined against the token count and xxh3-128 its
receipt records (a part is committed by a rename, not synced: a power cut can leave it short or zeroed); one that
differs is removed and named, and the rerun encodes it again.
"""

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import xxhash

from pile_tools.ground import InputError, write_json, writing
from pile_tools.indexed import check_pair, read_index, write_index
from pile_tools.readback import relative_inside

CHUNK = 8 << 20
JOURNAL = "joined.json"  # in the parts directory
RANK_MARK = "rank-"  # .parts/rank-R-of-N: a build-shards --rank R --world-size N writes to this directory
# What is read of a part's receipt (pile_tools/parts.py writes it), and of each shard it records
RECEIPT_KEYS = (
    "source",
    "start",
    "engine",
    "shards",
    "skipped",
    "skip_examples",
    "components_seen",
    "seconds",
    "lines",
)
SHARD_KEYS = ("component", "documents", "tokens", "text_bytes")
_buffers = threading.local()  # one reused read buffer per thread: no 8 MB allocation per appended file


def _buffer() -> memoryview:
    if not hasattr(_buffers, "view"):
        _buffers.view = memoryview(bytearray(CHUNK))
    return _buffers.view


class JoinedShard:
    """One final shard being written: `PREFIX.bin.tmp`, the xxh3-128 of what it holds, its documents' sizes."""

    def __init__(self, prefix: Path, file=None):
        self.prefix, self.tmp = prefix, Path(f"{prefix}.bin.tmp")
        if file is None:
            with writing(Path(f"{prefix}.bin")):
                prefix.parent.mkdir(parents=True, exist_ok=True)
                file = open(self.tmp, "wb", buffering=0)
        self.file, self.length = file, 0
        self.hash = xxhash.xxh3_128()
        self.sizes: list[np.ndarray] = []

    @classmethod
    def reopen(cls, prefix: Path, length: int, digest: str) -> "JoinedShard | None":
        """The shard a crashed run left, cut back to the `length` bytes its journal vouches for; None when they are
        not there as journaled (the file is gone, shorter, or its hash differs): what it held must be made again."""
        tmp, final = Path(f"{prefix}.bin.tmp"), Path(f"{prefix}.bin")
        if not tmp.is_file() and final.is_file():  # renamed into place before the crash, the run not yet done
            final.replace(tmp)
        try:
            file = open(tmp, "r+b", buffering=0)
        except OSError:
            return None
        shard = cls(prefix, file)
        view = _buffer()
        while shard.length < length and (n := file.readinto(view[: min(CHUNK, length - shard.length)])):
            shard.hash.update(view[:n])
            shard.length += n
        if shard.length != length or shard.hash.hexdigest() != digest:
            shard.discard()
            return None
        with writing(final):
            file.truncate(length)
        return shard

    def append(self, src: Path, stat: dict) -> None:
        """Append the part shard `src` (its .bin's bytes, its .idx's sizes): one read, one write, hashed between;
        then check the bytes are those its receipt's `stat` records. PartNotWhole when they are not: the bytes
        appended past `length` are then not the shard's."""
        view, mine, start = _buffer(), xxhash.xxh3_128(), self.length
        try:
            part, index = open(f"{src}.bin", "rb", buffering=0), read_index(Path(f"{src}.idx"))
        except (OSError, ValueError) as e:
            raise PartNotWhole(f"{src}: cannot read this committed part ({e})") from None
        with part, writing(Path(f"{self.prefix}.bin")):
            while n := part.readinto(view):
                self.hash.update(view[:n])
                mine.update(view[:n])
                written = 0
                while written < n:
                    written += self.file.write(view[written:n])
                self.length += n
        dtype, sizes = index[0], np.array(index[1])
        nbytes, tokens = self.length - start, int(sizes.sum())
        recorded = stat.get("tokens", tokens)
        if nbytes != recorded * dtype.itemsize or tokens != recorded:
            raise PartNotWhole(
                f"{src}.bin: {nbytes:,} bytes and {tokens:,} tokens in its .idx, where its receipt records "
                f"{recorded:,} tokens ({recorded * dtype.itemsize:,} bytes)"
            )
        if stat.get("xxh3_128", mine.hexdigest()) != mine.hexdigest():
            raise PartNotWhole(f"{src}.bin: content differs from the xxh3-128 its receipt records")
        self.sizes.append(sizes)

    def sync(self) -> None:
        """Flush what is appended to the disk."""
        with writing(Path(f"{self.prefix}.bin")):
            os.fsync(self.file.fileno())

    def record(self) -> dict:
        """The journal's record of what the file holds so far."""
        return {"bytes": self.length, "xxh3_128": self.hash.hexdigest()}

    def commit(self, dtype: np.dtype) -> str:
        """Put the .bin in place, then write its .idx; returns the .bin's xxh3-128."""
        with writing(Path(f"{self.prefix}.bin")):
            self.file.close()
            self.tmp.replace(f"{self.prefix}.bin")
        write_index(Path(f"{self.prefix}.idx"), np.concatenate(self.sizes), dtype)
        return self.hash.hexdigest()

    def discard(self) -> None:
        """Close and remove the unfinished .bin.tmp (a failed or abandoned run)."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class PartNotWhole(InputError):
    """A committed part that is not as its receipt records: renamed into place, then cut short by a crash before
    its bytes reached the disk (or damaged since)."""


def read_receipt(where: Path, complete: bool = False) -> dict:
    """The receipt of the committed part `where`; PartNotWhole when it cannot be read, records no shards, or
    (`complete`: all the final assembly reads) lacks any of RECEIPT_KEYS and SHARD_KEYS."""
    try:
        receipt = json.loads((where / "receipt.json").read_text())
        if not isinstance(receipt, dict) or not isinstance(receipt.get("shards"), dict):
            raise ValueError("no shards recorded")
        for prefix in receipt["shards"]:
            relative_inside(prefix)
        if complete:
            missing = [key for key in RECEIPT_KEYS if key not in receipt]
            for prefix, stat in receipt["shards"].items():
                missing += [f"{prefix} {key}" for key in SHARD_KEYS if not isinstance(stat, dict) or key not in stat]
                if isinstance(stat, dict) and "tokens" in stat and not is_count(stat["tokens"]):
                    missing.append(f"{prefix} tokens as a count")
            if missing:
                raise ValueError(f"it records no {', '.join(missing)}")
        return receipt
    except (OSError, ValueError) as e:
        raise PartNotWhole(f"{where / 'receipt.json'}: cannot read this committed part's receipt ({e})") from None


def is_count(value) -> bool:
    """Whether a value read back is a count: a non-negative JSON integer."""
    return type(value) is int and value >= 0


def whole_part_problem(where: Path) -> str | None:
    """What makes the committed part `where` unfit to merge, from its receipt and its shards' sizes (no hashing),
    or None: a receipt that cannot be read, a shard whose .bin and .idx disagree or whose tokens are not those
    the receipt records."""
    try:
        shards = read_receipt(where, complete=True)["shards"]
        for prefix, stat in shards.items():
            if (problem := check_pair(where / prefix)) is not None:
                return problem
            tokens = int(np.asarray(read_index(Path(f"{where / prefix}.idx"))[1], np.int64).sum())
            if tokens != stat["tokens"]:
                return f"{where / prefix}.idx: {tokens:,} tokens, where its receipt records {stat['tokens']:,}"
    except (PartNotWhole, OSError, ValueError) as e:
        return str(e)
    return None


def holds_its_tokens(where: Path) -> bool:
    """Whether a committed part still holds every shard it made (a single-machine run removes them once joined)."""
    try:
        return all(Path(f"{where / prefix}.bin").is_file() for prefix in read_receipt(where)["shards"])
    except PartNotWhole:
        return False


class Joiner(threading.Thread):
    """Appends committed parts to the final shards in part order, in a thread started at once beside the
    encoding, and removes each part's tokens once they are synced into the shards and journaled. A rerun takes up
    where the journal ends. It joins only once its gate is open (the parts' engine confirmed); `finish()` opens
    it, waits for the last part and returns the shards, or raises what failed."""

    def __init__(self, out: Path, parts_dir: Path, n_parts: int, echo=print):
        super().__init__(daemon=True, name="join-parts")
        self.out, self.parts_dir, self.n_parts = out, parts_dir, n_parts
        self.journal = parts_dir / JOURNAL
        self.joined, self.shards = 0, {}
        self.gate, self.stopping, self.error = threading.Event(), threading.Event(), None
        if self.journal.is_file():
            self.resume(echo)
        self.start()

    def resume(self, echo) -> None:
        """Reopen the shards a crashed run was joining, as far as its journal goes; if any is not as journaled,
        start the joining again, with the parts whose tokens were removed encoded again."""
        try:
            journal = json.loads(self.journal.read_text())
            for prefix, record in journal["shards"].items():
                self.shards[prefix] = JoinedShard.reopen(self.out / prefix, record["bytes"], record["xxh3_128"])
            if None not in self.shards.values():
                for index in range(journal["joined"]):
                    where = self.parts_dir / f"{index:05d}"
                    for prefix in read_receipt(where)["shards"]:
                        self.shards[prefix].sizes.append(np.array(read_index(where / f"{prefix}.idx")[1]))
                self.joined = journal["joined"]
                return
            lost = ", ".join(sorted(prefix for prefix, shard in self.shards.items() if shard is None))
        except (OSError, ValueError, KeyError, InputError) as e:
            lost = f"the journal or a part's index is unreadable: {e}"
        self.start_over(f"{self.out}: the joined shards are not as {self.journal} records ({lost})", echo)

    def start_over(self, why: str, echo) -> None:
        """Drop the joined shards, and the parts whose tokens only they held: those are encoded again."""
        for shard in self.shards.values():
            if shard is not None:
                shard.discard()
        self.shards = {}
        for tmp in self.out.glob("*/*.bin.tmp"):
            tmp.unlink()
        redo = 0
        for where in (p for p in self.parts_dir.iterdir() if p.name.isdigit()):
            if not holds_its_tokens(where):
                shutil.rmtree(where)
                redo += 1
        self.journal.unlink()
        echo(f"warning: {why}; the {redo} part(s) they held are encoded again")

    def start_joining_once(self, verdict, engine: str) -> None:
        """Open the gate when `verdict`, the future of the exactness check, confirms the parts' `engine` (at once
        for None: no check under way); a refused engine's parts are made again, and never joined."""
        if verdict is None:
            self.gate.set()
        else:
            verdict.add_done_callback(lambda f: f.exception() is None and f.result() == engine and self.gate.set())

    def run(self) -> None:
        try:
            while self.joined < self.n_parts:
                where = self.parts_dir / f"{self.joined:05d}"
                if not (self.gate.is_set() and (where / "receipt.json").is_file()):
                    if self.stopping.wait(0.05):
                        return
                    continue
                try:
                    stats = read_receipt(where)["shards"]
                    for prefix, stat in stats.items():
                        if prefix not in self.shards:
                            self.shards[prefix] = JoinedShard(self.out / prefix)
                        self.shards[prefix].append(where / prefix, stat)
                except PartNotWhole as e:  # a rerun encodes it again, and cuts the shards back to the journal
                    shutil.rmtree(where)
                    raise PartNotWhole(
                        f"{e}; the part is removed: run the same command again to make it anew"
                    ) from None
                self.joined += 1
                self.settle(where, stats)
        except Exception as e:  # re-raised by finish(), in the main thread
            self.error = e

    def settle(self, where: Path, prefixes) -> None:
        """Sync the shards `where`'s part went into, journal every shard's length and hash, then remove the part's
        tokens: from here on the shards hold the only copy."""
        for prefix in prefixes:  # the other shards were synced when they last grew
            self.shards[prefix].sync()
        records = {prefix: shard.record() for prefix, shard in self.shards.items()}
        write_json(self.journal, {"joined": self.joined, "shards": records}, durable=True)
        for prefix in prefixes:
            Path(f"{where / prefix}.bin").unlink()

    def raise_if_failed(self) -> None:
        """Raise what stopped the joining (a full disk, an unreadable part), once it has stopped."""
        if self.error is not None:
            self.join()
            self.release()
            raise self.error

    def finish(self) -> dict[str, JoinedShard]:
        """Wait until every part is appended; the shards by prefix."""
        self.gate.set()
        self.join()
        self.raise_if_failed()
        return self.shards

    def abandon(self) -> None:
        """Stop (the encoding failed) and let go of the unfinished files."""
        self.stopping.set()
        self.join()
        self.release()

    def release(self) -> None:
        """Close the unfinished files; remove them too, unless the journal vouches for them (a rerun goes on with
        them: the tokens of the parts they hold are nowhere else)."""
        keep = self.journal.is_file()
        for shard in self.shards.values():
            if keep:
                shard.file.close()
            else:
                shard.discard()
