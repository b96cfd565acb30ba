"""build-shards against its ceiling and against gpt-neox, side by side, on N copies of the mini-Pile.

    .venv/bin/python benchmarks/shards.py [--copies 10] [--workers 2] [--corpus ../shared/corpus/mini-pile]
        [--skip-neox] [--only-ours] [--ray [--repeat 3]] [--compare-against REV [--repeat 3]]

Three runs on the same input, each in its own process, timed and with peak RSS (the process tree, sampled):
  ceiling   one process: read + orjson + gigatoken encode_batch(parallel=True) + EOD + one uint16 write per file
  ours      neox-data build-shards --workers N (and once more on 1 copy, for the memory ratio), with where its
            time went (manifest.json's timings: planning the parts, starting the workers and checking the engine,
            encoding the parts, the joining and hashing left when the encoding ended (parts are joined while
            later parts encode), blend; and the parts' read / encode / write
            seconds summed over the workers), so the serial share is visible
  gpt-neox  tools/datasets/preprocess_data.py --workers 2, HFTokenizer, --append-eod (its own venv, set up here
            from the workplace's gpt-neox mirror or GPT_NEOX_DIR; needs the package registry the first time)
Goals: ours >= 1.0 x the ceiling's throughput on 2 cores (issue 13; 0.8 x in issue 2); peak RSS at N copies
<= 1.2 x at 1 copy; gpt-neox >= 30 x slower than ours; peak disk growth near 1x the final shards, as gpt-neox's
(the used space of WORK's filesystem, sampled: other writers on it count too).

--ray instead times `build-shards --executor ray --world-size 1` (one rank, a Ray task on a local cluster this
script starts first with `ray start --head` on 127.0.0.1, as a team's cluster would already run) beside the same
build without Ray, interleaved: Ray's overhead (goal <= 1.15x, issue 32); and, interleaved with them, Ray's own cost
per command, the floor of that overhead: a fresh driver running one task that does nothing (imports what a rank
imports before its build), less the same imports without Ray. Only wall time: Ray's worker is not a child of the
command, so its memory is not the command's process tree.

--compare-against REV instead times build-shards here beside the same command at commit REV (checked out in a
worktree under benchmarks/.work), interleaved: the cost of what was added since, e.g. the source map (goal <= 1.05x
against the commit before it, issue 30). The shards of both must be byte-identical; the script checks it.
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import psutil

from pile_tools.shards_dir import manifest_entries

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / ".work"
TOKENIZER = ROOT / "tokenizer" / "assets" / "gpt-neox-20b" / "tokenizer.json"
NEOX_MIRROR = Path("/work/.mirror/EleutherAI+gpt-neox/repo")
NEOX_DEPS = [
    "setuptools<81",
    "torch==2.13.0",
    "deepspeed==0.19.8",
    "tokenizers",
    "transformers",
    "lm_dataformat",
    "ftfy",
    "sentencepiece",
    "numpy",
    "tqdm",
    "pyyaml",
    "requests",
]


def copies_of(corpus: Path, n: int) -> Path:
    """A directory with n copies of every corpus file (distinct names, same bytes)."""
    out = WORK / f"{corpus.name}-x{n}"
    files = sorted(corpus.glob("*.jsonl.zst"))
    if not out.is_dir() or len(list(out.iterdir())) != n * len(files):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for k in range(n):
            for f in files:
                shutil.copy(f, out / f"c{k:02d}_{f.name}")
    return out


class Run(NamedTuple):
    seconds: float
    peak: int  # bytes, the process tree's resident sets summed
    largest: int  # bytes, the largest single process's (the per-worker memory goal)
    disk: int  # bytes, the peak growth of the used space on WORK's filesystem (other writers there count too)


def measure(cmd: list[str], cwd=None) -> Run:
    """Wall seconds, peak RSS (the process tree's) and peak disk growth of a command, sampled every 100 ms."""
    log = WORK / "last-run.log"  # a file, not a pipe: a full pipe would stall the progress bars
    used = shutil.disk_usage(WORK).used
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    root, peak, largest, disk = psutil.Process(proc.pid), 0, 0, 0
    while proc.poll() is None:
        disk = max(disk, shutil.disk_usage(WORK).used - used)
        try:
            rss = [p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running()]
            peak, largest = max(peak, sum(rss)), max(largest, *rss)
        except psutil.Error:
            pass
        try:  # sample every 100 ms (reading /proc costs CPU the measured run would miss), but stop on exit at once
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
    seconds = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{log.read_text(errors='replace')[-3000:]}")
    return Run(seconds, peak, largest, disk)


def ceiling(src: Path, out: Path) -> None:
    """The simplest fast pipeline: no splits, components, resume, parts or checks."""
    import gigatoken
    import numpy as np
    import orjson
    import zstandard

    tok = gigatoken.Tokenizer(str(TOKENIZER))
    with open(out, "wb") as f:
        for path in sorted(src.glob("*.jsonl.zst")):
            with open(path, "rb") as fh:
                stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh))
                texts = [orjson.loads(line)["text"] for line in stream]
            layout = tok.encode_batch(texts, parallel=True).layout
            offsets = np.asarray(layout.offsets)
            ids = np.asarray(layout.content.data)[offsets[0] : offsets[-1]]
            out_ids = np.insert(ids, offsets[1:] - offsets[0], 0).astype(np.uint16)  # EOD (id 0) after each
            f.write(out_ids.tobytes())


def neox_python() -> tuple[Path, Path]:
    """gpt-neox's tree and a venv able to run its preprocess_data.py."""
    tree = Path(os.environ.get("GPT_NEOX_DIR", WORK / "gpt-neox"))
    if not (tree / "tools" / "datasets" / "preprocess_data.py").is_file():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", f"--git-dir={NEOX_MIRROR}", "archive", "HEAD", "megatron", "tools"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    venv = WORK / "neox-venv"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *NEOX_DEPS], check=True)
    return tree, venv / "bin" / "python"


def text_bytes(src: Path) -> int:
    import orjson
    import zstandard

    total = 0
    for path in sorted(src.glob("*.jsonl.zst")):
        with open(path, "rb") as fh:
            for line in io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh)):
                total += len(orjson.loads(line)["text"].encode())
    return total


def print_breakdown(timings: dict, wall: float, args) -> None:
    """Where our run's wall time went, from its manifest.json, and the serial share (all but the parts' encoding)."""
    timings = dict(timings)
    parts_cpu = timings.pop("parts_cpu_seconds", {})
    print(f"ours, {args.copies} copies, --workers {args.workers}: where the {wall:.1f} s went (wall seconds)")
    for phase, seconds in timings.items():
        print(f"  {phase:<34} {seconds:>7.2f}  {seconds / wall:>6.1%}")
    rest = wall - sum(timings.values())
    print(f"  {'start-up, removing the parts, exit':<34} {rest:>7.2f}  {rest / wall:>6.1%}")
    print("  in the parts, summed over workers: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts_cpu.items()))
    serial = wall - timings.get("encode_parts", 0.0)
    print(f"  serial share (all but encoding the parts): {serial:.1f} s, {serial / wall:.1%}")


OUT = WORK / "out"


def run_ours(src: Path, workers: int, extra: tuple = ()) -> Run:
    """neox-data build-shards on `src`, unweighted, into a fresh OUT: measured."""
    shutil.rmtree(OUT, ignore_errors=True)
    args = ["--tokenizer", str(TOKENIZER), "--workers", str(workers), "--output", str(OUT), "--weights", "none"]
    args += list(extra)
    return measure([str(Path(sys.executable).parent / "neox-data"), "build-shards", str(src), *args])


def neox_command(python: Path, corpus: Path) -> list[str]:
    """gpt-neox's preprocess_data.py on every file of `corpus`, with EOD, on 2 workers."""
    files = ",".join(str(p) for p in sorted(corpus.glob("*.jsonl.zst")))
    args = ["--input", files, "--output-prefix", str(WORK / "neox"), "--tokenizer-type", "HFTokenizer"]
    args += ["--vocab-file", str(TOKENIZER), "--append-eod", "--workers", "2"]
    return [str(python), "tools/datasets/preprocess_data.py", *args]


def output_bytes() -> int:
    return sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())


def print_disk(run: Run, shards: int) -> None:
    """Our run's peak disk use against its final shards (gpt-neox's preprocessor needs 1x: it writes the shards)."""
    print(f"peak disk growth: {run.disk / 2**30:.2f} GiB, {run.disk / shards:.2f}x the {shards / 2**30:.2f} GiB output")


def only_ours(args) -> None:
    """build-shards alone on `args.copies` copies (a node-scale run: no ceiling, no 1-copy run, no scan of the
    text; its size comes from manifest.json): wall time, GB/s of text, peak RSS, where the time went."""
    run = run_ours(copies_of(args.corpus, args.copies), args.workers)
    manifest = json.loads((OUT / "manifest.json").read_text())
    text = sum(e["text_bytes"] for e in manifest_entries(manifest).values())
    print(f"input: {args.copies} copies of {args.corpus}, {text / 1e9:.2f} GB of text; {os.cpu_count()} CPUs")
    rate, gib = text / 1e9 / run.seconds, 2**30
    print(f"ours, --workers {args.workers}: {run.seconds:.1f} s, {rate:.3f} GB/s of text (goal >= 0.8 on 16 cores)")
    print(f"peak RSS: {run.peak / gib:.2f} GiB in all, {run.largest / gib:.2f} GiB the largest process (goal <= 1)")
    print_disk(run, output_bytes())
    print_breakdown(manifest.get("timings", {}), run.seconds, args)


def ray_cluster(cpus: int) -> tuple[str, str, dict]:
    """Start a one-node Ray cluster on 127.0.0.1: its address, temp dir and the environment its drivers need."""
    import secrets

    temp = f"/tmp/ray-bench-{os.getpid()}"
    os.makedirs(temp, exist_ok=True)
    (Path(temp) / "token").write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": f"{temp}/token"}
    port = "6390"
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", port, "--num-cpus", str(cpus),
           "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return f"127.0.0.1:{port}", temp, env


# Ray's own cost per command, whatever the task does: a fresh driver that connects, runs one task asking for
# --workers CPUs whose body imports what a rank imports before its build, and disconnects; beside the same
# imports without Ray.
NOTHING_ON_RAY = """import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
def nothing():
    import numpy, pydantic, tqdm
ray.get(ray.remote(nothing).options(num_cpus=int(sys.argv[2])).remote())
ray.shutdown()
"""
NOTHING = "import numpy, pydantic, tqdm"


def on_ray(args) -> None:
    """build-shards with --executor ray (one rank) beside the same build without Ray, interleaved; and Ray's own
    cost per command (a task that does nothing) beside the same imports without Ray."""
    src = copies_of(args.corpus, args.copies)
    address, temp, env = ray_cluster(args.workers)
    os.environ.update(env)
    try:
        args_ray = ["--executor", "ray", "--world-size", "1", "--ray-address", address]
        runs = {"local": [], "ray": [], "nothing": [], "nothing on ray": []}
        for _ in range(args.repeat):
            runs["local"].append(run_ours(src, args.workers).seconds)
            runs["ray"].append(run_ours(src, args.workers, args_ray).seconds)
            runs["nothing"].append(measure([sys.executable, "-c", NOTHING]).seconds)
            noop = [sys.executable, "-c", NOTHING_ON_RAY, address, str(args.workers)]
            runs["nothing on ray"].append(measure(noop).seconds)
    finally:
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)
    local, ray, nothing, noop = (sorted(v)[args.repeat // 2] for v in runs.values())
    pairs = sorted(r / n for r, n in zip(runs["ray"], runs["local"]))
    print(f"build-shards on {args.copies} copies of {args.corpus}, --workers {args.workers}, medians of {args.repeat}")
    print(f"without Ray: {local:.1f} s; --executor ray, one rank: {ray:.1f} s")
    print(f"ray / local: {ray / local:.2f} (per pair: {', '.join(f'{r:.2f}' for r in pairs)}; goal <= 1.15)")
    floor = noop - nothing
    print(
        f"Ray's own cost per command: a task doing nothing {noop:.2f} s, the same imports without Ray {nothing:.2f} s: "
        f"{floor:.2f} s, {floor / local:.1%} of the local build (ours on Ray: {ray - local:.2f} s)"
    )


def shard_digest(out: Path) -> str:
    """xxh3-128 over every .bin and .idx of a shards directory, in name order."""
    import xxhash

    digest = xxhash.xxh3_128()
    for path in sorted(p for p in out.rglob("*") if p.suffix in (".bin", ".idx")):
        digest.update(str(path.relative_to(out)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def against(args) -> None:
    """build-shards now beside the same command at commit `args.compare_against`, interleaved; medians, ratio."""
    src, rev = copies_of(args.corpus, args.copies), args.compare_against
    old = WORK / f"checkout-{rev}"
    if not old.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(old), rev], cwd=ROOT, check=True, capture_output=True)
    runs, digests = {"then": [], "now": []}, {}
    for _ in range(args.repeat):  # -m cli imports the cwd's code: the checkout's, or this tree's
        for name, cwd in (("then", old), ("now", ROOT)):
            shutil.rmtree(OUT, ignore_errors=True)
            cmd = [sys.executable, "-m", "cli", "build-shards", str(src), "--tokenizer", str(TOKENIZER),
                   "--workers", str(args.workers), "--output", str(OUT), "--weights", "none"]  # fmt: skip
            runs[name].append(measure(cmd, cwd=cwd).seconds)
            digests[name] = shard_digest(OUT)
    then, now = (sorted(runs[k])[args.repeat // 2] for k in ("then", "now"))
    pairs = sorted(n / t for n, t in zip(runs["now"], runs["then"]))
    print(f"build-shards on {args.copies} copies of {args.corpus}, --workers {args.workers}, medians of {args.repeat}")
    print(f"at {rev}: {then:.1f} s; now: {now:.1f} s")
    print(f"now / then: {now / then:.3f} (per pair: {', '.join(f'{r:.3f}' for r in pairs)}; goal <= 1.05)")
    same = digests["then"] == digests["now"]
    print(f"shards (.bin, .idx) {'byte-identical' if same else 'DIFFER'}: xxh3-128 {digests['now']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus" / "mini-pile")
    parser.add_argument("--skip-neox", action="store_true")
    parser.add_argument("--only-ours", action="store_true", help="build-shards alone (node scale: issue 13's GB/s)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ray", action="store_true", help="--executor ray beside the local build (issue 32)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="Interleaved runs of each, with --ray or --compare-against."
    )
    parser.add_argument("--compare-against", metavar="REV", help="build-shards at commit REV beside this tree's.")
    parser.add_argument("--ceiling", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare_against:
        return against(args)
    if args.ray:
        return on_ray(args)
    if args.ceiling:
        return ceiling(*args.ceiling)
    if args.only_ours:
        return only_ours(args)
    one, many = copies_of(args.corpus, 1), copies_of(args.corpus, args.copies)
    mb = text_bytes(many) / 1e6
    rows = {}
    rows["ceiling"] = measure([sys.executable, __file__, "--ceiling", str(many), str(WORK / "ceiling.bin")])
    rows["ours"] = run_ours(many, args.workers)
    manifest, shards = json.loads((OUT / "manifest.json").read_text()), output_bytes()
    rows["ours, 1 copy"] = run_ours(one, args.workers)
    if not args.skip_neox:
        tree, python = neox_python()
        rows["gpt-neox"] = measure(neox_command(python, many), cwd=tree)
    print(f"input: {args.copies} copies of {args.corpus}, {mb:,.0f} MB of text; 1 copy: {mb / args.copies:,.0f} MB")
    print(f"{'run':<14} {'seconds':>8} {'MB/s':>7} {'peak RSS MB':>12}")
    for name, run in rows.items():
        size = mb / args.copies if "1 copy" in name else mb
        print(f"{name:<14} {run.seconds:>8.1f} {size / run.seconds:>7.1f} {run.peak / 2**20:>12.0f}")
    print_breakdown(manifest.get("timings", {}), rows["ours"].seconds, args)
    print_disk(rows["ours"], shards)
    speed = rows["ceiling"].seconds / rows["ours"].seconds
    print(f"ours / ceiling throughput: {speed:.2f}  (goal >= 1.0 on 2 cores, issue 13)")
    print(
        f"peak RSS, {args.copies} copies / 1 copy: {rows['ours'].peak / rows['ours, 1 copy'].peak:.2f}  (goal <= 1.2)"
    )
    if "gpt-neox" in rows:
        print(f"gpt-neox / ours wall time: {rows['gpt-neox'].seconds / rows['ours'].seconds:.1f}x  (goal >= 30)")


if __name__ == "__main__":
    main()
