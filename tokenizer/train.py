"""train-tokenizer: the paper's byte-level BPE, laid out like the released GPT-NeoX-20B tokenizer.

ids 0 `<|endoftext|>` and 1 `<|padding|>`; the 256 bytes; the learned merges; then 23 added tokens for runs of
24 down to 2 spaces, matched before pre-tokenization. Exactly `vocab_size` ids in all.

Space runs are kept out of the merge statistics: while training, the pre-tokenizer first cuts the text where
the space-run tokens will match at encoding time (and drops those runs), so BPE learns from what encoding will
show it. The released file learned 221 tokens with two adjacent spaces that encoding can never produce; this
layout learns none (and avoids `tokenizers`' 32-bit pair-count overflow on whitespace-heavy code, its #2058).
"""

import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pile_tools.components import epochs_for, load_epochs, split_weights
from pile_tools.encoding import checked_encoder, load_reference
from pile_tools.ground import InputError, check_writable, prefetch, write_json, write_text
from pile_tools.parts import split_of, split_thresholds
from pile_tools.reader import Part, Skips, cut_into_parts, discover, read_documents, report_skips
from tokenizer.metrics import bytes_and_words, measures, unreachable_ids

SPECIALS = ["<|endoftext|>", "<|padding|>"]  # ids 0 and 1, as in GPT-NeoX-20B's tokenizer
CACHE_BYTES = 1 << 30  # inputs up to this much text are read once and kept, larger ones are read twice
HELD_OUT_BYTES = 16 << 20  # of held-out text kept to measure the trained tokenizer on
SPACE_RUNS = [" " * n for n in range(24, 1, -1)]  # longest first, as in the released file
FIXED_IDS = len(SPECIALS) + 256 + len(SPACE_RUNS)
# Where encoding splits the text before pre-tokenization: the space runs (24 at a time, the remainder if >= 2)
# and the special tokens. A single leftover space stays with the text after it, as `Ġ`.
SPLITTER = re.compile(r" {24}| {2,23}(?! )|<\|endoftext\|>|<\|padding\|>")


def transformers_files(add_prefix_space: bool) -> dict[str, dict]:
    """What `AutoTokenizer.from_pretrained(DIR)` reads beside tokenizer.json (transformers 4 and 5)."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIALS[0],
        "eos_token": SPECIALS[0],
        "unk_token": SPECIALS[0],
        "pad_token": SPECIALS[1],
        "add_prefix_space": add_prefix_space,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


@dataclass
class Component:
    """One component's sizes in the first pass and its sampling rate under the byte budget."""

    documents: int = 0
    bytes: int = 0  # after capping each document
    used_documents: int = 0
    used_bytes: int = 0
    epochs: float = 1.0
    rate: float = 0.0  # copies of each document fed to the trainer, on average
    credit: float = 0.0  # bytes owed to the sample so far


@dataclass
class TrainingText:
    """What the tokenizer trains on: the parts, per-component sizes and rates, the caps and skips."""

    parts: list[Part]
    components: dict[str, Component] = field(default_factory=dict)
    doc_cap: int = 0
    budget: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    cache: list[tuple[str, str]] | None = None  # the documents, when they fit in CACHE_BYTES
    thresholds: tuple[int, ...] = ()  # build-shards' hash split: documents outside its train split are held out
    held_out: list[tuple[str, str]] = field(default_factory=list)  # up to HELD_OUT_BYTES of them, to measure on
    held_out_documents: int = 0
    held_out_bytes: int = 0  # of those kept


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8."""
    return len(text) if text.isascii() else len(text.encode())  # isascii() is O(1) on CPython's ASCII strings


def cap_text(text: str, cap: int) -> str:
    """The first `cap` bytes of the text's UTF-8 (a character cut in half is dropped)."""
    if utf8_size(text) <= cap:
        return text
    return text.encode()[:cap].decode("utf-8", errors="ignore")


def seeded_credit(component: str, seed: int) -> float:
    """A reproducible starting point in [0, 1) for a component's systematic sample."""
    h = hashlib.blake2b(component.encode(), digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(h, "little") / 2**64


def take(c: Component, nbytes: int) -> int:
    """Copies of the next document: floor(rate), plus one more by systematic sampling of the fraction by bytes, so
    each component's share is `rate` x its bytes to within one document (coin flips would miss by several)."""
    whole = int(c.rate)
    c.credit += (c.rate - whole) * nbytes
    extra = nbytes > 0 and c.credit >= nbytes
    c.credit -= nbytes if extra else 0
    return whole + extra


def held_out(plan: TrainingText, text: str) -> bool:
    """Whether build-shards, with the run's --split, puts the document outside its train split."""
    return bool(plan.thresholds) and split_of(text.encode("utf-8"), plan.thresholds) != 0


def hold_out(plan: TrainingText, component: str, text: str) -> None:
    """Count a held-out document, and keep it to measure on while there is room."""
    plan.held_out_documents += 1
    size = utf8_size(text)
    if plan.held_out_bytes + size <= HELD_OUT_BYTES:
        plan.held_out.append((component, text))
        plan.held_out_bytes += size


def held_out_thresholds(split: str) -> tuple[int, ...]:
    """build-shards' hash cut points for --split, or none when it holds nothing out (1,0,0)."""
    weights = split_weights(split, exactly_three=True)
    if weights is None:
        raise InputError(f"--split {split!r}: give 3 non-negative weights for train,valid,test, like 995,4,1")
    return split_thresholds(weights) if sum(weights[1:]) > 0 else ()


def measure_held_out(path: Path, plan: TrainingText, echo) -> dict:
    """The trained tokenizer's measures on the held-out documents (tokenizer/metrics.py), encoded by the fast
    engine that gives `tokenizers`' ids, and its unreachable ids."""
    import numpy as np

    texts = [text for _, text in plan.held_out]
    out = {"documents": plan.held_out_documents, "measured_documents": len(texts), "measured_bytes": 0}
    if texts:
        encoder = checked_encoder(path, texts[:64], echo)
        encoder.threaded = True
        ids, _ = encoder.encode(texts)
        size = load_reference(path).get_vocab_size(with_added_tokens=True)
        counts = np.bincount(ids, minlength=size)
        out["measured_bytes"], words = bytes_and_words(texts)
        out |= measures(out["measured_bytes"], words, counts, size)
    return {**out, "unreachable_ids": unreachable_ids(path)}


def plan_sample(
    inputs: list[str], max_bytes: int | None, weights: str, seed: int, strict: bool, split: str, echo=print
) -> TrainingText:
    """First pass: the held-out documents aside, sizes per component, then each component's sampling rate under
    the byte budget."""
    plan = TrainingText(parts=cut_into_parts(discover(inputs), part_size=1 << 62))
    plan.thresholds = held_out_thresholds(split)
    table, every = load_epochs(weights)
    sizes, skips, cache, cached = {}, Skips(strict), [], 0
    for component, text in read_documents(plan.parts, "sizing", skips):
        if held_out(plan, text):
            hold_out(plan, component, text)
            continue
        sizes.setdefault(component, []).append(utf8_size(text))
        if cache is not None:
            cache.append((component, text))
            cached += sizes[component][-1]
            cache = cache if cached <= CACHE_BYTES else None
    plan.cache = cache
    if not sizes and plan.held_out_documents:
        raise InputError(
            f"all {plan.held_out_documents} documents of the input fall outside --split {split}'s train split; give "
            "more text, or --split 1,0,0 to hold none out"
        )
    if not sizes:
        raise InputError("no documents in the input")
    plan.doc_cap = min(1 << 20, max(64 << 10, (max_bytes or sum(map(sum, sizes.values()))) // 1000))
    unknown: set[str] = set()
    for name, s in sorted(sizes.items()):
        c = plan.components[name] = Component(documents=len(s), bytes=sum(min(n, plan.doc_cap) for n in s))
        c.epochs = epochs_for(name, table, every, unknown)
    plan.budget = max_bytes or sum(c.bytes for c in plan.components.values())  # default: every capped byte once
    mass = sum(c.epochs * c.bytes for c in plan.components.values()) or 1.0
    for name, c in plan.components.items():
        c.rate = plan.budget * c.epochs / mass  # share of the budget ∝ epochs x size, spread over the bytes
        c.credit = seeded_credit(name, seed) * (c.rate % 1) * c.bytes / max(1, c.documents)
    plan.skipped = skips.counts
    report_skips(skips.counts, skips.examples, echo)
    return plan


def sample_batches(plan: TrainingText, strict: bool, batch: int = 64):
    """Second pass: lists of sampled documents, capped in length, each as often as its copies say."""
    texts = []
    docs = plan.cache if plan.cache is not None else read_documents(plan.parts, "reading", Skips(strict))
    for component, text in docs:
        if plan.cache is None and held_out(plan, text):
            continue
        c = plan.components[component]
        text = cap_text(text, plan.doc_cap)
        nbytes = utf8_size(text)
        n = take(c, nbytes)
        c.used_documents += n
        c.used_bytes += n * nbytes
        texts += [text] * n
        if len(texts) >= batch:
            yield texts
            texts = []
    if texts:
        yield texts


def sample_texts(plan: TrainingText, strict: bool):
    """The sample one text at a time. The trainer's threads pull texts one by one while holding the GIL, so input
    that is not in memory is read and sampled ahead in a thread, not inside that pull."""
    if plan.cache is not None:  # in memory already: hand the trainer a list, the cheapest thing to pull from
        yield from [text for batch in sample_batches(plan, strict) for text in batch]
        return
    for batch in prefetch(sample_batches(plan, strict), depth=64):
        yield from batch


def build_tokenizer(add_prefix_space: bool):
    """An untrained tokenizer with the released file's normalizer, pre-tokenizer, post-processor and decoder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=True)
    # decoders.ByteLevel() takes no settings (its add_prefix_space is always true, and unused when decoding); spell
    # the released file's decoder out so the configuration is equal, not just equivalent.
    config = json.loads(tok.to_str())
    config["decoder"] = {**config["pre_tokenizer"]}
    return Tokenizer.from_str(json.dumps(config))


def train(texts, vocab_size: int, min_frequency: int, add_prefix_space: bool):
    """Train the merges on `texts`, then add the space-run tokens; exactly `vocab_size` ids or an error."""
    from tokenizers import AddedToken, Regex, pre_tokenizers, trainers

    if vocab_size <= FIXED_IDS:
        raise InputError(f"--vocab-size {vocab_size} leaves no room for merges (the fixed ids take {FIXED_IDS})")
    tok = build_tokenizer(add_prefix_space)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPACE_RUNS),
        min_frequency=min_frequency,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    byte_level = tok.pre_tokenizer
    cut = pre_tokenizers.Split(Regex(SPLITTER.pattern), behavior="removed")
    tok.pre_tokenizer = pre_tokenizers.Sequence([cut, byte_level])
    tok.train_from_iterator(texts, trainer=trainer)
    tok.pre_tokenizer = byte_level
    tok.add_tokens([AddedToken(s, normalized=True, special=False) for s in SPACE_RUNS])
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise InputError(
            f"the text supports only {got - FIXED_IDS} merges with --min-frequency {min_frequency}, "
            f"{vocab_size - FIXED_IDS} are needed for --vocab-size {vocab_size}: give more text or a smaller vocabulary"
        )
    return tok


def composition(tok) -> dict:
    """What the vocabulary holds, by kind of token."""
    vocab = tok.get_vocab(with_added_tokens=False)
    learned = [t for t, i in vocab.items() if i >= len(SPECIALS) + 256]
    return {
        "total": tok.get_vocab_size(with_added_tokens=True),
        "special": len(SPECIALS),
        "bytes": 256,
        "merges": len(learned),
        "space_runs": len(SPACE_RUNS),
        "merges_with_leading_space": sum(t.startswith("Ġ") for t in learned),
        "merges_with_two_adjacent_spaces": sum("ĠĠ" in t for t in learned),
        "merges_all_digits": sum(t.lstrip("Ġ").isdigit() for t in learned),
        "merges_whitespace_only": sum(set(t) <= set("ĠĊĉč") for t in learned),
    }


def train_tokenizer(
    inputs,
    output,
    *,
    vocab_size=50257,
    max_bytes=None,
    component_weights="pile",
    add_prefix_space=False,
    min_frequency=2,
    seed=1234,
    strict=False,
    split="995,4,1",
    echo=print,
) -> dict:
    """Sample, train and save; returns the training report. The documents build-shards with `split` would put in
    valid or test are held out of the training, and the tokenizer is measured on them; an id that encoding can
    never produce is an error, after the report is written."""
    start = time.time()
    plan = plan_sample(inputs, max_bytes, component_weights, seed, strict, split, echo)
    out = check_writable(Path(output))  # before the training, not after it
    tok = train(sample_texts(plan, strict), vocab_size, min_frequency, add_prefix_space)
    write_text(out / "tokenizer.json", tok.to_str(pretty=True))
    for name, obj in transformers_files(add_prefix_space).items():
        write_json(out / name, obj)
    report = {
        "vocab_size": vocab_size,
        "add_prefix_space": add_prefix_space,
        "min_frequency": min_frequency,
        "seed": seed,
        "component_weights": component_weights,
        "budget_bytes": plan.budget,
        "document_cap_bytes": plan.doc_cap,
        "seconds": round(time.time() - start, 1),
        "used_bytes": sum(c.used_bytes for c in plan.components.values()),
        "components": {
            name: {k: v for k, v in vars(c).items() if k != "credit"} for name, c in sorted(plan.components.items())
        },
        "skipped": plan.skipped,
        "vocabulary": composition(tok),
        "held_out": {"split": split, **measure_held_out(out / "tokenizer.json", plan, echo)},
    }
    write_json(out / "train_report.json", report)
    if dead := report["held_out"]["unreachable_ids"]:
        shown = ", ".join(repr(tok.id_to_token(i)) for i in dead[:5])
        raise InputError(
            f"{out / 'tokenizer.json'}: {len(dead)} id(s) that encoding never produces ({shown}): a defect of the "
            f"training, listed in {out / 'train_report.json'}"
        )
    return report
