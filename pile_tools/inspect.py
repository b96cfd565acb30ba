"""inspect: counts per shard, a consistency check of each .bin/.idx pair, and documents decoded back."""

import warnings
from pathlib import Path

import numpy as np

from pile_tools.ground import InputError
from pile_tools.indexed import Shard, check_pair
from pile_tools.shards_dir import directory_of, has_manifest, manifest_tokenizer, read_manifest
from pile_tools.sourcemap import SourceMap


def find_shards(target: Path) -> tuple[list[Path], Path | None]:
    """Shard prefixes under a build-shards directory (or the one prefix given), and that directory when it holds
    a manifest."""
    if target.is_dir():
        prefixes = sorted(p.with_suffix("") for p in target.rglob("*.idx") if ".parts" not in p.parts)
        directory = target
    else:
        prefix = target.with_suffix("") if target.suffix in (".bin", ".idx") else target
        prefixes = [prefix] if Path(f"{prefix}.idx").is_file() else []
        directory = directory_of(prefix)
    if not prefixes:
        raise InputError(f"{target}: no .bin/.idx shards found")
    return prefixes, directory if has_manifest(directory) else None


def inspect(target: str, decode: int, tokenizer: str | None, chars: int, echo) -> None:
    """Print the table; an InputError after it when any pair is corrupt (so the command exits non-zero)."""
    root = Path(target)
    prefixes, directory = find_shards(root)
    manifest = read_manifest(directory) if directory else None
    decoder = load_decoder(tokenizer, manifest) if decode else None
    sources = SourceMap(directory, manifest) if manifest else None
    base = root if root.is_dir() else prefixes[0].parent
    echo(f"{'shard':<40} {'dtype':>6} {'documents':>10} {'tokens':>13} {'tok/doc':>8}  check")
    total_docs = total_tokens = 0
    corrupt = []
    for prefix in prefixes:
        name = str(prefix.relative_to(base)) if prefix.is_relative_to(base) else str(prefix)
        problem = check_pair(prefix)
        try:
            shard = Shard(prefix)
        except (OSError, ValueError):  # unreadable: no counts to show
            corrupt.append(name)
            echo(f"{name:<40} CORRUPT: {problem}")
            continue
        tokens = int(np.asarray(shard.sizes, np.int64).sum())
        total_docs, total_tokens = total_docs + len(shard), total_tokens + tokens
        echo(
            f"{name:<40} {shard.dtype.name:>6} {len(shard):>10,} {tokens:>13,} "
            f"{tokens / max(1, len(shard)):>8.0f}  {'ok' if problem is None else 'CORRUPT: ' + problem}"
        )
        if problem is not None:
            corrupt.append(name)
            continue
        key = f"{prefix.parent.name}/{prefix.name}"
        for i in range(min(decode, len(shard))):
            text = decoder(shard[i].tolist())
            where = ""
            if sources and sources.covers(key):  # the file's name: the manifest's inputs give its whole path
                file, line = sources.locate(key, i)
                where = f", from {Path(file).name}:{line}"
            echo(f"--- {name} document {i} ({len(shard[i])} tokens{where}) ---")
            echo(text[:chars] + (" [...]" if len(text) > chars else ""))
    echo(f"{'total':<40} {'':>6} {total_docs:>10,} {total_tokens:>13,}")
    if manifest:
        skipped = manifest.get("skipped") or {}
        weights = manifest["options"].get("weights")
        echo(
            f"tokenizer sha256 {manifest['tokenizer']['sha256'][:12]}..., weights {weights}, "
            f"skipped lines: {sum(skipped.values())}"
        )
    if corrupt:
        raise InputError(f"{len(corrupt)} corrupt shard(s): {', '.join(corrupt)}; the full audit: neox-data verify")


def load_decoder(tokenizer: str | None, manifest: dict | None):
    """A decoder for --decode: the tokenizer given, else the manifest's, with a warning if they differ."""
    from pile_tools.encoding import file_sha256, load_reference, resolve_tokenizer

    if tokenizer is None and manifest is None:
        raise InputError("--decode needs --tokenizer: there is no manifest.json naming the one used")
    path = resolve_tokenizer(tokenizer) if tokenizer else manifest_tokenizer(manifest)
    if path is None:
        raise InputError(
            f"the manifest's tokenizer {manifest['tokenizer']['path']} is gone, or is no longer the file the shards "
            "were built with (its sha256 differs); pass --tokenizer"
        )
    if tokenizer and manifest and file_sha256(path) != manifest["tokenizer"]["sha256"]:
        built = manifest["tokenizer"]["sha256"][:12]
        warnings.warn(
            f"--tokenizer {tokenizer} is not the tokenizer these shards were built with (sha256 {built}"
            "...): the decoded text will be wrong",
            stacklevel=2,
        )
    reference = load_reference(path)
    return lambda ids: reference.decode(ids, skip_special_tokens=False)
