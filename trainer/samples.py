"""Where the trainer's samples come from, and which of them each rank reads at each step: gpt-neox's order.

Sources, per split, are either a build-shards output directory (its blend.json: shards and weights, read as
gpt-neox reads `train_data_paths` and `train_data_weights`) or gpt-neox's data keys: `train_data_paths` /
`train_data_weights` (and valid/test; no weights means equal weights, as in gpt-neox), or one `data_path` (a
prefix, a build-shards directory, or Megatron's "w1 p1 w2 p2 ..." blend) cut into train/valid/test document ranges
by `split` as Megatron cuts it.

As gpt-neox builds them: a split of N samples (train: train_iters x global batch; valid: (train_iters //
eval_interval + 1) x eval_iters x global batch, a fresh part at each evaluation; test: eval_iters x global batch)
is a GPTDataset of ceil(N x weight x 1.005) samples per source, blended by BlendableDataset's rule; one `data_path`
prefix is a single GPTDataset of N samples. Step s reads global samples [s x G, (s + 1) x G); micro-batch m of
data-parallel rank r reads the `micro` samples from s x G + (m x dp + r) x micro (DistributedBatchSampler's
split); a read past the data wraps as gpt-neox's loader cycles (modulo its whole batches). Which samples a step
reads is a function of the position alone: resuming restores the position exactly, and nothing is cached between
steps (gpt-neox's itertools.cycle grows host memory over a run).
"""

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import xxhash

from pile_tools.components import SPLITS, split_weights
from pile_tools.indexed import check_pair, read_index
from pile_tools.shards_dir import directory_of, manifest_entries, manifest_tokenizer, read_blend, read_manifest
from trainer.config import ConfigError, DataConfig, NeoXConfig
from trainer.data import BlendedDataset, GPTDataset, blend_index, neox_weights
from trainer.model import IGNORED, document_layout


@dataclass
class Source:
    """A shard of a split with its blend weight (and, for one data_path cut by split, its documents)."""

    prefix: Path
    weight: float
    documents: range | None = None  # a document range of the shard, for `data_path` with `split`


def check_prefix(prefix: Path, key: str) -> Path:
    """`prefix`, or a ConfigError naming `key` when its .bin or .idx is missing."""
    for suffix in (".bin", ".idx"):
        if not Path(f"{prefix}{suffix}").is_file():
            raise ConfigError(f"{key}: {prefix}{suffix} does not exist")
    return prefix


def sources_from_blend(data_dir: Path, key: str) -> dict[str, list[Source]]:
    """Shards and weights of each split from a build-shards output's blend.json."""
    splits = read_blend(data_dir)
    if splits is None:
        raise ConfigError(f"{key}: {data_dir} holds no blend.json (is it a build-shards output?)")
    return {
        split: [Source(check_prefix(prefix, key), weight) for prefix, weight, _ in splits[split]] for split in SPLITS
    }


def megatron_split(split: str, documents: int) -> list[range]:
    """Megatron's train/valid/test document ranges for a `split` like "969,30,1"."""
    parts = split_weights(split, exactly_three=False)
    if parts is None:
        raise ConfigError(f"split: expected three numbers >= 0 like 969,30,1, got {split!r}")
    bounds = [0]
    for p in parts:
        bounds.append(bounds[-1] + int(round(p / sum(parts) * documents)))
    bounds = [b - (bounds[-1] - documents) if i else 0 for i, b in enumerate(bounds)]
    return [range(bounds[i], bounds[i + 1]) for i in range(3)]


def weighted_prefixes(value, key: str) -> list[tuple[float, Path]]:
    """`data_path` as Megatron writes it: one prefix, or alternating weights and prefixes."""
    items = value.split() if isinstance(value, str) else list(value)
    if len(items) == 1:
        return [(1.0, Path(items[0]))]
    if len(items) % 2:
        raise ConfigError(f"{key}: expected one prefix or pairs of weight and prefix, got {value!r}")
    try:
        return [(float(items[i]), Path(items[i + 1])) for i in range(0, len(items), 2)]
    except ValueError:
        raise ConfigError(f"{key}: expected pairs of weight and prefix, got {value!r}") from None


def sources_from_keys(data: DataConfig) -> dict[str, list[Source]]:
    """gpt-neox's data keys as sources per split."""
    if data.train_data_paths:
        out = {}
        for split in SPLITS:
            paths = getattr(data, f"{split}_data_paths") or []
            weights = getattr(data, f"{split}_data_weights") or [1.0] * len(paths)  # gpt-neox's default
            out[split] = [Source(check_prefix(Path(p), f"{split}_data_paths"), w) for p, w in zip(paths, weights)]
        return out
    value = data.data_path
    if isinstance(value, str) and Path(value).is_dir():
        return sources_from_blend(Path(value), "data_path")
    pairs = [(w, check_prefix(p, "data_path")) for w, p in weighted_prefixes(value, "data_path")]
    ranges = {p: megatron_split(data.split, len(shard_sizes(p))) for _, p in pairs}
    return {name: [Source(p, w, ranges[p][i]) for w, p in pairs] for i, name in enumerate(SPLITS)}


def shard_sizes(prefix: Path) -> np.ndarray:
    """The documents' token counts from a shard's .idx."""
    return read_index(Path(f"{prefix}.idx"))[1]


def resolve_sources(data: DataConfig) -> dict[str, list[Source]]:
    """Sources per split: --data DIR first, then the config's keys; a clear error when there are none. With
    weight_by_num_documents, each split's shards are weighted by their document counts, as gpt-neox does."""
    if data.data_dir is not None:
        if not Path(data.data_dir).is_dir():
            raise ConfigError(f"--data: {data.data_dir} is not a directory")
        sources = sources_from_blend(Path(data.data_dir), "--data")
    elif not data.train_data_paths and not data.data_path:
        raise ConfigError(
            "no training data: give --data DIR (a build-shards output), or data_path or train_data_paths in the config"
        )
    else:
        sources = sources_from_keys(data)
    if not data.weight_by_num_documents or any(s.documents is not None for s in sources.get("train", [])):
        return sources  # one data_path cut by split is not a blend: gpt-neox weighs only separate paths
    return {
        split: [
            replace(s, weight=w)
            for s, w in zip(shards, weights_by_num_documents([len(shard_sizes(s.prefix)) for s in shards], data))
        ]
        for split, shards in sources.items()
    }


def weights_by_num_documents(counts: list[int], data: DataConfig) -> list[float]:
    """gpt-neox's weights from document counts n (out of N): p = (n / N) ** alpha normalised, times 1 - n / N,
    normalised; the same float operations in the same order, so the blend is its blend."""
    if len(counts) <= 1:
        return [1.0] * len(counts)
    total = sum(counts)
    shares = [n / total for n in counts]
    probs = [p**data.weighted_sampler_alpha for p in shares]
    norm = sum(probs)
    probs = [p / norm for p in probs]
    weights = [p * q for p, q in zip(probs, [1 - share for share in shares])]
    norm = sum(weights)
    return [w / norm for w in weights]


def shards_manifest(data_dir: Path | None) -> dict:
    """The manifest.json of a build-shards directory, or {}."""
    return read_manifest(data_dir) if data_dir else {}


def check_shards(sources: dict[str, list[Source]], vocab_size: int) -> None:
    """Before any work, in milliseconds: every .bin agrees with its .idx, and the largest id that build-shards
    recorded (in the manifest of DIR/split/component) fits the vocabulary. A ConfigError names the shard."""
    manifests: dict[Path, dict] = {}  # one read per build-shards directory, not per shard
    for prefix in {s.prefix for split in sources.values() for s in split}:
        if (problem := check_pair(prefix)) is not None:
            raise ConfigError(problem)
        root = directory_of(prefix)
        if root not in manifests:
            manifests[root] = read_manifest(root)
        manifest = manifests[root]
        limit = min(vocab_size, manifest.get("tokenizer", {}).get("vocab_size", vocab_size))
        max_id = manifest_entries(manifest).get(f"{prefix.parent.name}/{prefix.name}", {}).get("max_id")
        if max_id is not None and max_id >= limit:
            raise ConfigError(f"shard {prefix}: token id {max_id:,} is outside the vocabulary ({limit:,} ids)")


def fallback_cache_dir(save: Path | None) -> Path:
    """Where sample indices go when the shards' directory is read-only: under --save, else the user's cache."""
    if save is not None:
        return Path(save) / "index-cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "neox-data" / "index-cache"


def cache_dir(prefix: Path, fallback: Path | None) -> Path:
    """`index-cache/` beside the shard when that place is writable; nothing is ever written beside read-only data."""
    beside = prefix.parent / "index-cache"
    writable = os.access(beside if beside.is_dir() else prefix.parent, os.W_OK)
    return beside if writable else fallback or fallback_cache_dir(None)


def source_samples(sources: list[Source], num_samples: int) -> list[int]:
    """Samples each source's GPTDataset indexes: ceil(N x weight x 1.005) (gpt-neox's 0.5% margin, so a blend that
    strays from its weights still has samples), or exactly N for a single `data_path` prefix, which gpt-neox does
    not blend."""
    if len(sources) == 1 and sources[0].documents is not None:
        return [num_samples]
    return [int(math.ceil(num_samples * w * 1.005)) for w in neox_weights([s.weight for s in sources])]


def split_dataset(
    sources: list[Source],
    num_samples: int,
    seq_length: int,
    seed: int,
    vocab_size: int | None = None,
    fallback: Path | None = None,
) -> BlendedDataset | None:
    """The blend of `sources` as gpt-neox builds it for a split of `num_samples` samples (None when the split has
    no data); its blend index holds the samples a run of that size reads."""
    sources = [s for s in sources if s.documents is None or len(s.documents)]
    if not sources or num_samples == 0:
        return None
    datasets = [
        GPTDataset(s.prefix, n, seq_length, seed, cache_dir(s.prefix, fallback), s.documents, vocab_size)
        for s, n in zip(sources, source_samples(sources, num_samples))
    ]
    size = min(num_samples, sum(len(d) for d in datasets))
    source, within = blend_index([s.weight for s in sources], size)
    names, weights = [s.prefix.name for s in sources], [s.weight for s in sources]
    return BlendedDataset(datasets, source, within, names=names, weights=weights)


def split_samples(config: NeoXConfig, global_batch: int) -> dict[str, int]:
    """Samples each split holds, as gpt-neox sizes them: every evaluation reads a fresh eval_iters x G."""
    t = config.training
    evaluations = t.train_iters // t.eval_interval + 1 if t.eval_interval else 1
    return {
        "train": t.train_iters * global_batch,
        "valid": evaluations * t.eval_iters * global_batch,
        "test": t.eval_iters * global_batch,
    }


def build_datasets(
    config: NeoXConfig, sources: dict[str, list[Source]], global_batch: int, fallback: Path, splits=SPLITS
) -> dict:
    """The datasets of `splits` (train, valid and test) sized to what the run reads; their indices cached beside
    the shards, or under `fallback` where that is read-only."""
    t = config.training
    out = {}
    for split, samples in split_samples(config, global_batch).items():
        if split not in splits:
            continue
        try:
            out[split] = split_dataset(
                sources.get(split, []), samples, t.seq_length, t.seed, config.model.vocab_size, fallback
            )
        except ValueError as e:  # a source with no tokens
            raise ConfigError(f"{split} data: {e}") from None
    if out["train"] is None:
        raise ConfigError("the training split holds no data")
    return out


def readable(size: int, loader_batch: int) -> int:
    """gpt-neox's loader yields whole batches of micro x dp samples and then cycles: the samples it ever reads."""
    return max(loader_batch, size - size % loader_batch)


def sample_positions(step: int, micro_step: int, micro: int, dp: int, rank: int, global_batch: int, size: int):
    """Positions in the dataset of the `micro` samples that data-parallel rank `rank` reads at (step, micro_step)."""
    start = step * global_batch + (micro_step * dp + rank) * micro
    return np.arange(start, start + micro) % readable(size, micro * dp)


def micro_batch(dataset, step: int, micro_step: int, micro: int, dp: int, rank: int, global_batch: int):
    """Those samples' tokens, as int64 (micro, seq + 1)."""
    where = sample_positions(step, micro_step, micro, dp, rank, global_batch, len(dataset))
    return torch.from_numpy(np.stack([dataset[int(i)] for i in where]))


def data_order(dataset: BlendedDataset, config: NeoXConfig, global_batch: int, dp: int, step: int) -> dict:
    """What decided the samples of a run's step `step` (numbered from 1, as the log numbers them), kept in the
    checkpoint of that step so that a resume can tell whether its settings give the order the run had: the train
    shards (documents, tokens, weight), seq_length, seed, the train samples (train_iters x global batch: gpt-neox
    sizes every shard's shuffle by them), the global batch, and an xxh3 of the token ids of that step, all ranks'."""
    t = config.training
    shards = [
        {
            "shard": "/".join(d.shard.prefix.parts[-2:]),
            "documents": len(d.documents),
            "tokens": int(np.asarray(d.shard.sizes[d.documents.start : d.documents.stop]).sum(dtype=np.int64)),
            "weight": w,
        }
        for d, w in zip(dataset.sources, dataset.weights)
    ]
    positions = np.arange(max(0, step - 1) * global_batch, step * global_batch)  # step 0: none yet
    positions %= readable(len(dataset), t.train_micro_batch_size_per_gpu * dp)
    digest = xxhash.xxh3_64()
    for i in positions:
        digest.update(dataset[int(i)].tobytes())
    return {
        "step": step,
        "shards": shards,
        "seq_length": t.seq_length,
        "seed": t.seed,
        "train_samples": split_samples(config, global_batch)["train"],
        "global_batch": global_batch,
        "xxh3": digest.hexdigest(),
    }


SHOWN = 3  # shards named in a changed order's warning; the rest are counted


def order_changes(saved: dict, now: dict) -> list[str]:
    """What differs between two data_order records of one step, in words; empty when the step's samples agree."""
    if saved["xxh3"] == now["xxh3"]:
        return []
    changes = [
        f"{what} {saved[key]} -> {now[key]}"
        for key, what in (
            ("seed", "seed"),
            ("seq_length", "seq_length"),
            ("global_batch", "global batch"),
            ("train_samples", "train samples (train_iters x global batch)"),
        )
        if saved[key] != now[key]
    ]
    before, after = ({s["shard"]: s for s in r["shards"]} for r in (saved, now))
    shards = [f"{name} no longer read" for name in sorted(before.keys() - after.keys())]
    shards += [f"{name} added" for name in sorted(after.keys() - before.keys())]
    for name in sorted(before.keys() & after.keys()):
        a, b = before[name], after[name]
        if (a["documents"], a["tokens"]) != (b["documents"], b["tokens"]):
            shards.append(
                f"{name} {a['documents']:,} -> {b['documents']:,} documents, {a['tokens']:,} -> {b['tokens']:,} tokens"
            )
        elif not math.isclose(a["weight"], b["weight"], rel_tol=1e-9):
            shards.append(f"{name} weight {a['weight']:.4g} -> {b['weight']:.4g}")
    if len(shards) > SHOWN:
        shards = shards[:SHOWN] + [f"{len(shards) - SHOWN} more train shards differ"]
    return changes + shards or [
        "the same shards, sizes and settings, other tokens (shards rebuilt with another tokenizer?)"
    ]


def data_directory(data: DataConfig) -> Path | None:
    """--data, else the config's `data_path` when it names a build-shards directory, else None."""
    if data.data_dir:
        return Path(data.data_dir)
    value = data.data_path
    return Path(value) if isinstance(value, str) and Path(value).is_dir() else None


def train_dataset(config: NeoXConfig, world_size: int) -> BlendedDataset:
    """The train split's dataset of a run of `world_size` processes, as `train` builds it (shards checked)."""
    sources = resolve_sources(config.data)
    check_shards(sources, config.model.vocab_size)
    global_batch = config.global_batch(world_size)
    return build_datasets(config, sources, global_batch, fallback_cache_dir(None), ("train",))["train"]


def step_positions(config: NeoXConfig, dataset: BlendedDataset, step: int, world_size: int) -> np.ndarray:
    """The dataset positions of the samples `train` reads at step `step` (numbered from 1 as its log and
    metrics.jsonl number steps): every rank's micro-batches, in order."""
    t = config.training
    if not 1 <= step <= t.train_iters:
        raise ConfigError(f"--step {step}: the run has steps 1 to {t.train_iters}")
    micro, dp = t.train_micro_batch_size_per_gpu, config.data_parallel_size(world_size)
    where = [
        sample_positions(step - 1, m, micro, dp, r, config.global_batch(world_size), len(dataset))
        for m in range(t.gradient_accumulation_steps)
        for r in range(dp)
    ]  # ranks and micro-batches in order
    return np.concatenate(where)


def global_batch_at(config: NeoXConfig, step: int, world_size: int) -> np.ndarray:
    """The token ids (global batch, seq_length + 1) that `train` reads at step `step`, in sample order (Pythia's
    "batch viewer")."""
    if not 1 <= step <= config.training.train_iters:  # before any index is built
        raise ConfigError(f"--step {step}: the run has steps 1 to {config.training.train_iters}")
    dataset = train_dataset(config, world_size)
    return np.stack([dataset[int(i)] for i in step_positions(config, dataset, step, world_size)])


def shards_eod(data: DataConfig) -> int | None:
    """The EOD id the shards' manifest records, or None (shards of Megatron or gpt-neox)."""
    return shards_manifest(data_directory(data)).get("tokenizer", {}).get("eod")


def document_starts(sample: np.ndarray, eod: int) -> list[int]:
    """Where the documents a sample (seq_length + 1 ids) shows the model start: its first input, and each input
    after an EOD (the last id is a target only)."""
    return [0, *(np.flatnonzero(np.asarray(sample[:-2]) == eod) + 1).tolist()]


def shards_tokenizer(data: DataConfig):
    """A decoder (ids -> text) for the run's tokenizer: the config's, else the one the shards' manifest names;
    None when neither is there."""
    path = data.tokenizer_file or manifest_tokenizer(shards_manifest(data_directory(data)))
    if not path or not Path(path).exists():
        return None
    from pile_tools.encoding import load_reference, resolve_tokenizer

    reference = load_reference(resolve_tokenizer(str(path)))
    return lambda ids: reference.decode(ids, skip_special_tokens=False)


@dataclass(frozen=True)
class Packing:
    """How the documents a sample packs are shown to the model (TrainingConfig's eod_mask_loss,
    reset_attention_mask, reset_position_ids), given the EOD id that closes each document."""

    eod: int | None = None
    mask_loss: bool = False
    attention: bool = False
    positions: bool = False

    @classmethod
    def of(cls, config: NeoXConfig, eod: int | None) -> "Packing":
        """The config's packing (all off unless asked for; then `eod` is needed)."""
        t = config.training
        return cls(eod, t.eod_mask_loss, t.reset_attention_mask, t.reset_position_ids)

    @property
    def on(self) -> bool:
        return self.mask_loss or self.attention or self.positions

    def split(self, ids: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """(the model's inputs as keyword arguments, targets) of samples (batch, seq + 1): ids, and with packing
        each token's position in its document and its document's index; the targets of EOD inputs IGNORED under
        eod_mask_loss. All off, exactly what the model saw before packing existed."""
        inputs, targets = ids[:, :-1], ids[:, 1:]
        if not self.on:
            return {"ids": inputs}, targets
        if self.mask_loss:
            targets = targets.masked_fill(inputs == self.eod, IGNORED)
        positions, documents = document_layout(inputs, self.eod, self.positions, self.attention)
        return {"ids": inputs, "positions": positions, "documents": documents}, targets
