"""compare-tokenizers: tokens per component against a baseline, counted as the paper's Appendix E counts, and the
measures tokenizer papers report (tokenizer/metrics.py), overall and per component.

Each document is encoded on its own, without special tokens or EOD. A token is whitespace-only when its
decoded bytes are all space, \\t, \\n, \\r, \\v or \\f; Tables 14-16 of the paper also count without those.
"""

import csv
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pile_tools.encoding import BUILTIN, checked_encoder, load_reference, resolve_tokenizer
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
from tokenizer.metrics import ALPHA, byte_decoder, bytes_and_words, measures, unreachable_ids

WHITESPACE = " \t\n\r\x0b\x0c"
BYTE_LEVEL_WS = "".join(ch for ch, b in byte_decoder().items() if chr(b) in WHITESPACE)  # ByteLevel's Ġ, Ċ...
BATCH_CHARS = 8 << 20


def whitespace_mask(path: Path) -> np.ndarray:
    """For every id of the tokenizer, whether its bytes are all whitespace: a ByteLevel token made of the characters
    standing for those bytes, or an added token (or one outside that alphabet) made of them as they are."""
    tok = load_reference(path)
    added = tok.get_added_tokens_decoder()
    mask = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=bool)
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        mask[i] = bool(token) and (not token.strip(WHITESPACE) or (i not in added and not token.strip(BYTE_LEVEL_WS)))
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


class Tokenizer:
    """One tokenizer being counted: its encoder (the first engine that gives `tokenizers`' ids on `sample`), which
    of its ids are whitespace-only, and its vocabulary size."""

    def __init__(self, path: Path, sample: list[str], echo):
        self.encoder = checked_encoder(path, sample, echo)
        self.encoder.threaded = True
        self.whitespace = whitespace_mask(path)
        self.vocab_size = len(self.whitespace)


def count(inputs: list[str], tokenizers: dict[str, Path], echo=print) -> tuple[dict, dict, dict]:
    """(documents, bytes, words, tokens and tokens without whitespace-only ones, per component and tokenizer;
    how often each id was produced, per tokenizer and component; each tokenizer's unreachable ids)."""
    parts = cut_into_parts(discover(inputs), part_size=1 << 62)
    sample = guard_sample(parts, None)
    encoders = {name: Tokenizer(path, sample, echo) for name, path in tokenizers.items()}
    components: dict[str, dict] = {}
    ids: dict[str, dict[str, np.ndarray]] = {name: {} for name in tokenizers}
    skips = Skips()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(pyplot)  # loaded while the text is encoded: a third of the figures' time
        for batch, text in prefetch(read_batches(parts, skips)):
            tally(batch, text, encoders, components, ids)
    if not components:
        raise InputError("no documents in the input")
    report_skips(skips.counts, skips.examples, echo)
    counted = {
        "components": dict(sorted(components.items())),
        "skipped": skips.counts,
        "engines": {name: t.encoder.engine for name, t in encoders.items()},
    }
    return counted, ids, {name: unreachable_ids(tokenizers[name], t.encoder) for name, t in encoders.items()}


def read_batches(parts, skips):
    """Lists of (component, text) of about BATCH_CHARS characters, each with its text's counts per component
    (made here, on the reading thread, while the batch before is encoded)."""
    for batch in batched_by_chars(read_documents(parts, "counting", skips), BATCH_CHARS, lambda item: len(item[1])):
        yield batch, text_counts(batch)


def text_counts(batch) -> dict[str, dict]:
    """Per component of a batch of (component, text): its documents, bytes and words."""
    out = {}
    for component in sorted({c for c, _ in batch}):
        mine = [t for c, t in batch if c == component]
        size, words = bytes_and_words(mine)
        out[component] = {"documents": len(mine), "bytes": size, "words": words}
    return out


def tally(batch, text: dict[str, dict], encoders: dict[str, Tokenizer], components: dict, ids: dict) -> None:
    """Add one batch of (component, text) to the counts: documents, bytes, words (`text`, its text_counts) and
    tokens per tokenizer, and each id's uses (`ids`: per tokenizer and component)."""
    names = [c for c, _ in batch]
    texts = [t for _, t in batch]
    order = list(text)
    for component, counts in text.items():
        entry = components.setdefault(
            component, {"documents": 0, "bytes": 0, "words": 0, "tokens": {}, "tokens_excluding_whitespace": {}}
        )
        for key, n in counts.items():
            entry[key] += n
    which = np.array([order.index(n) for n in names])  # each document's component, as its index in `order`
    for name, t in encoders.items():
        tokens, counts = t.encoder.encode(texts)
        # every count below comes from how often each component used each id
        offsets = np.repeat(which * t.vocab_size, counts) if len(order) > 1 else 0  # the component's block
        uses = np.bincount(offsets + tokens, minlength=len(order) * t.vocab_size).reshape(len(order), t.vocab_size)
        whitespace = uses @ t.whitespace
        for k, component in enumerate(order):
            entry, n = components[component], int(uses[k].sum())
            entry["tokens"][name] = entry["tokens"].get(name, 0) + n
            entry["tokens_excluding_whitespace"][name] = (
                entry["tokens_excluding_whitespace"].get(name, 0) + n - int(whitespace[k])
            )
            ids[name][component] = ids[name][component] + uses[k] if component in ids[name] else uses[k]


def tokenizer_metrics(report: dict, ids: dict, unreachable: dict[str, list[int]]) -> dict:
    """Per tokenizer: its measures over all the text and per component (tokenizer/metrics.py), and its
    unreachable ids."""
    out = {}
    for name in report["tokenizers"]:
        uses = ids[name]
        size = len(next(iter(uses.values())))
        per_component = {c: measures(e["bytes"], e["words"], uses[c], size) for c, e in report["components"].items()}
        total = report["total"]
        out[name] = {
            **measures(total["bytes"], total["words"], sum(uses.values()), size),
            "vocabulary_size": size,
            "unreachable_ids": unreachable[name],
            "components": per_component,
        }
    return out


def with_total(components: dict) -> dict:
    """The counts summed over all components."""
    total = {"documents": 0, "bytes": 0, "words": 0, "tokens": {}, "tokens_excluding_whitespace": {}}
    for entry in components.values():
        for key in ("documents", "bytes", "words"):
            total[key] += entry[key]
        for key in ("tokens", "tokens_excluding_whitespace"):
            for name, n in entry[key].items():
                total[key][name] = total[key].get(name, 0) + n
    return total


METRICS = {  # the measures shown beside the counts, with how a reader names them
    "bytes_per_token": "bytes per token",
    "tokens_per_word": "tokens per word",
    "renyi_efficiency": f"Rényi efficiency (alpha {ALPHA})",
    "vocabulary_used": "share of the vocabulary used",
}


def csv_rows(report: dict):
    """One row per (component or total, tokenizer), with the derived ratios and the measures."""
    base = report["baseline"]
    for component, e in [*report["components"].items(), ("total", report["total"])]:
        for name in report["tokenizers"]:
            tokens, no_ws = e["tokens"][name], e["tokens_excluding_whitespace"][name]
            m = report["metrics"][name]
            m = m if component == "total" else m["components"][component]
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
                "words": e["words"],
                **{key: m[key] for key in METRICS if key != "bytes_per_token"},
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
    return "\n".join(out + metrics_markdown(report))


def metrics_markdown(report: dict) -> list[str]:
    """report.md's measures: one table over all the text, one per measure by component."""
    names, metrics = report["tokenizers"], report["metrics"]
    out = [
        "## Measures",
        "",
        "A word: a run of bytes that are not ASCII whitespace. Unreachable: ids whose own text never encodes to them.",
        "",
        "| tokenizer | vocabulary | " + " | ".join(METRICS.values()) + " | unreachable ids |",
        "|---|" + "---:|" * (len(METRICS) + 2),
    ]
    for n in names:
        m = metrics[n]
        cells = [n, f"{m['vocabulary_size']:,}", *(f"{m[k]:.3f}" for k in METRICS), f"{len(m['unreachable_ids']):,}"]
        out.append("| " + " | ".join(cells) + " |")
    for key, title in METRICS.items():
        out += [
            "",
            f"### {title[0].upper() + title[1:]}, by component",
            "",
            "| component | " + " | ".join(names) + " |",
        ]
        out.append("|---|" + "---:|" * len(names))
        for component in report["components"]:
            out.append(
                f"| {component} | "
                + " | ".join(f"{metrics[n]['components'][component][key]:.3f}" for n in names)
                + " |"
            )
        out.append("| **total** | " + " | ".join(f"{metrics[n][key]:.3f}" for n in names) + " |")
    return out + [""]


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display); its import is most of a figure's time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bars(labels: list[str], series: dict[str, list[float]], ylabel: str, title: str, path: Path, line=None) -> None:
    """A figure of bars per label, one per series (tokenizer), saved to `path`."""
    plt = pyplot()
    width_in = min(14, max(6, 0.45 * len(labels) * max(1, len(series))))
    fig, ax = plt.subplots(figsize=(width_in, 5))
    fig.subplots_adjust(left=0.75 / width_in, right=1 - 0.15 / width_in, top=0.93, bottom=0.3)  # tight_layout's
    # margins for component names, without the extra drawing it costs (a third of each figure's time)
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(len(labels)) + k * width, values, width, label=name)
    if line is not None:
        ax.axhline(line, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(labels)) + width * (len(series) - 1) / 2, labels, rotation=40, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)


def plot(report: dict, out: Path) -> None:
    """compression.png: tokens per component relative to the baseline, one bar per tokenizer; and one figure per
    measure (bytes_per_token.png, ...), every tokenizer beside each other."""
    base, labels = report["baseline"], [*report["components"], "total"]
    entries = [*report["components"].values(), report["total"]]
    others = {
        name: [e["tokens"][name] / max(1, e["tokens"][base]) for e in entries]
        for name in report["tokenizers"]
        if name != base
    }
    title = "Tokens per component, relative to the baseline (lower is better)"
    bars(labels, others, f"tokens relative to {base}", title, out / "compression.png", line=1.0)
    for key, name in METRICS.items():
        series = {
            n: [*(m["components"][c][key] for c in report["components"]), m[key]] for n, m in report["metrics"].items()
        }
        bars(labels, series, name, f"{name[0].upper() + name[1:]}, per component", out / f"{key}.png")


def compare_tokenizers(inputs, specs, baseline, output, echo=print) -> dict:
    """Count, then write report.json, report.md, report.csv and compression.png into `output`."""
    tokenizers = name_tokenizers(specs, baseline)
    out = check_writable(Path(output))  # before the counting, not after it
    counted, ids, unreachable = count(inputs, tokenizers, echo)
    report = {
        "baseline": next(iter(tokenizers)),
        "tokenizers": list(tokenizers),
        "files": {n: str(p) for n, p in tokenizers.items()},
        **counted,
    }
    report["total"] = with_total(report["components"])
    report["metrics"] = tokenizer_metrics(report, ids, unreachable)
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
    plot(report, out)
    return report
