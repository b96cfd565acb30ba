"""Resolving a tokenizer (a tokenizer.json, a directory holding one, or a bundled name) and fast exact batch
encoding: the fastest engine that reproduces HF `tokenizers` ids on the run's own text.

HF `tokenizers` is the reference for ids but encodes ~1-4 MB/s per core here. gigatoken and fastokens reproduce
its ids for byte-level BPE files at 15-70x the speed. Which one runs is decided per run by `choose_engine`: both
encode a sample of the run's documents (plus a few known-hard strings) and must agree with `tokenizers` exactly,
else the run falls back to the next engine and, last, to `tokenizers` itself.
"""

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from pile_tools.ground import InputError

# The bundled reference tokenizers ship as the tokenizer package's data (tokenizer/assets/), read here as files:
# the package is found where Python would import it from (it is not imported), wherever this one lies.
ASSETS = Path(importlib.util.find_spec("tokenizer").submodule_search_locations[0]) / "assets"
BUILTIN = ("gpt2", "gpt-neox-20b")
ENGINES = ("gigatoken", "fastokens", "tokenizers")

# Strings where engines have been known to differ: special tokens inside text, space runs longer than the
# longest space-run token, NFD input under an NFC normalizer, control characters, astral code points.
HARD_STRINGS = [
    "a<|endoftext|>b",
    "x" + " " * 30 + "y",
    "e\u0301te\u0301 caf\u00e9",
    "\t\t\n  \n\r\n \u000b\u000c",
    "\U0001f600 ok \u200d\u2028",
    "    def f(x):\n        return x  # two  spaces\n",
]


class TokenizerError(InputError):
    """A tokenizer that cannot be found or used; the message is for the user."""


def resolve_tokenizer(name_or_path: str) -> Path:
    """Return the `tokenizer.json` for a built-in name, a tokenizer.json path, or a directory holding one."""
    if name_or_path in BUILTIN:
        return ASSETS / name_or_path / "tokenizer.json"
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer not found: {name_or_path} (give a tokenizer.json, a directory holding one, "
            f"or one of {', '.join(BUILTIN)})"
        )
    return path


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (recorded in manifests to name the tokenizer exactly)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@lru_cache(maxsize=4)
def load_reference(path: Path):
    """The HF `tokenizers` object for `path`, with a clear error for a file it cannot read (loaded once)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise TokenizerError(f"{path}: not a readable HF tokenizers file ({e})") from None


def eod_id(reference, path: Path) -> int:
    """The `<|endoftext|>` id that ends every document."""
    eod = reference.token_to_id("<|endoftext|>")
    if eod is None:
        raise TokenizerError(f"{path}: the tokenizer has no <|endoftext|> token to end documents with")
    return eod


class Encoder:
    """Encodes a batch of texts into one flat uint32 id buffer and per-text counts, without special tokens."""

    def __init__(self, path: Path, engine: str, threaded: bool = False):
        self.engine, self.threaded = engine, threaded
        if engine == "gigatoken":
            import gigatoken

            self._tok = gigatoken.Tokenizer(str(path))
        elif engine == "fastokens":
            import fastokens

            self._tok = fastokens.Tokenizer.from_file(str(path))
        elif engine == "tokenizers":
            self._tok = load_reference(path)
        else:
            raise TokenizerError(f"unknown encoding engine {engine!r}; choose from {', '.join(ENGINES)}")

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Return (ids, counts): ids of all texts concatenated (uint32), and each text's number of ids."""
        if self.engine == "gigatoken":
            # Read the awkward array's buffers directly: converting per document in Python costs 60x the encoding.
            layout = self._tok.encode_batch(texts, parallel=self.threaded).layout
            offsets = np.asarray(layout.offsets)
            ids = np.asarray(layout.content.data)[offsets[0] : offsets[-1]]
            return ids.astype(np.uint32, copy=False), np.diff(offsets)
        if self.engine == "fastokens":
            ids, offsets = self._tok.encode_batch_flat(texts, add_special_tokens=False)
            return np.frombuffer(ids, np.uint32), np.diff(np.frombuffer(offsets, np.uint64)).astype(np.int64)
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        counts = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
        ids = np.fromiter((i for e in encodings for i in e.ids), np.uint32, int(counts.sum()))
        return ids, counts


def first_mismatch(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> int | None:
    """Index of the first text whose ids differ between two `Encoder.encode` results, or None."""
    if np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0]):
        return None
    ends_a, ends_b = np.cumsum(a[1]), np.cumsum(b[1])
    for i in range(len(a[1])):
        sa, sb = ends_a[i] - a[1][i], ends_b[i] - b[1][i]
        if not np.array_equal(a[0][sa : ends_a[i]], b[0][sb : ends_b[i]]):
            return i
    return len(a[1])


def checked_encoder(path: Path, sample: list[str], warn=print) -> Encoder:
    """The Encoder of the first engine in ENGINES whose ids equal `tokenizers`' on `sample` + HARD_STRINGS."""
    texts = list(sample) + HARD_STRINGS
    fallback = Encoder(path, "tokenizers")
    reference = fallback.encode(texts)
    for name in ENGINES[:-1]:
        try:
            encoder = Encoder(path, name)
            got = encoder.encode(texts)
        except Exception as e:  # the fast engines refuse some tokenizer types; that is what the fallback is for
            warn(f"{name} cannot encode with {path} ({type(e).__name__}: {e}); trying the next engine")
            continue
        bad = first_mismatch(got, reference)
        if bad is None:
            return encoder
        warn(f"{name} gives different ids from tokenizers on {texts[bad][:60]!r}...; not using it")
    return fallback


def choose_engine(path: Path, sample: list[str], warn=print) -> str:
    """The name of checked_encoder's engine."""
    return checked_encoder(path, sample, warn).engine


def byte_decoder() -> dict[str, int]:
    """The ByteLevel alphabet: the printable character standing for each byte (GPT-2's bytes_to_unicode)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars
