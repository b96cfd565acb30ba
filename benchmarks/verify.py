"""neox-data verify against a plain read of the same bytes, side by side, on the shards of N copies of the mini-Pile.

    .venv/bin/python benchmarks/verify.py [--copies 10] [--corpus ../shared/corpus/mini-pile] [--rounds 3]

Builds the shards once (benchmarks/.work/, with build-shards --workers 2), then alternates, each in its own
process, with the files in the page cache:
  read      one thread reading every .bin into a reused buffer: what any audit must at least do
  verify-1  neox-data verify DIR --workers 1 (idx/bin agreement, EOD, ids, xxh3 against the manifest, blend)
  verify-N  neox-data verify DIR --workers <cores>
Goal (issue 11): >= 1 GB/s of shard per core. Prints GB/s of .bin per core, wall time with start-up, and the ratio
to the plain read.
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shards import ROOT, WORK, copies_of  # noqa: E402

READ = """
import sys, time
from pathlib import Path
buf, total, start = bytearray(32 << 20), 0, time.perf_counter()
for p in sorted(Path(sys.argv[1]).rglob("*.bin")):
    with open(p, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
print(f"{total} bytes in {time.perf_counter() - start:.3f} s")
"""


def build(corpus: Path, copies: int) -> Path:
    out = WORK / f"verify-shards-x{copies}"
    if not (out / "manifest.json").is_file():
        src = copies_of(corpus, copies)
        subprocess.run(
            [
                str(ROOT / ".venv" / "bin" / "neox-data"),
                "build-shards",
                str(src),
                "--tokenizer",
                "gpt-neox-20b",
                "--output",
                str(out),
                "--workers",
                "2",
                "--weights",
                "none",
            ],
            check=True,
            stderr=subprocess.DEVNULL,
        )
    return out


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
    return time.perf_counter() - start, done.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus" / "mini-pile")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shards = build(args.corpus, args.copies)
    nbytes = sum(p.stat().st_size for p in shards.rglob("*.bin"))
    cores = os.cpu_count() or 1
    neox = str(ROOT / ".venv" / "bin" / "neox-data")
    runs = {
        "read": [sys.executable, "-c", READ, str(shards)],
        "verify-1": [neox, "verify", str(shards), "--workers", "1"],
        f"verify-{cores}": [neox, "verify", str(shards), "--workers", str(cores)],
    }
    timed(runs["read"])  # into the page cache
    print(f"{nbytes / 1e9:.2f} GB of .bin in {len(list(shards.rglob('*.bin')))} shards, {cores} cores")
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, cmd in runs.items():
            wall, out = timed(cmd)
            if name == "read":
                inner = float(re.search(r"in ([\d.]+) s", out)[1])
            else:
                inner = float(re.search(r"GB in ([\d.]+) s", out)[1])  # the scan, without Python's start-up
            workers = 1 if name != f"verify-{cores}" else cores
            rates[name].append(nbytes / 1e9 / inner / workers)
            print(
                f"round {r}  {name:<10} {inner:6.2f} s scanning ({wall:5.2f} s with start-up)  "
                f"{nbytes / 1e9 / inner:6.2f} GB/s = {rates[name][-1]:5.2f} GB/s per core"
            )
    median = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    print("median GB/s per core: " + ", ".join(f"{k} {v:.2f}" for k, v in median.items()))
    print(
        f"verify-1 / read: {median['verify-1'] / median['read']:.2f}; goal >= 1 GB/s per core: "
        f"{'met' if median['verify-1'] >= 1.0 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
