"""A build-shards output directory's own files, read and written only here:

    DIR/plan.json      while a run is under way: what decides the output bytes (inputs, tokenizer, options, parts)
                       and their hash, the fingerprint (a rerun resumes only its own run; merge-shards joins ranks)
    DIR/blend.json     per split, each shard's prefix (relative to DIR), documents, tokens, epochs and sampling
                       weight; also as Megatron's --data-path and gpt-neox's train_data_paths/weights
    DIR/manifest.json  written last, so it marks the run done: the tokenizer (path, sha256, vocabulary, EOD),
                       options, inputs, and each shard's documents, tokens, max_id and xxh3-128, by component
    DIR/<split>/<component>.bin/.idx   the shards (pile_tools/indexed.py)
    DIR/<split>/<component>.lines.npy  each document's input line, with manifest.json's "source_map" of the shard
                                       (pile_tools/sourcemap.py)

blend.json may be edited by hand (weights are a choice): whatever a reader finds there is checked for the shape
below, each prefix must stay inside DIR, and weights must be finite and >= 0; anything else is one line naming the
file and the field.
"""

import hashlib
import json
from pathlib import Path

from pile_tools.ground import InputError, write_json
from pile_tools.readback import Count, Inside, Record, Weight, inside, read_record

PLAN, BLEND, MANIFEST = "plan.json", "blend.json", "manifest.json"
SPLITS = ("train", "valid", "test")


class BlendShard(Record):
    prefix: Inside
    weight: Weight
    tokens: Count | None = None


class BlendSplit(Record):
    shards: list[BlendShard]


class Blend(Record):
    splits: dict[str, BlendSplit]


class Entry(Record):
    prefix: Inside
    documents: Count
    tokens: Count
    max_id: Count | None = None
    xxh3_128: str | None = None


class Component(Record):
    splits: dict[str, Entry]


class ManifestTokenizer(Record):
    path: str
    sha256: str
    vocab_size: Count
    eod: int | None = None


class Manifest(Record):
    tokenizer: ManifestTokenizer
    components: dict[str, Component]
    options: dict
    skipped: dict[str, Count] = {}


class PlanPart(Record):
    index: Count
    source: str
    start: Count = 0
    end: Count | None = None


class PlanTokenizer(ManifestTokenizer):
    dtype: str


class Plan(Record):
    fingerprint: str
    tokenizer: PlanTokenizer
    options: dict
    inputs: list
    parts: list[PlanPart]


def blend_file(directory: Path) -> Path:
    """Where a directory's blend.json is (for messages; read it with read_blend)."""
    return Path(directory) / BLEND


def read_blend(directory: Path) -> dict[str, list[tuple[Path, float, dict]]] | None:
    """(shard prefix inside `directory`, weight, blend.json's row) of each split's shards; None without a blend.json."""
    path = blend_file(directory)
    if not path.is_file():
        return None
    splits = read_record(path, Blend)["splits"]
    missing = [split for split in SPLITS if split not in splits]
    if missing:
        raise InputError(f"{path}: splits: {', '.join(missing)} missing")
    return {
        split: [(inside(directory, s["prefix"]), float(s["weight"]), s) for s in splits[split]["shards"]]
        for split in SPLITS
    }


def write_blend(directory: Path, blend: dict) -> None:
    """blend.json, atomically."""
    write_json(Path(directory) / BLEND, blend)


def directory_of(prefix: Path) -> Path:
    """The build-shards directory a shard prefix DIR/<split>/<component> lies in."""
    return Path(prefix).parent.parent


def has_manifest(directory: Path) -> bool:
    """Whether a directory holds a finished build-shards run's manifest.json."""
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: Path) -> dict:
    """A build-shards directory's manifest.json, checked; {} where there is none (shards of Megatron or
    gpt-neox)."""
    path = Path(directory) / MANIFEST
    return read_record(path, Manifest) if path.is_file() else {}


def write_manifest(directory: Path, manifest: dict) -> None:
    """manifest.json, atomically: the last file of a run, which marks it done."""
    write_json(Path(directory) / MANIFEST, manifest)


def manifest_entries(manifest: dict) -> dict[str, dict]:
    """Each shard's record in a manifest (documents, tokens, max_id, xxh3_128, ...), by prefix ('train/github')."""
    return {e["prefix"]: e for c in manifest.get("components", {}).values() for e in c["splits"].values()}


def manifest_tokenizer(manifest: dict) -> Path | None:
    """The tokenizer file the shards were built with, when it is still where the manifest says, with the sha256
    it records (a file since changed, or a path edited in, is not taken for it); None otherwise."""
    from pile_tools.encoding import file_sha256

    recorded = manifest.get("tokenizer")
    if not recorded or not Path(recorded["path"]).is_file():
        return None
    path = Path(recorded["path"])
    return path if file_sha256(path) == recorded["sha256"] else None


def fingerprint(plan: dict) -> str:
    """The hash of what decides a run's output: the plan but the tokenizer's path (its sha256 is what counts) and
    the fingerprint itself."""
    decisive = {k: v for k, v in plan.items() if k != "fingerprint"}
    decisive["tokenizer"] = {k: v for k, v in plan["tokenizer"].items() if k != "path"}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


def read_plan(directory: Path) -> dict | None:
    """A run's plan.json, checked, and its fingerprint checked against its content; None when there is none."""
    path = Path(directory) / PLAN
    if not path.is_file():
        return None
    plan = read_record(path, Plan)
    if fingerprint(plan) != plan["fingerprint"]:
        raise InputError(f"{path}: its fingerprint does not match its content (edited, or damaged)")
    return plan


def write_plan(directory: Path, plan: dict) -> None:
    """plan.json, atomically."""
    write_json(Path(directory) / PLAN, plan)


def run_fingerprints(directory: Path) -> list[tuple[str, str]]:
    """(file, fingerprint) of the runs a directory holds: its manifest.json's (a finished run keeps its plan's),
    then its plan.json's; an InputError naming a file that cannot be read."""
    found = []
    if has_manifest(directory):
        record = read_manifest(directory)
        if not isinstance(record.get("fingerprint"), str):
            raise InputError(f"{Path(directory) / MANIFEST}: fingerprint: missing")
        found.append((MANIFEST, record["fingerprint"]))
    if (Path(directory) / PLAN).is_file():
        found.append((PLAN, read_plan(directory)["fingerprint"]))
    return found


def has_plan(directory: Path) -> bool:
    """Whether a directory holds a run under way (its plan.json)."""
    return (Path(directory) / PLAN).is_file()


def remove_plan(directory: Path) -> None:
    """Drop a directory's plan.json: its run is done, or gave way to another."""
    (Path(directory) / PLAN).unlink(missing_ok=True)
