"""decontaminate's throughput beside a plain read of the same shards, on N copies of the mini-Pile.

    .venv/bin/python benchmarks/decontaminate.py [--copies 3] [--corpus ../shared/corpus/mini-pile] [--repeat 3]

The shards are built once (build-shards, --weights none). Then, interleaved, each in this one process, page cache
warm, medians of --repeat:
  read      every shard's .bin read whole (np.fromfile): the floor of any scan
  decode    every document decoded to text by `tokenizers` (Tokenizer.decode, one document at a time, one core):
            what a script of one's own would do to get the text back
  ours      neox-data decontaminate --workers 1 against the two local tasks, in a process of its own, its whole
            wall time: task loading, the scan, the report; and once more with a worker per CPU (the whole machine)
All as MB of the shards' text (manifest.json's text_bytes) per second per core.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shards import WORK, copies_of  # noqa: E402  (benchmarks/shards.py: this directory is on sys.path)

from pile_tools.indexed import Shard  # noqa: E402
from pile_tools.shards_dir import manifest_entries  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tokenizer" / "assets" / "gpt-neox-20b" / "tokenizer.json"
BIN = Path(sys.executable).parent


def shards_of(src: Path) -> Path:
    """build-shards of `src` (once)."""
    out = WORK / f"shards-{src.name}"
    if not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [BIN / "neox-data", "build-shards", src, "--tokenizer", TOKENIZER, "--output", out, "--weights", "none"]
        subprocess.run(list(map(str, [*cmd, "--workers", "2"])), check=True, capture_output=True)
    return out


def plain_read(data: Path, prefixes: list[str]) -> float:
    start = time.perf_counter()
    for prefix in prefixes:
        np.fromfile(data / f"{prefix}.bin", np.uint16).sum()
    return time.perf_counter() - start


def plain_decode(data: Path, prefixes: list[str]) -> float:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    start = time.perf_counter()
    for prefix in prefixes:
        shard = Shard(data / prefix)
        for i in range(len(shard)):
            tokenizer.decode(shard[i].tolist())
    return time.perf_counter() - start


def ours(data: Path, workers: int) -> float:
    cmd = [BIN / "neox-data", "decontaminate", data, "--workers", workers, "--against", "neox_books_wordperplexity"]
    cmd += ["--against", "neox_books_lastword", "--output", WORK / "contamination"]
    start = time.perf_counter()
    subprocess.run(list(map(str, cmd)), check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus" / "mini-pile")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    data = shards_of(copies_of(args.corpus, args.copies))
    manifest = json.loads((data / "manifest.json").read_text())
    entries = manifest_entries(manifest)
    mb = sum(e["text_bytes"] for e in entries.values()) / 1e6
    prefixes = sorted(entries)
    times = {"read": [], "decode": [], "ours": [], "all": []}
    for _ in range(args.repeat):
        times["read"].append(plain_read(data, prefixes))
        times["decode"].append(plain_decode(data, prefixes))
        times["ours"].append(ours(data, 1))
        times["all"].append(ours(data, os.cpu_count()))
    median = {k: sorted(v)[args.repeat // 2] for k, v in times.items()}
    print(
        f"{args.copies} copies of {args.corpus}: {mb:,.1f} MB of text in {len(prefixes)} shards; "
        f"medians of {args.repeat}"
    )
    for name, what in (
        ("read", "plain read of the .bin files"),
        ("decode", "tokenizers' decode, document by document"),
        ("ours", "neox-data decontaminate, 2 tasks, whole command"),
    ):
        print(f"  {what:<50} {median[name]:>7.2f} s {mb / median[name]:>8.1f} MB/s per core")
    what = f"the same, --workers {os.cpu_count()} (every CPU)"
    print(f"  {what:<50} {median['all']:>7.2f} s {mb / median['all']:>8.1f} MB/s in all")
    print(f"decontaminate / decode throughput: {median['decode'] / median['ours']:.2f}")


if __name__ == "__main__":
    main()
