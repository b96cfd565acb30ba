"""Join committed parts into the final shards, then write blend.json and manifest.json.

Shards are joined in part order, so the bytes depend only on the plan: not on workers, ranks or restarts.
Every final file is written under a temp name and renamed; manifest.json comes last and marks the run done.
"""

import os
import shutil
import time
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import pile_tools
from pile_tools.components import SPLITS, epochs_for, load_epochs
from pile_tools.ground import InputError, writing
from pile_tools.indexed import Shard, write_index
from pile_tools.join import RANK_MARK, JoinedShard, PartNotWhole, read_receipt
from pile_tools.reader import report_skips
from pile_tools.shards_dir import remove_plan, write_blend, write_manifest
from pile_tools.sourcemap import line_offsets, write_source_map


def load_receipts(plan: dict, dirs: list[Path]) -> list[tuple[Path, dict]]:
    """(part directory, receipt) for every part of the plan, looked up in each dir's `.parts/`."""
    found = []
    missing = []
    for part in plan["parts"]:
        name = f"{part['index']:05d}"
        where = next((d / ".parts" / name for d in dirs if (d / ".parts" / name / "receipt.json").is_file()), None)
        if where is None:
            missing.append(part["index"])
        else:
            try:
                found.append((where, read_receipt(where, complete=True)))
            except PartNotWhole as e:
                raise PartNotWhole(f"{e}; remove its part directory and run build-shards again for it") from None
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise InputError(
            f"{len(missing)} of {len(plan['parts'])} parts are not done yet (parts {shown}); "
            f"{unfinished_ranks(missing, dirs)}"
        )
    return found


def unfinished_ranks(missing: list[int], dirs: list[Path]) -> str:
    """Which `--rank` runs to finish for the `missing` parts, and where they write, from the rank-R-of-N marks
    the ranks leave in their directories."""
    marks = {}
    for d in dirs:
        for mark in (d / ".parts").glob(f"{RANK_MARK}*-of-*"):
            rank, _, world = mark.name.removeprefix(RANK_MARK).partition("-of-")
            if rank.isdigit() and world.isdigit():
                marks[int(rank), int(world)] = d
    worlds = {world for _, world in marks}
    if len(worlds) != 1:
        return "finish every --rank of the run first"
    world = worlds.pop()
    ranks = sorted({i % world for i in missing})
    where = [
        f"--rank {r} --world-size {world} (output {marks[r, world]})"
        if (r, world) in marks
        else f"--rank {r} --world-size {world} (never started in {', '.join(map(str, dirs))})"
        for r in ranks
    ]
    return f"run build-shards again for {'; '.join(where)}, then merge-shards"


def append_file(out, src: Path) -> None:
    """Append src to the open file `out` in the kernel (no copy through Python's buffers): copy_file_range, which
    shares the blocks on filesystems that can (XFS, Btrfs), else sendfile, else a plain copy."""
    out.flush()  # the kernel writes at the descriptor's offset, past anything still in Python's buffer
    with open(src, "rb") as f:
        remaining = os.fstat(f.fileno()).st_size
        for kernel_copy in (
            lambda n: os.copy_file_range(f.fileno(), out.fileno(), n),
            lambda n: os.sendfile(out.fileno(), f.fileno(), None, n),
        ):
            try:
                while remaining:
                    sent = kernel_copy(remaining)
                    if sent == 0:
                        raise OSError("no progress")
                    remaining -= sent
                return
            except (AttributeError, OSError):
                continue
        f.seek(os.fstat(f.fileno()).st_size - remaining)
        shutil.copyfileobj(f, out, 16 << 20)


def write_epochs(f, prefix: Path, e: float, seed: int, name: str) -> list[np.ndarray]:
    """Append a shard's whole epochs, then a seeded fraction of its documents, to `f`; returns their sizes."""
    shard, sizes = Shard(prefix), []
    for _ in range(int(e)):  # whole epochs: the shard's .bin again, copied by the kernel
        append_file(f, Path(f"{prefix}.bin"))
        sizes.append(np.asarray(shard.sizes))
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    chosen = np.sort(rng.choice(len(shard), round((e - int(e)) * len(shard)), replace=False))
    for i in chosen:
        f.write(shard[i].tobytes())
    sizes.append(np.asarray(shard.sizes)[chosen])
    return sizes


def materialize(out: Path, shards: dict, epochs: dict, seed: int, dtype: np.dtype) -> dict:
    """Write the train split's repeats as one dataset: whole epochs, then a seeded fraction of each component."""
    prefix = out / "materialized" / "train"
    prefix.parent.mkdir(exist_ok=True)
    tmp, sizes = Path(f"{prefix}.bin.tmp"), []
    with writing(Path(f"{prefix}.bin")):
        try:
            with open(tmp, "wb") as f:
                for name in sorted(k for k in shards if k.startswith("train/")):
                    sizes += write_epochs(f, out / name, epochs[shards[name]["component"]], seed, name)
            tmp.replace(f"{prefix}.bin")
        finally:
            tmp.unlink(missing_ok=True)
    all_sizes = np.concatenate(sizes) if sizes else np.zeros(0, np.int32)
    write_index(Path(f"{prefix}.idx"), all_sizes, dtype)
    return {"prefix": "materialized/train", "documents": len(all_sizes), "tokens": int(all_sizes.sum())}


def build_blend(out: Path, shards: dict, epochs: dict, weights: str) -> dict:
    """Per split, each shard's sampling weight ∝ epochs x tokens, also as Megatron and gpt-neox settings."""
    blend = {"weights": weights, "splits": {}, "gpt_neox": {}}
    for split in SPLITS:
        names = sorted(k for k in shards if k.startswith(f"{split}/"))
        mass = [epochs[shards[n]["component"]] * shards[n]["tokens"] for n in names]
        total = sum(mass) or 1.0
        rows = [
            {
                "prefix": n,
                **{k: shards[n][k] for k in ("component", "documents", "tokens")},
                "epochs": epochs[shards[n]["component"]],
                "weight": m / total,
            }
            for n, m in zip(names, mass)
        ]
        paths = [str((out / n).resolve()) for n in names]
        blend["splits"][split] = {
            "shards": rows,
            "data_path": " ".join(f"{r['weight']:.6g} {p}" for r, p in zip(rows, paths)),
        }
        blend["gpt_neox"][f"{split}_data_paths"] = paths
        blend["gpt_neox"][f"{split}_data_weights"] = [r["weight"] for r in rows]
    return blend


def collect_shards(receipts: list[tuple[Path, dict]], inputs: list[dict]) -> dict:
    """prefix -> component, totals and the part shards to join, in part order; with, for the source map, each part
    shard's documents, input (its index in `inputs`) and the lines of that input before its part."""
    shards, offsets = {}, line_offsets(receipts)
    number = {i["path"]: n for n, i in enumerate(inputs)}
    for where, receipt in receipts:
        for prefix, stat in receipt["shards"].items():
            entry = shards.setdefault(
                prefix,
                {
                    "component": stat["component"],
                    "documents": 0,
                    "tokens": 0,
                    "text_bytes": 0,
                    "max_id": 0,
                    "sources": [],
                    "origins": [],
                },
            )
            if entry["component"] != stat["component"]:
                raise InputError(
                    f"components {entry['component']!r} and {stat['component']!r} share the file name {prefix}"
                )
            for key in ("documents", "tokens", "text_bytes"):
                entry[key] += stat[key]
            entry["max_id"] = max(entry["max_id"], stat.get("max_id", 0))
            entry["sources"].append((where / prefix, stat))
            entry["origins"].append((where / prefix, stat, number[receipt["source"]], offsets[where]))
    return shards


def warn_premixed(receipts, weights: str, echo) -> None:
    """The released Pile's train files mix all components and are already upsampled: weighting them again is wrong."""
    if weights == "none":
        return
    for _, r in receipts:
        if len(r["components_seen"]) > 1 and r["start"] == 0:
            echo(
                f"warning: {r['source']} mixes {len(r['components_seen'])} components, like the released Pile's "
                f"pre-mixed files, whose train set is already upsampled; --weights {weights} upsamples it again. "
                f"Use --weights none unless this input is known not to be upsampled"
            )


def record_manifest(out, plan, receipts, shards, epochs, blend, unknown, start, timings: dict) -> dict:
    """manifest.json: the run's plan, inputs, per-shard counts, max_id and xxh3, skips and timing."""
    skipped, examples = defaultdict(int), []
    for _, r in receipts:
        for reason, n in r["skipped"].items():
            skipped[reason] += n
        examples.extend(r["skip_examples"])
    components = defaultdict(lambda: {"splits": {}})
    weights = {r["prefix"]: r["weight"] for split in blend["splits"].values() for r in split["shards"]}
    for prefix, s in sorted(shards.items()):
        components[s["component"]]["epochs"] = epochs[s["component"]]
        components[s["component"]]["splits"][prefix.split("/")[0]] = {
            "prefix": prefix,
            **{k: s[k] for k in ("documents", "tokens", "text_bytes", "max_id", "xxh3_128", "source_map")},
            "weight": weights[prefix],
        }
    manifest = {
        "tool": "neox-data build-shards",
        "version": pile_tools.__version__,
        "fingerprint": plan["fingerprint"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": {**plan["tokenizer"], "engine": sorted({r["engine"] for _, r in receipts})},
        "options": plan["options"],
        "inputs": plan["inputs"],
        "components": dict(components),
        "unknown_components": sorted(unknown),
        "skipped": dict(skipped),
        "skip_examples": examples[:100],
        "parts": len(receipts),
        "part_seconds": round(sum(r["seconds"] for _, r in receipts), 3),
        "wall_seconds": round(time.time() - start, 3),
        "timings": {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()},  # wall, by phase
    }
    write_manifest(out, manifest)
    return manifest


def remove_parts(parts_dir: Path) -> None:
    """Delete the parts once the shards are final, in threads: freeing a run's worth of pages is kernel work
    (mini-Pile x115, 5.8 GB in 1,610 parts, on 2 cores: 2.2 s in one thread, 1.9 s in two). A single-machine run's
    joiner has removed the parts' tokens already: their indexes and receipts are left."""
    if parts_dir.is_dir():
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(lambda d: shutil.rmtree(d, ignore_errors=True), list(parts_dir.iterdir())))
    shutil.rmtree(parts_dir, ignore_errors=True)


def join_shards(out: Path, shards: dict, dtype: np.dtype) -> dict[str, JoinedShard]:
    """Every final shard from its parts at once, in threads, largest first (reads, writes and xxhash release the
    GIL): for merge-shards, and runs whose parts were all done before."""

    def join(prefix: str) -> JoinedShard:
        joined = JoinedShard(out / prefix)
        try:
            for src, stat in shards[prefix]["sources"]:
                joined.append(src, stat)
        except PartNotWhole as e:
            joined.discard()
            raise PartNotWhole(f"{e}; remove its part directory and run build-shards again for its --rank") from None
        except BaseException:
            joined.discard()
            raise
        return joined

    biggest_first = sorted(shards, key=lambda prefix: -shards[prefix]["tokens"])
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {prefix: pool.submit(join, prefix) for prefix in biggest_first}
    failed = [f.exception() for f in futures.values() if f.exception() is not None]
    if failed:
        for f in futures.values():
            if f.exception() is None:
                f.result().discard()
        raise failed[0]
    return {prefix: f.result() for prefix, f in futures.items()}


def assemble(
    out: Path, plan: dict, dirs: list[Path], start: float, echo=print, timings: dict | None = None, joiner=None
) -> dict:
    """Join the parts found in `dirs` into `out`, or finish what `joiner` (a pile_tools.join.Joiner) has been
    joining during the encoding; then blend.json and manifest.json. Returns the manifest."""
    timings = timings if timings is not None else {}
    mark = time.time()
    joined = joiner.finish() if joiner is not None else None  # first: it removes a part that is not whole
    timings["join_and_hash_shards"] = time.time() - mark  # what was left when the encoding ended
    receipts = load_receipts(plan, dirs)
    shards = collect_shards(receipts, plan["inputs"])
    if not shards:
        skipped = sum(n for _, r in receipts for n in r["skipped"].values())
        raise InputError(f"no documents in the input ({skipped} lines skipped as bad, the rest blank)")
    table, every = load_epochs(plan["options"]["weights"])
    unknown: set[str] = set()
    epochs = {s["component"]: epochs_for(s["component"], table, every, unknown) for s in shards.values()}
    if unknown:
        echo(f"warning: not in the Pile's table, weighted 1.0 epoch: {', '.join(sorted(unknown))}")
    warn_premixed(receipts, plan["options"]["weights"], echo)
    dtype = np.dtype(plan["tokenizer"]["dtype"])
    mark = time.time()
    joined = joined if joiner is not None else join_shards(out, shards, dtype)
    try:
        for prefix, shard in shards.items():
            shard["xxh3_128"] = joined[prefix].commit(dtype)
    except BaseException:
        if joiner is None:  # a joiner lets go of its own files: those its journal vouches for are kept
            for unfinished in joined.values():
                unfinished.discard()
        raise
    timings["join_and_hash_shards"] += time.time() - mark
    mark = time.time()
    for prefix, shard in shards.items():
        shard["source_map"] = write_source_map(out / prefix, shard["origins"])
    timings["source_map"] = time.time() - mark
    mark = time.time()
    blend = build_blend(out, shards, epochs, plan["options"]["weights"])
    if plan["options"]["materialize"]:
        blend["materialized"] = materialize(out, shards, epochs, plan["options"]["seed"], dtype)
    write_blend(out, blend)
    timings["blend_and_materialize"] = time.time() - mark
    phases = defaultdict(float)
    for _, r in receipts:
        for phase, seconds in r.get("phase_seconds", {}).items():
            phases[phase] += seconds
    timings["parts_cpu_seconds"] = {k: round(v, 3) for k, v in phases.items()}  # summed over the workers
    manifest = record_manifest(out, plan, receipts, shards, epochs, blend, unknown, start, timings)
    report_skips(manifest["skipped"], manifest["skip_examples"], echo)
    remove_parts(out / ".parts")
    remove_plan(out)
    return manifest
