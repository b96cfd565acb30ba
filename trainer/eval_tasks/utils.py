"""Local lm-eval tasks on a bundled book held out of training (see README.md here): no download needed."""

import json
import re
from pathlib import Path

HERE = Path(__file__).parent


def load(name: str):
    """{validation, test} splits of one of the bundled jsonl files, as lm-eval's custom_dataset wants them."""
    import datasets

    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line]
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list([r for r in rows if r["split"] == split])
            for split in ("validation", "test")
        }
    )


def load_passages(**kwargs):
    """neox_books_wordperplexity's data."""
    return load("persuasion_passages.jsonl")


def load_last_words(**kwargs):
    """neox_books_lastword's data."""
    return load("persuasion_last_words.jsonl")


def process_results(doc, results):
    """Rolling log-likelihood per word and per byte, counted on the passage as written (as the wikitext task)."""
    (loglikelihood,) = results
    words, nbytes = len(re.split(r"\s+", doc["text"].strip())), len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }
