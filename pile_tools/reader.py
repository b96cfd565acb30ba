"""Streaming reader for Pile-format inputs: `.jsonl.zst`, `.jsonl.gz`, `.jsonl`, `.txt`, and HF datasets.

Work is cut into parts: one per input file, or one per fixed byte range of a large uncompressed `.jsonl`. A part
yields (component, text, line) per document; bad lines are skipped and counted by reason, bad files raise
InputError. Memory does not grow with the input: lines are read one at a time from a bounded buffer.
"""

import gzip
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import orjson
import zstandard

from pile_tools.ground import InputError

SUFFIXES = (".jsonl.zst", ".jsonl.zstd", ".jsonl.gz", ".jsonl", ".txt")
HF_PREFIX = "hf:"
BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark, which Windows editors put before a file's first line
GUARD_BYTES = 1 << 19  # text encoded by both the fast engine and `tokenizers` before the run
GUARD_DOC_CHARS = 64 << 10
MAX_EXAMPLES = 3  # messages kept per skip reason and part; the counts are always complete


@dataclass(frozen=True)
class Part:
    """A unit of work: a whole input, or the lines that start in bytes [start, end) of an uncompressed one."""

    index: int
    source: str
    start: int = 0
    end: int | None = None

    def describe(self) -> str:
        """The part as messages name it: the file, and its byte range when it is a slice."""
        return self.source if self.end is None else f"{self.source} [bytes {self.start}-{self.end})"


def component_from_name(path: str) -> str:
    """The default component of a file: its name without the known suffix ('Github.jsonl.zst' -> 'Github')."""
    name = Path(path).name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def looks_local(item: str) -> bool:
    """Whether an input names a local path (so a missing one is a typo, never a Hugging Face dataset): it starts
    with ./ ../ / or ~, has a known file suffix, or its parent directory exists here."""
    if item.startswith(("./", "../", "/", "~")) or item.endswith(SUFFIXES) or Path(item).suffix:
        return True
    parent = Path(item).parent
    return str(parent) not in ("", ".") and parent.is_dir()


def files_under(directory: Path) -> list[Path]:
    """The input files under `directory`, sorted, symlinked subdirectories followed (each real directory once, so
    a link that points back up ends there)."""
    found, seen = [], set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        found += [Path(root) / f for f in files if f.endswith(SUFFIXES) and (Path(root) / f).is_file()]
    return sorted(found)


def once_each(sources: list[str]) -> list[str]:
    """The sources with any given twice (a file and its directory, two links to one file) kept at its first
    place, with a warning: reading it twice would double its documents."""
    kept, twice = list(dict.fromkeys(sources)), len(sources) - len(set(sources))
    if twice:
        again = [s for i, s in enumerate(sources) if s in sources[:i]]
        warnings.warn(f"{again[0]}{f' and {twice - 1} more' if twice > 1 else ''} given twice: read once", stacklevel=3)
    return kept


def discover(inputs: list[str]) -> list[str]:
    """Expand inputs into sources: files in the order given, directories' files sorted, HF dataset names
    (`hf:owner/name[:split]`, or an `owner/name` that cannot be a local path). A file reached twice is read once."""
    sources = []
    for item in inputs:
        path = Path(item).expanduser()
        if item.startswith(HF_PREFIX) or (
            not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+(:\w+)?", item) and not looks_local(item)
        ):
            name = item.removeprefix(HF_PREFIX)
            dataset = name.partition(":")[0]
            if not Path(dataset).exists():  # a local dataset directory streams without the network
                if looks_local(dataset):
                    raise InputError(f"{item}: not a local file or directory")
                check_hub_reachable(name)  # at once, before any work, not after the libraries' retries
            sources.append(HF_PREFIX + name)
        elif path.is_dir():
            found = files_under(path)
            if not found:
                raise InputError(f"{item}: directory holds no {', '.join(SUFFIXES)} files")
            sources.extend(str(p.resolve()) for p in found)
        elif path.is_file():
            if path.stat().st_size == 0:
                raise InputError(f"{item}: empty file")
            sources.append(str(path.resolve()))
        else:
            raise InputError(f"{item}: no such file or directory")
    return once_each(sources)


def part_bytes(part: Part) -> int:
    """Input bytes a part reads (0 for a streamed HF dataset)."""
    if part.source.startswith(HF_PREFIX):
        return 0
    return (part.end or os.path.getsize(part.source)) - part.start


def cut_into_parts(sources: list[str], part_size: int) -> list[Part]:
    """Cut sources into parts; only uncompressed JSON lines can be cut at byte offsets."""
    parts = []
    for source in sources:
        size = 0 if source.startswith(HF_PREFIX) else os.path.getsize(source)
        if source.endswith(".jsonl") and size > part_size:
            for start in range(0, size, part_size):
                parts.append(Part(len(parts), source, start, min(start + part_size, size)))
        else:
            parts.append(Part(len(parts), source))
    return parts


class Skips:
    """Counts of skipped lines by reason, with the first few messages; `strict` makes any skip fatal."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: dict[str, int] = {}
        self.examples: list[str] = []

    def note(self, reason: str, where: str, detail: str = "") -> None:
        """Count a skipped line (keeping the first examples of each reason); with --strict, stop instead."""
        message = f"{where}: {reason.replace('_', ' ')}{': ' + detail if detail else ''}"
        if self.strict:
            raise InputError(f"{message} (--strict makes every skipped line an error)")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self.counts[reason] <= MAX_EXAMPLES:
            self.examples.append(message)


def report_skips(counts: dict[str, int], examples: list[str], echo, shown: int = 10) -> None:
    """One warning line with the counts by reason, then the first messages (file:line: reason)."""
    if counts:
        echo("warning: skipped lines: " + ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in sorted(counts.items())))
        for message in examples[:shown]:
            echo(f"  {message}")


class _ZstdRaw(io.RawIOBase):
    """Decompresses a zstd stream of one or more frames, and raises on a truncated or non-zstd file."""

    def __init__(self, fh, path: str):
        self.fh, self.path = fh, path
        self._dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
        self._dobj = self._dctx.decompressobj()
        self._buf, self._pos, self._in_frame = b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos >= len(self._buf):
            chunk = self.fh.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise InputError(f"{self.path}: truncated zstd file (the stream ends inside a frame)")
                return 0
            self._buf, self._pos = self._feed(chunk), 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def _feed(self, data: bytes) -> bytes:
        out = []
        while data:
            try:
                out.append(self._dobj.decompress(data))
            except zstandard.ZstdError as e:
                raise InputError(f"{self.path}: not a valid zstd file ({e})") from None
            self._in_frame = not self._dobj.eof
            data = self._dobj.unused_data if self._dobj.eof else b""
            if self._dobj.eof:
                self._dobj = self._dctx.decompressobj()
        return b"".join(out)


class PartReader:
    """Reads one part's documents; `consumed` is how many bytes of the input file it has read so far."""

    def __init__(self, part: Part, component: str | None, skips: Skips, max_doc_bytes: int = 0):
        self.part, self.component, self.skips, self.max_doc_bytes = part, component, skips, max_doc_bytes
        self.default_component = component or component_from_name(part.source.removeprefix(HF_PREFIX))
        self.components_seen: set[str] = set()
        self._raw = None
        self._first_line = 1
        self.lines = 0  # lines (rows) of the input read so far: a source map's lines count from the part's first

    @property
    def consumed(self) -> int:
        """Input bytes read so far (buffered ahead of the documents yielded, so approximate)."""
        if self._raw is None:
            return 0
        try:
            position = self._raw.tell()
        except ValueError:  # closed: the part is read
            position = self._end
        return min(position, self.part.end or position) - self.part.start

    def documents(self):
        """Yield (component, text, line number) for every good document of the part, in order."""
        source = self.part.source
        if source.startswith(HF_PREFIX):
            yield from self._hf_documents(source.removeprefix(HF_PREFIX))
        elif source.endswith(".txt"):
            yield from self._txt_document(source)
        else:
            yield from self._jsonl_documents(source)

    def _lines(self, source: str):
        """(line number, bytes) of each line whose first byte lies in the part's range."""
        self._raw = open(source, "rb")
        with self._raw:
            if source.endswith((".zst", ".zstd")):
                stream = io.BufferedReader(_ZstdRaw(self._raw, source), buffer_size=1 << 20)
            elif source.endswith(".gz"):
                stream = gzip.GzipFile(fileobj=self._raw)
            else:
                stream = self._raw
            yield from self._numbered(stream, source)
            self._end = self._raw.tell()

    def _numbered(self, stream, source: str):
        pos, end, number = self.part.start, self.part.end, 0
        if pos:  # a byte range: the line that straddles `start` belongs to the previous part
            stream.seek(pos - 1)
            pos += len(stream.readline()) - 1
            self._range_first, self._first_line = pos, None
        try:
            while end is None or pos < end:
                line = stream.readline()
                if not line:
                    return
                number += 1
                pos += len(line)
                self.lines = number
                yield number, line.removeprefix(BOM) if pos == len(line) else line
        except (OSError, EOFError) as e:  # gzip's truncated or non-gzip files
            raise InputError(f"{source}: cannot read past line {number} ({e})") from None

    def _where(self, number: int) -> str:
        if self._first_line is None:  # a byte range: count the lines before it only when a message needs it
            self._first_line = 1
            with open(self.part.source, "rb") as f:
                for chunk in iter(lambda: f.read(min(1 << 24, self._range_first - f.tell())), b""):
                    self._first_line += chunk.count(b"\n")
        return f"{self.part.source}:{self._first_line + number - 1}"

    def _jsonl_documents(self, source: str):
        for number, line in self._lines(source):
            if not line.strip():
                continue
            doc = self._parse(line, number)
            if doc is not None:
                yield doc[0], doc[1], number

    def _parse(self, line: bytes, number: int):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            try:
                line.decode("utf-8")
                reason = "invalid_utf8" if "surrogate" in str(e) else "invalid_json"
            except UnicodeDecodeError:
                reason = "invalid_utf8"
            return self.skips.note(reason, self._where(number), str(e)[:120])
        if not isinstance(obj, dict):
            return self.skips.note("invalid_json", self._where(number), f"a JSON {type(obj).__name__}, not an object")
        return self._document(obj, number)

    def _document(self, obj: dict, number: int):
        if "text" not in obj:
            return self.skips.note("missing_text", self._where(number), "no 'text' field")
        text = obj["text"]
        if not isinstance(text, str):
            return self.skips.note("text_not_string", self._where(number), f"'text' is a {type(text).__name__}")
        if not text:
            return self.skips.note("empty", self._where(number))
        if self.max_doc_bytes and len(text) > self.max_doc_bytes // 4 and len(text.encode()) > self.max_doc_bytes:
            return self.skips.note(
                "too_long", self._where(number), f"{len(text.encode()) / 1e6:.1f} MB > --max-doc-bytes"
            )
        meta = obj.get("meta")
        name = meta.get("pile_set_name") if isinstance(meta, dict) else None
        component = name if isinstance(name, str) and name else self.default_component
        self.components_seen.add(component)
        return component, text

    def _txt_document(self, source: str):
        self._raw = open(source, "rb")
        with self._raw:
            data = self._raw.read()
            self._end = len(data)
        data = data.removeprefix(BOM)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = 1 + data[: e.start].count(b"\n")
            return self.skips.note("invalid_utf8", f"{source}:{line}", str(e)[:120])
        doc, self.lines = self._document({"text": text}, 1), 1
        if doc is not None:
            yield doc[0], doc[1], 1

    def _hf_documents(self, name: str):
        import datasets

        dataset_name, _, split = name.partition(":")
        try:
            rows = datasets.load_dataset(dataset_name, split=split or "train", streaming=True)
        except Exception as e:
            raise InputError(
                f"{name}: not a local file or directory, and not a Hugging Face dataset that can be "
                f"opened ({type(e).__name__}: {e})"
            ) from None
        for number, row in enumerate(rows, 1):
            self.lines = number
            if isinstance(row.get("meta"), str):  # some hub copies of the Pile keep meta as a JSON string
                try:
                    row = {**row, "meta": orjson.loads(row["meta"])}
                except orjson.JSONDecodeError:
                    pass
            doc = self._document(row, number)
            if doc is not None:
                yield doc[0], doc[1], number


def hub_offline() -> bool:
    """True when the user asked the Hugging Face libraries to stay offline."""
    return any(
        os.environ.get(k, "0").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached (offline mode, no network), or None: one connection attempt,
    instead of the libraries' rounds of retries."""
    import socket
    from urllib.parse import urlparse

    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"{endpoint.hostname} cannot be reached ({e})"
    return None


def check_hub_reachable(what: str) -> None:
    """Fail at once, naming `what`, when the Hub cannot be reached."""
    if reason := hub_unreachable():
        raise InputError(f"{what}: a Hugging Face dataset, but {reason}; give a local path, or check the network")


def read_documents(parts: list[Part], desc: str, skips: Skips):
    """(component, text) of every document, with a progress bar over input bytes; skips are counted."""
    from tqdm import tqdm

    total = sum(map(part_bytes, parts))
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, dynamic_ncols=True, leave=False, disable=None) as bar:
        for part in parts:
            reader, seen = PartReader(part, None, skips), 0
            for component, text, _ in reader.documents():
                yield component, text
                if reader.consumed - seen > 1 << 20:
                    bar.update(reader.consumed - seen)
                    seen = reader.consumed
            bar.update(reader.consumed - seen)


def guard_sample(parts: list[Part], component: str | None) -> list[str]:
    """Documents from across the run's inputs for the exactness check, GUARD_BYTES in all."""
    picked = parts[:: max(1, len(parts) // 16)][:16]
    sample, budget = [], GUARD_BYTES
    for part in picked:
        share = budget // max(1, len(picked) - picked.index(part))
        try:
            for _, text, _ in PartReader(part, component, Skips()).documents():
                sample.append(text[:GUARD_DOC_CHARS])
                share -= len(sample[-1])
                budget -= len(sample[-1])
                if share <= 0:
                    break
        except InputError:
            continue  # the run itself reports bad files, with their names
    return sample


def batched_by_chars(items, limit: int, chars=len):
    """Lists of consecutive items holding about `limit` characters each (`chars(item)`); the last may hold fewer."""
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += chars(item)
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
