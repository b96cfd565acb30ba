"""train-tokenizer: the paper's byte-level BPE, laid out like the released GPT-NeoX-20B tokenizer.

ids 0 `<|endoftext|>` and 1 `<|padding|>`; the 256 bytes; the learned merges; then 23 added tokens for runs of
24 down to 2 spaces, matched before pre-tokenization. Exactly `vocab_size` ids in all.

Space runs are kept out of the merge statistics: the text is cut where the space-run tokens will match at
encoding time, and the pieces are trained on separately. The released file learned 221 tokens with two adjacent
spaces that encoding can never produce; this layout learns none (and avoids `tokenizers`' 32-bit pair-count
overflow on whitespace-heavy code, its issue #2058).
"""

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pile_tools.components import epochs_for, load_epochs
from pile_tools.reader import InputError, Part, PartReader, Skips, discover, plan_parts

SPECIALS = ["<|endoftext|>", "<|padding|>"]
SPACE_RUNS = [" " * n for n in range(24, 1, -1)]  # longest first, as in the released file
FIXED_IDS = len(SPECIALS) + 256 + len(SPACE_RUNS)
# Where encoding splits the text before pre-tokenization: the space runs (24 at a time, the remainder if >= 2)
# and the special tokens. A single leftover space stays with the text after it, as `Ġ`.
SPLITTER = re.compile(r" {24}| {2,23}(?! )|<\|endoftext\|>|<\|padding\|>")


@dataclass
class Component:
    documents: int = 0
    bytes: int = 0  # after capping each document
    used_documents: int = 0
    used_bytes: int = 0
    epochs: float = 1.0
    rate: float = 0.0  # copies of each document fed to the trainer, on average


@dataclass
class TrainPlan:
    parts: list[Part]
    components: dict[str, Component] = field(default_factory=dict)
    doc_cap: int = 0
    budget: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


def pieces(text: str):
    """The text between the matches of the space-run and special tokens: what BPE sees at encoding time."""
    start = 0
    for m in SPLITTER.finditer(text):
        if m.start() > start:
            yield text[start : m.start()]
        start = m.end()
    if start < len(text):
        yield text[start:]


def copies(text: str, rate: float, seed: int) -> int:
    """How many times a document is fed: floor(rate), plus one with probability frac(rate), by a seeded hash."""
    whole = int(rate)
    h = hashlib.blake2b(text.encode(), digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return whole + (int.from_bytes(h, "little") / 2**64 < rate - whole)


def read_all(parts: list[Part], desc: str, skips: Skips):
    """(component, text) of every document, with a progress bar over input bytes; skips are counted."""
    total = sum(os.path.getsize(p.source) for p in parts if not p.source.startswith("hf:"))
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, dynamic_ncols=True, leave=False) as bar:
        for part in parts:
            reader, seen = PartReader(part, None, skips), 0
            for component, text, _ in reader.documents():
                yield component, text
                if reader.consumed - seen > 1 << 20:
                    bar.update(reader.consumed - seen)
                    seen = reader.consumed
            bar.update(reader.consumed - seen)


def plan_sample(inputs: list[str], max_bytes: int | None, weights: str, strict: bool) -> TrainPlan:
    """First pass: sizes per component, then each component's sampling rate under the byte budget."""
    plan = TrainPlan(parts=plan_parts(discover(inputs), part_size=1 << 62))
    table, every = load_epochs(weights)
    sizes, skips = {}, Skips(strict)
    for component, text in read_all(plan.parts, "sizing", skips):
        sizes.setdefault(component, []).append(len(text.encode()))
    if not sizes:
        raise InputError("no documents in the input")
    total = sum(sum(s) for s in sizes.values())
    plan.budget = max_bytes or total
    plan.doc_cap = min(1 << 20, max(16 << 10, plan.budget // 1000))
    unknown: set[str] = set()
    for name, s in sorted(sizes.items()):
        c = plan.components[name] = Component(documents=len(s), bytes=sum(min(n, plan.doc_cap) for n in s))
        c.epochs = epochs_for(name, table, every, unknown)
    mass = sum(c.epochs * c.bytes for c in plan.components.values()) or 1.0
    for c in plan.components.values():
        c.rate = plan.budget * c.epochs / mass  # share of the budget ∝ epochs x size, spread over the bytes
    plan.skipped = skips.counts
    return plan


def sample_texts(plan: TrainPlan, seed: int, strict: bool):
    """Second pass: the pieces of each sampled document, capped in length, each as often as its copies say."""
    for component, text in read_all(plan.parts, "reading", Skips(strict)):
        c = plan.components[component]
        text = text[: plan.doc_cap]
        n = copies(text, c.rate, seed)
        if n:
            c.used_documents += n
            c.used_bytes += n * len(text.encode())
            split = list(pieces(text))
            for _ in range(n):
                yield from split


def build_tokenizer(add_prefix_space: bool):
    """An untrained tokenizer with the released file's normalizer, pre-tokenizer, post-processor and decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=True)
    return tok


def train(texts, vocab_size: int, min_frequency: int, add_prefix_space: bool):
    """Train the merges on `texts`, then add the space-run tokens; exactly `vocab_size` ids or an error."""
    from tokenizers import AddedToken, pre_tokenizers, trainers

    if vocab_size <= FIXED_IDS:
        raise InputError(f"--vocab-size {vocab_size} leaves no room for merges (the fixed ids take {FIXED_IDS})")
    tok = build_tokenizer(add_prefix_space)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPACE_RUNS), min_frequency=min_frequency, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=sys.stderr.isatty(),
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(s, normalized=True, special=False) for s in SPACE_RUNS])
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise InputError(
            f"the text supports only {got - FIXED_IDS} merges with --min-frequency {min_frequency}, "
            f"{vocab_size - FIXED_IDS} are needed for --vocab-size {vocab_size}: give more text or a smaller vocabulary"
        )
    return tok


def transformers_files(add_prefix_space: bool) -> dict[str, dict]:
    """What `AutoTokenizer.from_pretrained(DIR)` reads beside tokenizer.json (transformers 4 and 5)."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0], "eos_token": SPECIALS[0],
        "unk_token": SPECIALS[0], "pad_token": SPECIALS[1], "add_prefix_space": add_prefix_space,
        "clean_up_tokenization_spaces": False, "model_max_length": 2048,
    }  # fmt: skip
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


def composition(tok) -> dict:
    """What the vocabulary holds, by kind of token."""
    vocab = tok.get_vocab(with_added_tokens=False)
    learned = [t for t, i in vocab.items() if i >= len(SPECIALS) + 256]
    return {
        "total": tok.get_vocab_size(with_added_tokens=True), "special": len(SPECIALS), "bytes": 256,
        "merges": len(learned), "space_runs": len(SPACE_RUNS),
        "merges_with_leading_space": sum(t.startswith("Ġ") for t in learned),
        "merges_with_two_adjacent_spaces": sum("ĠĠ" in t for t in learned),
        "merges_all_digits": sum(t.lstrip("Ġ").isdigit() for t in learned),
        "merges_whitespace_only": sum(set(t) <= set("ĠĊĉč") for t in learned),
    }  # fmt: skip


def write_atomic(path: Path, text: str) -> None:
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def train_tokenizer(inputs, output, *, vocab_size=50257, max_bytes=None, component_weights="pile",
                    add_prefix_space=False, min_frequency=2, seed=1234, strict=False) -> dict:  # fmt: skip
    """Sample, train and save; returns the training report."""
    start = time.time()
    plan = plan_sample(inputs, max_bytes, component_weights, strict)
    tok = train(sample_texts(plan, seed, strict), vocab_size, min_frequency, add_prefix_space)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "tokenizer.json", tok.to_str(pretty=True))
    for name, obj in transformers_files(add_prefix_space).items():
        write_atomic(out / name, json.dumps(obj, indent=2) + "\n")
    report = {
        "vocab_size": vocab_size, "add_prefix_space": add_prefix_space, "min_frequency": min_frequency,
        "seed": seed, "component_weights": component_weights, "budget_bytes": plan.budget,
        "document_cap_bytes": plan.doc_cap, "seconds": round(time.time() - start, 1),
        "used_bytes": sum(c.used_bytes for c in plan.components.values()),
        "components": {k: vars(v) for k, v in sorted(plan.components.items())},
        "skipped": plan.skipped, "vocabulary": composition(tok),
    }  # fmt: skip
    write_atomic(out / "train_report.json", json.dumps(report, indent=1) + "\n")
    return report
