"""What tokenizer papers measure, from the ids a tokenizer gives a text: bytes per token, tokens per word
(fertility), Rényi efficiency (Zouhar et al., ACL 2023), the share of the vocabulary used; and the ids that
encoding can never produce ("Fishing for Magikarp", Land & Bartolo, 2024).

A word is a maximal run of bytes that are not ASCII whitespace (space, \\t, \\n, \\r, \\v, \\f): what
`str.split()` counts on text whose whitespace is ASCII. Rényi efficiency is H_a(p) / log |V|, the Rényi entropy of
order a = 2.5 of the unigram distribution p of the ids used, over the log of the whole vocabulary's size |V|
(added tokens included): 1 when every id is used equally, lower the more the mass gathers on a few ids.
"""

import json
from pathlib import Path

import numpy as np

from pile_tools.encoding import byte_decoder

ALPHA = 2.5


TO_BYTES = str.maketrans({ch: chr(b) for ch, b in byte_decoder().items()})  # each character to its byte's
BYTE_LEVEL = str.maketrans(dict.fromkeys(byte_decoder()))  # deletes the alphabet's characters


def token_bytes(tok) -> list[tuple[int, bytes, bool]]:
    """(id, its bytes, whether it is a special token) for each id of a `tokenizers` object: a ByteLevel token's
    characters mapped back to the bytes they stand for; an added token, or one outside that alphabet, as UTF-8."""
    added = tok.get_added_tokens_decoder()
    out = []
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if i in added or token.translate(BYTE_LEVEL):
            out.append((i, token.encode(), i in added and added[i].special))
        else:
            out.append((i, token.translate(TO_BYTES).encode("latin-1"), False))
    return out


WORD_BYTES = bytes(0 if b in b" \t\n\r\x0b\x0c" else 1 for b in range(256))  # 1 for a byte a word is made of


def words_in(data: bytes) -> int:
    """The words of UTF-8 text (see the module's docstring): the starts of runs of word bytes."""
    marks = np.frombuffer(data.translate(WORD_BYTES), np.uint8)
    return int(np.count_nonzero(marks[1:] > marks[:-1])) + int(marks[:1].sum())


def bytes_and_words(texts: list[str]) -> tuple[int, int]:
    """The UTF-8 bytes and the words of documents, each counted on its own (a newline between them while counting,
    so no word runs across two)."""
    data = "\n".join(texts).encode()
    return len(data) - max(0, len(texts) - 1), words_in(data)


def renyi_efficiency(counts: np.ndarray, vocab_size: int, alpha: float = ALPHA) -> float:
    """H_alpha of the ids' unigram distribution (`counts`, one per id) over log(vocab_size)."""
    used = counts[counts > 0].astype(np.float64)
    if not len(used) or vocab_size < 2:
        return 0.0
    p = used / used.sum()
    return float(np.log(np.sum(p**alpha)) / (1 - alpha) / np.log(vocab_size))


def measures(text_bytes: int, words: int, counts: np.ndarray, vocab_size: int) -> dict:
    """A tokenizer's measures on a text, from its bytes, its words and how often each id was produced."""
    tokens = int(counts.sum())
    return {
        "tokens": tokens,
        "bytes_per_token": text_bytes / max(1, tokens),
        "tokens_per_word": tokens / max(1, words),
        "renyi_efficiency": renyi_efficiency(counts, vocab_size),
        "vocabulary_used": int(np.count_nonzero(counts)) / vocab_size,
    }


def without_prefix_space(path: Path):
    """(the tokenizer of `path` with any add_prefix_space of its pre-tokenizer off, whether one was on): that
    prefix only changes how a string's first word starts, and with it no token without a leading space would encode
    to itself alone, though text holds such tokens in the middle of words."""
    from tokenizers import Tokenizer

    from pile_tools.encoding import load_reference

    reference = load_reference(Path(path))  # a file it cannot read is one line naming it
    config = json.loads(Path(path).read_text(encoding="utf-8"))

    def off(node) -> bool:
        """Turn add_prefix_space off everywhere under `node`; whether there was one to turn off."""
        found = False
        if isinstance(node, dict):
            if node.get("add_prefix_space"):
                node["add_prefix_space"], found = False, True
            node = list(node.values())
        if isinstance(node, list):
            found = any([off(value) for value in node]) or found
        return found

    if not off(config.get("pre_tokenizer")):
        return reference, False  # as it is
    return Tokenizer.from_str(json.dumps(config)), True


def unreachable_ids(path: Path, encoder=None) -> list[int]:
    """The ids that encoding never produces: those whose own text does not encode back to exactly that id (with
    the pre-tokenizer's prefix space off: see without_prefix_space). Special tokens are left out (they are never
    text), and so are byte tokens that are not whole UTF-8 on their own (text holds them only beside the bytes
    that complete them).

    `encoder` (pile_tools.encoding.Encoder of the same file, an engine choose_engine found to give `tokenizers`'
    ids) makes it faster: only the texts it does not encode to their own id alone are encoded by `tokenizers`,
    whose ids decide. Without it, or with a prefix space turned off, `tokenizers` encodes every one."""
    tok, changed = without_prefix_space(Path(path))
    ids, texts = [], []
    for i, data, special in token_bytes(tok):
        if special:
            continue
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            continue
        ids.append(i)
    if encoder is not None and not changed and texts:
        got, counts = encoder.encode(texts)
        alone = (counts == 1) & (got[np.maximum(np.cumsum(counts) - 1, 0)] == ids) if len(got) else counts < 0
        ids, texts = [i for i, ok in zip(ids, alone) if not ok], [t for t, ok in zip(texts, alone) if not ok]
    encoded = tok.encode_batch(texts, add_special_tokens=False)
    return sorted(i for i, e in zip(ids, encoded) if e.ids != [i])
