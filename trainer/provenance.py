"""Where a step's tokens came from, and when each train shard starts its next epoch: `neox-data batch --sources`
and `neox-data batch --epochs`.

A sample's sources are the documents it spans, in order, each with the token range of the document it holds: the
sample is their concatenation (a document's tokens are its text encoded, EOD appended). Through the shards' source
map (pile_tools/sourcemap.py) each document is also an input file and line.

Epochs: gpt-neox shuffles the copies of a shard's documents for all its epochs as one array (doc_idx), and then
the samples cut from them, so epoch 2 is not a block of steps: it begins at the first step that reads any document
a second time, i.e. from a second of its copies. For each train shard: epoch k begins at the first step that reads
some document's k-th copy, copies counted in the order the run first reads them.
"""

from pathlib import Path

import numpy as np

from pile_tools.shards_dir import directory_of, read_manifest
from pile_tools.sourcemap import SourceMap
from trainer.config import NeoXConfig
from trainer.data import BlendedDataset, GPTDataset
from trainer.samples import readable, step_positions, train_dataset


class Provenance:
    """Each shard's component and source map, read once per build-shards directory."""

    def __init__(self):
        self.maps: dict[Path, SourceMap | None] = {}
        self.missing: set[str] = set()

    def origin(self, prefix: Path) -> tuple[SourceMap | None, str, str | None]:
        """(the source map of the shard's directory or None, the shard's name `train/github`, its component)."""
        root, name = directory_of(prefix), f"{prefix.parent.name}/{prefix.name}"
        if root not in self.maps:
            manifest = read_manifest(root)
            self.maps[root] = SourceMap(root, manifest) if manifest else None
        found = self.maps[root]
        if found is None or not found.covers(name):
            self.missing.add(str(prefix))
            return None, name, (found.components.get(name) if found else None)
        return found, name, found.components[name]

    def describe(self, prefix: Path, copy: int, document: int, start: int, end: int) -> dict:
        """One source of a sample: file and line (None without a source map), component, shard, document, tokens,
        and which copy of the document it is (its position in gpt-neox's doc_idx, which holds one copy of each
        document per epoch, shuffled)."""
        found, name, component = self.origin(prefix)
        file, line = found.locate(name, document) if found else (None, None)
        return {
            "file": file,
            "line": line,
            "component": component,
            "shard": str(prefix),
            "document": document,
            "tokens": [start, end],
            "copy": copy,
        }


def batch_sources(config: NeoXConfig, step: int, world_size: int, decode=None) -> tuple[dict, list[str]]:
    """{"step", "samples": [{"tokens", "sources": [...]}]} of a step (with each source's "text" when `decode`), and
    the shards that have no source map (their file and line are None)."""
    dataset = train_dataset(config, world_size)
    provenance, samples = Provenance(), []
    for position in step_positions(config, dataset, step, world_size):
        source, spans = dataset.spans(int(position))
        shard = dataset.sources[source].shard
        described = [provenance.describe(shard.prefix, *span) for span in spans]
        if decode is not None:
            for row, (_, doc, start, end) in zip(described, spans):
                row["text"] = decode(shard[doc][start:end].tolist())
        samples.append({"tokens": dataset[int(position)].tolist(), "sources": described})
    return {"step": step, "samples": samples}, sorted(provenance.missing)


def first_reads(dataset: GPTDataset, within: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The first step that reads each copy of a document (each position of doc_idx), from the samples `within` it
    that the run reads at `steps`; a large number for a copy never read.

    Sample j spans the copies sample_idx[j, 0] .. sample_idx[j + 1, 0]; the samples touching copy q are then the
    consecutive J0(q) .. J1(q), and the first read of q the minimum of those samples' steps, taken for every q at
    once by one np.minimum.reduceat over (J0, J1 + 1) pairs."""
    never = np.iinfo(np.int64).max
    count = len(dataset.shuffle_idx)
    j = np.asarray(dataset.shuffle_idx)[np.where(within < count, within, within % max(1, len(dataset)))]
    sample_step = np.full(count + 1, never, np.int64)  # one past the samples: the sentinel for copies never read
    np.minimum.at(sample_step, j, steps)
    firsts, lasts = np.asarray(dataset.sample_idx[:count, 0]), np.asarray(dataset.sample_idx[1 : count + 1, 0])
    copies = np.arange(len(dataset.doc_idx))
    lo, hi = np.searchsorted(lasts, copies, "left"), np.searchsorted(firsts, copies, "right")  # [J0, J1 + 1)
    valid = lo < hi
    pairs = np.stack([np.where(valid, lo, count), np.where(valid, hi, count)], axis=1).ravel()
    return np.minimum.reduceat(sample_step, pairs)[::2]


def epoch_steps(dataset: GPTDataset, within: np.ndarray, steps: np.ndarray) -> list[int]:
    """The step at which each epoch of a shard begins in the run (epoch k: the first step reading some document's
    k-th copy, copies ranked by their first read); only the epochs the run reaches."""
    touched = first_reads(dataset, within, steps)
    documents = np.asarray(dataset.doc_idx, np.int64)
    read = touched < np.iinfo(np.int64).max
    documents, touched = documents[read], touched[read]
    order = np.lexsort((touched, documents))
    documents, touched = documents[order], touched[order]
    group_start = np.flatnonzero(np.r_[True, documents[1:] != documents[:-1]])
    rank = np.arange(len(documents)) - np.repeat(group_start, np.diff(np.r_[group_start, len(documents)]))
    return [int(touched[rank == k].min()) for k in range(int(rank.max()) + 1 if len(rank) else 0)]


def epoch_starts(config: NeoXConfig, world_size: int) -> list[dict]:
    """For each train shard of the run: its name, component and the step each of its epochs begins at."""
    dataset: BlendedDataset = train_dataset(config, world_size)
    t, global_batch = config.training, config.global_batch(world_size)
    loader_batch = t.train_micro_batch_size_per_gpu * config.data_parallel_size(world_size)
    reads, size = t.train_iters * global_batch, readable(len(dataset), loader_batch)
    positions = None if reads <= size else np.arange(reads, dtype=np.int64) % size  # the loader's wrap, if any
    which = np.asarray(dataset.source)[:reads] if positions is None else np.asarray(dataset.source)[positions]
    provenance, out = Provenance(), []
    for k, source in enumerate(dataset.sources):
        read = np.flatnonzero(which == k)  # the run's k-th reads of this shard, in order: 8 bytes a sample
        within = np.asarray(dataset.within)[read if positions is None else positions[read]]
        _, _, component = provenance.origin(source.shard.prefix)
        starts = epoch_steps(source, within, read // global_batch + 1)
        out.append({"shard": str(source.shard.prefix), "component": component, "epochs": starts})
    return out
