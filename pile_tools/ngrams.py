"""Shards as text and their n-grams, as lm-eval's decontamination (lm_eval/decontamination/janitor.py) defines
them: ASCII letters lowercased, ASCII punctuation deleted, split on whitespace, every run of `n` consecutive words.

A shard is read as tokens and decoded by table (a byte-level BPE's token is a fixed string of bytes), so the text
is what the shard holds, whether or not its inputs are still on disk. Words are numbered by a vocabulary (the
evaluation tasks' words): a word outside it can be in no n-gram of theirs, so only the windows of known words are
hashed, each n-gram of word numbers to 64 bits, and looked up in each task's sorted hashes. One Scanner per process
scans a range of a shard's documents: decontaminate runs them on workers.
"""

import string
from itertools import repeat
from pathlib import Path

import numpy as np

from pile_tools.encoding import byte_decoder
from pile_tools.ground import InputError
from pile_tools.indexed import Shard

NORMALIZE = bytes.maketrans(string.ascii_uppercase.encode(), string.ascii_lowercase.encode())
PUNCTUATION = string.punctuation.encode()
MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: the n-gram hash is a polynomial in it, mod 2**64
UNKNOWN, BOUNDARY = -1, -2  # a word no task has; the end of a document (no n-gram crosses it)
SEPARATOR = b" \x00 "  # decoded in place of EOD: a word of its own, which marks the document boundary
CHUNK_TOKENS = 1 << 20  # decoded at once: ~4 MB of text, whose gather indices stay in the caches


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


class ByteDecoder:
    """Token ids to UTF-8 bytes by table, for a byte-level BPE (GPT-2's, GPT-NeoX's, ours): what `tokenizers`
    decodes, EOD as SEPARATOR and other special tokens as nothing (skip_special_tokens, as lm-eval sees text).
    One gather of the tokens' bytes from the table, in numpy: ~130 MB/s on one core here, `tokenizers`' decode
    ~18 (benchmarks/decontaminate.py)."""

    def __init__(self, path: Path, eod: int):
        from tokenizers import Tokenizer, decoders

        tokenizer = Tokenizer.from_file(str(path))
        if not isinstance(tokenizer.decoder, decoders.ByteLevel):
            raise InputError(f"{path}: not a byte-level BPE tokenizer; decontaminate decodes only those")
        alphabet = byte_decoder()
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
        # int32: a chunk (CHUNK_TOKENS) decodes to far less than 2**31 bytes, and half int64's memory traffic
        self.lengths = np.array([len(p) for p in pieces], np.int32)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int32)
        self.table = np.frombuffer(b"".join(pieces), np.uint8)

    def __call__(self, ids: np.ndarray) -> bytes:
        lengths = self.lengths[ids]
        ends = np.cumsum(lengths, dtype=np.int64)
        where = np.repeat((self.offsets[ids] - (ends - lengths)).astype(np.int32), lengths)
        where += np.arange(len(where), dtype=np.int32)
        return self.table[where].tobytes()


def chunks(shard: Shard, first: int, last: int):
    """(first document, end document, their tokens) of consecutive runs of whole documents of [first, last), about
    CHUNK_TOKENS tokens each."""
    ends = np.concatenate([[0], np.cumsum(np.asarray(shard.sizes, np.int64))])  # ends[d]: tokens before document d
    while first < last:
        end = min(last, max(first + 1, int(np.searchsorted(ends, ends[first] + CHUNK_TOKENS, "right")) - 1))
        start = int(shard.pointers[first]) // shard.dtype.itemsize
        yield first, end, np.asarray(shard.tokens[start : start + int(ends[end] - ends[first])])
        first = end


def scan_words(text: bytes, documents: int | None, vocabulary: Vocabulary):
    """(words, their numbers, each word's document within the chunk) of decoded text whose `documents` are each
    closed by SEPARATOR; None when the separators are not as many (a text holding a NUL word of its own). For
    documents=None the text is one document: a NUL word in it is only a word no task has (it breaks n-grams, as
    for lm-eval, where it is a word of its own too)."""
    words = text.translate(NORMALIZE, PUNCTUATION).decode("utf-8", "replace").split()
    ids = vocabulary.number(words, grow=False)
    boundary = ids == BOUNDARY
    if documents is None:
        return words, ids, np.zeros(len(ids), np.int64)
    if int(boundary.sum()) != documents:
        return None
    return words, ids, np.cumsum(boundary) - boundary


class Scanner:
    """What a worker needs to find the documents of a shard that share an n-gram with each of a few tasks: the
    decoder, the tasks' vocabulary (word -> number) and each task's sorted n-gram hashes."""

    def __init__(self, tokenizer: str, eod: int, words: dict[str, int], tasks: list[np.ndarray], n: int):
        self.decoder, self.tasks, self.n = ByteDecoder(Path(tokenizer), eod), tasks, n
        self.vocabulary = Vocabulary()
        self.vocabulary.ids = words

    def scan(self, prefix: str, first: int, last: int) -> tuple[list[dict[int, tuple[str, int]]], int]:
        """Documents [first, last) of the shard `prefix`: per task, {document: (its first matching n-gram, that
        n-gram's hash)}; and the tokens read."""
        shard, found, tokens_read = Shard(Path(prefix)), [{} for _ in self.tasks], 0
        for start, end, tokens in chunks(shard, first, last):
            scanned = scan_words(self.decoder(tokens), end - start, self.vocabulary)
            if scanned is None:  # one document at a time: a NUL in a text is not a boundary
                offsets = np.concatenate([[0], np.cumsum(np.asarray(shard.sizes[start:end], np.int64))])
                for doc in range(start, end):
                    one = tokens[offsets[doc - start] : offsets[doc + 1 - start]]
                    self.match(doc, *scan_words(self.decoder(one), None, self.vocabulary), found)
            else:
                self.match(start, *scanned, found)
            tokens_read += len(tokens)
        return found, tokens_read

    def match(self, first: int, words: list[str], ids: np.ndarray, doc_of: np.ndarray, found) -> None:
        """A chunk's n-grams looked up in each task; the first of each matching document kept."""
        starts, hashes = ngram_hashes(ids, self.n)
        for task, documents in zip(self.tasks, found):
            for i in np.flatnonzero(np.isin(hashes, task)).tolist():
                doc = first + int(doc_of[starts[i]])
                if doc not in documents:
                    documents[doc] = (" ".join(words[starts[i] : starts[i] + self.n]), int(hashes[i]))


def document_ranges(shard: Shard, tokens: int) -> list[tuple[int, int]]:
    """A shard's documents cut into ranges of about `tokens` tokens (at least one document each): workers' jobs."""
    ends = np.cumsum(np.asarray(shard.sizes, np.int64))
    cuts = sorted(
        {0, len(shard), *np.searchsorted(ends, np.arange(tokens, int(ends[-1]) if len(ends) else 0, tokens)).tolist()}
    )
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]
