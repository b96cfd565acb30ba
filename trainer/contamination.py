"""neox-data decontaminate: which documents of the shards share an n-gram with an evaluation task's text.

A task is our local tasks, an lm-eval task with its data on disk, or a .jsonl/.txt file; its n-grams are
lm-eval's (pile_tools/ngrams.py: 13 words by default, as GPT-3 and the harness use). A document is contaminated
by a task when one of its n-grams is one of the task's. The shards are scanned on worker processes, a range of
documents each; the report counts documents and tokens per task, split and component, and names the first
matches as file:line through the source map. The shards are never rewritten.
"""

import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from pile_tools.ground import InputError, check_writable, write_json, write_text
from pile_tools.indexed import Shard
from pile_tools.ngrams import BOUNDARY, CHUNK_TOKENS, Scanner, Vocabulary, document_ranges, ngram_hashes, words_of
from pile_tools.shards_dir import manifest_entries, manifest_tokenizer, read_manifest
from pile_tools.sourcemap import SourceMap

MATCHES_SHOWN = 20  # per task in the report
JOB_TOKENS = 16 * CHUNK_TOKENS  # a worker's job: ~64 MB of text, enough to amortise sending back its findings


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
    if path.is_dir():
        raise InputError(f"{path}: a directory; --against takes a .jsonl or .txt file, or an lm-eval task's name")
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


def decontaminate(data: str, against: list[str], output: str, n: int = 13, workers: int = 0) -> dict:
    """Write DIR/report.json and DIR/report.md: per task, the documents (and their tokens) of each split and
    component sharing an n-gram with it, and the first matches as file:line. Returns the report. `workers`: scanning
    processes (0: one per CPU)."""
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
    setup = (str(tokenizer), manifest["tokenizer"]["eod"], vocabulary.ids, [t.hashes for t in tasks], n)
    found = scan(root, manifest_entries(manifest), setup, workers or os.cpu_count() or 1)
    report = build_report(root, manifest, tasks, found, n, time.perf_counter() - start)
    write_json(out / "report.json", report)
    write_text(out / "report.md", as_markdown(report))
    return report


_scanner = None  # a worker's Scanner, made once by its initializer


def _start_worker(*setup) -> None:
    global _scanner
    _scanner = Scanner(*setup)


def _scan(job: tuple[str, int, int]):
    return _scanner.scan(*job)


def scan(root: Path, entries: dict, setup: tuple, workers: int) -> list[dict[str, dict]]:
    """Every shard's documents looked up, in ranges of about JOB_TOKENS tokens on `workers` processes (here for
    one); per task, {shard: {document: (first matching n-gram, its hash)}}, under one progress bar."""
    from tqdm import tqdm

    jobs = [
        (name, str(root / name), first, last)
        for name in sorted(entries)
        for first, last in document_ranges(Shard(root / name), JOB_TOKENS)
    ]
    found = [{name: {} for name in entries} for _ in setup[3]]
    total = sum(e["tokens"] for e in entries.values())
    with tqdm(total=total, unit="tok", unit_scale=True, desc="scanning", dynamic_ncols=True, disable=None) as bar:
        if workers <= 1 or total <= 2 * JOB_TOKENS:  # a pool's start-up (~1 s) is more than a small scan
            _start_worker(*setup)
            results = (_scan(job[1:]) for job in jobs)
            pool = None
        else:  # spawned, not forked: the tokenizer library's threads do not survive a fork
            pool = ProcessPoolExecutor(min(workers, len(jobs)), mp.get_context("spawn"), _start_worker, setup)
            results = pool.map(_scan, [job[1:] for job in jobs])
        try:
            for (name, *_), (per_task, tokens) in zip(jobs, results):
                for documents, mine in zip(found, per_task):
                    documents[name].update(mine)
                bar.update(tokens)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    return found


def build_report(root: Path, manifest: dict, tasks, found, n: int, seconds: float) -> dict:
    """report.json: the run, each task's n-grams, and per task the contaminated documents by shard, with matches."""
    entries, sources = manifest_entries(manifest), SourceMap(root, manifest)

    def shard_of(name: str) -> dict:  # how every row of the report names a shard
        return {"shard": name, "split": name.split("/")[0], "component": sources.components[name]}

    return {
        "data": str(root.resolve()),
        "ngram": n,
        "normalization": "ASCII letters lowercased, ASCII punctuation deleted, split on whitespace (lm-eval's)",
        "seconds": round(seconds, 3),
        "text_bytes": sum(e.get("text_bytes", 0) for e in entries.values()),
        "shards": [
            {**shard_of(name), "documents": e["documents"], "tokens": e["tokens"]}
            for name, e in sorted(entries.items())
        ],
        "tasks": {task.name: task_report(root, task, seen, sources, shard_of) for task, seen in zip(tasks, found)},
    }


def task_report(root: Path, task: Task, seen: dict, sources: SourceMap, shard_of) -> dict:
    """One task's part of the report: its contaminated documents and their tokens by shard, and the first matches
    (input file and line, the n-gram, the task item it came from)."""
    by_shard, matches = [], []
    for name in sorted(name for name in seen if seen[name]):
        docs = seen[name]
        sizes = np.asarray(Shard(root / name).sizes, np.int64)
        by_shard.append({**shard_of(name), "documents": len(docs), "tokens": int(sizes[sorted(docs)].sum())})
        for doc in sorted(docs)[: MATCHES_SHOWN - len(matches)]:
            ngram, h = docs[doc]
            file, line = sources.locate(name, doc) if sources.covers(name) else (None, None)
            matches.append(
                {"file": file, "line": line, **shard_of(name), "document": doc, "ngram": ngram,
                 "task_item": task.item_of.get(h)}
            )  # fmt: skip
    return {
        "items": task.items,
        "ngrams": len(task.hashes),
        "documents": sum(r["documents"] for r in by_shard),
        "tokens": sum(r["tokens"] for r in by_shard),
        "by_shard": by_shard,
        "matches": matches,
    }


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
