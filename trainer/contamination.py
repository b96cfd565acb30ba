"""neox-data decontaminate: which documents of the shards share an n-gram with an evaluation task's text.

N-grams as lm-eval's decontamination (lm_eval/decontamination/janitor.py) defines them: the text with ASCII letters
lowercased and ASCII punctuation deleted, split on whitespace, every run of `n` consecutive words (13 by default,
as GPT-3 and the harness use). A document is contaminated by a task when one of its n-grams is one of the task's.

The shards are read as tokens and decoded (a byte-level BPE decodes by a table lookup, vectorised: the text is
what the shard holds, whether or not the inputs are still on disk). Words are numbered by the tasks' vocabulary:
a word no task uses can be in no matching n-gram, so only the windows of known words are hashed (each n-gram of
word numbers to 64 bits) and looked up in each task's sorted hashes. The report names the first matches of each
task as file:line through the source map. The shards are never rewritten.
"""

import json
import string
import time
from collections import defaultdict
from itertools import repeat
from pathlib import Path

import numpy as np

from pile_tools.ground import InputError, check_writable, write_json, write_text
from pile_tools.indexed import Shard
from pile_tools.shards_dir import manifest_entries, manifest_tokenizer, read_manifest
from pile_tools.sourcemap import SourceMap

NORMALIZE = bytes.maketrans(string.ascii_uppercase.encode(), string.ascii_lowercase.encode())
PUNCTUATION = string.punctuation.encode()
MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: the n-gram hash is a polynomial in it, mod 2**64
UNKNOWN, BOUNDARY = -1, -2  # a word no task has; the end of a document (no n-gram crosses it)
SEPARATOR = b" \x00 "  # decoded in place of EOD: a word of its own, which marks the document boundary
MATCHES_SHOWN = 20  # per task in the report
CHUNK_TOKENS = 4 << 20  # decoded at once: ~16 MB of text


def words_of(text: str) -> list[str]:
    """lm-eval's normalisation, then its words."""
    return text.encode("utf-8").translate(NORMALIZE, PUNCTUATION).decode("utf-8", "replace").split()


class Vocabulary:
    """The tasks' words, numbered."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def number(self, words: list[str], grow: bool) -> np.ndarray:
        """Each word's number (growing the vocabulary with new words when `grow`, else UNKNOWN for them)."""
        if grow:
            return np.fromiter((self.ids.setdefault(w, len(self.ids)) for w in words), np.int64, len(words))
        return np.fromiter(map(self.ids.get, words, repeat(UNKNOWN)), np.int64, len(words))


def ngram_hashes(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, 64-bit hash) of every window of `n` consecutive known words (no UNKNOWN or BOUNDARY in it)."""
    if len(ids) < n:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    bad = np.concatenate([[0], np.cumsum(ids < 0)])
    starts = np.flatnonzero(bad[n:] == bad[:-n])
    h = np.zeros(len(starts), np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * MULTIPLIER + ids[starts + k].astype(np.uint64)
    return starts, h


class Task:
    """An evaluation text's n-grams: sorted hashes, and which item of the task each came from first."""

    def __init__(self, name: str, items: list[str], vocabulary: Vocabulary, n: int):
        self.name, self.items = name, len(items)
        first: dict[int, int] = {}
        for number, text in enumerate(items):
            _, hashes = ngram_hashes(vocabulary.number(words_of(text), grow=True), n)
            for h in hashes.tolist():
                first.setdefault(h, number)
        self.item_of = first
        self.hashes = np.array(sorted(first), np.uint64)


def jsonl_items(path: Path) -> list[str]:
    """The texts of a .jsonl (each line's "text", else its string fields joined; a line may be a bare string), or
    of a .txt (the whole file)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot be read as UTF-8 text ({e})") from None
    if path.suffix != ".jsonl":
        return [raw]
    items = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as e:
            raise InputError(f"{path}:{number}: not JSON ({e})") from None
        if isinstance(value, dict):
            value = value["text"] if isinstance(value.get("text"), str) else " ".join(strings_in(value))
        items.append(value if isinstance(value, str) else " ".join(strings_in(value)))
    return items


def strings_in(value) -> list[str]:
    """Every string inside a JSON value, in order."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [s for v in value for s in strings_in(v)] if isinstance(value, list) else []


def task_items(names: list[str]) -> dict[str, list[str]]:
    """The text of each evaluation document of lm-eval tasks (ours, or the harness's with data on disk): what the
    task marks for decontamination, else its prompt and its answer."""
    import logging

    from lm_eval.tasks import get_task_dict

    from trainer.evaluate import task_manager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on each task's defaults
    tasks = get_task_dict(names, task_manager(names))
    out = {}
    for name, task in flatten(tasks):
        texts = []
        for doc in task.eval_docs:
            if task.should_decontaminate():
                texts.append(str(task.doc_to_decontamination_query(doc)))
                continue
            prompt, target = task.doc_to_text(doc), task.doc_to_target(doc)
            if isinstance(target, int) and task.config.doc_to_choice is not None:
                target = task.doc_to_choice(doc)[target]
            texts.append(" ".join(str(x) for x in (prompt, target) if isinstance(x, str)))
        out[name] = texts
    return out


def flatten(tasks: dict):
    """(name, task) of a task dict, groups opened."""
    for key, value in tasks.items():
        if isinstance(value, dict):
            yield from flatten(value)
        else:
            yield getattr(key, "group_name", key) if not isinstance(key, str) else key, value


def load_tasks(against: list[str], vocabulary: Vocabulary, n: int) -> list[Task]:
    """The tasks named by --against: files (.jsonl, .txt), else lm-eval task names."""
    files = [a for a in against if Path(a).exists()]
    names = [a for a in against if a not in files]
    texts = {a: jsonl_items(Path(a)) for a in files}
    if names:
        texts |= task_items(names)
    tasks = [Task(name, items, vocabulary, n) for name, items in texts.items()]
    for task in tasks:
        if not len(task.hashes):
            raise InputError(f"{task.name}: no {n}-gram in its {task.items} item(s) (texts of fewer than {n} words)")
    return tasks


class ByteDecoder:
    """Token ids to UTF-8 bytes by table for a byte-level BPE (GPT-2's, GPT-NeoX's, ours), `tokenizers`' decode
    otherwise; EOD becomes SEPARATOR, other special tokens nothing (skip_special_tokens, as lm-eval sees text)."""

    def __init__(self, path: Path, eod: int):
        from tokenizers import Tokenizer
        from tokenizers.pre_tokenizers import ByteLevel, Sequence

        tokenizer = Tokenizer.from_file(str(path))
        if not isinstance(tokenizer.pre_tokenizer, (ByteLevel, Sequence)):
            raise InputError(f"{path}: not a byte-level BPE tokenizer; decontaminate decodes only those by table")
        alphabet = byte_alphabet()
        added = {t.content: t for t in tokenizer.get_added_tokens_decoder().values()}
        pieces = []
        for token, _ in sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]):
            if token in added:
                pieces.append(b"" if added[token].special else token.encode("utf-8"))
            elif all(c in alphabet for c in token):
                pieces.append(bytes(alphabet[c] for c in token))
            else:
                raise InputError(f"{path}: not a byte-level BPE tokenizer ({token!r}); decontaminate needs one")
        pieces[eod] = SEPARATOR
        self.lengths = np.array([len(p) for p in pieces], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.table = np.frombuffer(b"".join(pieces), np.uint8)

    def __call__(self, ids: np.ndarray) -> bytes:
        lengths = self.lengths[ids]
        ends = np.cumsum(lengths)
        where = np.repeat(self.offsets[ids] - (ends - lengths), lengths) + np.arange(int(ends[-1]) if len(ends) else 0)
        return self.table[where].tobytes()


def byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte (the byte-level pre-tokenizer's alphabet), char -> byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Found:
    """One task's contaminated documents: per shard, each document's first matching n-gram (word start, hash)."""

    def __init__(self):
        self.documents: dict[str, dict[int, tuple[str, int]]] = defaultdict(dict)


def chunks(shard: Shard):
    """(first document, its tokens) of consecutive runs of whole documents, about CHUNK_TOKENS tokens each."""
    ends = np.cumsum(np.asarray(shard.sizes, np.int64))
    first = 0
    while first < len(shard):
        last = max(first + 1, int(np.searchsorted(ends, (ends[first - 1] if first else 0) + CHUNK_TOKENS)))
        start = int(shard.pointers[first]) // shard.dtype.itemsize
        yield (
            first,
            last,
            np.asarray(shard.tokens[start : start + int(ends[last - 1] - (ends[first - 1] if first else 0))]),
        )
        first = last


def scan_words(text: bytes, documents: int, vocabulary: Vocabulary) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(words, their numbers, each word's document within the chunk) of decoded text whose documents are
    separated by SEPARATOR; None when the separators are not `documents` (a document holding a NUL itself)."""
    words = text.translate(NORMALIZE, PUNCTUATION).decode("utf-8", "replace").split()
    ids = vocabulary.number(words, grow=False)
    boundary = ids == BOUNDARY
    if int(boundary.sum()) != documents:
        return None
    return words, ids, np.cumsum(boundary) - boundary


def scan_shard(name: str, shard: Shard, decoder, vocabulary: Vocabulary, tasks: list[Task], found, n, progress):
    """Record in `found` (by task) each document of the shard that shares an n-gram with a task."""
    for first, last, tokens in chunks(shard):
        scanned = scan_words(decoder(tokens), last - first, vocabulary)
        if scanned is None:  # one document at a time: a NUL in a text is not a boundary
            offsets = np.concatenate([[0], np.cumsum(np.asarray(shard.sizes[first:last], np.int64))])
            for doc in range(first, last):
                part = scan_words(decoder(tokens[offsets[doc - first] : offsets[doc + 1 - first]]), 1, vocabulary)
                if part is not None:
                    match_words(name, doc, *part, tasks, found, n)
        else:
            match_words(name, first, *scanned, tasks, found, n)
        progress(len(tokens))


def match_words(name: str, first: int, words, ids, doc_of, tasks, found, n: int) -> None:
    """The n-grams of a chunk's words looked up in each task; the first of each matching document kept."""
    starts, hashes = ngram_hashes(ids, n)
    for task, seen in zip(tasks, found):
        hit = np.flatnonzero(np.isin(hashes, task.hashes))
        documents = seen.documents[name]
        for i in hit.tolist():
            doc = first + int(doc_of[starts[i]])
            if doc not in documents:
                documents[doc] = (" ".join(words[starts[i] : starts[i] + n]), int(hashes[i]))


def decontaminate(data: str, against: list[str], output: str, n: int = 13, echo=print) -> dict:
    """Write DIR/report.json and DIR/report.md: per task, the documents (and their tokens) of each split and
    component sharing an n-gram with it, and the first matches as file:line. Returns the report."""
    from tqdm import tqdm

    root, out = Path(data), Path(output)
    manifest = read_manifest(root) if root.is_dir() else {}
    if not manifest:
        raise InputError(f"{data}: no manifest.json; give a build-shards output directory")
    tokenizer = manifest_tokenizer(manifest)
    if tokenizer is None:
        raise InputError(
            f"{root}: the tokenizer its manifest.json names, {manifest['tokenizer']['path']}, is gone or changed "
            "(its sha256 differs)"
        )
    check_writable(out)
    start = time.perf_counter()
    vocabulary = Vocabulary()
    vocabulary.ids["\x00"] = BOUNDARY
    tasks = load_tasks(against, vocabulary, n)
    decoder = ByteDecoder(tokenizer, manifest["tokenizer"]["eod"])
    entries = manifest_entries(manifest)
    found = [Found() for _ in tasks]
    total = sum(e["tokens"] for e in entries.values())
    with tqdm(total=total, unit="tok", unit_scale=True, desc="scanning", dynamic_ncols=True, disable=None) as bar:
        for name in sorted(entries):
            scan_shard(name, Shard(root / name), decoder, vocabulary, tasks, found, n, bar.update)
    report = build_report(root, manifest, tasks, found, n, time.perf_counter() - start)
    write_json(out / "report.json", report)
    write_text(out / "report.md", as_markdown(report))
    return report


def build_report(root: Path, manifest: dict, tasks, found, n: int, seconds: float) -> dict:
    """report.json: the run, each task's n-grams, and per task the contaminated documents by shard, with matches."""
    entries, sources = manifest_entries(manifest), SourceMap(root, manifest)
    shards = [
        {"shard": name, "split": name.split("/")[0], "component": sources.components[name], **counts(e)}
        for name, e in sorted(entries.items())
    ]
    report = {
        "data": str(root.resolve()),
        "ngram": n,
        "normalization": "ASCII letters lowercased, ASCII punctuation deleted, split on whitespace (lm-eval's)",
        "seconds": round(seconds, 3),
        "text_bytes": sum(e.get("text_bytes", 0) for e in entries.values()),
        "shards": shards,
        "tasks": {},
    }
    for task, seen in zip(tasks, found):
        by_shard, matches = [], []
        for name in sorted(seen.documents):
            docs = seen.documents[name]
            if not docs:
                continue
            shard = Shard(root / name)
            sizes = np.asarray(shard.sizes, np.int64)
            tokens = int(sizes[sorted(docs)].sum())
            by_shard.append(
                {
                    "shard": name,
                    "split": name.split("/")[0],
                    "component": sources.components[name],
                    "documents": len(docs),
                    "tokens": tokens,
                }
            )
            for doc in sorted(docs)[: MATCHES_SHOWN - len(matches)]:
                ngram, h = docs[doc]
                file, line = sources.locate(name, doc) if sources.covers(name) else (None, None)
                matches.append(
                    {
                        "file": file,
                        "line": line,
                        "component": sources.components[name],
                        "split": name.split("/")[0],
                        "shard": name,
                        "document": doc,
                        "ngram": ngram,
                        "task_item": task.item_of.get(h),
                    }
                )
        report["tasks"][task.name] = {
            "items": task.items,
            "ngrams": len(task.hashes),
            "documents": sum(r["documents"] for r in by_shard),
            "tokens": sum(r["tokens"] for r in by_shard),
            "by_shard": by_shard,
            "matches": matches,
        }
    return report


def counts(entry: dict) -> dict:
    return {k: entry[k] for k in ("documents", "tokens")}


def as_markdown(report: dict) -> str:
    """report.md: one table of contaminated documents per task and shard, then the first matches."""
    lines = [
        f"# Contamination of {report['data']}",
        "",
        f"{report['ngram']}-grams, {report['normalization']}; {report['text_bytes'] / 1e6:,.1f} MB of text scanned "
        f"in {report['seconds']:.1f} s.",
        "",
        "| task | items | n-grams | documents | tokens |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, task in report["tasks"].items():
        lines.append(
            f"| {name} | {task['items']:,} | {task['ngrams']:,} | {task['documents']:,} | {task['tokens']:,} |"
        )
    for name, task in report["tasks"].items():
        lines += ["", f"## {name}", ""]
        if not task["by_shard"]:
            lines.append("No document shares an n-gram with this task.")
            continue
        lines += ["| split | component | documents | tokens |", "|---|---|---:|---:|"]
        lines += [
            f"| {r['split']} | {r['component']} | {r['documents']:,} | {r['tokens']:,} |" for r in task["by_shard"]
        ]
        lines += ["", "First matches:", ""]
        lines += [
            f'- `{m["file"]}:{m["line"]}` ({m["component"]}, {m["shard"]} document {m["document"]}): "{m["ngram"]}"'
            for m in task["matches"]
        ]
    return "\n".join(lines) + "\n"
