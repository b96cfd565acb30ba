"""A checkpoint's sync to the disk while another writer has data in the page cache: os.sync() (what the trainer did
until 2026-12-05) against the trainer's sync_on_each_machine (an fsync of each of the checkpoint's files and
directories), side by side.

    .venv/bin/python benchmarks/checkpoint_sync.py [--checkpoint DIR] [--other-gb 2] [--rounds 3]

DIR: a checkpoint the trainer wrote (default: trains configs/tiny.yml for 2 steps on pile_tools/sample into
benchmarks/.work/). Each round, for each way: os.sync() (untimed, a clean start), a fresh copy of the checkpoint
(its pages dirty, as right after a save), then --other-gb of another writer's bytes not yet on the disk (a data
job, logs, another run on the node), then the timed sync. Prints each time and the medians' ratio. What os.sync()
costs grows with what the others have written, and on a busy node its wait has no bound; the fsyncs cost what
the checkpoint costs.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / ".work"
sys.path.insert(0, str(ROOT))


def tiny_checkpoint() -> Path:
    """A tiny model's checkpoint, trained once into benchmarks/.work/sync-run."""
    run, shards = WORK / "sync-run", WORK / "sync-shards"
    if not (run / "latest").is_file():
        neox = str(ROOT / ".venv" / "bin" / "neox-data")
        quiet = {"check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        shutil.rmtree(shards, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
        sample = ROOT / "pile_tools" / "sample"
        subprocess.run([neox, "build-shards", sample, "--tokenizer", "gpt-neox-20b", "--output", shards], **quiet)
        sets = ["--set", "train_iters=2", "--set", "save_interval=2", "--set", "eval_interval=2"]
        subprocess.run(
            [neox, "train", "--config", ROOT / "configs" / "tiny.yml", "--data", shards, "--save", run, *sets], **quiet
        )
    return run / (run / "latest").read_text().strip()


def dirty(checkpoint: Path, other_gb: float) -> Path:
    """A fresh copy of the checkpoint and `other_gb` of another writer's bytes, all only in the page cache."""
    copy, other = WORK / "sync-copy" / checkpoint.name, WORK / "sync-other.bin"
    shutil.rmtree(copy.parent, ignore_errors=True)
    other.unlink(missing_ok=True)  # a new file each round: rewriting one in place is written back as it goes
    os.sync()
    shutil.copytree(checkpoint, copy)
    block = os.urandom(16 << 20)
    with open(other, "wb") as f:
        for _ in range(int(other_gb * 1e9) // len(block)):
            f.write(block)
    return copy


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--other-gb", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or tiny_checkpoint()

    import torch.distributed as dist

    from pile_tools.checksums import listed_files
    from trainer.checkpoint import sync_on_each_machine

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
    names = listed_files(checkpoint)
    size = sum((checkpoint / n).stat().st_size for n in names)
    print(f"{checkpoint}: {len(names)} files, {size / 1e6:.0f} MB; another writer's {args.other_gb:g} GB")
    ways = {"os.sync": lambda copy: os.sync(), "fsync each": lambda copy: sync_on_each_machine(copy, names)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.rounds):
        for name, sync in ways.items():
            copy = dirty(checkpoint, args.other_gb)
            start = time.perf_counter()
            sync(copy)
            times[name].append(time.perf_counter() - start)
            print(f"round {r}  {name:<10} {times[name][-1]:6.3f} s")
    (WORK / "sync-other.bin").unlink()
    shutil.rmtree(WORK / "sync-copy")
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(
        f"median: os.sync {median['os.sync']:.3f} s, fsync each {median['fsync each']:.3f} s; "
        f"os.sync / fsync each = {median['os.sync'] / median['fsync each']:.1f}x"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
