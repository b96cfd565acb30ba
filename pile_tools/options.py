"""build-shards' options, built once by its command: a module of their own, light to import (a Ray driver needs
them, not the build)."""

from dataclasses import dataclass

from pile_tools.components import split_weights
from pile_tools.ground import InputError


def parse_split(split: str) -> list[float]:
    """--split's three train,valid,test weights, or an InputError saying how to write them."""
    weights = split_weights(split, exactly_three=True)
    if weights is None:
        raise InputError(
            f"--split {split!r}: give 3 non-negative weights for train,valid,test, like 995,4,1 "
            "(0 leaves a split out: 1,0,0 is train only)"
        )
    return weights


@dataclass(frozen=True)
class BuildOptions:
    """build-shards' options, built once by its command and passed whole: what decides the output bytes (recorded
    in plan.json, whose hash is the run's fingerprint), then how the work is run (which never changes them)."""

    split: str = "995,4,1"  # train,valid,test weights
    weights: str = "pile"  # epochs per component: pile, none, or a JSON file
    component: str | None = None  # for documents without meta.pile_set_name (default: the file's name)
    part_size: int = 256 << 20  # uncompressed .jsonl inputs are cut into parts of this many bytes
    max_doc_bytes: int = 0  # longer documents are skipped and counted; 0: no limit
    materialize: bool = False  # also write the train split's repeats as one dataset
    seed: int = 1234  # of --materialize's fractions
    workers: int = 1  # encoding processes
    rank: int = 0  # this process's share of the parts, of world_size
    world_size: int = 1
    strict: bool = False  # a bad line is an error, not a counted skip

    def decisive(self) -> dict:
        """The options plan.json records: those that decide the bytes, --split checked and parsed."""
        return {
            "split": parse_split(self.split),
            "weights": self.weights,
            "component": self.component,
            "part_size": self.part_size,
            "max_doc_bytes": self.max_doc_bytes,
            "materialize": self.materialize,
            "seed": self.seed,
        }
