"""A CPU training run with glibc's default malloc against the same run asking for transparent huge pages
(GLIBC_TUNABLES=glibc.malloc.hugetlb=1, which the Makefile exports for `make demo` and `make test`), side by side.

    .venv/bin/python benchmarks/cpu_malloc.py [--steps 30] [--rounds 3]

Each round trains configs/tiny.yml (the demo's model) for --steps steps on the bundled sample's shards (built once
into benchmarks/.work/), once each way, in alternating order; prints each run's wall time, CPU time (user and
system) and page faults, the medians and their ratio, and checks both ways give the same losses. A step of the
tiny model allocates and frees its logits (8 x 128 x 50,304 floats) and their gradients: glibc maps such blocks
fresh every time and the kernel zeroes them a 4 KiB page at a time, unless the block is backed by huge pages.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / ".work"
NEOX = str(ROOT / ".venv" / "bin" / "neox-data")
WAYS = {"default": None, "hugetlb": "glibc.malloc.hugetlb=1"}


def shards() -> Path:
    out = WORK / "malloc-shards"
    if not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        sample = ROOT / "pile_tools" / "sample"
        subprocess.run([NEOX, "build-shards", sample, "--tokenizer", "gpt-neox-20b", "--output", out], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return out


def train(way: str, data: Path, steps: int) -> dict:
    """One run, timed: wall, user and system seconds, minor page faults; and its losses."""
    run = WORK / f"malloc-run-{way}"
    shutil.rmtree(run, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if WAYS[way]:
        env["GLIBC_TUNABLES"] = WAYS[way]
    sets = [f"train_iters={steps}", "eval_interval=0", f"save_interval={steps}", "log_interval=1"]
    cmd = [NEOX, "train", "--config", str(ROOT / "configs" / "tiny.yml"), "--data", str(data), "--save", str(run)]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run([*cmd, *[a for s in sets for a in ("--set", s)]], env=env, check=True, capture_output=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "wall": wall,
        "user": after.ru_utime - before.ru_utime,
        "sys": after.ru_stime - before.ru_stime,
        "faults": after.ru_minflt - before.ru_minflt,
        "losses": [r["loss"] for r in rows if r["kind"] == "train"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    data = shards()
    results = {way: [] for way in WAYS}
    for r in range(args.rounds):
        for way in list(WAYS)[:: 1 if r % 2 == 0 else -1]:
            done = train(way, data, args.steps)
            results[way].append(done)
            print(f"round {r + 1} {way:8s} {done['wall']:6.1f} s wall  {done['user']:6.1f} s user  "
                  f"{done['sys']:5.1f} s sys  {done['faults']:>10,} page faults", flush=True)  # fmt: skip
    same = all(a["losses"] == b["losses"] for a, b in zip(results["default"], results["hugetlb"]))
    median = {way: {k: statistics.median(d[k] for d in runs) for k in ("wall", "user", "sys", "faults")}
              for way, runs in results.items()}  # fmt: skip
    for key in ("wall", "user", "sys", "faults"):
        d, h = median["default"][key], median["hugetlb"][key]
        print(f"median {key:6s}: default {d:>12,.1f}  hugetlb {h:>12,.1f}  ratio {h / d:.3f}")
    cpu = [median[w]["user"] + median[w]["sys"] for w in WAYS]
    print(f"CPU time (user + sys) ratio: {cpu[1] / cpu[0]:.3f}; same losses both ways: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
