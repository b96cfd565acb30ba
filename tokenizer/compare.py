"""compare-tokenizers: tokens per component against a baseline, counted as the paper's Appendix E counts.

Each document is encoded on its own, without special tokens or EOD. A token is whitespace-only when its
decoded bytes are all space, \\t, \\n, \\r, \\v or \\f; Tables 14-16 of the paper also count without those.
"""

import csv
import io
import json
from pathlib import Path

import numpy as np

from pile_tools.encoding import BUILTIN, Encoder, choose_engine, load_reference, resolve_tokenizer
from pile_tools.ground import InputError, check_writable, prefetch, save_figure, write_text
from pile_tools.reader import (
    Skips,
    batched_by_chars,
    cut_into_parts,
    discover,
    guard_sample,
    read_documents,
    report_skips,
)

WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")
BATCH_CHARS = 8 << 20


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


def whitespace_mask(path: Path) -> np.ndarray:
    """For every id of the tokenizer, whether its bytes are all whitespace."""
    tok = load_reference(path)
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    decoder = byte_decoder()
    mask = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=bool)
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if token in added or not all(ch in decoder for ch in token):
            data = token.encode()
        else:
            data = bytes(decoder[ch] for ch in token)
        mask[i] = bool(data) and set(data) <= WHITESPACE
    return mask


def name_tokenizers(specs: list[str], baseline: str) -> dict[str, Path]:
    """Report name -> tokenizer.json, baseline first; a path is named as it was given (what the legend shows)."""
    named: dict[str, Path] = {}
    for spec in [baseline, *specs]:
        path = resolve_tokenizer(spec)
        if path in named.values():
            continue
        name = spec if spec in BUILTIN else spec.rstrip("/").removesuffix("/tokenizer.json") or path.stem
        while name in named:
            name += "'"
        named[name] = path
    return named


def count(inputs: list[str], tokenizers: dict[str, Path], echo=print) -> dict:
    """documents, bytes, tokens and tokens without whitespace-only ones, per component and tokenizer."""
    parts = cut_into_parts(discover(inputs), part_size=1 << 62)
    sample = guard_sample(parts, None)
    encoders = {}
    for name, path in tokenizers.items():
        engine = choose_engine(path, sample, echo)
        encoders[name] = (Encoder(path, engine, threaded=True), whitespace_mask(path))
    components: dict[str, dict] = {}
    skips = Skips()
    for batch in prefetch(read_batches(parts, skips)):
        tally(batch, encoders, components)
    if not components:
        raise InputError("no documents in the input")
    report_skips(skips.counts, skips.examples, echo)
    return {
        "components": dict(sorted(components.items())),
        "skipped": skips.counts,
        "engines": {name: enc.engine for name, (enc, _) in encoders.items()},
    }


def read_batches(parts, skips):
    """Lists of (component, text) of about BATCH_CHARS characters."""
    yield from batched_by_chars(read_documents(parts, "counting", skips), BATCH_CHARS, lambda item: len(item[1]))


def tally(batch, encoders, components) -> None:
    """Add one batch of (component, text) to the counts: documents, bytes and tokens per tokenizer."""
    names = [c for c, _ in batch]
    texts = [t for _, t in batch]
    for component in set(names):
        entry = components.setdefault(
            component, {"documents": 0, "bytes": 0, "tokens": {}, "tokens_excluding_whitespace": {}}
        )
        mine = [t for c, t in batch if c == component]
        entry["documents"] += len(mine)
        entry["bytes"] += sum(len(t.encode()) for t in mine)
    index = {c: np.array([n == c for n in names]) for c in set(names)}
    for name, (encoder, mask) in encoders.items():
        ids, counts = encoder.encode(texts)
        doc = np.repeat(np.arange(len(texts)), counts)
        ws = np.bincount(doc, weights=mask[ids], minlength=len(texts)).astype(np.int64)
        for component, sel in index.items():
            entry = components[component]
            n = int(counts[sel].sum())
            entry["tokens"][name] = entry["tokens"].get(name, 0) + n
            entry["tokens_excluding_whitespace"][name] = (
                entry["tokens_excluding_whitespace"].get(name, 0) + n - int(ws[sel].sum())
            )


def with_total(components: dict) -> dict:
    """The counts summed over all components."""
    total = {"documents": 0, "bytes": 0, "tokens": {}, "tokens_excluding_whitespace": {}}
    for entry in components.values():
        total["documents"] += entry["documents"]
        total["bytes"] += entry["bytes"]
        for key in ("tokens", "tokens_excluding_whitespace"):
            for name, n in entry[key].items():
                total[key][name] = total[key].get(name, 0) + n
    return total


def csv_rows(report: dict):
    """One row per (component or total, tokenizer), with the derived ratios."""
    base = report["baseline"]
    for component, e in [*report["components"].items(), ("total", report["total"])]:
        for name in report["tokenizers"]:
            tokens, no_ws = e["tokens"][name], e["tokens_excluding_whitespace"][name]
            yield {
                "component": component,
                "tokenizer": name,
                "documents": e["documents"],
                "bytes": e["bytes"],
                "tokens": tokens,
                "ratio_to_baseline": tokens / max(1, e["tokens"][base]),
                "bytes_per_token": e["bytes"] / max(1, tokens),
                "tokens_excluding_whitespace": no_ws,
                "ratio_to_baseline_excluding_whitespace": no_ws / max(1, e["tokens_excluding_whitespace"][base]),
            }


def markdown(report: dict) -> str:
    """report.md: tokens per component and tokenizer, ratios to the baseline and bytes per token."""
    names, base = report["tokenizers"], report["baseline"]
    out = [f"# Tokens per component (baseline: {base})", ""]
    for title, key in (("All tokens", "tokens"), ("Excluding whitespace-only tokens", "tokens_excluding_whitespace")):
        ratios = [f"{n} / {base}" for n in names if n != base]
        header = ["component", "documents", "MB", *names, *ratios, f"bytes/token ({', '.join(names)})"]
        out += [f"## {title}", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 2) + "---|"]
        for component, e in [*report["components"].items(), ("**total**", report["total"])]:
            t = e[key]
            cells = [component, f"{e['documents']:,}", f"{e['bytes'] / 1e6:.2f}", *(f"{t[n]:,}" for n in names)]
            cells += [f"{t[n] / max(1, t[base]):.3f}" for n in names if n != base]
            cells += [", ".join(f"{e['bytes'] / max(1, t[n]):.2f}" for n in names)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    """compression.png: tokens per component relative to the baseline, one bar per tokenizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [n for n in report["tokenizers"] if n != report["baseline"]]
    labels = [*report["components"], "total"]
    entries = [*report["components"].values(), report["total"]]
    fig, ax = plt.subplots(figsize=(min(14, max(6, 0.45 * len(labels) * max(1, len(others)))), 5))
    width = 0.8 / max(1, len(others))
    for k, name in enumerate(others):
        ratios = [e["tokens"][name] / max(1, e["tokens"][report["baseline"]]) for e in entries]
        ax.bar(np.arange(len(labels)) + k * width, ratios, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(labels)) + width * (len(others) - 1) / 2, labels, rotation=40, ha="right")
    ax.set_ylabel(f"tokens relative to {report['baseline']}")
    ax.set_title("Tokens per component, relative to the baseline (lower is better)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def compare_tokenizers(inputs, specs, baseline, output, echo=print) -> dict:
    """Count, then write report.json, report.md, report.csv and compression.png into `output`."""
    tokenizers = name_tokenizers(specs, baseline)
    out = check_writable(Path(output))  # before the counting, not after it
    counted = count(inputs, tokenizers, echo)
    report = {
        "baseline": next(iter(tokenizers)),
        "tokenizers": list(tokenizers),
        "files": {n: str(p) for n, p in tokenizers.items()},
        **counted,
    }
    report["total"] = with_total(report["components"])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(next(csv_rows(report))))
    writer.writeheader()
    writer.writerows(csv_rows(report))
    for name, text in (
        ("report.json", json.dumps(report, indent=1)),
        ("report.md", markdown(report)),
        ("report.csv", buf.getvalue()),
    ):
        write_text(out / name, text + ("" if text.endswith("\n") else "\n"))
    plot(report, out / "compression.png")
    return report
