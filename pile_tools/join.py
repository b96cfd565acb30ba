"""Final shards from committed parts: each part's shard appended in part order, hashed as its bytes go by.

A single-machine run joins while it encodes: a thread appends each part as soon as it and every part before it
are committed, so the copy of the tokens into the final files overlaps the encoding instead of following it, and
when the last part is done only its own shards are left to append. The final names appear by rename (the `.bin`,
then its `.idx`); until then the files are `PREFIX.bin.tmp`, never mistaken for a shard.
"""

import json
import threading
from pathlib import Path

import numpy as np
import xxhash

from pile_tools.ground import InputError, writing
from pile_tools.indexed import read_index, write_index

CHUNK = 8 << 20
_buffers = threading.local()  # one reused read buffer per thread: no 8 MB allocation per appended file


def _buffer() -> memoryview:
    if not hasattr(_buffers, "view"):
        _buffers.view = memoryview(bytearray(CHUNK))
    return _buffers.view


class JoinedShard:
    """One final shard being written: `PREFIX.bin.tmp`, the xxh3-128 of what it holds, its documents' sizes."""

    def __init__(self, prefix: Path):
        self.prefix, self.tmp = prefix, Path(f"{prefix}.bin.tmp")
        with writing(Path(f"{prefix}.bin")):
            prefix.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.tmp, "wb", buffering=0)
        self.hash = xxhash.xxh3_128()
        self.sizes: list[np.ndarray] = []

    def append(self, src: Path) -> None:
        """Append the part shard `src` (its .bin's bytes, its .idx's sizes): one read, one write, hashed between."""
        view = _buffer()
        try:
            part, sizes = open(f"{src}.bin", "rb", buffering=0), np.array(read_index(Path(f"{src}.idx"))[1])
        except (OSError, ValueError) as e:
            raise InputError(
                f"{src}: cannot read this committed part ({e}); remove its part directory and rerun"
            ) from None
        with part, writing(Path(f"{self.prefix}.bin")):
            while n := part.readinto(view):
                self.hash.update(view[:n])
                written = 0
                while written < n:
                    written += self.file.write(view[written:n])
        self.sizes.append(sizes)

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


class Joiner(threading.Thread):
    """Appends committed parts to the final shards in part order, in a thread started at once beside the
    encoding. It joins only once its gate is open (the parts' engine confirmed); `finish()` opens it, waits for
    the last part and returns the shards, or raises what failed."""

    def __init__(self, out: Path, parts_dir: Path, n_parts: int):
        super().__init__(daemon=True, name="join-parts")
        self.out, self.parts_dir, self.n_parts = out, parts_dir, n_parts
        self.joined, self.shards = 0, {}
        self.gate, self.stopping, self.error = threading.Event(), threading.Event(), None
        self.start()

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
                for prefix in json.loads((where / "receipt.json").read_text())["shards"]:
                    if prefix not in self.shards:
                        self.shards[prefix] = JoinedShard(self.out / prefix)
                    self.shards[prefix].append(where / prefix)
                self.joined += 1
        except Exception as e:  # re-raised by finish(), in the main thread
            self.error = e

    def raise_if_failed(self) -> None:
        """Raise what stopped the joining (a full disk, an unreadable part), once it has stopped."""
        if self.error is not None:
            self.join()
            self.discard()
            raise self.error

    def finish(self) -> dict[str, JoinedShard]:
        """Wait until every part is appended; the shards by prefix."""
        self.gate.set()
        self.join()
        self.raise_if_failed()
        return self.shards

    def abandon(self) -> None:
        """Stop (the encoding failed) and remove the unfinished files."""
        self.stopping.set()
        self.join()
        self.discard()

    def discard(self) -> None:
        for shard in self.shards.values():
            shard.discard()
