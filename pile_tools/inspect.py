"""inspect: counts per shard, a consistency check of each .bin/.idx pair, and documents decoded back."""

import json
import os
from pathlib import Path

import numpy as np

from pile_tools.indexed import Shard
from pile_tools.reader import InputError


def find_shards(target: Path) -> tuple[list[Path], Path | None]:
    """Shard prefixes under a build-shards directory (or the one prefix given), and its manifest if any."""
    if target.is_dir():
        prefixes = sorted(p.with_suffix("") for p in target.rglob("*.idx") if ".parts" not in p.parts)
        manifest = target / "manifest.json"
    else:
        prefix = target.with_suffix("") if target.suffix in (".bin", ".idx") else target
        prefixes = [prefix] if Path(f"{prefix}.idx").is_file() else []
        manifest = prefix.parent.parent / "manifest.json"
    if not prefixes:
        raise InputError(f"{target}: no .bin/.idx shards found")
    return prefixes, manifest if manifest.is_file() else None


def check(shard: Shard) -> str:
    """'ok', or what is wrong with the pair: the .bin size must match the sizes the .idx gives."""
    expected = int(np.asarray(shard.sizes, np.int64).sum()) * shard.dtype.itemsize
    actual = os.path.getsize(f"{shard.prefix}.bin")
    if expected != actual:
        return f"CORRUPT: .idx sizes sum to {expected} bytes, .bin has {actual}"
    if len(shard) and (shard.pointers[-1] + shard.sizes[-1] * shard.dtype.itemsize != actual):
        return "CORRUPT: pointers do not end at the end of .bin"
    return "ok"


def inspect(target: str, decode: int, tokenizer: str | None, chars: int, echo) -> None:
    root = Path(target)
    prefixes, manifest_path = find_shards(root)
    manifest = json.loads(manifest_path.read_text()) if manifest_path else None
    decoder = load_decoder(tokenizer, manifest) if decode else None
    base = root if root.is_dir() else prefixes[0].parent
    echo(f"{'shard':<40} {'dtype':>6} {'documents':>10} {'tokens':>13} {'tok/doc':>8}  check")
    total_docs = total_tokens = 0
    for prefix in prefixes:
        shard = Shard(prefix)
        tokens = int(np.asarray(shard.sizes, np.int64).sum())
        total_docs, total_tokens = total_docs + len(shard), total_tokens + tokens
        name = str(prefix.relative_to(base)) if prefix.is_relative_to(base) else str(prefix)
        echo(f"{name:<40} {shard.dtype.name:>6} {len(shard):>10,} {tokens:>13,} "
             f"{tokens / max(1, len(shard)):>8.0f}  {check(shard)}")  # fmt: skip
        for i in range(min(decode, len(shard))):
            text = decoder(shard[i].tolist())
            echo(f"--- {name} document {i} ({len(shard[i])} tokens) ---")
            echo(text[:chars] + (" [...]" if len(text) > chars else ""))
    echo(f"{'total':<40} {'':>6} {total_docs:>10,} {total_tokens:>13,}")
    if manifest:
        skipped = manifest.get("skipped") or {}
        echo(f"tokenizer sha256 {manifest['tokenizer']['sha256'][:12]}..., weights {manifest['options']['weights']}, "
             f"skipped lines: {sum(skipped.values())}")  # fmt: skip


def load_decoder(tokenizer: str | None, manifest: dict | None):
    from tokenizer.engine import load_reference, resolve_tokenizer

    if tokenizer is None and manifest is None:
        raise InputError("--decode needs --tokenizer: there is no manifest.json naming the one used")
    path = resolve_tokenizer(tokenizer) if tokenizer else Path(manifest["tokenizer"]["path"])
    if not path.is_file():
        raise InputError(f"the manifest's tokenizer {path} is gone; pass --tokenizer")
    reference = load_reference(path)
    return lambda ids: reference.decode(ids, skip_special_tokens=False)
